"""Self-training on real horse photos: pseudo-masks -> seg head -> fused pipeline, without ground truth.

12 train-split photos (their own pseudo-masks, no mask file is read for training; the 10 most
confident are kept) train a seg head in a few seconds; the fused pipeline is then scored on 6
test-split photos it never saw. Measured when the test was written (balanced preset, 1 thread):
plain pipeline fg IoU 0.631, head alone 0.738, fused 0.776. A collapsed head (all background, all
foreground or noise) pulls the fused masks far below the plain ones, so the test asks for the fused
masks to stay within 0.05 of the plain pipeline and above 0.5, and for the head alone to beat 0.4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import horse_stems
from explainers.imageio import load_image
from explainers.metrics import SegmentationScore
from explainers.segment import PipelineConfig, Tag2Mask
from explainers.segment.fusion import fuse_seg
from explainers.self_training import SelfTrainConfig, pseudo_targets, self_train
from explainers.training import ProjectHeads, TrainConfig

N_TRAIN, N_TEST = 12, 6


def _gt(horse_dir, stem):
    return np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0


@pytest.fixture(scope="module")
def engine(backbone):
    return Tag2Mask(backbone, PipelineConfig.preset("balanced"))


@pytest.fixture(scope="module")
def trained(engine, horse_dir):
    stems = horse_stems("train")[::20][:N_TRAIN]
    paths = [horse_dir / "images" / f"{s}.jpg" for s in stems]
    cfg = SelfTrainConfig(train=TrainConfig(size=256, seg_epochs=25, seed=0))
    return self_train(engine, paths, [["horse"]] * len(paths), cfg, keys=stems)


@pytest.fixture(scope="module")
def test_photos(horse_dir):
    stems = horse_stems("test")[::8][:N_TEST]
    return [(load_image(horse_dir / "images" / f"{s}.jpg"), _gt(horse_dir, s)) for s in stems]


def test_self_training_trains_a_seg_head_on_pseudo_masks(trained, engine):
    assert trained.labels == ["horse"] and trained.heads.segmenter is not None
    (stats,) = trained.rounds
    assert stats["used"] >= N_TRAIN - 2 and 0.5 < stats["supervised_share"] <= 1.0
    assert engine.heads is None                      # the engine is left as it was
    assert len(trained.pseudo) == N_TRAIN and all(p is not None for p in trained.pseudo)
    p = trained.pseudo[0]
    assert p.probs.shape[0] == 2 and np.allclose(p.probs.sum(0), 1.0, atol=1e-3)


def test_fused_pipeline_does_not_collapse(trained, backbone, engine, test_photos):
    fused = Tag2Mask(backbone, PipelineConfig.preset("balanced"), heads=trained.heads)
    plain, mixed, head = SegmentationScore(), SegmentationScore(), SegmentationScore()
    for img, gt in test_photos:
        plain.add(engine.predict(img, ["horse"]).tags[0].mask, gt)
        res = fused.predict(img, ["horse"])
        assert "fusion" in res.timings and res.tags[0].mask.shape == gt.shape
        mixed.add(res.tags[0].mask, gt)
        head.add(trained.heads.seg_probs(img, ["horse"])["horse"] >= 0.5, gt)
    p, m, h = (s.summary()["fg_iou"] for s in (plain, mixed, head))
    assert h > 0.4, f"the head alone learned nothing: fg IoU {h:.3f}"
    assert m >= max(0.5, p - 0.05), f"fused {m:.3f} vs plain {p:.3f}"


def test_checkpoint_round_trip_and_set_heads(trained, backbone, engine, test_photos, tmp_path):
    path = tmp_path / "heads.pt"
    torch.save(trained.checkpoint(), path)
    heads = ProjectHeads.from_checkpoint(torch.load(path, weights_only=True), backbone)
    img, _ = test_photos[0]
    a = trained.heads.seg_probs(img, ["horse"])["horse"]
    b = heads.seg_probs(img, ["horse"])["horse"]
    assert np.allclose(a, b, atol=1e-5)
    e = Tag2Mask(backbone, PipelineConfig.preset("balanced"))
    e.set_heads(heads)
    with_heads = e.predict(img, ["horse"])
    e.set_heads(None)
    without = e.predict(img, ["horse"])
    assert "fusion" in with_heads.timings and "fusion" not in without.timings
    assert np.array_equal(without.tags[0].mask, engine.predict(img, ["horse"]).tags[0].mask)
    # a tag the head lacks keeps the CAM alone: "cat" on a horse photo fuses nothing
    assert "fusion" not in e.__class__(backbone, heads=heads).predict(img, ["cat"]).timings


def test_heads_of_another_backbone_are_refused(trained, mobilenet):
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        Tag2Mask(mobilenet, heads=trained.heads)


def test_fuse_seg_weights_and_unknown_tags():
    rng = np.random.default_rng(0)
    unary = rng.random((3, 5, 6)).astype(np.float32) + 0.01
    unary /= unary.sum(0, keepdims=True)
    seg = {"horse": np.full((5, 6), 0.9, np.float32)}
    assert np.allclose(fuse_seg(unary, ["horse", "dog"], seg, 0.0), unary, atol=1e-3)
    full = fuse_seg(unary, ["horse", "dog"], seg, 1.0)
    assert np.allclose(full.sum(0), 1.0, atol=1e-5)
    assert np.allclose(full[1], 0.9, atol=1e-3)                      # the head decides for horse
    assert np.allclose(full[2] / full[0], unary[2] / unary[0], rtol=1e-2)   # dog vs background: the CAM's say
    half = fuse_seg(unary, ["horse", "dog"], seg, 0.5, mode="log")
    assert np.allclose(half.sum(0), 1.0, atol=1e-5) and (half[1] > unary[1] - 1e-6).all()
    assert fuse_seg(unary, ["cat", "dog"], seg, 0.7) is unary
    with pytest.raises(ValueError, match="mode"):
        fuse_seg(unary, ["horse", "dog"], seg, 0.5, mode="max")


def test_pseudo_targets_ignore_unsure_pixels_and_degenerate_masks(trained):
    p = trained.pseudo[0]
    cfg = SelfTrainConfig(confidence=0.9, band=0.05)
    target, weight = pseudo_targets(p, ["horse", "cow"], 64, cfg)
    assert target.shape == weight.shape == (2, 64, 64)
    assert (weight[1] == 1).all() and (target[1] == 0).all()        # an untagged label: negative everywhere
    assert 0 < (weight[0] == 0).mean() < 0.6                        # the outline band and unsure pixels
    assert target[0][weight[0] > 0].min() == 0 and target[0][weight[0] > 0].max() == 1
    assert pseudo_targets(p, ["horse"], 64, SelfTrainConfig(max_fg=0.0001)) is None


def test_clutter_guard_falls_back_to_the_raw_cam_when_the_walk_covers_the_scene():
    from explainers.segment.cam_stage import guard_cover

    raw = torch.zeros(2, 40, 40)
    raw[:, 10:20, 10:20] = 1.0                       # both CAMs fire on one small object
    walked = raw.clone()
    walked[0] = 0.8                                  # tag 0: the walk spread over the whole scene...
    walked[0, :2] = 0.0
    walked[0, 10:20, 10:20] = 1.0
    walked[1, 8:22, 8:22] = 1.0                      # ...tag 1: it grew the object a little
    out = guard_cover(raw, walked, 0.55, "raw")
    assert torch.equal(out[0], raw[0]) and torch.equal(out[1], walked[1])
    assert torch.equal(guard_cover(raw, walked, 1.0), walked)
    prod = guard_cover(raw, walked, 0.55, "product")
    assert prod[0].max() == 1.0 and (prod[0][raw[0] == 0] == 0).all()
    with pytest.raises(ValueError, match="cover_fallback"):
        guard_cover(raw, walked, 0.5, "median")
