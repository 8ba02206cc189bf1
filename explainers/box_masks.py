"""Boxes -> pseudo-masks with OpenCV's GrabCut, for training a seg head from box-only labels.

A box says "the object is in here, nothing of it is outside". Filling the box with foreground
teaches a seg head to predict boxes; GrabCut (``cv2.grabCut``) separates the object from the
background inside the box by colour models learnt from the pixels outside every box (sure
background) and inside the boxes (probable foreground), with a graph cut along the photo's edges.

:func:`box_pseudo_mask` returns the pseudo-mask and a per-pixel weight for the training loss:
``1`` outside every box (certainly background), ``inside_weight`` inside the boxes (GrabCut's guess),
``0`` in a thin band along GrabCut's outline (where it is least sure). A box GrabCut leaves (almost)
empty, or a photo with no background left to learn from, falls back to the filled box at
``fallback_weight``. It runs at a working resolution (``work_side``, 256 px on the long side)
and returns the result at ``size`` (default: the photo's).

    mask, weight = box_pseudo_mask(photo, [(x0, y0, x1, y1)])    # bool (H, W), float32 (H, W)
"""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

__all__ = ["box_pseudo_mask", "boxes_from_mask", "fill_boxes"]


def _work_size(h: int, w: int, work_side: int) -> tuple[int, int]:
    scale = min(1.0, work_side / max(h, w))
    return max(1, round(h * scale)), max(1, round(w * scale))


def _box_cells(box: Sequence[float], scale_y: float, scale_x: float,
               shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1) of a pixel box (x1/y1 exclusive) on a grid scaled by (scale_y, scale_x), clipped."""
    x0, y0, x1, y1 = box
    h, w = shape
    c0, c1 = max(0, int(math.floor(x0 * scale_x))), min(w, int(math.ceil(x1 * scale_x)))
    r0, r1 = max(0, int(math.floor(y0 * scale_y))), min(h, int(math.ceil(y1 * scale_y)))
    return r0, r1, c0, c1


def fill_boxes(boxes: Sequence[Sequence[float]], photo_shape: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """Bool (H, W) = `shape`: True inside any of `boxes` (pixels of a photo of `photo_shape`, x1/y1
    exclusive), the boxes scaled to `shape` with outward rounding (a box never loses a cell)."""
    h, w = photo_shape
    inside = np.zeros(shape, bool)
    for r0, r1, c0, c1 in (_box_cells(b, shape[0] / h, shape[1] / w, shape) for b in boxes):
        inside[r0:r1, c0:c1] = True
    return inside


def box_pseudo_mask(image: np.ndarray, boxes: Sequence[Sequence[float]], size: tuple[int, int] | None = None, *,
                    work_side: int = 256, iterations: int = 3, inside_weight: float = 0.6, band: float = 0.02,
                    min_fill: float = 0.15, fallback_weight: float = 0.3,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """GrabCut pseudo-mask of the object(s) in `boxes` on an RGB uint8 photo.

    `boxes`: (x0, y0, x1, y1) in the photo's pixels, x1/y1 exclusive; one GrabCut for all of them
    (one colour model for the object, the background learnt outside every box). Returns
    ``(mask bool, weight float32)`` at `size` (H, W) (default: the photo's size; the photo is
    resized to it, so a square `size` gives the targets of a square-resized photo).

    Weights: 1 outside every box; `inside_weight` inside; 0 within `band` x the box's short side of
    GrabCut's outline inside a box. A box where GrabCut keeps less than `min_fill` of the area, or a
    photo whose boxes leave under 1 % of it as background, is filled whole at `fallback_weight`.
    `seed` fixes OpenCV's RNG (GrabCut's k-means start) so the result is reproducible.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 photo (H, W, 3), got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    out_h, out_w = size if size is not None else (h, w)
    wh, ww = _work_size(h, w, work_side)
    cells = [_box_cells(b, wh / h, ww / w, (wh, ww)) for b in boxes]
    cells = [c for c in cells if c[1] > c[0] and c[3] > c[2]]

    inside = fill_boxes(boxes, (h, w), (wh, ww))
    mask = inside.copy()
    weight = np.where(inside, fallback_weight, 1.0).astype(np.float32)
    if cells and (~inside).sum() >= 0.01 * inside.size:
        grab = _grabcut(image, (wh, ww), inside, iterations, seed)
        mask, weight = _grab_supervision(grab, cells, inside, inside_weight, band, min_fill, fallback_weight)

    if (out_h, out_w) != (wh, ww):
        shrink = out_h * out_w < wh * ww
        interp = cv2.INTER_AREA if shrink else cv2.INTER_NEAREST
        mask = cv2.resize(mask.astype(np.float32), (out_w, out_h), interpolation=interp) >= 0.5
        weight = cv2.resize(weight, (out_w, out_h), interpolation=interp)
        outside = ~fill_boxes(boxes, (h, w), (out_h, out_w))   # resizing must not leak out of the boxes
        mask &= ~outside
        weight[outside] = 1.0
    return mask, weight


def _grabcut(image: np.ndarray, work: tuple[int, int], inside: np.ndarray, iterations: int, seed: int) -> np.ndarray:
    """GrabCut's foreground (bool, working size): sure background outside `inside`, probable
    foreground inside it (what ``GC_INIT_WITH_RECT`` sets up for one box)."""
    wh, ww = work
    small = cv2.resize(image, (ww, wh), interpolation=cv2.INTER_AREA) if (wh, ww) != image.shape[:2] else image
    bgr = np.ascontiguousarray(small[:, :, ::-1])
    gc = np.where(inside, cv2.GC_PR_FGD, cv2.GC_BGD).astype(np.uint8)
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.setRNGSeed(seed)
    cv2.grabCut(bgr, gc, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    return (gc == cv2.GC_FGD) | (gc == cv2.GC_PR_FGD)


def _grab_supervision(grab: np.ndarray, cells, inside: np.ndarray, inside_weight: float, band: float,
                      min_fill: float, fallback_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """GrabCut's foreground -> (mask, weight) at the working size, box by box (see box_pseudo_mask)."""
    mask = grab & inside
    weight = np.where(inside, inside_weight, 1.0).astype(np.float32)
    for r0, r1, c0, c1 in cells:
        box = mask[r0:r1, c0:c1]
        if box.mean() < min_fill:                         # GrabCut lost the object: keep the box
            mask[r0:r1, c0:c1] = True
            weight[r0:r1, c0:c1] = fallback_weight
            continue
        px = int(round(band * min(r1 - r0, c1 - c0)))
        if px < 1:
            continue
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * px + 1, 2 * px + 1))
        m = box.astype(np.uint8)
        edge = (cv2.dilate(m, kernel) != cv2.erode(m, kernel))
        weight[r0:r1, c0:c1][edge] = 0.0
    return mask, weight


def boxes_from_mask(mask: np.ndarray, min_area: float = 0.01) -> list[tuple[int, int, int, int]]:
    """One (x0, y0, x1, y1) box per connected component of a bool mask (8-connected), largest
    first; components under `min_area` x the largest one's area are left out (specks)."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=8)
    comps = sorted((stats[i] for i in range(1, n)), key=lambda s: -s[cv2.CC_STAT_AREA])
    if not comps:
        return []
    biggest = comps[0][cv2.CC_STAT_AREA]
    return [(int(s[0]), int(s[1]), int(s[0] + s[2]), int(s[1] + s[3])) for s in comps
            if s[cv2.CC_STAT_AREA] >= min_area * biggest]
