"""What the tags -> mask pipeline returns. Coordinates are pixels of the original (EXIF-upright) photo.

A photo's tags that cannot be segmented (no classifier class, no trained head) do not fail the photo
while others can: they are left out of ``PhotoResult.tags`` and listed in ``PhotoResult.skipped``
with the reason, a sentence (``{"person": "tag 'person' has no class in the ImageNet-1k classifier: ..."}``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Polygon:
    points: list[tuple[float, float]]   # (x, y) pixels, closed implicitly, at least 3 points
    score: float


@dataclass
class Box:
    x0: float
    y0: float
    x1: float
    y1: float
    score: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


@dataclass
class TagMask:
    tag: str
    mask: np.ndarray                    # (H, W) bool at the photo's original size
    score: float                        # confidence that the tag is in the photo, 0..1
    polygons: list[Polygon] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)   # one per connected component
    quality: float | None = None        # estimated fg IoU of the mask, 0..1 (explainers.segment.quality); None = unknown


@dataclass
class PhotoResult:
    width: int
    height: int
    tags: list[TagMask]
    cams: dict[str, np.ndarray] = field(default_factory=dict)   # tag -> (H, W) float32 in [0, 1]
    timings: dict[str, float] = field(default_factory=dict)     # stage -> seconds
    skipped: dict[str, str] = field(default_factory=dict)       # tag left out -> why (a sentence)

    @property
    def score(self) -> float:
        """One number per photo for ordering (active learning): the mean tag score."""
        return float(np.mean([t.score for t in self.tags])) if self.tags else 0.0

    @property
    def quality(self) -> float | None:
        """The photo's estimated mask quality (for ordering pre-labels, worst first): halfway between the
        mean and the best of its tags' ``quality`` (the tags that have one); None when none has. That
        ranked the dev photos best by their mean true fg IoU (Spearman, COCO dev cross-validated / MSRC
        dev: 0.640 / 0.652; the mean alone 0.583 / 0.654, the max 0.638 / 0.644, the min 0.464 / 0.655;
        benchmarks/fit_quality_score.py)."""
        known = [t.quality for t in self.tags if t.quality is not None]
        return float((np.mean(known) + np.max(known)) / 2) if known else None
