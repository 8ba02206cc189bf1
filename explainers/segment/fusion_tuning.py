"""Choosing the seg head's weight in the pipeline's fusion on a project's validation masks.

With trained heads, :class:`~explainers.segment.Tag2Mask` blends the seg head's probabilities into
the CAM-derived ones before the dense CRF, at weight ``w`` (0 = CAM only, 1 = seg head only; see
:func:`~explainers.segment.pipeline.fuse_seg`). Which ``w`` is best depends on how good the head
is, so on how many corrections it learnt from: :func:`choose_fusion_weight` runs the whole pipeline
on each validation photo that has a mask, for every weight of a grid, and keeps the one with the
best foreground IoU. The CAM stage (the expensive part) runs once per photo; only stages 2-5 run
per weight (:func:`masks_per_weight`).

The choice is stored with the heads (``ProjectHeads.fusion_weight``, checkpoint key
``"fusion_weight"``), which the engine then uses instead of ``config.fusion.seg_weight``.

    choice = choose_fusion_weight(engine, heads, validation_samples)
    choice.weight        # e.g. 0.85, or None: fewer than MIN_MASKS masks, keep the default
    choice.to_meta()     # {"chosen", "scores": {"0.0": fg IoU, ...}, "n_masks", "n_photos", ...}

Without enough validation masks the engine's default (0.7) stays, except for a seg head trained on
boxes alone, which gets :data:`BOX_ONLY_WEIGHT` (:func:`fallback_weight`): such a head is a weaker
guide than one trained on masks, and at 0.7 it pulls small projects below the CAM pipeline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

__all__ = ["WEIGHTS", "MIN_MASKS", "TIE_TOLERANCE", "BOX_ONLY_WEIGHT", "FusionChoice", "masks_per_weight",
           "choose_fusion_weight", "fallback_weight"]

WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.7, 0.85, 1.0)
MIN_MASKS = 5          # fewer validation masks than this: no choice. Measured (benchmarks/learning_curve.py):
#                        on 3 masks the choice follows the photos drawn (w=0 at N=10 and 25: test fg IoU 0.731
#                        instead of 0.79 / 0.83 at 0.7); on 6 it picked 1.0, the test's best (0.870 vs 0.863)
TIE_TOLERANCE = 1e-3   # weights within this fg IoU of the best count as tied; the smallest of them wins
BOX_ONLY_WEIGHT = 0.25  # the weight of a seg head that never saw a mask (box-only labels), which validation
#                        cannot score. Train split (40 held-out train horses, GrabCut heads from N = 10/25/50
#                        boxed photos): 0.25 -> fg IoU 0.832/0.833/0.832, 0.5 -> .819/.839/.828, 0.7 ->
#                        .805/.832/.834, CAM alone .823; filled-box heads fall far below the CAM above 0.25


@dataclass
class FusionChoice:
    """The outcome of :func:`choose_fusion_weight`.

    ``weight``: the chosen weight, None when there were fewer than ``min_masks`` validation masks
    (keep the engine's default). ``scores``: weight -> fg IoU (pooled over pixels per label, mean
    over labels) of the pipeline's masks on the validation photos.
    """

    weight: float | None
    scores: dict[float, float] = field(default_factory=dict)
    n_masks: int = 0
    n_photos: int = 0
    min_masks: int = MIN_MASKS
    seconds: float = 0.0

    def to_meta(self) -> dict:
        """JSON-able summary for a model version's meta (weights as strings: JSON keys)."""
        return {"chosen": self.weight, "scores": {str(w): s for w, s in self.scores.items()},
                "n_masks": self.n_masks, "n_photos": self.n_photos, "min_masks": self.min_masks,
                "seconds": round(self.seconds, 2)}


class _OnePhotoHeads:
    """`heads` for one photo's runs at several weights: its own ``fusion_weight`` (the caller's heads
    are not touched) and ``seg_probs`` computed once (the seg head's output does not depend on the
    weight); everything else is the wrapped heads'."""

    def __init__(self, heads):
        self._heads = heads
        self.fusion_weight = heads.fusion_weight
        self._seg: dict[tuple, dict[str, np.ndarray]] = {}

    def __getattr__(self, name):
        return getattr(self._heads, name)

    def seg_probs(self, photo: np.ndarray, labels: Sequence[str] | None = None,
                  flip: bool = True) -> dict[str, np.ndarray]:
        key = (None if labels is None else tuple(labels), bool(flip))
        if key not in self._seg:
            self._seg[key] = self._heads.seg_probs(photo, labels, flip=flip)
        return self._seg[key]


def masks_per_weight(engine, heads, image: np.ndarray, tags: Sequence[str], weights: Iterable[float],
                     cam=None) -> dict[float, dict[str, np.ndarray]]:
    """The pipeline's masks of `tags` on one photo for each fusion weight: {weight: {tag: bool mask}}.

    `engine` (a :class:`~explainers.segment.Tag2Mask`) runs with `heads` at each weight in turn; the
    CAM stage and the seg head run once per photo (the CAM stage not at all when `cam`, the photo's
    ``engine._cam_output(image, tags)`` with these heads, is given). The engine's heads are restored
    afterwards and `heads` is left as it was. Weight 0 gives the pipeline without the seg head.
    """
    from explainers.segment.pipeline import check_image

    image = check_image(image)
    tags = list(dict.fromkeys(tags))
    before = engine.heads
    one = _OnePhotoHeads(heads)
    out: dict[float, dict[str, np.ndarray]] = {}
    try:
        engine.set_heads(one)
        if cam is None:
            cam = engine._cam_output(image, tags)
        for w in weights:
            one.fusion_weight = float(w)
            result, _ = engine._from_cam(image, tags, cam, {}, time.perf_counter())
            out[float(w)] = {t.tag: t.mask for t in result.tags}
    finally:
        engine.set_heads(before)
    return out


def _pick(scores: dict[float, float], tolerance: float) -> float:
    """The smallest weight whose score is within `tolerance` of the best."""
    best = max(scores.values())
    return min(w for w, s in scores.items() if s >= best - tolerance)


def choose_fusion_weight(engine, heads, samples: Sequence, weights: Sequence[float] = WEIGHTS,
                         min_masks: int = MIN_MASKS, tolerance: float = TIE_TOLERANCE) -> FusionChoice:
    """The fusion weight with the best validation fg IoU, over `weights`.

    `samples`: :class:`explainers.training.Sample` with masks (others are passed over), photos
    loaded one at a time. Each photo runs with its tags the engine can segment (``engine.can_segment``)
    and is scored on the masks of those tags the seg head was trained on, at the photo's size. A
    photo that fails to load, or whose masks do not match its size, is left out. Ties (within
    `tolerance`) go to the smaller weight, the one closer to the CAM pipeline. Fewer than
    `min_masks` scored masks -> ``weight=None`` (the scores are still reported).
    """
    from explainers.training import fg_iou_scores

    if heads.segmenter is None:
        return FusionChoice(None, min_masks=min_masks)
    weights = sorted({float(w) for w in weights})
    t0 = time.perf_counter()
    pairs: dict[float, list] = {w: [] for w in weights}
    n_masks = n_photos = 0
    for s in samples:
        scored = [label for label in s.masks if label in heads.segmenter.labels]
        if not scored:
            continue
        try:
            image = s.photo()
        except Exception:  # noqa: BLE001 - an unreadable photo is left out of the choice
            continue
        tags = [t for t in s.all_tags() if engine.can_segment(t)]
        scored = [label for label in scored if label in tags and np.asarray(s.masks[label]).shape == image.shape[:2]]
        if not scored:
            continue
        for w, masks in masks_per_weight(engine, heads, image, tags, weights).items():
            pairs[w] += [(label, masks[label], np.asarray(s.masks[label], bool)) for label in scored]
        n_masks += len(scored)
        n_photos += 1
    scores = {w: fg_iou_scores(p)["fg_iou"] for w, p in pairs.items()} if n_masks else {}
    weight = _pick(scores, tolerance) if n_masks >= max(1, min_masks) else None
    return FusionChoice(weight, scores, n_masks, n_photos, min_masks, time.perf_counter() - t0)


def fallback_weight(counts: dict) -> float | None:
    """The weight for heads whose validation could not choose one, from their training counts
    (``TrainResult.counts``): :data:`BOX_ONLY_WEIGHT` when the seg head learnt from boxes alone
    (no mask), else None (the engine's ``config.fusion.seg_weight``)."""
    if not counts.get("train_with_masks") and counts.get("train_with_boxes"):
        return BOX_ONLY_WEIGHT
    return None
