"""Box -> GrabCut pseudo-masks (explainers.box_masks) and box-only training, on real horse photos."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import horse_stems
from explainers.box_masks import box_pseudo_mask, boxes_from_mask
from explainers.heads import BackboneFeatures
from explainers.imageio import load_image
from explainers.metrics import iou, mask_to_box
from explainers.training import FeatureCache, ProjectHeads, Sample, TrainConfig, train_heads


def _spread(split: str, n: int, offset: int = 0) -> list[str]:
    names = horse_stems(split)
    return [names[(offset + int(i * len(names) / n)) % len(names)] for i in range(n)]


def _load(horse_dir, stems):
    return [(s, load_image(horse_dir / "images" / f"{s}.jpg"),
             np.asarray(Image.open(horse_dir / "masks" / f"{s}.png")) > 0) for s in stems]


@pytest.fixture(scope="module")
def test_horses(horse_dir):
    return _load(horse_dir, _spread("test", 8))


def _filled(shape, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_grabcut_pseudo_mask_beats_the_box_itself(test_horses):
    """8 test horses, one box each (the mask's): GrabCut's pseudo-mask overlaps the true mask far better
    than the filled box does (measured: pooled 0.65 vs 0.40; every photo better, by 0.12 at least)."""
    inter = {"box": 0, "grabcut": 0}
    union = {"box": 0, "grabcut": 0}
    for stem, img, gt in test_horses:
        box = mask_to_box(gt)
        filled = _filled(gt.shape, box)
        mask, weight = box_pseudo_mask(img, [box])
        assert mask.shape == gt.shape and mask.dtype == bool and weight.shape == gt.shape
        assert iou(mask, gt) > iou(filled, gt) + 0.05, stem
        assert not (mask & ~filled).any(), stem                  # nothing outside the box
        for name, m in (("box", filled), ("grabcut", mask)):
            inter[name] += int((m & gt).sum())
            union[name] += int((m | gt).sum())
    box_iou, grab_iou = inter["box"] / union["box"], inter["grabcut"] / union["grabcut"]
    assert grab_iou > 0.55 and grab_iou > box_iou + 0.15, (grab_iou, box_iou)


def test_weights_band_size_and_reproducibility(test_horses):
    _, img, gt = test_horses[1]
    box = mask_to_box(gt)
    filled = _filled(gt.shape, box)
    mask, weight = box_pseudo_mask(img, [box], inside_weight=0.6, band=0.02)
    assert np.all(weight[~filled] == 1.0)                           # outside every box: sure background
    assert np.allclose(np.unique(weight[filled]), [0.0, 0.6])        # inside: GrabCut's guess, band ignored
    ignored = filled & (weight == 0)
    assert 0 < ignored.sum() < 0.25 * filled.sum()
    again, _ = box_pseudo_mask(img, [box], inside_weight=0.6, band=0.02)
    assert np.array_equal(mask, again)                                # seeded
    no_band = box_pseudo_mask(img, [box], band=0.0)[1]
    assert not (filled & (no_band == 0)).any()
    small, small_w = box_pseudo_mask(img, [box], (64, 64))            # e.g. the square training targets
    assert small.shape == small_w.shape == (64, 64)
    assert iou(small, np.asarray(Image.fromarray(mask).resize((64, 64), Image.NEAREST))) > 0.85


def test_fallbacks_and_several_boxes(test_horses):
    _, img, gt = test_horses[0]
    h, w = gt.shape
    # a box over the whole photo leaves no background to learn from: the filled box, at the fallback weight
    mask, weight = box_pseudo_mask(img, [(0, 0, w, h)], fallback_weight=0.3)
    assert mask.all() and np.allclose(weight, 0.3)
    # no box: all background, full weight
    mask, weight = box_pseudo_mask(img, [])
    assert not mask.any() and np.all(weight == 1.0)
    # two boxes: two objects found, each inside its own box
    two = np.zeros((h, 2 * w), bool)
    two[:, :w], two[:, w:] = gt, gt[:, ::-1]
    photo = np.concatenate([img, img[:, ::-1]], axis=1)
    boxes = boxes_from_mask(two)
    assert len(boxes) == 2 and sorted(b[0] for b in boxes)[1] >= w - 1
    mask, _ = box_pseudo_mask(photo, boxes)
    assert mask[:, :w].any() and mask[:, w:].any() and iou(mask, two) > 0.45
    with pytest.raises(ValueError):
        box_pseudo_mask(img.astype(np.float32), [(0, 0, 5, 5)])


def test_boxes_from_mask_drops_specks():
    m = np.zeros((100, 100), bool)
    m[10:50, 10:60] = True          # 2000 px
    m[70:90, 70:95] = True          # 500 px
    m[0, 99] = True                 # a speck
    assert boxes_from_mask(m) == [(10, 10, 60, 50), (70, 70, 95, 90)]
    assert boxes_from_mask(np.zeros((5, 5), bool)) == []


def test_grabcut_box_training_beats_filled_boxes(backbone, horse_dir):
    """10 train horses with boxes only: a seg head on GrabCut pseudo-masks segments held-out horses
    much better than one on filled boxes, which learns boxes (measured: fg IoU 0.65 vs 0.41)."""
    train = _load(horse_dir, _spread("train", 10))
    held = _load(horse_dir, _spread("train", 6, offset=7))
    samples = [Sample(s, ["horse"], boxes={"horse": boxes_from_mask(gt)}, image=img) for s, img, gt in train]
    cache = FeatureCache(BackboneFeatures(backbone), 160, True)
    scores = {}
    for mode in ("box", "grabcut"):
        r = train_heads(backbone, samples, ["horse"], TrainConfig(size=160, seg_epochs=15, seed=0, box_mode=mode),
                        cache=cache, train_classifier_head=False, validation=[])
        assert ("box_masks" in r.seconds) == (mode == "grabcut")
        heads = ProjectHeads(backbone, None, r.segmenter, r.layers, r.size)
        inter = union = 0
        for _, img, gt in held:
            pred = heads.seg_probs(img)["horse"] >= 0.5
            inter, union = inter + int((pred & gt).sum()), union + int((pred | gt).sum())
        scores[mode] = inter / union
    assert scores["grabcut"] > scores["box"] + 0.1 and scores["grabcut"] > 0.5, scores
    with pytest.raises(ValueError, match="box_mode"):
        train_heads(backbone, samples, ["horse"], TrainConfig(size=160, box_mode="boxes"), cache=cache, validation=[])


def test_grabcut_runs_on_the_photo_loaded_for_the_features(backbone, test_horses):
    """Box-only samples with loaders (photos fetched from Label Studio in the service): each photo is
    loaded once, for its features and its pseudo-mask together."""
    loads: dict[str, int] = {}

    def loader(stem, img):
        def load():
            loads[stem] = loads.get(stem, 0) + 1
            return img
        return load
    samples = [Sample(s, ["horse"], boxes={"horse": [mask_to_box(gt)]}, load=loader(s, img))
               for s, img, gt in test_horses[:4]]
    r = train_heads(backbone, samples, ["horse"], TrainConfig(size=96, seg_epochs=2, seed=0),
                    train_classifier_head=False, validation=[])
    assert loads == {s: 1 for s, _, _ in test_horses[:4]}
    assert r.segmenter is not None and r.seconds["box_masks"] > 0 and r.counts["train_with_boxes"] == 4
