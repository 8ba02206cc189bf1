"""The JSON-able options a training job carries (model_dir, local_roots, backbone, ...) and the
Settings they give in the worker that runs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dataclasses import replace

from backend.serving.predict import settings as process_settings
from backend.settings import Settings


def settings_from_options(options: dict | None = None) -> Settings:
    """The settings of the process running the job (a worker's: its ``--device``; else the
    environment's), overridden by JSON-able job options (model_dir, local_roots, backbone,
    label_studio_url, train_min_new)."""
    options = options or {}
    over: dict[str, Any] = {}
    if options.get("model_dir"):
        over["model_dir"] = Path(options["model_dir"])
    if options.get("local_roots") is not None:
        over["local_roots"] = [Path(p) for p in options["local_roots"]]
    for key in ("backbone", "label_studio_url"):
        if options.get(key):
            over[key] = options[key]
    if options.get("train_min_new") is not None:
        over["train_min_new"] = int(options["train_min_new"])
    return replace(process_settings(), **over)


def job_options(settings: Settings) -> dict:
    """The settings a worker on the same host needs to find the same store/registry and photos."""
    out = {"model_dir": str(Path(settings.model_dir).resolve()),
           "local_roots": [str(p) for p in settings.local_roots], "backbone": settings.backbone}
    if settings.self_train > 0:
        out["self_train_min"] = int(settings.self_train)     # TAG2MASK_SELF_TRAIN
    return out
