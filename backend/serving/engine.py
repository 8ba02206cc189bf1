"""One model per process and device: the frozen backbones (:func:`get_backbone`) and the engine built
on them (:func:`get_engine`, an :class:`explainers.segment.Tag2Mask`, with the inference lock).

Prediction jobs, training jobs and the web process of one process all use these: a worker serving
every queue holds one backbone per device, whatever mix of jobs it runs (the engine is built on the
backbone :func:`get_backbone` holds, and a training's fusion choice runs on that engine,
:func:`engine_on`). An engine of other settings (another preset or backbone) replaces the process's
engine on that device. Torch is imported on the first call only.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from backend.settings import Settings

__all__ = ["get_engine", "engine_loaded", "get_backbone", "engine_on", "device_of"]

log = logging.getLogger(__name__)

_ENGINE_LOCK = threading.Lock()        # guards loading (backbones and engines)
_INFER_LOCK = threading.Lock()         # serialises inference on the process's engines (shared model, CPU)
_BACKBONES: dict[tuple[str, str], Any] = {}       # (backbone name, device) -> frozen Backbone
_ENGINES: dict[str, tuple[tuple, Any]] = {}        # device -> ((backbone, preset), Tag2Mask)


def device_of(device: str | None) -> str:
    """The torch device a setting names ("auto" or None: CUDA when present, else CPU), as a string."""
    from explainers.device import pick_device

    return str(pick_device(device or "auto"))


def _set_threads(settings: Settings) -> None:
    if settings.threads:
        from explainers.device import set_cpu_threads

        set_cpu_threads(settings.threads)


def _load_backbone(name: str, device: str, settings: Settings):
    """The backbone `name` on `device` (a string from :func:`device_of`); call with _ENGINE_LOCK held."""
    key = (name, device)
    if key not in _BACKBONES:
        from explainers.backbones import load_backbone

        _set_threads(settings)
        _BACKBONES[key] = load_backbone(name, device)
    return _BACKBONES[key]


def get_backbone(name: str, device: str | None = None, settings: Settings | None = None):
    """The process's frozen backbone `name` on `device` (default: the settings' device), loaded once
    per process and device; the engine of that device runs on the same object."""
    settings = settings or Settings.from_env()
    dev = device_of(device or settings.device)
    with _ENGINE_LOCK:
        return _load_backbone(name, dev, settings)


def get_engine(settings: Settings):
    """The process's Tag2Mask on the settings' device for their backbone and preset (built on first
    call, on :func:`get_backbone`'s backbone) and the inference lock."""
    dev = device_of(settings.device)
    want = (settings.backbone, settings.preset)
    entry = _ENGINES.get(dev)
    if entry is None or entry[0] != want:
        with _ENGINE_LOCK:
            entry = _ENGINES.get(dev)
            if entry is None or entry[0] != want:
                t = time.perf_counter()
                from explainers.segment import PipelineConfig, Tag2Mask

                backbone = _load_backbone(settings.backbone, dev, settings)
                engine = Tag2Mask(backbone=backbone, config=PipelineConfig.preset(settings.preset))
                entry = _ENGINES[dev] = (want, engine)
                log.info("model loaded: %s / %s on %s in %.1f s", settings.backbone, settings.preset, dev,
                         time.perf_counter() - t)
    return entry[1], _INFER_LOCK


def warm_smart_tools(settings: Settings) -> None:
    """Load the backbones whose CAMs a smart tool's box averages with the engine's
    (``PromptConfig.cam_ensemble``) into the process's engine, so the first box an annotator draws
    does not wait for them (0.2 s on an idle machine, seconds on a busy one; their weights stay in
    memory)."""
    from explainers.segment.interactive import PromptConfig

    engine, lock = get_engine(settings)
    with lock:
        engine.ensemble.stages(PromptConfig().cam_ensemble)


def engine_on(backbone, preset: str):
    """(An engine on `backbone` with `preset`'s pipeline, the inference lock): the process's engine of
    that device when it runs on this very backbone with this preset, else a new one on `backbone`
    (kept as that device's engine when `backbone` is the process's own). Used to choose a
    training's fusion on the model that will serve it."""
    dev = str(backbone.device)
    with _ENGINE_LOCK:
        entry = _ENGINES.get(dev)
        if entry is not None and entry[0] == (backbone.name, preset) and entry[1].backbone is backbone:
            return entry[1], _INFER_LOCK
        from explainers.segment import PipelineConfig, Tag2Mask

        engine = Tag2Mask(backbone=backbone, config=PipelineConfig.preset(preset))
        if _BACKBONES.get((backbone.name, dev)) is backbone:
            _ENGINES[dev] = ((backbone.name, preset), engine)
        return engine, _INFER_LOCK


def engine_loaded(settings: Settings | None = None) -> bool:
    """Whether the process holds an engine (of these settings' backbone and preset, on their device)."""
    if settings is None:
        return bool(_ENGINES)
    if not _ENGINES:
        return False
    try:
        dev = device_of(settings.device)
    except Exception:   # noqa: BLE001 - a device string torch cannot read: no engine runs on it
        return False
    entry = _ENGINES.get(dev)
    return entry is not None and entry[0] == (settings.backbone, settings.preset)
