"""explainers: explanation methods for CNN classifiers and the tags -> mask -> polygon pipeline.

This package is a plain library: it knows nothing of Label Studio, Redis or HTTP.
"""
from explainers.backbones import Backbone, available_backbones, load_backbone
from explainers.errors import (
    BackboneError,
    ExplainersError,
    ImageLoadError,
    LayerNotFoundError,
    UnknownTagError,
)
from explainers.hooks import LayerRecorder, get_layer, layer_names

__all__ = [
    "Backbone",
    "BackboneError",
    "ExplainersError",
    "ImageLoadError",
    "LayerNotFoundError",
    "LayerRecorder",
    "UnknownTagError",
    "available_backbones",
    "get_layer",
    "layer_names",
    "load_backbone",
]
