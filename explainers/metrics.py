"""Scores of predicted masks against ground truth: IoU, box IoU, and running accumulators.

Conventions: masks are boolean (H, W) arrays (anything non-zero is foreground); boxes are
(x0, y0, x1, y1) in pixels, x0/y0 inclusive and x1/y1 exclusive, so a one-pixel box is (x, y, x+1, y+1).
IoU of two empty sets is 1.0 (both agree there is nothing), and the box of an empty mask is None.
A `valid` mask (optional) leaves the other pixels (e.g. "void" in the ground truth) out of every count.

- :class:`SegmentationScore`: one tag over many photos (fg / bg IoU pooled over pixels, box IoU, worst photos);
- :class:`ClassScores`: many classes over many photos, one :class:`SegmentationScore` per class, fed with
  the predicted mask of each tag of a photo and the ground-truth mask of that class; classes are then
  averaged with equal weight (mean fg IoU, mIoU), and each photo gets the mean of its tags' IoUs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

Box = tuple[int, int, int, int]


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.ndim != 2 or gt.ndim != 2:
        raise ValueError(f"masks must be 2-D (H, W), got {pred.shape} and {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: prediction {pred.shape}, ground truth {gt.shape}")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape (1.0 when both are empty)."""
    pred, gt = _pair(pred, gt)
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


def mask_to_box(mask: np.ndarray) -> Optional[Box]:
    """The tightest (x0, y0, x1, y1) box around all foreground pixels (x1, y1 exclusive); None if empty."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got {mask.shape}")
    mask = mask.astype(bool, copy=False)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_area(box: Optional[Sequence[float]]) -> float:
    if box is None:
        return 0.0
    x0, y0, x1, y1 = box
    return max(0.0, x1 - x0) * max(0.0, y1 - y0)


def box_iou(a: Optional[Sequence[float]], b: Optional[Sequence[float]]) -> float:
    """IoU of two (x0, y0, x1, y1) boxes; None stands for no box (two Nones -> 1.0, one -> 0.0)."""
    if a is None and b is None:
        return 1.0
    if a is None or b is None:
        return 0.0
    ix0, iy0 = max(a[0], b[0]), max(a[1], b[1])
    ix1, iy1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix1 - ix0) * max(0.0, iy1 - iy0)
    union = box_area(a) + box_area(b) - inter
    if union <= 0:
        return 1.0 if tuple(a) == tuple(b) else 0.0
    return inter / union


class SegmentationScore:
    """Accumulates foreground/background IoU over many photos.

    ``fg_iou``/``bg_iou`` in :meth:`summary` are pooled over all pixels of all photos (sum of
    intersections / sum of unions), the usual dataset-level IoU; ``mean_photo_fg_iou`` averages the
    per-photo foreground IoU instead, so small objects weigh as much as large ones.
    """

    def __init__(self) -> None:
        self.fg_inter = 0
        self.fg_union = 0
        self.bg_inter = 0
        self.bg_union = 0
        self.photo_ious: list[tuple[str, float]] = []
        self.box_ious: list[float] = []
        self.seconds: list[float] = []

    @property
    def n(self) -> int:
        return len(self.photo_ious)

    def add(self, pred: np.ndarray, gt: np.ndarray, seconds: float | None = None, name: str | None = None,
            valid: np.ndarray | None = None) -> float:
        """Score one photo; returns its foreground IoU. `seconds`: time spent on it, if measured.
        `valid`: the pixels to score (default: all); the others count for nothing, boxes included."""
        pred, gt = _pair(pred, gt)
        if valid is not None:
            valid = _pair(valid, gt)[0]
            pred, gt = pred & valid, gt & valid
        fg_i, fg_u = int(np.count_nonzero(pred & gt)), int(np.count_nonzero(pred | gt))
        if valid is None:
            bg_i, bg_u = int(np.count_nonzero(~pred & ~gt)), int(np.count_nonzero(~pred | ~gt))
        else:
            bg_i, bg_u = int(np.count_nonzero(valid & ~pred & ~gt)), int(np.count_nonzero(valid & (~pred | ~gt)))
        self.fg_inter += fg_i
        self.fg_union += fg_u
        self.bg_inter += bg_i
        self.bg_union += bg_u
        photo = fg_i / fg_u if fg_u else 1.0
        self.photo_ious.append((name if name is not None else f"#{self.n}", photo))
        self.box_ious.append(box_iou(mask_to_box(pred), mask_to_box(gt)))
        if seconds is not None:
            self.seconds.append(float(seconds))
        return photo

    def summary(self, worst: int = 5) -> dict:
        """fg_iou, bg_iou, miou, mean_photo_fg_iou, box_iou, seconds_per_photo, n, worst [(name, iou)].

        Values are NaN (seconds_per_photo: None) when nothing was added (or no time was given).
        """
        nan = math.nan
        fg = self.fg_inter / self.fg_union if self.fg_union else (1.0 if self.n else nan)
        bg = self.bg_inter / self.bg_union if self.bg_union else (1.0 if self.n else nan)
        ranked = sorted(self.photo_ious, key=lambda item: item[1])
        return {
            "fg_iou": fg,
            "bg_iou": bg,
            "miou": (fg + bg) / 2,
            "mean_photo_fg_iou": float(np.mean([v for _, v in self.photo_ious])) if self.n else nan,
            "box_iou": float(np.mean(self.box_ious)) if self.box_ious else nan,
            "seconds_per_photo": float(np.mean(self.seconds)) if self.seconds else None,
            "n": self.n,
            "worst": ranked[:worst],
        }


class ClassScores:
    """Accumulates per-class scores over photos with several tags (class-id ground truth).

    For each photo, :meth:`add_photo` takes, per tag (= class), the predicted mask of that tag and the
    ground-truth mask of that class; each class pools its pixels over the photos it was asked on (as
    :class:`SegmentationScore`). :meth:`summary` averages the classes with equal weight, so a rare
    class counts as much as a frequent one.
    """

    def __init__(self) -> None:
        self.classes: dict[str, SegmentationScore] = {}
        self.photos: list[tuple[str, dict[str, float]]] = []
        self.seconds: list[float] = []

    @property
    def n(self) -> int:
        return len(self.photos)

    def add_photo(self, name: str, masks: dict[str, tuple[np.ndarray, np.ndarray]], valid: np.ndarray | None = None,
                  seconds: float | None = None) -> dict[str, float]:
        """Score one photo: `masks` = {class name: (predicted mask, ground-truth mask)}, `valid` as in
        :meth:`SegmentationScore.add`. Returns {class name: fg IoU on this photo}."""
        if not masks:
            raise ValueError(f"photo {name!r}: no class to score")
        ious = {}
        for cls, (pred, gt) in masks.items():
            ious[cls] = self.classes.setdefault(cls, SegmentationScore()).add(pred, gt, name=name, valid=valid)
        self.photos.append((name, ious))
        if seconds is not None:
            self.seconds.append(float(seconds))
        return ious

    @staticmethod
    def photo_score(ious: dict[str, float]) -> float:
        """A photo's one number: the mean fg IoU of its tags."""
        return float(np.mean(list(ious.values())))

    def summary(self, worst: int = 5) -> dict:
        """n (photos), n_classes, mean_fg_iou / mean_bg_iou / miou / box_iou (means over classes of each
        class's pooled fg IoU, bg IoU, (fg + bg) / 2 and mean box IoU), mean_photo_score (photos' mean tag
        IoU, averaged), seconds_per_photo, classes {name: the class's SegmentationScore summary without
        its worst list, plus "photos"}, worst_classes [(name, fg IoU)] and worst [(photo, score)], lowest
        first. NaN (seconds_per_photo: None) when nothing was added."""
        nan = math.nan
        per_class = {}
        for cls, score in sorted(self.classes.items()):
            s = score.summary(worst=0)
            per_class[cls] = {"fg_iou": s["fg_iou"], "bg_iou": s["bg_iou"], "miou": s["miou"],
                              "box_iou": s["box_iou"], "mean_photo_fg_iou": s["mean_photo_fg_iou"], "photos": s["n"]}

        def mean_of(key: str) -> float:
            return float(np.mean([c[key] for c in per_class.values()])) if per_class else nan

        scores = [(name, self.photo_score(ious)) for name, ious in self.photos]
        return {
            "n": self.n,
            "n_classes": len(per_class),
            "mean_fg_iou": mean_of("fg_iou"),
            "mean_bg_iou": mean_of("bg_iou"),
            "miou": mean_of("miou"),
            "box_iou": mean_of("box_iou"),
            "mean_photo_score": float(np.mean([v for _, v in scores])) if scores else nan,
            "seconds_per_photo": float(np.mean(self.seconds)) if self.seconds else None,
            "classes": per_class,
            "worst_classes": sorted(((c, v["fg_iou"]) for c, v in per_class.items()),
                                    key=lambda kv: (kv[1], kv[0]))[:worst],
            "worst": sorted(scores, key=lambda kv: (kv[1], kv[0]))[:worst],
        }
