"""Tags -> masks -> polygons/boxes: CAMs of a pretrained classifier, a dense CRF, clean-up, geometry.

The settings (``PipelineConfig``...) and result types import without torch; ``Tag2Mask`` (the
pipeline, which needs torch) loads :mod:`explainers.segment.pipeline` on first use.
"""
from explainers.lazy import lazy_names

from explainers.segment.config import (
    BackgroundConfig,
    CAMConfig,
    CRFConfig,
    FusionConfig,
    GeometryConfig,
    PipelineConfig,
    PostprocessConfig,
)
from explainers.segment.types import Box, PhotoResult, Polygon, TagMask

_LAZY = {"Tag2Mask": "explainers.segment.pipeline"}   # name -> the module that defines it (imports torch)

__all__ = [
    "BackgroundConfig", "Box", "CAMConfig", "CRFConfig", "FusionConfig", "GeometryConfig", "PhotoResult", "PipelineConfig",
    "Polygon", "PostprocessConfig", "Tag2Mask", "TagMask",
]


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
