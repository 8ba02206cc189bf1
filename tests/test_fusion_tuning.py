"""How a project's heads combine in the pipeline, chosen per label on validation masks
(explainers.segment.fusion_tuning), through train_and_register into a registry version: real small
trainings on Weizmann horses and on MSRC-v2 "body" (a label ImageNet lacks: its CAM is the head's)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import REPO, horse_stems
from backend.storage.registry import PROMOTION_METRICS, ModelRegistry, compare_validation
from backend.training.trainer import train_and_register
from explainers.imageio import load_image
from explainers.segment import PipelineConfig, Tag2Mask
from explainers.metrics import mask_to_box
from explainers.segment.fusion_tuning import (BOX_ONLY_WEIGHT, CAM_ALONE, HEAD_ALONE, MIN_MASKS, TIE_TOLERANCE,
                                              WEIGHTS, Combo, _best, _pick, choose_fusion, choose_fusion_weight,
                                              fallback_weight, masks_per_combo, masks_per_weight)
from explainers.segment.config import CRFConfig
from explainers.segment.crf import crf_by_tag
from explainers.segment.fusion import fuse_seg
from explainers.training import ProjectHeads, Sample, fg_iou_scores

GRID_KEYS = {f"{w:g}" for w in WEIGHTS} | {f"{w:g}/no-crf" for w in WEIGHTS}
MSRC_DIR = REPO.parent / "shared" / "data" / "msrc_v2"


def _sample(horse_dir, stem: str) -> Sample:
    mask = np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0
    return Sample(stem, ["horse"], masks={"horse": mask}, load=lambda: load_image(horse_dir / "images" / f"{stem}.jpg"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, horse_dir, backbone):
    """12 corrected train horses, 6 of them held out (val_fraction 0.4): a registry version with its chosen weight."""
    samples = [_sample(horse_dir, s) for s in horse_stems("train")[:12]]
    registry = ModelRegistry(tmp_path_factory.mktemp("models"))
    report = train_and_register(samples, "horses", registry, backbone,
                                config={"val_fraction": 0.4, "seg_epochs": 20, "size": 192, "seed": 0})
    return samples, registry, report


@pytest.fixture(scope="module")
def engine(backbone):
    return Tag2Mask(backbone, PipelineConfig.preset("balanced"))


def test_the_chosen_weight_is_the_best_of_the_grid_and_is_stored(trained, backbone):
    _, registry, report = trained
    fusion = report["validation"]["fusion"]
    assert fusion["n_masks"] == report["validation"]["n_val_masks"] >= MIN_MASKS
    assert set(fusion["scores"]) == GRID_KEYS                                  # every weight, CRF on and off
    combos = {Combo(float(k.split("/")[0]), not k.endswith("/no-crf")): s for k, s in fusion["scores"].items()}
    assert all(0.3 < s <= 1.0 for s in combos.values()), combos
    assert max(combos.values()) - min(combos.values()) > 0.005, combos       # the combination matters
    best = _best(combos, TIE_TOLERANCE)
    chosen = report["fusion_weight"]
    assert chosen == fusion["chosen"] == best.weight and fusion["crf"] == best.crf
    assert report["fusion"] == {"horse": best.to_dict()} == {k: {"weight": e["weight"], "crf": e["crf"]}
                                                             for k, e in fusion["per_label"].items()}
    assert fusion["per_label"]["horse"]["basis"] == "own"
    assert "fusion_tuning" in report["seconds"]
    # the served pipeline's score is what promotion compares between versions, never below its parts
    assert report["validation"]["pipeline_fg_iou"] == fusion["served"] == combos[best]
    assert fusion["served"] >= max(fusion["parts"]["cam_alone"], fusion["parts"]["seg_head_alone"]) - TIE_TOLERANCE
    assert "pipeline_fg_iou" in PROMOTION_METRICS
    worse = dict(report["validation"], pipeline_fg_iou=report["validation"]["pipeline_fg_iou"] - 0.05)
    assert [r["metric"] for r in compare_validation(worse, report["validation"])] == ["pipeline_fg_iou"]

    # meta and checkpoint carry it; the served heads and the engine use it
    ckpt, meta = registry.load("horses")
    assert ckpt["fusion_weight"] == chosen and meta["validation"]["fusion"] == fusion
    assert ckpt["fusion"] == report["fusion"]
    heads = ProjectHeads.from_checkpoint(ckpt, backbone)
    assert heads.fusion_weight == chosen and heads.fusion == report["fusion"]
    engine = Tag2Mask(backbone, PipelineConfig.preset("balanced"), heads=heads)
    assert engine.fusion_weight() == chosen and engine.fusion_for("horse") == (best.weight, best.crf)
    assert Tag2Mask(backbone, PipelineConfig.preset("balanced").replace(**{"crf.enabled": False}),
                    heads=heads).fusion_for("horse") == (best.weight, False)


def test_weight_zero_is_the_pipeline_without_heads(trained, engine, backbone, horse_dir):
    _, registry, _ = trained
    heads = ProjectHeads.from_checkpoint(registry.load("horses")[0], backbone)
    before = heads.fusion_weight
    photo = load_image(horse_dir / "images" / f"{horse_stems('test')[3]}.jpg")
    plain = engine.predict(photo, ["horse"]).tags[0].mask
    by_w = masks_per_weight(engine, heads, photo, ["horse"], [0.0, 1.0])
    assert np.array_equal(by_w[0.0]["horse"], plain)
    assert not np.array_equal(by_w[1.0]["horse"], plain)
    assert engine.heads is None and heads.fusion_weight == before            # nothing left changed
    with_heads = Tag2Mask(backbone, PipelineConfig.preset("balanced"), heads=heads)
    as_served = {"horse": Combo(**heads.fusion["horse"])}
    assert np.array_equal(masks_per_combo(with_heads, heads, photo, ["horse"], [as_served])[0]["horse"],
                          with_heads.predict(photo, ["horse"]).tags[0].mask)
    assert with_heads.heads is heads


def test_too_few_masks_keep_the_default(trained, engine, backbone, horse_dir):
    _, registry, _ = trained
    heads = ProjectHeads.from_checkpoint(registry.load("horses")[0], backbone)
    held = [_sample(horse_dir, s) for s in horse_stems("test")[:2]]

    def broken():
        raise OSError("gone")
    held.append(Sample("lost", ["horse"], masks=dict(held[0].masks), load=broken))   # left out, not fatal
    photo = load_image(horse_dir / "images" / f"{horse_stems('test')[0]}.jpg")
    held.append(Sample("tags-only", ["horse"], image=photo))                         # no mask: not scored
    choice = choose_fusion_weight(engine, heads, held, weights=(0.0, 0.7))
    assert choice.weight is None and choice.n_masks == choice.n_photos == 2
    assert set(choice.scores) == {"0", "0.7"} and choice.to_meta()["chosen"] is None and choice.per_label == {}
    assert choose_fusion_weight(engine, heads, held, weights=(0.0, 0.7), min_masks=2).weight in (0.0, 0.7)
    # a checkpoint without a chosen weight: the engine keeps its configured default, with the CRF
    ckpt = dict(registry.load("horses")[0])
    ckpt.pop("fusion_weight")
    ckpt.pop("fusion")
    plain = ProjectHeads.from_checkpoint(ckpt, backbone)
    assert plain.fusion_weight is None and plain.fusion == {}
    assert Tag2Mask(backbone, PipelineConfig.preset("balanced"), heads=plain).fusion_for("horse") == (0.7, True)
    # an older checkpoint, with the global weight only: still read, served at that weight with the CRF
    ckpt["fusion_weight"] = 0.85
    old = ProjectHeads.from_checkpoint(ckpt, backbone)
    assert old.fusion == {} and Tag2Mask(backbone, PipelineConfig.preset("balanced"), heads=old).fusion_for("horse") \
        == (0.85, True)


def test_ties_go_to_the_smaller_weight_then_the_presets_crf():
    assert _pick({0.0: 0.80, 0.5: 0.8005, 1.0: 0.79}, 1e-3) == 0.0
    assert _pick({0.0: 0.80, 0.5: 0.8005, 1.0: 0.79}, 0.0) == 0.5
    assert _pick({0.25: 0.7, 0.85: 0.7}, 0.0) == 0.25
    assert _best({Combo(1.0, False): 0.7, Combo(1.0, True): 0.7, Combo(0.85, True): 0.6}, 1e-3) == Combo(1.0, True)
    assert _best({Combo(1.0, False): 0.7005, Combo(1.0, True): 0.7}, 1e-3, default_crf=False) == Combo(1.0, False)
    assert _best({Combo(1.0, False): 0.75, Combo(0.5, True): 0.7}, 1e-3) == HEAD_ALONE


def test_a_box_only_head_gets_the_box_only_weight(tmp_path, horse_dir, backbone):
    """Boxes alone leave validation nothing to score: the version carries BOX_ONLY_WEIGHT, with the rule."""
    samples = []
    for stem in horse_stems("train")[20:28]:
        s = _sample(horse_dir, stem)
        samples.append(Sample(stem, ["horse"], boxes={"horse": [mask_to_box(s.masks["horse"])]}, load=s.load))
    registry = ModelRegistry(tmp_path)
    report = train_and_register(samples, "boxes", registry, backbone, config={"seg_epochs": 5, "size": 128})
    assert report["counts"]["train_with_boxes"] == report["counts"]["train"] and "fg_iou" not in report["validation"]
    assert report["fusion_weight"] == BOX_ONLY_WEIGHT == fallback_weight(report["counts"])
    assert report["validation"]["fusion"] == {"chosen": BOX_ONLY_WEIGHT, "rule": "seg head trained on boxes only"}
    assert registry.load("boxes")[0]["fusion_weight"] == BOX_ONLY_WEIGHT
    assert fallback_weight({"train_with_masks": 3, "train_with_boxes": 5}) is None


# -- a label ImageNet lacks (MSRC-v2 "body": its CAM comes from the project's classifier head) ---------
def _msrc_samples(label: str, split: str, n: int) -> list[Sample]:
    """`n` photos of `split` with `label`, evenly spread, each tagged `label` with its mask (void = not it)."""
    ids = {name: int(i) for i, name in (line.split() for line in (MSRC_DIR / "classes.txt").read_text().splitlines())}
    tags = {line.split()[0]: {int(t) for t in line.split()[1:]} for line in (MSRC_DIR / "tags.txt").read_text().splitlines()}
    stems = [s for s in (MSRC_DIR / f"split_{split}.txt").read_text().split() if ids[label] in tags[s]]
    stems = [stems[int(i * len(stems) / n)] for i in range(n)]
    return [Sample(s, [label], masks={label: np.asarray(Image.open(MSRC_DIR / "masks" / f"{s}.png")) == ids[label]},
                   image=load_image(MSRC_DIR / "images" / f"{s}.png")) for s in stems]


@pytest.fixture(scope="module")
def body(tmp_path_factory, backbone):
    """18 corrected MSRC dev photos of "body", 8 held out; no refit, so the saved heads are the validated ones."""
    if not (MSRC_DIR / "images").is_dir():
        pytest.fail(f"the MSRC-v2 photos are missing at {MSRC_DIR}")
    samples = _msrc_samples("body", "dev", 18)
    registry = ModelRegistry(tmp_path_factory.mktemp("models"))
    report = train_and_register(samples, "people", registry, backbone,
                                config={"val_fraction": 0.45, "seg_epochs": 20, "size": 192, "seed": 0, "refit": "off"})
    return samples, registry, report


def test_a_label_imagenet_lacks_gets_its_combination_chosen_on_its_masks(body, backbone):
    """Before, validation found "0 masks" for such a label (the engine it ran could not segment it
    without the heads) and served the preset's 0.7 blend of a weak head CAM."""
    samples, registry, report = body
    v = report["validation"]
    fusion = v["fusion"]
    assert not Tag2Mask(backbone).knows_tag("body")
    assert fusion["n_masks"] == v["n_val_masks"] == report["counts"]["val"] >= MIN_MASKS
    assert set(fusion["scores"]) == GRID_KEYS and fusion["per_label"]["body"]["basis"] == "own"
    # the served pipeline is not worse on validation than its best part: neither the seg head alone
    # (through the pipeline, or its own validation score) nor the head-CAM pipeline without it
    parts = fusion["parts"]
    assert v["pipeline_fg_iou"] == fusion["served"] >= max(parts.values()) - TIE_TOLERANCE
    assert v["pipeline_fg_iou"] >= v["fg_iou"] - 0.01, (v["pipeline_fg_iou"], v["fg_iou"])
    # here the head CAM is weak (every example carries "body": the head never saw it absent)
    assert parts["cam_alone"] < parts["seg_head_alone"] - 0.1, parts
    assert fusion["scores"]["0.7"] < fusion["served"] - 0.02, fusion["scores"]    # the old default blend loses


def test_the_served_pipeline_reproduces_its_validation_score(body, backbone):
    """What validation scored is what /predict serves: the saved heads through Tag2Mask.predict."""
    samples, registry, report = body
    heads = ProjectHeads.from_checkpoint(registry.load("people")[0], backbone)
    assert heads.fusion == report["fusion"] and set(heads.fusion) == {"body"}
    engine = Tag2Mask(backbone, PipelineConfig.preset("balanced"), heads=heads)
    from explainers.training import split_samples

    _, val = split_samples(samples, 0.45, seed=0)            # train_heads' own split of these examples
    pairs = [("body", engine.predict(s.image, ["body"]).tags[0].mask, s.masks["body"]) for s in val]
    assert len(pairs) == report["counts"]["val"]
    assert fg_iou_scores(pairs)["fg_iou"] == pytest.approx(report["validation"]["pipeline_fg_iou"], abs=1e-9)


def test_fusion_with_per_label_weights(horse_photo):
    """Equal per-label weights are the single-weight blend exactly; different ones mix each class at its own."""
    rng = np.random.default_rng(0)
    unary = rng.random((3, 20, 30)).astype(np.float32) + 0.05
    unary /= unary.sum(axis=0, keepdims=True)
    seg = {"a": rng.random((20, 30)).astype(np.float32), "b": rng.random((20, 30)).astype(np.float32)}
    for mode in ("linear", "log"):
        assert np.array_equal(fuse_seg(unary, ["a", "b"], seg, {"a": 0.7, "b": 0.7}, mode),
                              fuse_seg(unary, ["a", "b"], seg, 0.7, mode))
    mixed = fuse_seg(unary, ["a", "b"], seg, {"a": 1.0, "b": 0.0})
    assert np.allclose(mixed.sum(axis=0), 1.0, atol=1e-5)
    assert not np.array_equal(mixed, fuse_seg(unary, ["a", "b"], seg, 0.5))
    assert np.array_equal(fuse_seg(unary, ["a", "b"], {}, {"a": 1.0}), unary)


def test_crf_by_tag_on_a_real_photo(horse_photo):
    import cv2

    img, gt = horse_photo
    small = cv2.resize(img, (160, 120), interpolation=cv2.INTER_AREA)
    g = cv2.resize(gt.astype(np.float32), (160, 120))
    fg = np.clip(0.2 + 0.6 * g, 0.01, 0.99).astype(np.float32)
    other = np.full_like(fg, 0.1)
    unary = np.stack([1 - fg - other, fg, other]).clip(0.01)
    unary /= unary.sum(axis=0, keepdims=True)
    cfg = CRFConfig()
    from explainers.segment.crf import dense_crf

    full = dense_crf(small, unary, cfg)
    assert np.array_equal(crf_by_tag(small, unary, [True, True], cfg), full)
    assert crf_by_tag(small, unary, [False, False], cfg) is unary
    mixed = crf_by_tag(small, unary, [False, True], cfg)          # the horse keeps its unary, the rest is the CRF's
    assert np.array_equal(mixed[1], unary[1]) and np.allclose(mixed.sum(axis=0), 1.0, atol=1e-5)
    assert not np.allclose(mixed[2], unary[2])


def test_refit_uses_every_correction(body, backbone):
    """After the choice, the heads learn from the validation examples too; the scores stay the split's."""
    import torch

    from explainers.training import FeatureCache, TrainConfig, refit_heads, train_heads
    from explainers.heads import BackboneFeatures

    samples = body[0]
    cfg = TrainConfig(val_fraction=0.45, seg_epochs=5, size=160, seed=0, refit_epochs=3)
    cache = FeatureCache(BackboneFeatures(backbone), cfg.size, cfg.flip)
    split = train_heads(backbone, samples, config=cfg, cache=cache)
    split.fusion = {"body": {"weight": 1.0, "crf": False}}
    computed = cache.computed
    refit = refit_heads(backbone, split, samples, cfg, cache)
    assert cache.computed == computed                          # the features are reused
    assert refit.counts["refit"] == len(samples) == split.counts["train"] + split.counts["val"]
    assert sorted(refit.refit_keys) == sorted(s.key for s in samples)
    assert refit.validation is split.validation and refit.fusion == split.fusion and refit.val_keys == split.val_keys
    before, after = split.segmenter.state_dict(), refit.segmenter.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)       # trained on, the validated head untouched
    assert refit.checkpoint()["fusion"] == split.fusion
    from dataclasses import replace

    assert refit_heads(backbone, split, samples, replace(cfg, refit="off"), cache) is split
    with pytest.raises(ValueError, match="unknown refit 'twice'"):
        refit_heads(backbone, split, samples, replace(cfg, refit="twice"), cache)
