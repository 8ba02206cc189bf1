"""Stage 5: masks -> polygons and boxes, one of each per connected component, with scores.

A component with holes gets its outer outline only (Label Studio polygons have no holes); the
holes stay in the mask, which the brush output carries exactly.

Polygons are the OpenCV outer contours simplified by Douglas-Peucker (`approxPolyDP`) with a
tolerance relative to the component's perimeter, raised until the point cap is met; fewer than 3
points -> dropped. Points are pixel coordinates (x, y) inside the photo. A box spans its component's
pixels: x0, y0 = first column/row, x1, y1 = one past the last (so width = number of columns).
Each shape's score = mean of `score_map` over its component x the tag score.
"""
from __future__ import annotations

import cv2
import numpy as np

from explainers.segment.config import GeometryConfig
from explainers.segment.types import Box, Polygon


def simplify(contour: np.ndarray, cfg: GeometryConfig) -> np.ndarray:
    """(N, 1, 2) contour -> (M, 2) simplified points, M <= cfg.max_points."""
    perimeter = cv2.arcLength(contour, True)
    eps = max(cfg.epsilon * perimeter, 0.5)
    approx = cv2.approxPolyDP(contour, eps, True)
    while len(approx) > cfg.max_points:
        eps *= 1.5
        approx = cv2.approxPolyDP(contour, eps, True)
    return approx.reshape(-1, 2)


def mask_geometry(mask: np.ndarray, score_map: np.ndarray | None = None, tag_score: float = 1.0,
                  cfg: GeometryConfig | None = None) -> tuple[list[Polygon], list[Box]]:
    """Boolean (H, W) mask -> (polygons, boxes), one box per 8-connected component."""
    cfg = cfg or GeometryConfig()
    h, w = mask.shape
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    polygons: list[Polygon] = []
    boxes: list[Box] = []
    for i in range(1, n):
        x, y, bw, bh, _area = (int(v) for v in stats[i])
        region = comp[y:y + bh, x:x + bw] == i
        mean = float(score_map[y:y + bh, x:x + bw][region].mean()) if score_map is not None else 1.0
        score = float(np.clip(mean * tag_score, 0.0, 1.0))
        boxes.append(Box(float(x), float(y), float(x + bw), float(y + bh), score))
        contours, _ = cv2.findContours(region.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE,
                                       offset=(x, y))
        for c in contours:
            if len(c) < cfg.min_points:
                continue
            pts = simplify(c, cfg)
            if len(pts) < cfg.min_points:
                continue
            pts = np.clip(pts, 0, [w - 1, h - 1])
            if cv2.contourArea(pts.astype(np.float32).reshape(-1, 1, 2)) <= 0:
                continue
            polygons.append(Polygon([(float(px), float(py)) for px, py in pts], score))
    return polygons, boxes
