"""Training machinery on real horse photos: split, feature cache, supervision, validation, determinism."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from explainers.imageio import load_image
from explainers.metrics import mask_to_box
from explainers.training import (
    FeatureCache,
    ProjectHeads,
    Sample,
    TrainConfig,
    average_precision,
    split_samples,
    tag_metrics,
    train_heads,
)
from explainers.heads import BackboneFeatures
from tests.conftest import horse_stems


@pytest.fixture(scope="module")
def horses(horse_dir):
    names = horse_stems("train")
    stems = [names[int(i * len(names) / 12)] for i in range(12)]
    out = []
    for s in stems:
        img = load_image(horse_dir / "images" / f"{s}.jpg")
        out.append((s, img, np.asarray(Image.open(horse_dir / "masks" / f"{s}.png")) > 0))
    return out


def test_average_precision_and_tag_metrics_by_hand():
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision([0.1, 0.9], [1, 0]) == pytest.approx(0.5)
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))
    m = tag_metrics(np.array([[0.9, 0.2], [0.6, 0.7], [0.1, 0.4]]), np.array([[1, 0], [0, 1], [0, 1]]))
    # decisions at 0.5: tp=2 (0,0),(1,1); fp=1 (1,0); fn=1 (2,1) -> F1 = 4 / 6
    assert m["f1"] == pytest.approx(4 / 6)
    assert m["map"] == pytest.approx((1.0 + 1.0) / 2)         # both labels' positives rank first


def test_split_is_seeded_stable_and_keeps_a_validation_sample():
    samples = [Sample(f"ann-{i}", ["x"]) for i in range(40)]
    train, val = split_samples(samples, 0.2, seed=3)
    assert len(train) + len(val) == 40 and 3 <= len(val) <= 14
    assert split_samples(samples, 0.2, seed=3)[1] == val                    # same seed, same split
    assert {s.key for s in split_samples(samples, 0.2, seed=4)[1]} != {s.key for s in val}
    more = samples + [Sample(f"ann-{i}", ["x"]) for i in range(40, 60)]
    _, val_more = split_samples(more, 0.2, seed=3)
    assert {s.key for s in val} <= {s.key for s in val_more}                # an example keeps its side
    _, few = split_samples(samples[:3], 0.01, seed=3)
    assert len(few) == 1                                                     # min_val when it can
    assert split_samples(samples[:1], 0.5, seed=3)[1] == []                 # never all of them


def test_feature_cache_runs_each_photo_once(backbone, horses):
    cache = FeatureCache(BackboneFeatures(backbone), size=160, flip=True)
    samples = [Sample(s, ["horse"], image=img) for s, img, _ in horses[:3]]
    first = cache.get(samples)
    again = cache.get(samples + [Sample("other-annotation", ["horse"], image=horses[0][1], photo_key=horses[0][0])])
    assert cache.computed == 3 and len(cache) == 3
    assert again[3] is first[0]                                              # same photo, same entry
    e = first[0]
    assert e["pooled"].shape == (2, 1280) and e["pooled"].device == backbone.device
    # the second view is the mirror image: its coarse map is (nearly) the first one mirrored
    a, b = e["maps"][-1][0], e["maps"][-1][1].flip(-1)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_training_is_deterministic_for_a_seed(backbone, horses):
    samples = [Sample(s, ["horse"], masks={"horse": m}, image=img) for s, img, m in horses[:6]]
    cfg = TrainConfig(size=128, seg_epochs=3, clf_epochs=20, seed=7)
    cache = FeatureCache(BackboneFeatures(backbone), 128, True)
    a = train_heads(backbone, samples, ["horse", "cow"], cfg, cache=cache)
    b = train_heads(backbone, samples, ["horse", "cow"], cfg, cache=cache)
    c = train_heads(backbone, samples, ["horse", "cow"], TrainConfig(size=128, seg_epochs=3, clf_epochs=20, seed=8),
                    cache=cache)
    for k, v in a.segmenter.state_dict().items():
        assert torch.equal(v, b.segmenter.state_dict()[k]), k
    assert a.validation == b.validation and a.val_keys == b.val_keys
    assert any(not torch.equal(v, c.segmenter.state_dict()[k]) for k, v in a.segmenter.state_dict().items())


def test_validation_scores_and_counts(backbone, horses):
    """8 masks train, 4 validate: fg IoU is measured on the held-out masks at the photos' size."""
    samples = [Sample(s, ["horse"], masks={"horse": m}, image=img) for s, img, m in horses[:8]]
    val = [Sample(s, ["horse"], masks={"horse": m}, image=img) for s, img, m in horses[8:]]
    cfg = TrainConfig(size=160, seg_epochs=20, seed=0)
    r = train_heads(backbone, samples, ["horse"], cfg, validation=val)
    assert r.counts["train"] == 8 and r.counts["val"] == 4 and r.counts["train_with_masks"] == 8
    assert r.validation["n_val_masks"] == 4
    assert 0.55 < r.validation["fg_iou"] <= 1.0, r.validation
    assert set(r.seconds) >= {"features", "classifier", "segmenter", "validation", "total"}
    # the checkpoint is plain data + tensors and brings the same heads back
    ck = r.checkpoint()
    buf = io.BytesIO()
    torch.save(ck, buf)
    buf.seek(0)
    heads = ProjectHeads.from_checkpoint(torch.load(buf, weights_only=True), backbone)
    img, mask = val[0].image, val[0].masks["horse"]
    p = heads.seg_probs(img)["horse"]
    assert p.shape == mask.shape and p.dtype == np.float32
    # tags-only training: a classifier, no seg head
    tags_only = train_heads(backbone, [Sample(s, ["horse"], image=img) for s, img, _ in horses[:4]]
                            + [Sample("neg", [], image=np.full((200, 300, 3), 90, np.uint8))], ["horse"],
                            TrainConfig(size=160, seed=0))
    assert tags_only.segmenter is None and tags_only.classifier is not None


def test_box_supervision_pushes_background_out_of_the_box(backbone, horses):
    """Box-only training with filled boxes (``box_mode="box"``): the prediction stays inside the boxes
    (outside is certain background). GrabCut pseudo-masks: tests/test_box_masks.py."""
    samples = []
    for s, img, m in horses[:8]:
        samples.append(Sample(s, ["horse"], boxes={"horse": [mask_to_box(m)]}, image=img))
    r = train_heads(backbone, samples, ["horse"], TrainConfig(size=160, seg_epochs=15, seed=0, box_mode="box"),
                    train_classifier_head=False, validation=[])
    heads = ProjectHeads(backbone, None, r.segmenter, r.layers, r.size)
    inside = outside = 0.0
    for s, img, m in horses[8:]:
        x0, y0, x1, y1 = mask_to_box(m)
        p = heads.seg_probs(img)["horse"]
        box = np.zeros(m.shape, bool)
        box[y0:y1, x0:x1] = True
        inside += float(p[box].mean())
        outside += float(p[~box].mean()) if (~box).any() else 0.0
    assert inside / 4 > 0.5 and outside / 4 < inside / 4 - 0.2, (inside, outside)


def test_device_and_input_checks(backbone, horses):
    s = [Sample("a", ["horse"], image=horses[0][1]), Sample("b", ["horse"], image=horses[1][1])]
    with pytest.raises(ValueError):
        train_heads(backbone, [], ["horse"])
    with pytest.raises(ValueError):
        train_heads(backbone, [Sample("a", [], image=horses[0][1])])        # nothing to learn
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            train_heads(backbone, s, ["horse"], TrainConfig(device="cuda"))
    with pytest.raises(ValueError):
        Sample("x").photo()

    # a photo that cannot be loaded is left out with its reason; the rest trains
    def broken():
        raise OSError("gone from the bucket")
    r = train_heads(backbone, s + [Sample("c", ["horse"], load=broken, photo_key="s3://gone.jpg")], ["horse"],
                    TrainConfig(size=96, clf_epochs=5), validation=[])
    assert r.counts["skipped"] == {"c": "OSError: gone from the bucket"} and r.counts["train"] == 2
    with pytest.raises(ValueError, match="no training photo"):
        train_heads(backbone, [Sample("d", ["horse"], load=broken)], ["horse"], TrainConfig(size=96))
