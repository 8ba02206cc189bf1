"""Tags -> masks -> polygons/boxes: CAMs of a pretrained classifier, a dense CRF, clean-up, geometry."""
from explainers.segment.config import (
    BackgroundConfig,
    CAMConfig,
    CRFConfig,
    FusionConfig,
    GeometryConfig,
    PipelineConfig,
    PostprocessConfig,
)
from explainers.segment.pipeline import Tag2Mask
from explainers.segment.types import Box, PhotoResult, Polygon, TagMask

__all__ = [
    "BackgroundConfig", "Box", "CAMConfig", "CRFConfig", "FusionConfig", "GeometryConfig", "PhotoResult", "PipelineConfig",
    "Polygon", "PostprocessConfig", "Tag2Mask", "TagMask",
]
