"""Stage 2b: the project's seg head blended into the CAM-derived class probabilities (:func:`fuse_seg`).

Used by :class:`~explainers.segment.Tag2Mask` when it has trained heads, at the weight the heads
carry for each label (chosen on validation, :mod:`explainers.segment.fusion_tuning`). Numpy only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["fuse_seg"]


def fuse_seg(unary: np.ndarray, tags: Sequence[str], seg: dict[str, np.ndarray], weight: float | dict[str, float],
             mode: str = "linear", min_prob: float = 1e-3) -> np.ndarray:
    """Blend seg-head probabilities into the CAM-derived class probabilities.

    `unary` (K + 1, h, w): background first, then `tags` in order, summing to 1 per pixel. `seg`:
    tag -> (h, w) foreground probability of the seg head; tags missing from it keep the CAM alone.
    The seg head's distribution over the classes: the known tags together get
    M = 1 - prod(1 - p_k), shared in proportion to their p_k; the background and the other tags
    share 1 - M in the proportions the CAM gave them. It is mixed with the CAM's, ``linear``
    = (1 - w) cam + w seg or ``log`` = cam^(1-w) seg^w, and renormalised.

    `weight` may be per tag ({tag: w}, the weights chosen per label on validation): each known
    tag's class mixes at its own w, the background and the other tags at the mean of those (with
    equal weights this is the single-weight blend exactly).
    """
    if mode not in ("linear", "log"):
        raise ValueError(f"unknown fusion mode {mode!r}; choose 'linear' or 'log'")
    known = [k + 1 for k, t in enumerate(tags) if t in seg]
    if not known:
        return unary
    w = _channel_weights(weight, tags, known, unary.shape[0])
    rest = [c for c in range(unary.shape[0]) if c not in known]
    p = np.stack([np.clip(seg[tags[c - 1]], 0.0, 1.0).astype(np.float32) for c in known])
    mass = 1.0 - np.prod(1.0 - p, axis=0)
    head = np.empty_like(unary, dtype=np.float32)
    head[known] = mass * p / np.maximum(p.sum(axis=0), 1e-8)
    cam_rest = unary[rest]
    head[rest] = (1.0 - mass) * cam_rest / np.maximum(cam_rest.sum(axis=0), 1e-8)
    head = np.maximum(head, min_prob)
    head /= head.sum(axis=0, keepdims=True)
    if mode == "linear":
        out = (1.0 - w) * unary + w * head
    else:
        out = np.exp((1.0 - w) * np.log(np.maximum(unary, min_prob)) + w * np.log(head))
    out = np.maximum(out, min_prob)
    return (out / out.sum(axis=0, keepdims=True)).astype(np.float32)


def _channel_weights(weight: float | dict[str, float], tags: Sequence[str], known: Sequence[int],
                     channels: int) -> float | np.ndarray:
    """:func:`fuse_seg`'s weight: a float when all `known` classes share one, else (channels, 1, 1)."""
    if not isinstance(weight, dict):
        return float(np.clip(weight, 0.0, 1.0))
    per = np.clip([float(weight.get(tags[c - 1], 0.0)) for c in known], 0.0, 1.0)
    if np.all(per == per[0]):
        return float(per[0])
    w = np.full((channels, 1, 1), float(per.mean()), np.float32)
    w[list(known), 0, 0] = per
    return w
