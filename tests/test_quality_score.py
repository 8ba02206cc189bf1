"""The estimated mask quality (explainers/segment/quality.py) on real photos, and the Label Studio scores it sets."""
from __future__ import annotations

import json

import numpy as np
import pytest

from backend.labelstudio.config import DEFAULT_LABEL_CONFIG, parse_label_config
from backend.labelstudio.results import make_prediction
from explainers.imageio import load_image
from explainers.segment import PipelineConfig, Tag2Mask
from explainers.segment.quality import FEATURES, MODEL_PATH, QualityModel, default_model, load_model
from tests.conftest import horse_and_mask, horse_stems

# test-split horses whose balanced masks are good (fg IoU 0.62, 0.88, 0.74 when written)
HORSES = horse_stems("test")[1:4]
NO_HORSE = "000000000009"   # coco128_dev: a bowl of oranges and broccoli on a table


class Recorder:
    """An estimator that keeps the features it is given and estimates nothing."""

    def __init__(self):
        self.rows = []

    def predict(self, features):
        self.rows.append(dict(features))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def engine(backbone):
    return Tag2Mask(backbone, PipelineConfig.preset("balanced"))


@pytest.fixture(scope="module")
def horses(horse_dir):
    return [horse_and_mask(horse_dir, stem) for stem in HORSES]


@pytest.fixture(scope="module")
def horse_results(engine, horses):
    return [engine.predict(img, ["horse"]) for img, _ in horses]


def test_a_good_mask_scores_above_a_wrong_tag_and_a_photo_without_the_object(engine, horses, horse_results,
                                                                             coco_dir):
    good = []
    for (img, gt), res in zip(horses, horse_results):
        (tm,) = res.tags
        assert iou(tm.mask, gt) > 0.6                      # the premise: these masks are good
        good.append(tm.quality)
        (wrong,) = engine.predict(img, ["pizza"]).tags     # a tag that is not in the photo gets a mask anyway
        assert wrong.mask.any() and wrong.quality < tm.quality, (tm.quality, wrong.quality)
    (absent,) = engine.predict(load_image(coco_dir / "images" / f"{NO_HORSE}.jpg"), ["horse"]).tags
    assert absent.quality < min(good), (absent.quality, good)
    assert min(good) > 0.5


def test_quality_lies_in_the_unit_interval_and_an_empty_mask_has_none(engine, horses, coco_dir):
    img = load_image(coco_dir / "images" / f"{NO_HORSE}.jpg")
    res = engine.predict(img, ["bowl", "orange", "broccoli", "horse", "zebra"])
    res2 = engine.predict(horses[0][0], ["horse", "cat"])
    tags = res.tags + res2.tags
    assert all(t.quality is not None and 0.0 <= t.quality <= 1.0 for t in tags)
    empty = [t for t in tags if not t.mask.any()]
    assert empty and all(t.quality == 0.0 for t in empty)    # e.g. the cat beside the horse
    assert all(0.0 <= t.score <= 1.0 for t in tags)          # score stays the tag probability
    qs = [t.quality for t in res.tags]
    assert res.quality == pytest.approx((np.mean(qs) + np.max(qs)) / 2)


def test_label_studio_scores_are_the_quality(engine, horses, horse_results):
    cfg = parse_label_config(DEFAULT_LABEL_CONFIG)
    res = horse_results[0]
    pred = make_prediction(res, cfg, "v-quality")
    assert pred["score"] == round(res.quality, 4) and res.quality != pytest.approx(res.score, abs=0.01)
    regions = [i for i in pred["result"] if i["type"] != "choices"]
    assert {i["type"] for i in regions} == {"brushlabels", "polygonlabels", "rectanglelabels"}
    assert all(i["score"] == round(res.tags[0].quality, 4) for i in regions)
    (choices,) = [i for i in pred["result"] if i["type"] == "choices"]
    assert choices["score"] == round(res.tags[0].score, 4)     # the choice keeps the tag probability
    # two tags: the prediction's score is the photo's quality, each region its own tag's
    two = engine.predict(horses[1][0], ["horse", "dog"])
    pred2 = make_prediction(two, cfg, "v-quality")
    assert pred2["score"] == round(two.quality, 4)
    by_label = {t.tag.capitalize(): t.quality for t in two.tags}
    for item in pred2["result"]:
        if item["type"] != "choices":
            label = item["value"][item["type"]][0]
            assert item["score"] == round(by_label[label], 4)


def test_the_stored_model_uses_exactly_the_features_the_pipeline_computes(engine, horses):
    model = load_model()
    assert default_model() is default_model() and default_model().features == model.features
    stored = json.loads(MODEL_PATH.read_text())
    engine.quality_model = recorder = Recorder()
    try:
        engine.predict(horses[0][0], ["horse", "dog"])
    finally:
        engine.quality_model = None
    assert len(recorder.rows) == 2
    for row in recorder.rows:
        assert set(row) == set(FEATURES) == set(stored["features"]) == set(model.features)
        assert all(np.isfinite(v) for v in row.values())
        assert 0.0 <= model.predict(row) <= 1.0


def test_a_drifted_or_mangled_model_file_is_refused(tmp_path):
    stored = json.loads(MODEL_PATH.read_text())
    drifted = dict(stored, features=[*stored["features"][:-1], "no_such_feature"])
    path = tmp_path / "drifted.json"
    path.write_text(json.dumps(drifted))
    with pytest.raises(ValueError, match="no_such_feature"):
        load_model(path)
    for bad in ({**stored, "coef": stored["coef"][:-1]}, {**stored, "scale": [0.0] * len(stored["scale"])},
                {**stored, "intercept": "NaN"}, {k: v for k, v in stored.items() if k != "mean"}):
        with pytest.raises(ValueError):
            QualityModel.from_dict(bad)
