"""Stage 4: from per-class probabilities to one clean boolean mask per tag.

`label_masks` takes the per-pixel argmax (background at index 0). `clean_mask` then drops small
islands, fills small holes and optionally smooths the outline with a morphological open + close.
Holes are only filled with pixels that no other tag holds, so tags' masks never overlap.
"""
from __future__ import annotations

import cv2
import numpy as np

from explainers.segment.config import PostprocessConfig


def label_masks(probs: np.ndarray) -> list[np.ndarray]:
    """(K + 1, H, W) probabilities -> K boolean masks (argmax labels 1..K)."""
    labels = probs.argmax(axis=0)
    return [labels == k for k in range(1, probs.shape[0])]


def remove_islands(mask: np.ndarray, min_island: float, min_area: float) -> np.ndarray:
    """Drop connected components smaller than `min_island` x the largest one or `min_area` x the photo."""
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return mask.astype(bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    floor = max(min_island * areas.max(), min_area * mask.size)
    keep = np.zeros(n, dtype=bool)
    keep[1:] = areas >= floor
    return keep[comp]


def fill_holes(mask: np.ndarray, max_hole: float, allowed: np.ndarray | None = None) -> np.ndarray:
    """Fill background regions enclosed by the mask and smaller than `max_hole` x the mask's area.

    Only pixels in `allowed` (default: all) are filled.
    """
    inv = (~mask).astype(np.uint8)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(inv, connectivity=4)
    if n <= 1:
        return mask
    h, w = mask.shape
    x, y, bw, bh = (stats[:, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    touches = (x == 0) | (y == 0) | (x + bw >= w) | (y + bh >= h)
    limit = max_hole * max(int(mask.sum()), 1)
    hole = ~touches & (stats[:, cv2.CC_STAT_AREA] <= limit)
    hole[0] = False  # label 0 of `inv` is the mask itself
    filled = mask | hole[comp]
    if allowed is not None:
        filled = mask | (filled & allowed)
    return filled


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def close_gaps(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological close with a disc of `radius` pixels: notches and gaps narrower than the disc
    filled, nothing taken away (the mask unchanged for `radius` <= 0)."""
    if radius <= 0:
        return mask
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_CLOSE, _disc(radius)).astype(bool)


def smooth(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological open then close with a disc of `radius` pixels."""
    if radius <= 0:
        return mask
    return close_gaps(cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _disc(radius)).astype(bool), radius)


def clean_mask(mask: np.ndarray, cfg: PostprocessConfig, allowed: np.ndarray | None = None) -> np.ndarray:
    """Islands removed, holes filled, outline smoothed (in that order, islands again after smoothing)."""
    mask = remove_islands(mask, cfg.min_island, cfg.min_area)
    if cfg.smooth > 0:
        radius = max(1, int(round(cfg.smooth * max(mask.shape) / 640)))
        mask = smooth(mask, radius)
        if allowed is not None:
            mask &= allowed
        mask = remove_islands(mask, cfg.min_island, cfg.min_area)
    if cfg.fill_holes:
        mask = fill_holes(mask, cfg.max_hole, allowed)
    return mask


def clean_masks(masks: list[np.ndarray], cfg: PostprocessConfig) -> list[np.ndarray]:
    """Clean every tag's mask; each pixel ends in at most one mask (earlier masks keep theirs)."""
    out: list[np.ndarray] = []
    taken = np.zeros(masks[0].shape, dtype=bool) if masks else None
    for i, m in enumerate(masks):
        others = np.zeros_like(m)
        for j, o in enumerate(masks):
            if j != i:
                others |= o
        allowed = ~(others | taken)
        c = clean_mask(m & allowed, cfg, allowed)
        taken |= c
        out.append(c)
    return out
