"""Batched photos (`Tag2Mask.predict_many`, `CAMStage.many`) give what one photo at a time gives.

Real test-split horses of mixed sizes (pass sizes at the balanced preset: 224x288 three times, 256x224
twice, 224x224, 224x320 and 224x352 once), with two different tag lists, on the real backbone (CPU).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import horse_stems
from explainers.errors import UnknownTagError
from explainers.imageio import load_image
from explainers.segment import PhotoResult, PipelineConfig, Tag2Mask
from explainers.segment.cam_stage import pass_size

STEMS = horse_stems("test")[:8]
TAG_LISTS = (["horse"], ["horse", "dog"])


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(pixel agreement, IoU) of two bool masks; two empty masks have IoU 1."""
    union = (a | b).sum()
    return float((a == b).mean()), float((a & b).sum() / union) if union else 1.0


def assert_same_result(got: PhotoResult, ref: PhotoResult) -> None:
    assert isinstance(got, PhotoResult), got
    assert (got.width, got.height) == (ref.width, ref.height)
    assert [t.tag for t in got.tags] == [t.tag for t in ref.tags]
    for g, r in zip(got.tags, ref.tags):
        pixels, iou = agreement(g.mask, r.mask)
        assert pixels > 0.99 and iou > 0.99, (g.tag, pixels, iou)
        assert g.score == pytest.approx(r.score, abs=1e-4)


@pytest.fixture(scope="module")
def engine(backbone):
    return Tag2Mask(backbone, PipelineConfig.preset("balanced"))


@pytest.fixture(scope="module")
def photos(horse_dir):
    return [load_image(horse_dir / "images" / f"{stem}.jpg") for stem in STEMS]


@pytest.fixture(scope="module")
def tag_lists():
    return [list(TAG_LISTS[i % 2]) for i in range(len(STEMS))]


@pytest.fixture(scope="module")
def reference(engine, photos, tag_lists):
    """`predict`, one photo at a time."""
    return [engine.predict(img, tags) for img, tags in zip(photos, tag_lists)]


@pytest.fixture(scope="module")
def batched(engine, photos, tag_lists):
    return engine.predict_many(photos, tag_lists, batch_size=8)


def test_photos_share_and_differ_in_pass_size(engine, photos):
    sizes = [pass_size(*img.shape[:2], 1.0, engine.config.cam) for img in photos]
    counts = sorted({s: sizes.count(s) for s in sizes}.values())
    assert len(counts) >= 3 and counts[-1] >= 3   # mixed sizes, and real batches of several photos


def test_cam_stage_many_matches_one_by_one(engine, photos, tag_lists):
    sets = [[engine.class_set(t) for t in tags] for tags in tag_lists]
    many = engine.cam_stage.many(photos, sets, max_batch=8)
    assert len(many) == len(photos)
    for img, s, got in zip(photos, sets, many):
        ref = engine.cam_stage(img, s)
        assert got.work_size == ref.work_size
        assert got.maps.shape == ref.maps.shape == (len(s), *ref.work_size)
        assert torch.allclose(got.maps, ref.maps, atol=1e-4)
        assert torch.allclose(got.probs, ref.probs, atol=1e-5)


def test_cam_stage_many_fused_layers_and_two_scales(backbone, photos, tag_lists):
    """Several fused layers group photos by working size too; two scales add up per photo."""
    cfg = PipelineConfig.preset("balanced").replace(**{"cam.fusion": True, "cam.scales": (1.0, 1.5)})
    engine = Tag2Mask(backbone, cfg)
    sets = [[engine.class_set(t) for t in tags] for tags in tag_lists[:4]]
    many = engine.cam_stage.many(photos[:4], sets, max_batch=3)
    for img, s, got in zip(photos, sets, many):
        ref = engine.cam_stage(img, s)
        assert torch.allclose(got.maps, ref.maps, atol=1e-4)
        assert torch.allclose(got.probs, ref.probs, atol=1e-5)


def test_predict_many_batches_every_photo(engine, photos, tag_lists):
    cams, seconds = engine._batched_cams(photos, tag_lists, 8)
    assert sorted(cams) == list(range(len(photos)))
    assert seconds > 0


def test_predict_many_matches_predict(batched, reference):
    assert len(batched) == len(reference)
    for got, ref in zip(batched, reference):
        assert_same_result(got, ref)
        assert {"cam", "crf", "total"} <= set(got.timings)
        assert got.timings["total"] >= got.timings["cam"] > 0


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_size_does_not_change_results(engine, photos, tag_lists, reference, batch_size):
    for got, ref in zip(engine.predict_many(photos, tag_lists, batch_size=batch_size), reference):
        assert_same_result(got, ref)


def test_bad_photos_fail_alone(engine, photos, tag_lists, reference):
    images = list(photos)
    tags = [list(t) for t in tag_lists]
    images[2] = photos[2][:, :, 0]            # 2-D: not an RGB photo
    tags[6] = ["no-such-thing"]               # no tag the classifier can name
    calls = []
    out = engine.predict_many(images, tags, progress=lambda done, total: calls.append((done, total)), batch_size=8)
    assert calls == [(i + 1, len(images)) for i in range(len(images))]
    assert isinstance(out[2], ValueError) and "RGB" in str(out[2])
    assert isinstance(out[6], UnknownTagError) and "'no-such-thing'" in str(out[6])
    cams, _ = engine._batched_cams(images, tags, 8)
    assert sorted(cams) == [0, 1, 3, 4, 5, 7]
    for i, (got, ref) in enumerate(zip(out, reference)):
        if i not in (2, 6):
            assert_same_result(got, ref)
            assert got.skipped == {}


def test_a_tag_that_cannot_be_segmented_leaves_the_others_batched(engine, photos, reference):
    """A photo tagged "horse" and a tag the classifier cannot name is still batched: its horse mask
    is the one of "horse" alone, the other tag is listed in `skipped` with its reason, as
    :meth:`predict` gives it."""
    tags = [["horse", "no-such-thing"], ["person", "horse", "dog"]]    # ImageNet-1k has no person class
    cams, _ = engine._batched_cams(photos[:2], tags, 8)
    assert sorted(cams) == [0, 1]
    out = engine.predict_many(photos[:2], tags, batch_size=8)
    one = [engine.predict(img, t) for img, t in zip(photos[:2], tags)]
    assert_same_result(out[0], reference[0])                           # photo 0's reference tags: ["horse"]
    assert_same_result(out[1], one[1]) and [t.tag for t in out[1].tags] == ["horse", "dog"]
    assert list(out[0].skipped) == ["no-such-thing"] and list(out[1].skipped) == ["person"]
    assert [o.skipped for o in out] == [o.skipped for o in one]
    assert "unknown tag 'no-such-thing'" in out[0].skipped["no-such-thing"]
    assert "tag 'person' has no class in the ImageNet-1k classifier" in out[1].skipped["person"]


def test_empty_tags_and_repeats(engine, photos, reference):
    out = engine.predict_many([photos[1], photos[0]], [[], ["horse", "horse"]], batch_size=8)
    assert out[0].tags == [] and (out[0].width, out[0].height) == (photos[1].shape[1], photos[1].shape[0])
    assert_same_result(out[1], reference[0])   # photo 0's reference tags: ["horse"]


def test_bad_arguments(engine, photos):
    with pytest.raises(ValueError, match="tag lists"):
        engine.predict_many(photos[:2], [["horse"]])
    with pytest.raises(ValueError, match="batch_size"):
        engine.predict_many(photos[:1], [["horse"]], batch_size=0)
