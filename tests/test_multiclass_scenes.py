"""Cluttered photos with several tags: the presence gate, and the stronger EfficientNet-Lite backbones (real
photos, real weights)."""
from __future__ import annotations

import numpy as np
import torch
import pytest

from backend.cli.evaluation import load_label_mask, read_classes
from explainers.imageio import load_image
from explainers.segment import PipelineConfig, Tag2Mask

# a park bench by a river: ImageNet's classifier is sure of the bench (0.99) and sees neither the small
# traffic light (1634 px of 640 x 427) nor the flowers (both < 0.001)
BENCH_PHOTO, BENCH_TAGS = "000000000510", ["traffic light", "bench", "flower"]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def bench_scene(coco_dir):
    classes = {name: cid for cid, name in read_classes(coco_dir / "classes.txt").items()}
    image = load_image(coco_dir / "images" / f"{BENCH_PHOTO}.jpg")
    gt = load_label_mask(coco_dir / "masks" / f"{BENCH_PHOTO}.png")
    return image, {tag: gt == classes[tag] for tag in BENCH_TAGS}


def test_presence_gate_leaves_an_unseen_tag_empty_instead_of_painting_a_wrong_blob(backbone, bench_scene):
    image, truth = bench_scene
    trusting = Tag2Mask(backbone, PipelineConfig.preset("fast")).predict(image, BENCH_TAGS)
    gated = Tag2Mask(backbone, PipelineConfig.preset("fast").replace(
        **{"background.presence_gate": 0.1})).predict(image, BENCH_TAGS)
    before = {t.tag: t for t in trusting.tags}
    after = {t.tag: t for t in gated.tags}
    assert [t.tag for t in gated.tags] == BENCH_TAGS          # gated tags stay in the result, with their score
    # without the gate the traffic light (score ~0) paints a blob many times the size of the real one
    assert before["traffic light"].score < 0.01
    assert before["traffic light"].mask.sum() > 10 * truth["traffic light"].sum()
    # with it: empty, and the confident bench keeps (at least) its overlap with the truth
    assert not after["traffic light"].mask.any() and not after["flower"].mask.any()
    assert after["traffic light"].polygons == [] and after["traffic light"].boxes == []
    assert _iou(after["bench"].mask, truth["bench"]) >= _iou(before["bench"].mask, truth["bench"]) - 0.02
    assert _iou(after["bench"].mask, truth["bench"]) > 0.5


def test_presence_gate_never_empties_a_lone_tag(backbone, chelsea):
    """The gate is relative to the photo's likeliest tag: a tag given alone is trusted even when the
    classifier doubts it ("dog" on the cat photo, probability ~0.01)."""
    engine = Tag2Mask(backbone, PipelineConfig.preset("fast").replace(**{"background.presence_gate": 0.9}))
    res = engine.predict(chelsea, ["dog"])
    assert res.tags[0].score < 0.1
    assert res.tags[0].mask.mean() > 0.1


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_backbones_load_their_shipped_weights_and_see_the_horse(name, horse_dir):
    from explainers import load_backbone

    bb = load_backbone(name, device="cpu")
    image = load_image(horse_dir / "images" / "horse001.jpg")
    p = bb.predict(bb.to_tensor(image, 240))[0]
    assert bb.categories[int(p.argmax())] == "sorrel" and float(p.max()) > 0.5


def test_cam_ensemble_averages_the_backbones_cams(backbone, horse_dir):
    """``cam.ensemble`` (the "best" preset: lite1 + lite2): the engine's CAMs and probabilities are the
    mean of its own backbone's and the listed ones'; the masks still fit the horse."""
    from conftest import horse_and_mask

    image, truth = horse_and_mask(horse_dir, "horse001")
    cfg = PipelineConfig.preset("fast")
    pair = Tag2Mask(backbone, cfg.replace(**{"cam.ensemble": ("efficientnet_lite2",)}))
    alone = Tag2Mask(backbone, cfg)
    lite2 = Tag2Mask(pair.ensemble_stages[0].backbone, cfg)
    maps = [e._cam_output(image, ["horse"]) for e in (alone, lite2)]
    mixed = pair._cam_output(image, ["horse"])
    assert not torch.allclose(maps[0].maps, maps[1].maps, atol=1e-3)
    assert torch.allclose(mixed.maps, (maps[0].maps + maps[1].maps) / 2, atol=1e-5)
    assert torch.allclose(mixed.probs, (maps[0].probs + maps[1].probs) / 2, atol=1e-6)
    assert _iou(pair.predict(image, ["horse"]).tags[0].mask, truth) > 0.6
    # predict_many takes the one-by-one path with an ensemble and gives the same masks
    many = pair.predict_many([image], [["horse"]])[0]
    assert np.array_equal(many.tags[0].mask, pair.predict(image, ["horse"]).tags[0].mask)
    assert PipelineConfig.preset("best").cam.ensemble == ("efficientnet_lite1", "efficientnet_lite2")


def test_tag_cams_takes_an_ensemble_for_one_call(backbone, horse_dir):
    """``tag_cams(..., ensemble=names)`` (a smart tool's box): the CAMs and probabilities are the mean of
    the engine's own and those backbones' for that call only; a backbone is loaded once and kept; the
    engine's own backbone in the list is left out; ``()`` is the engine alone."""
    from conftest import horse_and_mask

    image, _ = horse_and_mask(horse_dir, "horse001")
    engine = Tag2Mask(backbone, PipelineConfig.preset("fast"))
    alone_maps, alone_probs = engine.tag_cams(image, ["horse"])
    maps, probs = engine.tag_cams(image, ["horse"], ensemble=("efficientnet_lite2",))
    stage = engine.ensemble.stages(("efficientnet_lite2",))[0]
    lite2_maps, lite2_probs = Tag2Mask(stage.backbone, PipelineConfig.preset("fast")).tag_cams(image, ["horse"])
    assert not np.allclose(alone_maps, lite2_maps, atol=1e-3)
    assert np.allclose(maps, (alone_maps + lite2_maps) / 2, atol=1e-4)
    assert np.allclose(probs, (alone_probs + lite2_probs) / 2, atol=1e-6)
    engine.tag_cams(image, ["horse"], ensemble=("efficientnet_lite2",))
    assert engine.ensemble.stages(("efficientnet_lite2",))[0] is stage and not engine.ensemble_stages
    assert np.array_equal(engine.tag_cams(image, ["horse"])[0], alone_maps)     # the call's ensemble only
    for names in ((), (backbone.name,)):
        assert np.array_equal(engine.tag_cams(image, ["horse"], ensemble=names)[0], alone_maps)
