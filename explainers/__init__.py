"""explainers: explanation methods for CNN classifiers and the tags -> mask -> polygon pipeline.

This package is a plain library: it knows nothing of Label Studio, Redis or HTTP.

Importing it (or a torch-free part of it: ``explainers.errors``, ``explainers.imageio``,
``explainers.segment.config``, ``explainers.segment.types``) does not import torch; the names that
need torch (``load_backbone``, ``Backbone``, ``LayerRecorder``...) load their module on first use.
"""
from explainers.lazy import lazy_names

from explainers.errors import (
    BackboneError,
    ExplainersError,
    ImageLoadError,
    LayerNotFoundError,
    UnknownTagError,
)

_LAZY = {   # name -> the module that defines it (imports torch)
    "Backbone": "explainers.backbones",
    "available_backbones": "explainers.backbones",
    "load_backbone": "explainers.backbones",
    "LayerRecorder": "explainers.hooks",
    "get_layer": "explainers.hooks",
    "layer_names": "explainers.hooks",
}

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


__getattr__, __dir__ = lazy_names(__name__, _LAZY)
