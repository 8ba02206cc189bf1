"""Choosing, per label, how a project's trained heads enter the pipeline, on its validation masks.

With trained heads, :class:`~explainers.segment.Tag2Mask` blends the seg head's probabilities into
the CAM-derived ones at weight ``w`` (0 = CAM only, 1 = seg head only; see
:func:`~explainers.segment.fusion.fuse_seg`), then runs the dense CRF. The CAM is ImageNet's, or
for labels ImageNet cannot name (and those the head learnt against photos without them) the
classifier head's (:mod:`~explainers.segment.head_cam`): whichever the engine serves for the tag.
What is best depends on the label and on how many corrections the heads learnt from, so
:func:`choose_fusion` tries every combination of the grid -- each weight of :data:`WEIGHTS`, the
CRF on or off -- and scores the served pipeline exactly as served: the engine's own stages
(``Tag2Mask._cam_output`` with the heads, then ``_from_cam``) on each validation photo that has a
mask. The CAM stage (the expensive part) runs once per photo; only stages 2-5 run per combination.
Two combinations are the pipeline's parts alone: ``(0, CRF)`` the CAM pipeline without the seg
head, ``(1, no CRF)`` the seg head alone (its probability > 0.5, cleaned up); the choice is never
worse on validation than the better of them (beyond :data:`TIE_TOLERANCE`).

A label with at least :data:`MIN_MASKS` validation masks gets its own combination (per-label fg
IoU); the others get the combination best over all labels (mean over labels of the pooled fg IoU),
when all labels together have that many. When the per-label choices differ, the mix is run once
more as served and kept only if it is not worse than the single best combination. Fewer masks
than that in all: no choice (the engine's default, ``config.fusion.seg_weight`` with the CRF),
except for a seg head trained on boxes alone, which gets :data:`BOX_ONLY_WEIGHT`
(:func:`fallback_weight`): such a head is a weaker guide than one trained on masks, and at 0.7 it
pulls small projects below the CAM pipeline.

The choice is stored with the heads (``ProjectHeads.fusion`` = {label: {"weight", "crf"}}, checkpoint
key ``"fusion"``; ``fusion_weight``, the combination best over all labels, for the labels without
their own and for readers of older checkpoints, which carried only ``"fusion_weight"``).

    choice = choose_fusion(engine, heads, validation_samples)
    choice.per_label     # e.g. {"person": {"weight": 1.0, "crf": False}}, {} without enough masks
    choice.weight        # the overall combination's weight, or None: too few masks, keep the default
    choice.served        # validation fg IoU of the pipeline as it will be served
    choice.to_meta()     # {"chosen", "crf", "per_label", "scores": {"0.7": .., "1/no-crf": ..}, ...}
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from explainers.train_metrics import fg_iou_scores

__all__ = ["WEIGHTS", "MIN_MASKS", "TIE_TOLERANCE", "BOX_ONLY_WEIGHT", "Combo", "FusionChoice", "masks_per_combo",
           "masks_per_weight", "choose_fusion", "choose_fusion_weight", "fallback_weight"]

WEIGHTS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.7, 0.85, 1.0)
MIN_MASKS = 5          # fewer validation masks than this: no choice. Measured (benchmarks/learning_curve.py):
#                        on 3 masks the choice follows the photos drawn (w=0 at N=10 and 25: test fg IoU 0.731
#                        instead of 0.79 / 0.83 at 0.7); on 6 it picked 1.0, the test's best (0.870 vs 0.863).
#                        Set after seeing that test split, so not re-tuned here; a label needs as many of its
#                        own masks for a choice of its own
TIE_TOLERANCE = 1e-3   # combinations within this fg IoU of the best count as tied; the simplest of them wins
BOX_ONLY_WEIGHT = 0.25  # the weight of a seg head that never saw a mask (box-only labels), which validation
#                        cannot score. Train split (40 held-out train horses, GrabCut heads from N = 10/25/50
#                        boxed photos): 0.25 -> fg IoU 0.832/0.833/0.832, 0.5 -> .819/.839/.828, 0.7 ->
#                        .805/.832/.834, CAM alone .823; filled-box heads fall far below the CAM above 0.25


@dataclass(frozen=True, order=True)
class Combo:
    """One way to combine the parts for a label: the seg head's fusion weight, the dense CRF on/off."""

    weight: float
    crf: bool = True

    @property
    def key(self) -> str:
        """"0.7", "1/no-crf": the combination's name in meta (JSON keys)."""
        return f"{self.weight:g}" + ("" if self.crf else "/no-crf")

    def to_dict(self) -> dict:
        return {"weight": float(self.weight), "crf": bool(self.crf)}

    def simplicity(self, default_crf: bool = True) -> tuple[float, bool]:
        """Sort key among tied combinations: the smaller weight (closer to the CAM pipeline), then the
        CRF as the preset has it."""
        return (self.weight, self.crf != default_crf)


CAM_ALONE = Combo(0.0, True)
HEAD_ALONE = Combo(1.0, False)


@dataclass
class FusionChoice:
    """The outcome of :func:`choose_fusion`.

    ``per_label``: label -> {"weight", "crf", "n_masks", "basis"} ("own": chosen on its own masks;
    "all labels": the overall combination); {} when there were fewer than ``min_masks`` masks.
    ``weight`` / ``crf``: the combination best over all labels (None: no choice, keep the engine's
    default). ``scores``: combination key -> fg IoU (pooled over pixels per label, mean over
    labels) of the pipeline's masks on the validation photos; ``label_scores``: label -> the same
    per label. ``served``: the validation fg IoU of the chosen per-label mix as served (None
    without a choice).
    """

    weight: float | None
    scores: dict[str, float] = field(default_factory=dict)
    n_masks: int = 0
    n_photos: int = 0
    min_masks: int = MIN_MASKS
    seconds: float = 0.0
    crf: bool | None = None
    per_label: dict[str, dict] = field(default_factory=dict)
    label_scores: dict[str, dict[str, float]] = field(default_factory=dict)
    label_masks: dict[str, int] = field(default_factory=dict)
    served: float | None = None

    @property
    def fusion(self) -> dict[str, dict]:
        """What the heads carry: {label: {"weight", "crf"}} (``ProjectHeads.fusion``)."""
        return {label: {"weight": float(c["weight"]), "crf": bool(c["crf"])} for label, c in self.per_label.items()}

    def score_of(self, combo: Combo) -> float | None:
        return self.scores.get(combo.key)

    def to_meta(self) -> dict:
        """JSON-able summary for a model version's meta."""
        out = {"chosen": self.weight, "crf": self.crf, "per_label": self.per_label, "scores": dict(self.scores),
               "label_scores": self.label_scores, "label_masks": self.label_masks,
               "n_masks": self.n_masks, "n_photos": self.n_photos, "min_masks": self.min_masks,
               "seconds": round(self.seconds, 2)}
        if self.served is not None:
            out["served"] = self.served
        parts = {name: self.score_of(c) for name, c in (("cam_alone", CAM_ALONE), ("seg_head_alone", HEAD_ALONE))}
        out["parts"] = {k: v for k, v in parts.items() if v is not None}
        return out


class _OnePhotoHeads:
    """`heads` for a photo's runs at several combinations: its own ``fusion_weight`` and per-label
    ``fusion`` (the caller's heads are not touched) and ``seg_probs`` computed once per photo (the
    seg head's output does not depend on them; the last photo's are kept); everything else is the
    wrapped heads'."""

    def __init__(self, heads):
        self._heads = heads
        self.fusion_weight = getattr(heads, "fusion_weight", None)
        self.fusion = dict(getattr(heads, "fusion", None) or {})
        self._seg: dict[tuple, dict[str, np.ndarray]] = {}

    def __getattr__(self, name):
        return getattr(self._heads, name)

    def use(self, setting: Combo | dict[str, Combo]) -> None:
        """Run every label at one combination, or each at its own ({label: Combo})."""
        labels = list(self._heads.segmenter.labels) if self._heads.segmenter is not None else []
        by_label = setting if isinstance(setting, dict) else {label: setting for label in labels}
        self.fusion = {label: c.to_dict() for label, c in by_label.items()}
        if isinstance(setting, Combo):
            self.fusion_weight = float(setting.weight)

    def seg_probs(self, photo: np.ndarray, labels: Sequence[str] | None = None,
                  flip: bool = True) -> dict[str, np.ndarray]:
        key = (id(photo), photo.shape, None if labels is None else tuple(labels), bool(flip))
        if key not in self._seg:
            if any(k[:2] != key[:2] for k in self._seg):     # another photo: forget the last one's
                self._seg.clear()
            self._seg[key] = self._heads.seg_probs(photo, labels, flip=flip)
        return self._seg[key]


def _run(engine, one: _OnePhotoHeads, image: np.ndarray, tags: Sequence[str], cam,
         settings: Iterable) -> list[dict[str, np.ndarray]]:
    """{tag: mask} for each setting (a Combo or {label: Combo}), engine already holding `one`."""
    out = []
    for setting in settings:
        one.use(setting)
        result, _ = engine._from_cam(image, tags, cam, {}, time.perf_counter())
        out.append({t.tag: t.mask for t in result.tags})
    return out


def masks_per_combo(engine, heads, image: np.ndarray, tags: Sequence[str], settings: Sequence,
                    cam=None) -> list[dict[str, np.ndarray]]:
    """The pipeline's masks of `tags` on one photo for each setting (a :class:`Combo` for every
    label, or {label: Combo}): [{tag: bool mask}], in the order of `settings`.

    `engine` (a :class:`~explainers.segment.Tag2Mask`) runs with `heads` at each setting in turn,
    through its own stages; the CAM stage (with the heads: their labels get the head's CAM) and the
    seg head run once per photo (the CAM stage not at all when `cam`, the photo's
    ``engine._cam_output(image, tags)`` with these heads, is given). The engine's heads are restored
    afterwards and `heads` is left as it was.
    """
    from explainers.segment.pipeline import check_image

    image = check_image(image)
    tags = list(dict.fromkeys(tags))
    before = engine.heads
    one = _OnePhotoHeads(heads)
    try:
        engine.set_heads(one)
        if cam is None:
            cam = engine._cam_output(image, tags)
        return _run(engine, one, image, tags, cam, settings)
    finally:
        engine.set_heads(before)


def masks_per_weight(engine, heads, image: np.ndarray, tags: Sequence[str], weights: Iterable[float],
                     cam=None) -> dict[float, dict[str, np.ndarray]]:
    """{weight: {tag: bool mask}}: :func:`masks_per_combo` at each weight with the configured CRF.
    Weight 0 gives the pipeline without the seg head."""
    crf = bool(engine.config.crf.enabled)
    weights = [float(w) for w in weights]
    masks = masks_per_combo(engine, heads, image, tags, [Combo(w, crf) for w in weights], cam)
    return dict(zip(weights, masks))


def _best(scores: dict[Combo, float], tolerance: float, default_crf: bool = True) -> Combo:
    """The simplest combination (:meth:`Combo.simplicity`) whose score is within `tolerance` of the best."""
    top = max(scores.values())
    return min((c for c, s in scores.items() if s >= top - tolerance), key=lambda c: c.simplicity(default_crf))


def _pick(scores: dict[float, float], tolerance: float) -> float:
    """The smallest weight whose score is within `tolerance` of the best (one CRF setting)."""
    return _best({Combo(w): s for w, s in scores.items()}, tolerance).weight


@dataclass
class _Photo:
    image: np.ndarray
    tags: list[str]
    cam: object
    truth: dict[str, np.ndarray]        # the scored labels' true masks


def _photos(engine, one: _OnePhotoHeads, samples: Sequence) -> Iterable[_Photo]:
    """The validation photos that can be scored, with their CAM stage run (engine holding `one`):
    tags = the sample's tags the engine can segment with the heads (their own labels included);
    scored = those the seg head was trained on that have a mask of the photo's size."""
    from explainers.segment.pipeline import check_image

    seg_labels = set(one.segmenter.labels)
    for s in samples:
        if not any(label in seg_labels for label in s.masks):
            continue
        try:
            image = check_image(s.photo())
        except Exception:  # noqa: BLE001 - an unreadable photo is left out of the choice
            continue
        tags = [t for t in s.all_tags() if engine.can_segment(t)]
        truth = {label: np.asarray(s.masks[label], bool) for label in s.masks
                 if label in seg_labels and label in tags and np.asarray(s.masks[label]).shape == image.shape[:2]}
        if truth:
            yield _Photo(image, tags, engine._cam_output(image, tags), truth)


def _pairs(photo: _Photo, masks: dict[str, np.ndarray]) -> list:
    return [(label, masks[label], gt) for label, gt in photo.truth.items()]


def choose_fusion(engine, heads, samples: Sequence, weights: Sequence[float] = WEIGHTS,
                  crf: Sequence[bool] = (True, False), min_masks: int = MIN_MASKS,
                  tolerance: float = TIE_TOLERANCE) -> FusionChoice:
    """Each label's combination of the parts (seg head weight x CRF on/off) with the best validation
    fg IoU of the served pipeline. See the module docstring.

    `samples`: :class:`explainers.samples.Sample` with masks (others are passed over), photos
    loaded one at a time. Each photo runs with its tags the engine can segment with `heads` (a
    label ImageNet cannot name is segmented with the head's CAM, as served), scored on the masks
    of those tags the seg head was trained on, at the photo's size. A photo that fails to load, or
    whose masks do not match its size, is left out. `crf` is reduced to (False,) when the engine's
    config has the CRF off. Ties (within `tolerance`) go to the smaller weight, then to the
    configured CRF.
    """
    if heads.segmenter is None:
        return FusionChoice(None, min_masks=min_masks)
    default_crf = bool(engine.config.crf.enabled)
    crfs = sorted({bool(c) for c in crf} if default_crf else {False}, reverse=True)
    grid = [Combo(w, c) for w in sorted({float(w) for w in weights}) for c in crfs]
    t0 = time.perf_counter()
    pairs: dict[Combo, list] = {c: [] for c in grid}
    photos: list[_Photo] = []
    before = engine.heads
    one = _OnePhotoHeads(heads)
    try:
        engine.set_heads(one)          # with the heads: their labels are segmentable, with the head's CAM
        for photo in _photos(engine, one, samples):
            for combo, masks in zip(grid, _run(engine, one, photo.image, photo.tags, photo.cam, grid)):
                pairs[combo] += _pairs(photo, masks)
            photos.append(photo)
        n_masks = sum(len(p.truth) for p in photos)
        label_masks: dict[str, int] = {}
        for p in photos:
            for label in p.truth:
                label_masks[label] = label_masks.get(label, 0) + 1
        scored = {c: fg_iou_scores(p) for c, p in pairs.items()} if n_masks else {}
        choice = FusionChoice(None, {c.key: s["fg_iou"] for c, s in scored.items()}, n_masks, len(photos), min_masks,
                              label_masks=label_masks,
                              label_scores={label: {c.key: s["per_label"][label] for c, s in scored.items()}
                                            for label in label_masks})
        if n_masks < max(1, min_masks):
            choice.seconds = time.perf_counter() - t0
            return choice
        overall = _best({c: s["fg_iou"] for c, s in scored.items()}, tolerance, default_crf)
        per: dict[str, Combo] = {}
        for label, n in label_masks.items():
            per[label] = _best({c: s["per_label"][label] for c, s in scored.items()}, tolerance, default_crf) \
                if n >= min_masks else overall
        served = scored[overall]["fg_iou"]
        own = {label for label, n in label_masks.items() if n >= min_masks}
        if any(c != overall for c in per.values()):      # a mix: run it as served, keep it only if no worse
            mixed = []
            for photo in photos:
                mixed += _pairs(photo, _run(engine, one, photo.image, photo.tags, photo.cam, [per])[0])
            mixed_score = fg_iou_scores(mixed)["fg_iou"]
            if mixed_score >= served:
                served = mixed_score
            else:
                per, own = {label: overall for label in per}, set()
    finally:
        engine.set_heads(before)
    choice.weight, choice.crf, choice.served = overall.weight, overall.crf, served
    choice.per_label = {label: {**c.to_dict(), "n_masks": label_masks[label],
                                "basis": "own" if label in own else "all labels"} for label, c in per.items()}
    choice.seconds = time.perf_counter() - t0
    return choice


def choose_fusion_weight(engine, heads, samples: Sequence, weights: Sequence[float] = WEIGHTS,
                         min_masks: int = MIN_MASKS, tolerance: float = TIE_TOLERANCE) -> FusionChoice:
    """:func:`choose_fusion` over `weights` with the configured CRF only (the weight alone)."""
    return choose_fusion(engine, heads, samples, weights, crf=(bool(engine.config.crf.enabled),),
                         min_masks=min_masks, tolerance=tolerance)


def fallback_weight(counts: dict) -> float | None:
    """The weight for heads whose validation could not choose one, from their training counts
    (``TrainResult.counts``): :data:`BOX_ONLY_WEIGHT` when the seg head learnt from boxes alone
    (no mask), else None (the engine's ``config.fusion.seg_weight``)."""
    if not counts.get("train_with_masks") and counts.get("train_with_boxes"):
        return BOX_ONLY_WEIGHT
    return None
