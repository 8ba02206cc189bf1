"""Self-training a project: its photos that carry tags and no mask get pseudo-masks from its current pipeline.

:func:`pseudo_masks_for` runs the project's pipeline as it is served now (the process's engine of the
preset, with the project's promoted heads when it has some) on every example that has tags but no
mask or box, and returns the seg head's training targets from the confident parts of those masks
(:func:`explainers.self_training.pseudo_training_targets`). :func:`backend.training.trainer.train_and_register`
trains on them beside the corrected masks, which always win for their photo.

A long run survives its worker: each photo's outcome is written at once to
``MODEL_DIR/pseudo/<project>/<run>/`` (``run``: a hash of the labels, the heads' version, the preset
and the settings, so a run with other inputs never reads them), and a retried job reads them back
instead of segmenting those photos again; the folder goes once the version is saved. `progress(done,
total)` is called after each photo (the train job puts it in its meta: ``tag2mask jobs --project P``
and ``/projects/<id>/progress`` show it).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["self_train_config", "pseudo_masks_for", "PseudoStore"]


def self_train_config(options: dict | None):
    """:class:`explainers.self_training.SelfTrainConfig` from JSON-able overrides (ValueError: unknown ones)."""
    from explainers.self_training import SelfTrainConfig

    names = {f.name for f in fields(SelfTrainConfig)} - {"train", "rounds"}
    bad = sorted(set(options or {}) - names)
    if bad:
        raise ValueError(f"unknown self-training option(s) {bad}; known: {sorted(names)}")
    return SelfTrainConfig(**(options or {}))


def _validated_on_masks(meta: dict) -> bool:
    """Whether a version's seg head was scored on corrected masks (its validation has an fg IoU)."""
    return (meta.get("validation") or {}).get("fg_iou") is not None


def _safe_name(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8", "replace")).hexdigest()[:20]


class PseudoStore:
    """One run's per-photo outcomes on disk: ``<sha1 of the key>.npz`` (target, weight, confidence) or
    ``.none`` (the photo failed or its mask was degenerate). Writes are atomic (temp file + rename)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def load(self, keys: Sequence[str]) -> dict:
        out = {}
        for key in keys:
            base = self.folder / _safe_name(key)
            if base.with_suffix(".none").exists():
                out[key] = None
            elif base.with_suffix(".npz").exists():
                try:
                    with np.load(base.with_suffix(".npz")) as z:
                        out[key] = ((z["target"], z["weight"]), float(z["confidence"]))
                except (OSError, ValueError, KeyError):
                    continue              # a torn file: computed again
        return out

    def save(self, key: str, outcome) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        base = self.folder / _safe_name(key)
        if outcome is None:
            base.with_suffix(".none").touch()
            return
        (target, weight), conf = outcome
        tmp = base.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, target=target, weight=weight, confidence=np.float32(conf))
        os.replace(tmp, base.with_suffix(".npz"))

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _with_tag_classifier(engine, heads, samples: Sequence, labels: Sequence[str], backbone, cache):
    """`heads`, or, when the engine with them cannot segment some of `labels` (labels ImageNet lacks,
    not yet learnt), heads whose classifier is trained now on the samples' tags (its CAM segments
    them: explainers.segment.head_cam) beside `heads`' seg head; (heads, the labels that needed it)."""
    from explainers.project_heads import ProjectHeads
    from explainers.training import TrainConfig, train_heads

    engine.set_heads(heads)
    missing = [label for label in labels if not engine.can_segment(label)]
    if not missing:
        return heads, []
    cfg = TrainConfig(size=cache.size, flip=cache.flip) if cache is not None else TrainConfig()
    tagged = [s for s in samples if s.all_tags()]
    result = train_heads(backbone, tagged, labels=list(labels), config=cfg, cache=cache, train_seg_head=False,
                         validation=[])
    segmenter = getattr(heads, "segmenter", None)
    return ProjectHeads(backbone, result.classifier, segmenter, result.layers, result.size,
                        getattr(heads, "fusion_weight", None), getattr(heads, "fusion", None)), missing


def pseudo_masks_for(samples: Sequence, project, registry, backbone, labels: Sequence[str], out: int, *,
                     preset: str = "balanced", options: dict | None = None, model_dir: Path | None = None,
                     progress: Callable[[int, int], None] | None = None, cache=None
                     ) -> tuple[dict, dict, PseudoStore | None]:
    """({sample key: (target, weight)}, stats, the run's store or None) for the tags-only `samples`.

    The pipeline is the engine of `preset` on `backbone` with `project`'s promoted heads when they
    were validated on corrected masks (else the zero-shot pipeline: a second round on an unvalidated
    self-trained version could only drift), under the process's inference lock. `options`: SelfTrainConfig overrides
    (``confidence``, ``keep_fraction``, ``min_label_photos``, ...). `model_dir`: where the run's
    outcomes are kept for a resumed job (None: not kept). A label that pipeline cannot segment (one
    ImageNet lacks that no promoted head learnt) gets its pseudo-masks from a classifier head trained
    first on the samples' tags (its CAM; it needs photos without the label to learn where it is
    absent); `cache`: the FeatureCache that training may reuse."""
    from backend.serving.engine import engine_on
    from backend.serving.heads import load_project_heads
    from explainers.self_training import pseudo_training_targets

    cfg = self_train_config(options)
    version = registry.current(project)
    if version is not None and not _validated_on_masks(registry.meta(project, version)):
        version = None        # a self-trained version nobody's masks validated: no second round on top of it
    heads = load_project_heads(registry, project, backbone) if version else None
    version = version if heads is not None else "zero-shot"
    run = hashlib.sha1(json.dumps([list(labels), version, preset, out, backbone.name, sorted((options or {}).items())],
                                  default=str).encode()).hexdigest()[:12]
    store = PseudoStore(Path(model_dir) / "pseudo" / _safe_name(str(project)) / run) if model_dir else None
    keys = [str(s.key) for s in samples]
    known = store.load(keys) if store is not None else {}
    if known:
        log.info("project %s: self-training resumes with %d photo(s) already pseudo-masked", project, len(known))
    engine, lock = engine_on(backbone, preset)
    with lock:
        before, extra = engine.heads, engine.tag_extra
        engine.tag_extra = None
        try:
            heads, from_tags = _with_tag_classifier(engine, heads, samples, labels, backbone, cache)
            engine.set_heads(heads)
            targets, stats = pseudo_training_targets(engine, samples, labels, out, cfg, known=known,
                                                     on_photo=store.save if store is not None else None,
                                                     progress=progress)
        finally:
            engine.set_heads(before)
            engine.tag_extra = extra
    stats = {**stats, "resumed": len(known), "from_version": version, "preset": preset, "cam_from_tags": from_tags,
             "confidence": cfg.confidence, "keep_fraction": cfg.keep_fraction}
    return targets, stats, store
