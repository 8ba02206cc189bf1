"""Self-training: a seg head learned from the pipeline's own confident pseudo-masks (no ground truth).

The standard last step of weakly supervised segmentation: CAM + CRF masks are right in their
confident interior and wrong mostly near the outline and on hard photos. A light seg head
(:class:`explainers.heads.SegHead`) trained on the photos' confident pixels only learns what the
object looks like across the whole set, and its probabilities, fused with the CAMs before the CRF
(``Tag2Mask(heads=...)``, ``config.fusion``), fix photos where the CAM alone went astray.

Steps (:func:`self_train`):

1. run the engine on every photo with its tags -> masks (after clean-up) and the CRF's per-pixel
   class probabilities (:func:`pseudo_labels`);
2. per photo and label, a target at the seg head's loss resolution: 1 inside the mask, 0 outside;
   a weight of 0 (ignored) where the CRF was unsure (probability of the chosen class below
   ``confidence``) and, optionally, in a band around the mask's outline (``band``); photos whose
   mask covers almost nothing or too much (``min_fg``/``max_fg``) are left out, and optionally the
   least confident ones (``keep_fraction``);
3. train a SegHead on the frozen backbone's features (:func:`explainers.head_training.train_segmenter`,
   cached features, photo + mirror image);
4. optionally more rounds: the engine, now fused with the head, gives the next pseudo-masks.

Only the photos and their tags are used: no ground-truth mask. Usage::

    engine = Tag2Mask(backbone)
    result = self_train(engine, photos, [["horse"]] * len(photos), SelfTrainConfig(rounds=1))
    engine.set_heads(result.heads)           # or Tag2Mask(backbone, heads=result.heads)
    torch.save(result.checkpoint(), "heads.pt")   # ProjectHeads.from_checkpoint(ckpt, backbone)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import cv2
import numpy as np

from explainers.feature_cache import FeatureCache
from explainers.head_training import train_segmenter
from explainers.heads import BackboneFeatures
from explainers.project_heads import ProjectHeads
from explainers.samples import Sample
from explainers.train_config import TrainConfig

__all__ = ["SelfTrainConfig", "PseudoLabel", "SelfTrainResult", "pseudo_labels", "pseudo_targets", "confidence",
           "train_on_pseudo", "self_train", "pseudo_training_targets"]



def _default_train() -> TrainConfig:
    return TrainConfig(size=256, flip=True, seg_epochs=30, seg_lr=3e-3, seg_batch=8, dice_weight=0.5)


@dataclass
class SelfTrainConfig:
    rounds: int = 1                 # 1 = train once on the plain pipeline's masks; 2 = once more on the fused masks
    confidence: float = 0.9         # a pixel supervises only when the CRF gave its class at least this probability
    band: float = 0.0               # ignore band on each side of the outline, as a fraction of the target side
    #                                 (0.04 -> fg IoU 0.79 vs 0.84 without, 60 train photos: keep the outline)
    min_fg: float = 0.01            # a mask covering less of the photo than this, or more than max_fg,
    max_fg: float = 0.5             # is degenerate: the photo is left out of training (an object rarely
    #                                 fills half a photo; masks that do had spread over a cluttered scene)
    keep_fraction: float = 0.8      # train on this share of the photos, the most confident ones (mean CRF
    #                                 probability of the chosen class; it tracks the mask's quality).
    #                                 60 train photos: fused fg IoU 0.852 with 0.8, 0.839 with 1.0
    soft: bool = False              # targets = the CRF probability instead of the 0/1 mask
    min_label_photos: int = 8       # pseudo_training_targets: a label with fewer confident pseudo-masked photos
    #                                 teaches nothing where it is (its tagged pixels get weight 0): zero-shot stays
    train: TrainConfig = field(default_factory=_default_train)


@dataclass
class PseudoLabel:
    """The engine's output on one photo: per tag its mask (bool, photo size) and the CRF marginals."""
    tags: list[str]
    masks: list[np.ndarray]          # one bool (H, W) per tag
    probs: np.ndarray | None         # (K + 1, h, w) CRF probabilities at the working resolution, bg first
    scores: list[float]


@dataclass
class SelfTrainResult:
    heads: ProjectHeads
    labels: list[str]
    rounds: list[dict]               # per round: photos used/left out, supervised pixel share, seconds
    pseudo: list[PseudoLabel]        # the last round's pseudo-labels (before its training)
    backbone: str = ""
    layers: list[str] = field(default_factory=list)
    size: int = 256

    def checkpoint(self) -> dict:
        """The heads as a ``ProjectHeads.from_checkpoint`` dict (plain types + tensors, no classifier)."""
        seg = self.heads.segmenter
        state = {k: v.detach().cpu().clone() for k, v in seg.state_dict().items()}
        return {"format": 1, "backbone": self.backbone, "layers": list(self.layers), "size": int(self.size),
                "labels": list(self.labels), "classifier": None, "segmenter": {"spec": seg.spec(), "state": state},
                "self_training": self.rounds}


def _loader(photo) -> Callable[[], np.ndarray]:
    if isinstance(photo, np.ndarray):
        return lambda: photo
    if callable(photo):
        return photo
    from explainers.imageio import load_image

    return lambda: load_image(photo)


def pseudo_labels(engine, photos: Sequence, tags_per_photo: Sequence[Sequence[str]],
                  progress: Callable[[int, int], None] | None = None) -> list[PseudoLabel | None]:
    """Run `engine` (a Tag2Mask, with or without heads) on each photo; None where a photo fails or one
    of its tags cannot be segmented (that tag would otherwise train as absent from the photo)."""
    if len(photos) != len(tags_per_photo):
        raise ValueError(f"{len(photos)} photos but {len(tags_per_photo)} tag lists")
    out: list[PseudoLabel | None] = []
    for i, (photo, tags) in enumerate(zip(photos, tags_per_photo)):
        try:
            res, probs = engine.predict_with_probs(_loader(photo)(), list(tags))
            if res.skipped:   # a tag it could not segment would read as absent (a negative) in pseudo_targets
                raise ValueError(f"tags left out: {sorted(res.skipped)}")
            out.append(PseudoLabel([t.tag for t in res.tags], [t.mask for t in res.tags], probs,
                                   [t.score for t in res.tags]))
        except Exception:  # noqa: BLE001 - a photo that cannot be segmented just does not supervise
            out.append(None)
        if progress is not None:
            progress(i + 1, len(photos))
    return out


def confidence(pseudo: PseudoLabel) -> float:
    """Mean over pixels of the CRF probability of the class each pixel was given (1 = sure everywhere)."""
    if pseudo.probs is None:
        return 1.0
    return float(pseudo.probs.max(axis=0).mean())


def pseudo_targets(pseudo: PseudoLabel, labels: Sequence[str], out: int,
                   cfg: SelfTrainConfig) -> tuple[np.ndarray, np.ndarray] | None:
    """(target, weight) float32 (L, out, out) for the square-resized photo; None when it should not train.

    Labels the photo is not tagged with are negatives everywhere; a tagged label supervises its
    confident pixels outside the outline band.
    """
    n = len(labels)
    target = np.zeros((n, out, out), np.float32)
    weight = np.zeros((n, out, out), np.float32)
    index = {t: k for k, t in enumerate(pseudo.tags)}
    radius = int(round(cfg.band * out))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1)) if radius > 0 else None
    for li, label in enumerate(labels):
        k = index.get(label)
        if k is None:
            weight[li] = 1.0
            continue
        mask = pseudo.masks[k]
        frac = float(mask.mean())
        if not cfg.min_fg <= frac <= cfg.max_fg:
            return None
        m = cv2.resize(mask.astype(np.float32), (out, out), interpolation=cv2.INTER_AREA)
        hard = m >= 0.5
        w = np.ones((out, out), np.float32)
        if pseudo.probs is not None:
            p_fg = cv2.resize(pseudo.probs[k + 1], (out, out), interpolation=cv2.INTER_AREA)
            conf = np.where(hard, p_fg, 1.0 - p_fg)
            w[conf < cfg.confidence] = 0.0
            if cfg.soft:
                m = p_fg
        if kernel is not None:
            u8 = hard.astype(np.uint8)
            band = cv2.dilate(u8, kernel).astype(bool) & ~cv2.erode(u8, kernel).astype(bool)
            w[band] = 0.0
        target[li] = m if cfg.soft else hard.astype(np.float32)
        weight[li] = w
    if not weight.any():
        return None
    return target, weight


def keep_floor(confidences: Sequence[float], keep_fraction: float) -> float:
    """The least confidence a photo needs to be among the ``keep_fraction`` most confident (-1: all kept)."""
    if keep_fraction >= 1.0 or not confidences:
        return -1.0
    scores = sorted(confidences, reverse=True)
    return scores[max(0, min(len(scores), int(np.ceil(keep_fraction * len(scores)))) - 1)]


def train_on_pseudo(backbone, photos: Sequence, pseudo: Sequence[PseudoLabel | None], labels: Sequence[str],
                    cfg: SelfTrainConfig, cache: FeatureCache | None = None, keys: Sequence[str] | None = None
                    ) -> tuple[ProjectHeads, dict]:
    """Train a SegHead on the confident part of the pseudo-labels; (heads, stats)."""
    tcfg = cfg.train
    t0 = time.perf_counter()
    features = cache.features if cache is not None else BackboneFeatures(backbone)
    cache = cache or FeatureCache(features, tcfg.size, tcfg.flip, tcfg.extract_batch)
    if cache.size != tcfg.size or cache.flip != tcfg.flip:
        raise ValueError("the feature cache was built with another size/flip than config.train")
    out = tcfg.size // tcfg.target_stride
    keys = list(keys) if keys is not None else [f"photo{i}" for i in range(len(photos))]
    samples, targets = [], []
    usable = [p for p in pseudo if p is not None]
    floor = keep_floor([confidence(p) for p in usable], cfg.keep_fraction)
    for key, photo, p in zip(keys, photos, pseudo):
        if p is None or confidence(p) < floor:
            continue
        tw = pseudo_targets(p, labels, out, cfg)
        if tw is None:
            continue
        samples.append(Sample(key=str(key), tags=list(p.tags), load=_loader(photo)))
        targets.append(tw)
    if not samples:
        raise ValueError("no photo gave a usable pseudo-mask (all failed or degenerate)")
    entries = cache.get(samples)
    t1 = time.perf_counter()
    head = train_segmenter(entries, targets, labels, features.channels, tcfg)
    heads = ProjectHeads(backbone, None, head, features.layers, tcfg.size)
    supervised = float(np.mean([w.mean() for _, w in targets]))
    stats = {"photos": len(photos), "used": len(samples), "left_out": len(photos) - len(samples),
             "supervised_share": round(supervised, 4), "seconds_features": round(t1 - t0, 2),
             "seconds_training": round(time.perf_counter() - t1, 2)}
    return heads, stats


def self_train(engine, photos: Sequence, tags_per_photo: Sequence[Sequence[str]],
               config: SelfTrainConfig | None = None, labels: Sequence[str] | None = None,
               keys: Sequence[str] | None = None, progress: Callable[[str], None] | None = None) -> SelfTrainResult:
    """Self-train a seg head for `engine` (a :class:`explainers.segment.Tag2Mask`) on the photos.

    `photos`: arrays, loaders or paths; `tags_per_photo`: each photo's tags (what a person gave);
    `labels`: the head's labels (default: every tag seen, sorted). The engine's own heads are
    used for the first round's pseudo-masks if it has any, and are left as they were on return.
    """
    cfg = config or SelfTrainConfig()
    if cfg.rounds < 1:
        raise ValueError("rounds must be at least 1")
    labels = sorted({t for ts in tags_per_photo for t in ts}) if labels is None else list(labels)
    if not labels:
        raise ValueError("no tags: nothing to learn")
    say = progress or (lambda line: None)
    features = BackboneFeatures(engine.backbone)
    cache = FeatureCache(features, cfg.train.size, cfg.train.flip, cfg.train.extract_batch)
    before = engine.heads
    rounds: list[dict] = []
    heads = None
    pseudo: list = []
    try:
        for r in range(cfg.rounds):
            t = time.perf_counter()
            if heads is not None:
                engine.set_heads(heads)
            pseudo = pseudo_labels(engine, photos, tags_per_photo)
            seconds_pseudo = time.perf_counter() - t
            heads, stats = train_on_pseudo(engine.backbone, photos, pseudo, labels, cfg, cache, keys)
            stats = {"round": r + 1, "seconds_pseudo": round(seconds_pseudo, 2), **stats}
            rounds.append(stats)
            say(f"self-training round {r + 1}: {stats}")
    finally:
        engine.set_heads(before)
    return SelfTrainResult(heads=heads, labels=labels, rounds=rounds, pseudo=pseudo, backbone=engine.backbone.name,
                           layers=list(features.layers), size=cfg.train.size)


def pseudo_training_targets(engine, samples: Sequence[Sample], labels: Sequence[str], out: int,
                            cfg: SelfTrainConfig | None = None, known: dict | None = None,
                            on_photo: Callable[[str, tuple | None], None] | None = None,
                            progress: Callable[[int, int], None] | None = None) -> tuple[dict, dict]:
    """The seg head's (target, weight) maps from `engine`'s own masks, for training alongside corrected
    masks (:func:`explainers.training.train_heads` ``pseudo_targets``): the self-training of a
    project's photos that carry tags and no mask.

    `samples`: photos with tags only (others are skipped); `labels`: the heads' labels, in order;
    `out`: the target side (``TrainConfig.size // target_stride``). Steps 1-2 of the module docstring
    (confident pixels; degenerate masks and the least confident ``1 - keep_fraction`` of the photos
    left out). A label with fewer than ``min_label_photos`` photos whose pseudo-mask trains it gets
    weight 0 on its tagged pixels everywhere (it learns nothing where it is, only where it is not)
    and is listed in ``stats["zero_shot"]``: the caller serves it without the seg head.

    Resuming: each photo's outcome, ``((target, weight), confidence)`` or None (it failed or its mask
    was degenerate), goes to `on_photo(key, outcome)` as soon as it is known; `known` = {key: outcome}
    from an earlier, interrupted run (for these labels and this engine) is not computed again.

    Returns ({sample key: (target, weight)}, stats: ``photos``, ``used``, ``computed``, ``per_label``
    {label: photos}, ``zero_shot`` [labels], ``seconds``).
    """
    cfg = cfg or SelfTrainConfig()
    t0 = time.perf_counter()
    labels = list(labels)
    todo = [s for s in samples if not s.has_regions and s.tags]
    outcomes = {str(s.key): (known or {})[str(s.key)] for s in todo if str(s.key) in (known or {})}
    fresh = [s for s in todo if str(s.key) not in outcomes]
    for i, s in enumerate(fresh):
        (p,) = pseudo_labels(engine, [s.photo], [list(s.tags)])
        outcome = None
        if p is not None:
            tw = pseudo_targets(p, labels, out, cfg)
            outcome = None if tw is None else (tw, confidence(p))
        outcomes[str(s.key)] = outcome
        if on_photo is not None:
            on_photo(str(s.key), outcome)
        if progress is not None:
            progress(len(todo) - len(fresh) + i + 1, len(todo))
    usable = {k: o for k, o in outcomes.items() if o is not None}
    floor = keep_floor([o[1] for o in usable.values()], cfg.keep_fraction)
    targets = {k: (o[0][0].copy(), o[0][1].copy()) for k, o in usable.items() if o[1] >= floor}
    tags_of = {str(s.key): set(s.tags) for s in todo}
    per_label = {label: sum(1 for k in targets if label in tags_of.get(k, ())) for label in labels}
    zero_shot = [label for label, n in per_label.items() if n < cfg.min_label_photos]
    for key, (target, weight) in targets.items():
        for label in zero_shot:
            if label in tags_of.get(key, ()):
                k = labels.index(label)
                weight[k] = 0.0
                target[k] = 0.0
    stats = {"photos": len(todo), "used": len(targets), "computed": len(fresh), "per_label": per_label,
             "zero_shot": zero_shot, "seconds": round(time.perf_counter() - t0, 2)}
    return targets, stats
