"""Mask and box scores on hand-made arrays whose answers are worked out by hand, plus real masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from explainers.metrics import SegmentationScore, box_iou, iou, mask_to_box


def _top_rows() -> np.ndarray:
    m = np.zeros((4, 4), bool)
    m[:2, :] = True  # rows 0-1: 8 pixels
    return m


def _left_cols() -> np.ndarray:
    m = np.zeros((4, 4), bool)
    m[:, :2] = True  # columns 0-1: 8 pixels
    return m


def test_iou_by_hand():
    # overlap = the 2x2 top-left corner = 4 pixels; union = 8 + 8 - 4 = 12
    assert iou(_top_rows(), _left_cols()) == pytest.approx(4 / 12)
    assert iou(_top_rows(), _top_rows()) == 1.0
    assert iou(_top_rows(), ~_top_rows()) == 0.0
    empty = np.zeros((4, 4), bool)
    assert iou(empty, empty) == 1.0
    assert iou(empty, _top_rows()) == 0.0


def test_iou_accepts_0_255_and_0_1_masks():
    a = _top_rows().astype(np.uint8) * 255
    b = _left_cols().astype(np.int64)
    assert iou(a, b) == pytest.approx(1 / 3)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="shapes differ"):
        iou(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError):
        iou(np.zeros((4, 4, 1), bool), np.zeros((4, 4, 1), bool))
    with pytest.raises(ValueError, match="shapes differ"):
        SegmentationScore().add(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


def test_mask_to_box_by_hand():
    m = np.zeros((5, 8), bool)
    assert mask_to_box(m) is None
    m[2, 5] = True
    assert mask_to_box(m) == (5, 2, 6, 3)  # one pixel: x1, y1 exclusive
    m[4, 1] = True  # an L of two far pixels
    assert mask_to_box(m) == (1, 2, 6, 5)
    assert mask_to_box(np.ones((5, 8), bool)) == (0, 0, 8, 5)
    assert all(isinstance(v, int) for v in mask_to_box(m))


def test_box_iou_by_hand():
    assert box_iou((0, 0, 2, 2), (1, 1, 3, 3)) == pytest.approx(1 / 7)  # overlap 1, union 4 + 4 - 1
    assert box_iou((0, 0, 4, 2), (0, 0, 2, 4)) == pytest.approx(4 / 12)
    assert box_iou((0, 0, 2, 2), (2, 0, 4, 2)) == 0.0  # touching edges share no pixel
    assert box_iou((0, 0, 2, 2), (5, 5, 6, 6)) == 0.0
    assert box_iou((1, 2, 3, 4), (1, 2, 3, 4)) == 1.0
    assert box_iou((0, 0, 10, 10), (2, 2, 4, 4)) == pytest.approx(4 / 100)
    assert box_iou(None, None) == 1.0
    assert box_iou(None, (0, 0, 1, 1)) == 0.0


def test_segmentation_score_by_hand():
    s = SegmentationScore()
    # photo a (4x4): fg 4/12; bg = bottom rows vs right columns: overlap 4, union 12; boxes (0,0,4,2) vs (0,0,2,4): 4/12
    assert s.add(_top_rows(), _left_cols(), seconds=0.5, name="a") == pytest.approx(1 / 3)
    # photo b (3x3): nothing predicted, one ground-truth pixel: fg 0/1; bg 8/9; box None vs (2,1,3,2): 0
    gt = np.zeros((3, 3), bool)
    gt[1, 2] = True
    assert s.add(np.zeros((3, 3), bool), gt, seconds=1.5, name="b") == 0.0
    out = s.summary()
    assert out["n"] == 2
    assert out["fg_iou"] == pytest.approx((4 + 0) / (12 + 1))
    assert out["bg_iou"] == pytest.approx((4 + 8) / (12 + 9))
    assert out["miou"] == pytest.approx((4 / 13 + 12 / 21) / 2)
    assert out["mean_photo_fg_iou"] == pytest.approx((1 / 3 + 0) / 2)
    assert out["box_iou"] == pytest.approx((1 / 3 + 0) / 2)
    assert out["seconds_per_photo"] == pytest.approx(1.0)
    assert [name for name, _ in out["worst"]] == ["b", "a"]
    assert out["worst"][0][1] == 0.0


def test_worst_keeps_five_lowest_and_default_names():
    s = SegmentationScore()
    gt = np.zeros((10, 10), bool)
    gt[:, :5] = True  # 50 pixels
    for k in range(8):  # prediction = first k+1 columns: IoU (k+1)/5 for k < 5, then 5/(k+1)
        pred = np.zeros((10, 10), bool)
        pred[:, : k + 1] = True
        s.add(pred, gt)
    out = s.summary()
    assert out["seconds_per_photo"] is None
    assert len(out["worst"]) == 5
    ious = [v for _, v in out["worst"]]
    assert ious == sorted(ious)
    assert out["worst"][0] == ("#0", pytest.approx(0.2))
    assert s.summary(worst=2)["worst"][1][1] == pytest.approx(0.4)


def test_empty_summary_is_nan():
    out = SegmentationScore().summary()
    assert out["n"] == 0 and math.isnan(out["fg_iou"]) and math.isnan(out["miou"]) and out["worst"] == []


def test_real_weizmann_masks(horse_dir):
    from conftest import horse_stems

    stem = horse_stems("test")[0]
    gt = np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0
    assert 0 < gt.mean() < 1
    assert iou(gt, gt) == 1.0 and iou(gt, ~gt) == 0.0
    box = mask_to_box(gt)
    ys, xs = np.nonzero(gt)
    assert box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    # the box itself as a mask holds the whole horse: its IoU is the horse's share of the box
    boxed = np.zeros_like(gt)
    boxed[box[1]:box[3], box[0]:box[2]] = True
    assert iou(boxed, gt) == pytest.approx(gt.sum() / boxed.sum())
    s = SegmentationScore()
    s.add(boxed, gt, name=stem)
    s.add(gt, gt, name="self")
    out = s.summary()
    assert out["box_iou"] == 1.0  # both predictions have the ground truth's box
    assert out["fg_iou"] == pytest.approx(2 * gt.sum() / (boxed.sum() + gt.sum()))
    assert out["worst"][0][0] == stem


# --- void pixels and several classes ----------------------------------------------------------------

def test_valid_pixels_leave_the_rest_out_by_hand():
    s = SegmentationScore()
    valid = np.ones((4, 4), bool)
    valid[:, 3] = False  # the last column is void
    # fg: top rows (8 px) vs left columns (8 px), without column 3: pred 6 px, gt 8 px, overlap 4 -> 4 / 10
    # bg (valid only): pred bg = rows 2-3, cols 0-2 (6 px); gt bg = cols 2 (4 px): overlap 2, union 8
    assert s.add(_top_rows(), _left_cols(), valid=valid) == pytest.approx(4 / 10)
    out = s.summary()
    assert out["fg_iou"] == pytest.approx(4 / 10) and out["bg_iou"] == pytest.approx(2 / 8)
    assert out["box_iou"] == pytest.approx((2 * 2 + 0) / (3 * 2 + 2 * 4 - 2 * 2))  # (0,0,3,2) vs (0,0,2,4)
    assert SegmentationScore().add(_top_rows(), _left_cols(), valid=np.ones((4, 4), bool)) == pytest.approx(1 / 3)


def test_class_scores_pool_pixels_per_class_then_average_classes():
    from explainers.metrics import ClassScores

    s = ClassScores()
    # photo p (4x4): cat = top rows vs left columns (4 / 12); dog predicted nowhere, 2 gt pixels (0 / 2)
    dog_gt = np.zeros((4, 4), bool)
    dog_gt[3, 2:] = True
    empty = np.zeros((4, 4), bool)
    ious = s.add_photo("p", {"cat": (_top_rows(), _left_cols()), "dog": (empty, dog_gt)}, seconds=1.0)
    assert ious == {"cat": pytest.approx(1 / 3), "dog": 0.0}
    # photo q (4x4, column 3 void): cat = the same masks -> 4 / 10 (see above)
    valid = np.ones((4, 4), bool)
    valid[:, 3] = False
    ious = s.add_photo("q", {"cat": (_top_rows(), _left_cols())}, valid=valid, seconds=3.0)
    assert ious == {"cat": pytest.approx(0.4)}
    out = s.summary()
    assert out["n"] == 2 and out["n_classes"] == 2
    cat, dog = out["classes"]["cat"], out["classes"]["dog"]
    assert cat["fg_iou"] == pytest.approx((4 + 4) / (12 + 10)) and cat["photos"] == 2  # pooled, not averaged
    assert cat["mean_photo_fg_iou"] == pytest.approx((1 / 3 + 0.4) / 2)
    assert dog["fg_iou"] == 0.0 and dog["photos"] == 1 and dog["box_iou"] == 0.0
    assert dog["bg_iou"] == pytest.approx(14 / 16)
    assert out["mean_fg_iou"] == pytest.approx((8 / 22 + 0) / 2)  # classes weigh the same
    assert out["miou"] == pytest.approx(((cat["fg_iou"] + cat["bg_iou"]) / 2 + (0 + 14 / 16) / 2) / 2)
    assert out["box_iou"] == pytest.approx((cat["box_iou"] + 0) / 2)
    assert out["mean_photo_score"] == pytest.approx(((1 / 3 + 0) / 2 + 0.4) / 2)
    assert out["seconds_per_photo"] == pytest.approx(2.0)
    assert out["worst_classes"] == [("dog", 0.0), ("cat", pytest.approx(8 / 22))]
    assert [name for name, _ in out["worst"]] == ["p", "q"] and out["worst"][0][1] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="no class"):
        s.add_photo("r", {})


def test_empty_class_scores_are_nan():
    from explainers.metrics import ClassScores

    out = ClassScores().summary()
    assert out["n"] == 0 and out["classes"] == {} and math.isnan(out["mean_fg_iou"]) and out["worst"] == []
