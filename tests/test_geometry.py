"""Clean-up and geometry on synthetic masks: components, holes, islands, bounds, point caps."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from explainers.segment.config import GeometryConfig, PostprocessConfig
from explainers.segment.geometry import mask_geometry
from explainers.segment.postprocess import clean_mask, clean_masks, fill_holes, remove_islands


def disc(shape, center, radius):
    m = np.zeros(shape, np.uint8)
    cv2.circle(m, center, radius, 1, -1)
    return m.astype(bool)


def test_two_discs_give_two_polygons_and_matching_boxes():
    mask = disc((200, 300), (60, 100), 40) | disc((200, 300), (220, 80), 30)
    polygons, boxes = mask_geometry(mask)
    assert len(polygons) == 2 and len(boxes) == 2
    got = sorted((b.x0, b.y0, b.x1, b.y1) for b in boxes)
    assert got == [(20.0, 60.0, 101.0, 141.0), (190.0, 50.0, 251.0, 111.0)]
    for poly in polygons:
        xs, ys = zip(*poly.points)
        box = next(b for b in boxes if b.x0 <= min(xs) and max(xs) < b.x1)
        assert min(xs) == box.x0 and max(xs) == box.x1 - 1
        assert min(ys) == box.y0 and max(ys) == box.y1 - 1
        # a simplified disc outline still covers nearly all of the disc
        area = cv2.contourArea(np.array(poly.points, np.float32))
        assert area > 0.9 * np.pi * (box.width / 2) ** 2


def test_ring_gives_outer_outline_and_one_box_and_keeps_its_hole_in_the_mask():
    ring = disc((200, 200), (100, 100), 80) & ~disc((200, 200), (100, 100), 40)
    polygons, boxes = mask_geometry(ring)
    assert len(polygons) == 1 and len(boxes) == 1
    area = cv2.contourArea(np.array(polygons[0].points, np.float32))
    assert area == pytest.approx(np.pi * 80 ** 2, rel=0.05)   # the outer outline, not the hole
    # the hole is big (25% of the ring): clean-up keeps it; a small hole is filled
    assert not clean_mask(ring, PostprocessConfig())[100, 100]
    pinhole = disc((200, 200), (100, 100), 80) & ~disc((200, 200), (100, 100), 5)
    assert clean_mask(pinhole, PostprocessConfig())[100, 100]


def test_tiny_islands_are_removed():
    mask = disc((300, 300), (150, 150), 80)
    mask[10:13, 10:13] = True             # 9 px: far below 2% of the object
    mask[280:284, 280:284] = True
    cleaned = remove_islands(mask, min_island=0.02, min_area=0.0)
    assert not cleaned[11, 11] and not cleaned[282, 282]
    assert cleaned[150, 150] and cleaned.sum() == disc((300, 300), (150, 150), 80).sum()
    _, boxes = mask_geometry(clean_mask(mask, PostprocessConfig()))
    assert len(boxes) == 1


def test_points_inside_the_photo_for_a_mask_touching_the_borders():
    h, w = 120, 160
    mask = np.zeros((h, w), bool)
    mask[:, :] = True
    mask[40:60, 50:70] = False
    polygons, boxes = mask_geometry(mask)
    assert boxes[0].x0 == 0 and boxes[0].y0 == 0 and boxes[0].x1 == w and boxes[0].y1 == h
    for poly in polygons:
        for x, y in poly.points:
            assert 0 <= x <= w - 1 and 0 <= y <= h - 1


def test_simplification_caps_the_number_of_points():
    yy, xx = np.mgrid[:400, :400]
    angle = np.arctan2(yy - 200, xx - 200)
    radius = 150 + 30 * np.sin(angle * 40)          # a star with 40 spikes: many contour points
    star = np.hypot(yy - 200, xx - 200) < radius
    polygons, _ = mask_geometry(star, cfg=GeometryConfig(max_points=25, epsilon=0.0001))
    assert len(polygons) == 1 and 3 <= len(polygons[0].points) <= 25
    fine, _ = mask_geometry(star, cfg=GeometryConfig(max_points=1000, epsilon=0.0001))
    assert len(fine[0].points) > 80


def test_degenerate_components_yield_no_polygon_but_scores_follow_the_score_map():
    mask = np.zeros((50, 50), bool)
    mask[10, 5:40] = True                            # a one-pixel line: zero area
    mask[20:40, 20:40] = True
    score_map = np.full((50, 50), 0.5, np.float32)
    polygons, boxes = mask_geometry(mask, score_map, tag_score=0.8)
    assert len(boxes) == 2 and len(polygons) == 1
    assert polygons[0].score == pytest.approx(0.4) and all(b.score == pytest.approx(0.4) for b in boxes)


def test_clean_masks_never_overlap_even_when_filling_holes():
    outer = disc((200, 200), (100, 100), 80) & ~disc((200, 200), (100, 100), 10)
    inner = disc((200, 200), (100, 100), 6)          # a second tag inside the first one's hole
    a, b = clean_masks([outer, inner], PostprocessConfig(max_hole=1.0))
    assert not (a & b).any()
    assert b.sum() == inner.sum()
    assert a[100, 108]                              # the hole's free ring was filled
    assert fill_holes(outer, 1.0)[100, 100]          # without a neighbour, the whole hole fills
