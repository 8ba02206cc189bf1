"""Per-tag masks of one photo -> instances (connected components), the unit every dataset writer uses.

An instance is one 8-connected component of one tag's mask, kept as the component's pixels inside its
bounding box (``mask`` bool (h, w) at offset ``x``, ``y``), so a photo with many instances costs the
instances' boxes, not a full-size mask each. Components smaller than ``min_pixels`` (default
:data:`MIN_INSTANCE_PIXELS`) are specks: left out of every format, and counted in ``dropped_pixels``.

Public API::

    cats = Categories(["horse", "dog"])          # stable ids in tag order, 1-based; unknown tags appended
    cats.id_of("dog") -> 2; cats.names -> ["horse", "dog"]
    photo = photo_instances("/p/a.jpg", "a", 640, 480, [Segment("horse", mask, 0.93)], cats)
    photo.instances                              # [Instance(tag, category, x, y, mask, score)], tag order
    inst.bbox -> (x, y, w, h); inst.area -> pixels; inst.full_mask(h, w) -> bool (H, W)
    inst.outline() -> [(x, y), ...] | None       # outer contour in pixels (holes not outlined)
    photo.dropped_pixels                         # speck pixels left out
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from backend.datasets import MIN_INSTANCE_PIXELS

__all__ = [
    "MIN_INSTANCE_PIXELS",
    "Categories",
    "Instance",
    "PhotoInstances",
    "Segment",
    "photo_instances",
]


class Segment(NamedTuple):
    """One tag's mask on a photo: bool (H, W) at the photo's (EXIF-upright) size; `score` optional."""

    tag: str
    mask: np.ndarray
    score: float | None = None


@dataclass
class Instance:
    """One connected component of one tag's mask."""

    tag: str
    category: int               # 1-based id in the Categories
    x: int                      # the component's box: left column, top row (pixels)
    y: int
    mask: np.ndarray            # bool (h, w): the component's pixels inside its box
    score: float | None = None

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x, y, width, height) in pixels, COCO's order."""
        h, w = self.mask.shape
        return self.x, self.y, w, h

    @property
    def area(self) -> int:
        return int(np.count_nonzero(self.mask))

    def full_mask(self, height: int, width: int) -> np.ndarray:
        """The instance as a bool (height, width) mask of the whole photo."""
        out = np.zeros((height, width), bool)
        h, w = self.mask.shape
        out[self.y:self.y + h, self.x:self.x + w] = self.mask
        return out

    def outline(self) -> list[tuple[int, int]] | None:
        """The component's outer contour (pixel centres, OpenCV's CHAIN_APPROX_SIMPLE: straight runs
        kept as their end points) in photo pixels; None when it has under 3 points (a line of pixels).
        Holes are not outlined: filling the outline fills them."""
        import cv2

        contours, _ = cv2.findContours(self.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE,
                                       offset=(self.x, self.y))
        if not contours:
            return None
        c = max(contours, key=len).reshape(-1, 2)
        if len(c) < 3:
            return None
        return [(int(px), int(py)) for px, py in c]


@dataclass
class PhotoInstances:
    """One photo of a dataset: its file, output name, size and instances."""

    image: Path
    name: str
    width: int
    height: int
    instances: list[Instance] = field(default_factory=list)
    dropped_pixels: int = 0     # pixels of specks left out (components under min_pixels)


class Categories:
    """The dataset's classes: names in a stable order, ids 1, 2, ... (0 is background)."""

    def __init__(self, names: Iterable[str] = ()):
        self.names: list[str] = []
        self._ids: dict[str, int] = {}
        for n in names:
            self.id_of(n)

    def id_of(self, name: str) -> int:
        """The 1-based id of `name`; a name not seen yet is appended (the ids of the others stay)."""
        if name not in self._ids:
            self.names.append(name)
            self._ids[name] = len(self.names)
        return self._ids[name]

    def __len__(self) -> int:
        return len(self.names)


def photo_instances(image: str | Path, name: str, width: int, height: int, segments: Sequence[Segment],
                    categories: Categories, min_pixels: int = MIN_INSTANCE_PIXELS) -> PhotoInstances:
    """A photo's segments -> its instances, tag by tag (in the order of `categories`), components in
    OpenCV's scan order (top to bottom). Raises ValueError for a mask of another size than the photo."""
    import cv2

    photo = PhotoInstances(image=Path(image), name=name, width=int(width), height=int(height))
    order = sorted(range(len(segments)), key=lambda i: categories.id_of(segments[i].tag))
    for i in order:
        seg = segments[i]
        mask = np.asarray(seg.mask)
        if mask.shape != (photo.height, photo.width):
            shown = f"{mask.shape[1]}x{mask.shape[0]}" if mask.ndim == 2 else f"of shape {mask.shape}"
            raise ValueError(f"the mask of {seg.tag!r} is {shown} pixels, the photo {photo.width}x{photo.height}")
        if not mask.any():
            continue
        cat = categories.id_of(seg.tag)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        for k in range(1, n):
            x, y, w, h, area = (int(v) for v in stats[k])
            if area < min_pixels:
                photo.dropped_pixels += area
                continue
            score = None if seg.score is None else float(seg.score)
            photo.instances.append(Instance(seg.tag, cat, x, y, comp[y:y + h, x:x + w] == k, score))
    return photo
