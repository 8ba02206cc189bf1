"""The seg head's fusion weight chosen on validation masks (explainers.segment.fusion_tuning), through
train_and_register into a registry version, on a real small training of horse photos."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import horse_stems
from backend.registry import PROMOTION_METRICS, ModelRegistry, compare_validation
from backend.training_jobs import train_and_register
from explainers.imageio import load_image
from explainers.segment import PipelineConfig, Tag2Mask
from explainers.metrics import mask_to_box
from explainers.segment.fusion_tuning import (BOX_ONLY_WEIGHT, MIN_MASKS, WEIGHTS, _pick, choose_fusion_weight,
                                              fallback_weight, masks_per_weight)
from explainers.training import ProjectHeads, Sample


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
    assert set(fusion["scores"]) == {str(w) for w in WEIGHTS}
    scores = {float(w): s for w, s in fusion["scores"].items()}
    assert all(0.3 < s <= 1.0 for s in scores.values()), scores
    assert max(scores.values()) - min(scores.values()) > 0.005, scores       # the weight matters
    chosen = report["fusion_weight"]
    assert chosen in WEIGHTS and chosen == fusion["chosen"] == _pick(scores, 1e-3)
    assert "fusion_tuning" in report["seconds"]
    # the served pipeline's score is what promotion compares between versions
    assert fusion["served_weight"] == chosen and report["validation"]["pipeline_fg_iou"] == scores[chosen]
    assert "pipeline_fg_iou" in PROMOTION_METRICS
    worse = dict(report["validation"], pipeline_fg_iou=report["validation"]["pipeline_fg_iou"] - 0.05)
    assert [r["metric"] for r in compare_validation(worse, report["validation"])] == ["pipeline_fg_iou"]

    # meta and checkpoint carry it; the served heads and the engine use it
    ckpt, meta = registry.load("horses")
    assert ckpt["fusion_weight"] == chosen and meta["validation"]["fusion"] == fusion
    heads = ProjectHeads.from_checkpoint(ckpt, backbone)
    assert heads.fusion_weight == chosen
    assert Tag2Mask(backbone, PipelineConfig.preset("balanced"), heads=heads).fusion_weight() == chosen


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
    assert np.array_equal(masks_per_weight(with_heads, heads, photo, ["horse"], [heads.fusion_weight])
                          [heads.fusion_weight]["horse"], with_heads.predict(photo, ["horse"]).tags[0].mask)
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
    assert set(choice.scores) == {0.0, 0.7} and choice.to_meta()["chosen"] is None
    assert choose_fusion_weight(engine, heads, held, weights=(0.0, 0.7), min_masks=2).weight in (0.0, 0.7)
    # a checkpoint without a chosen weight: the engine keeps its configured default
    ckpt = dict(registry.load("horses")[0])
    ckpt.pop("fusion_weight")
    plain = ProjectHeads.from_checkpoint(ckpt, backbone)
    assert plain.fusion_weight is None
    assert Tag2Mask(backbone, PipelineConfig.preset("balanced"), heads=plain).fusion_weight() == 0.7


def test_ties_go_to_the_smaller_weight():
    assert _pick({0.0: 0.80, 0.5: 0.8005, 1.0: 0.79}, 1e-3) == 0.0
    assert _pick({0.0: 0.80, 0.5: 0.8005, 1.0: 0.79}, 0.0) == 0.5
    assert _pick({0.25: 0.7, 0.85: 0.7}, 0.0) == 0.25


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
