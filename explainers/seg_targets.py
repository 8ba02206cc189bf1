"""What the seg head is trained to output on each example: (target, weight) maps per label.

A mask supervises every pixel; a box-only label supervises outside = 0 fully and inside the box
either with GrabCut's pseudo-mask at a lower weight (``box_mode="grabcut"``,
:func:`explainers.box_masks.box_pseudo_mask`, computed by :class:`PseudoMasks` when the feature
cache loads the photo) or with the filled box at ``box_weight`` (``box_mode="box"``); a label absent
from a photo's tags is a negative everywhere (:func:`seg_targets`).
"""
from __future__ import annotations

import time
from typing import Sequence

import cv2
import numpy as np

from explainers.box_masks import box_pseudo_mask, fill_boxes
from explainers.samples import Sample
from explainers.train_config import TrainConfig

__all__ = ["Targets", "seg_targets", "box_pseudo_targets", "PseudoMasks"]

Targets = tuple[np.ndarray, np.ndarray]     # (target, weight) float32 arrays of the same shape


def seg_targets(sample: Sample, labels: Sequence[str], out: int, cfg: TrainConfig,
                pseudo: dict[str, Targets] | None = None) -> Targets | None:
    """(target, weight) float32 (K, out, out) for the square-resized photo; None if nothing supervises.

    A mask supervises every pixel; a box-only label uses its entry in `pseudo` (label -> (target,
    weight) at (out, out), from :func:`box_pseudo_targets`) when there is one, else the filled box
    (outside 0 at weight 1, inside 1 at ``box_weight``); a label missing from the tags is background.
    """
    k_n = len(labels)
    target = np.zeros((k_n, out, out), np.float32)
    weight = np.zeros((k_n, out, out), np.float32)
    tags = set(sample.all_tags())
    pseudo = pseudo or {}
    shape = sample.shape
    for m in sample.masks.values():
        shape = np.asarray(m).shape[:2]
        break
    for k, label in enumerate(labels):
        mask = sample.masks.get(label)
        boxes = sample.boxes.get(label) or []
        if mask is not None:
            m = np.asarray(mask, np.float32)
            target[k] = cv2.resize(m, (out, out), interpolation=cv2.INTER_AREA)
            weight[k] = 1.0
        elif boxes and label in pseudo:
            target[k], weight[k] = pseudo[label]
        elif boxes:
            if shape is None:
                shape = sample.photo().shape[:2]
            inside = fill_boxes(boxes, shape, (out, out))
            target[k] = inside
            weight[k] = np.where(inside, cfg.box_weight, 1.0)
        elif label not in tags and cfg.negatives_from_tags:
            weight[k] = 1.0
    if not weight.any():
        return None
    return target, weight


def _needs_pseudo_masks(sample: Sample, cfg: TrainConfig) -> bool:
    """Whether `sample` has a box-only label that ``box_mode="grabcut"`` turns into a pseudo-mask."""
    return cfg.box_mode == "grabcut" and any(b and label not in sample.masks for label, b in sample.boxes.items())


def box_pseudo_targets(sample: Sample, photo: np.ndarray, out: int, cfg: TrainConfig) -> dict[str, Targets]:
    """label -> (target, weight) float32 (out, out) of each box-only label of `sample`: GrabCut
    pseudo-masks of the square-resized photo (:func:`explainers.box_masks.box_pseudo_mask`)."""
    found = {}
    for label, boxes in sample.boxes.items():
        if not boxes or label in sample.masks:
            continue
        mask, weight = box_pseudo_mask(photo, boxes, (out, out), work_side=cfg.grabcut_side,
                                       inside_weight=cfg.grabcut_weight, band=cfg.grabcut_band,
                                       fallback_weight=cfg.box_weight, seed=cfg.seed)
        found[label] = (mask.astype(np.float32), weight.astype(np.float32))
    return found


class PseudoMasks:
    """GrabCut pseudo-targets of the training samples that need them, computed when the feature
    cache loads their photos (``on_photo``) or, for photos whose features were cached earlier,
    by loading them once more (:meth:`complete`)."""

    def __init__(self, samples: Sequence[Sample], out: int, cfg: TrainConfig):
        self.out, self.cfg = out, cfg
        self.by_key: dict[str, list[Sample]] = {}
        for s in samples:
            if _needs_pseudo_masks(s, cfg):
                self.by_key.setdefault(s.cache_key, []).append(s)
        self.targets: dict[int, dict[str, Targets]] = {}     # id(sample) -> label -> (target, weight)
        self.seconds = 0.0

    def on_photo(self, key: str, photo: np.ndarray) -> None:
        t = time.perf_counter()
        for s in self.by_key.get(key, []):
            self.targets[id(s)] = box_pseudo_targets(s, photo, self.out, self.cfg)
        self.seconds += time.perf_counter() - t

    def complete(self, samples: Sequence[Sample]) -> None:
        """Pseudo-targets of `samples` not done yet (their photo is loaded again; one that fails
        to load keeps the filled boxes)."""
        for s in samples:
            if id(s) in self.targets or s.cache_key not in self.by_key:
                continue
            try:
                photo = s.photo()
            except Exception:  # noqa: BLE001 - its features loaded earlier; the filled box still supervises
                continue
            t = time.perf_counter()
            self.targets[id(s)] = box_pseudo_targets(s, photo, self.out, self.cfg)
            self.seconds += time.perf_counter() - t

    def get(self, sample: Sample) -> dict[str, Targets] | None:
        return self.targets.get(id(sample))
