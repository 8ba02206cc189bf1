"""Model version strings: ``tag2mask-<release>-<backbone>-<preset>-<hash of the preset>`` (or
``TAG2MASK_MODEL_VERSION``), plus ``+p<project>.vN`` when the project has a promoted trained model.
Torch-free: /setup and /versions answer while the model loads.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging

from backend.settings import Settings
from backend.storage.keys import safe_name
from backend.storage.registry import ModelRegistry

log = logging.getLogger(__name__)


VERSION = "0.1.0"


@functools.lru_cache(maxsize=None)
def _preset_hash(preset: str) -> str:
    """Six hex digits of the preset's pipeline settings: a tuning change makes a new model version.
    Torch-free (the settings module only), so /health and /setup answer while the model loads."""
    from explainers.segment.config import PipelineConfig

    blob = json.dumps(PipelineConfig.preset(preset).to_dict(), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:6]


def base_model_version(settings: Settings) -> str:
    """``TAG2MASK_MODEL_VERSION``, else ``tag2mask-<release>-<backbone>-<preset>-<hash of the preset>``."""
    if settings.model_version:
        return settings.model_version
    return f"tag2mask-{VERSION}-{settings.backbone}-{settings.preset}-{_preset_hash(settings.preset)}"


def project_model_version(base: str, project, current: str | None) -> str:
    """`base` plus ``+p<project>.<current>`` when `current` (a promoted version) is given."""
    return f"{base}+p{safe_name(project)}.{current}" if (current and project is not None) else base


def current_model_version(project, settings: Settings | None = None, registry: ModelRegistry | None = None) -> str:
    """The model version string to report for `project`: the base version
    (:func:`backend.serving.versions.base_model_version`: ``tag2mask-<release>-<backbone>-<preset>-<config hash>``
    or ``TAG2MASK_MODEL_VERSION``), plus ``+p<project>.<version>`` when the project has a promoted
    trained model. Reads the registry's state file only (no torch): /setup calls it while the model loads."""

    settings = settings or Settings.from_env()
    base = base_model_version(settings)
    if project is None:
        return base
    registry = registry or ModelRegistry.in_model_dir(settings.model_dir)
    try:
        current = registry.current(project)
    except ValueError:
        return base
    return project_model_version(base, project, current)
