"""Versioned model checkpoints per project on disk, with promotion guarded by validation scores.

Layout under ``MODEL_DIR/models``::

    <project>/<version>/model.pt     # torch.save of a dict of tensors / plain types (loads with weights_only=True)
    <project>/<version>/meta.json    # project, version, labels, counts, validation, parent, created, ...
    <project>/state.json             # {"current": version | null, "history": [...promoted...], "log": [...]}

Public API::

    reg = ModelRegistry.in_model_dir(settings.model_dir)
    v = reg.save(project, checkpoint, meta)      # -> "v3"; meta gets project/version/created/parent
    v = reg.save_result(project, train_result, examples_revision=12)   # explainers.training.TrainResult
    ckpt, meta = reg.load(project)               # the promoted version (or version=...), weights_only=True
    reg.promote(project, v, force=False)         # -> Promotion(promoted, version, previous, reason, regressions)
    reg.rollback(project)                        # -> the version now current (the previously promoted one)
    reg.current(project) -> str | None
    reg.list(project) -> [meta + {"current": bool}]  # oldest first
    reg.projects() -> [str]

Promotion rule: a version is promoted when there is no current one, or when none of the validation
metrics it shares with the current one (``PROMOTION_METRICS``: map, f1, fg_iou of the seg head alone,
pipeline_fg_iou of the served pipeline -- CAM + seg head fused as the version's per-label choice says, CRF on or off; higher is better)
drops by more than ``tolerance``, and it does not lose a metric the current one has (e.g. a seg head).
``force=True`` promotes anyway (recorded in the log). Scores of two versions are computed on their own
validation splits; the split is a stable hash of example ids, so most of it is shared.

Reading versions, metadata and the promoted version (``current``, ``versions``, ``meta``, ``list``,
``promote``) does not import torch, so the web process can report model versions before the model
has loaded; only ``save`` and ``load`` (checkpoints) import it.

Writes are atomic (a version directory appears complete or not at all; state.json is replaced by
rename) and serialised per project with a file lock, so several processes on one host can train and
promote. Hosts that share only Redis need a store in front of this layout (a later step).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["ModelRegistry", "Promotion", "RegistryError", "PROMOTION_METRICS", "compare_validation"]

PROMOTION_METRICS = ("map", "f1", "fg_iou", "pipeline_fg_iou")
_VERSION = re.compile(r"^v(\d+)$")


class RegistryError(RuntimeError):
    """A registry operation that cannot be done (unknown project/version, nothing to roll back to)."""


@dataclass
class Promotion:
    promoted: bool
    version: str
    previous: str | None
    reason: str
    regressions: list[dict] = field(default_factory=list)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _num(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def compare_validation(new: dict, old: dict, metrics=PROMOTION_METRICS, tolerance: float = 0.0) -> list[dict]:
    """Regressions of `new` against `old`: [{"metric", "old", "new"}] (new None = metric lost)."""
    out = []
    for m in metrics:
        o, n = _num((old or {}).get(m)), _num((new or {}).get(m))
        if o is None:
            continue
        if n is None or n < o - tolerance:
            out.append({"metric": m, "old": o, "new": n})
    return out


def project_dirname(project) -> str:
    """A safe directory name for a project id ("12", "my-project"); raises ValueError otherwise."""
    name = str(project).strip()
    if not name or name in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", name):
        raise ValueError(f"project id {project!r} is not usable as a directory name "
                         "(letters, digits, '_', '.', '-'; at most 100)")
    return name


class ModelRegistry:
    def __init__(self, root):
        self.root = Path(root)

    @classmethod
    def in_model_dir(cls, model_dir) -> "ModelRegistry":
        return cls(Path(model_dir) / "models")

    # -- paths and state --------------------------------------------------------------------------
    def project_dir(self, project) -> Path:
        return self.root / project_dirname(project)

    def _version_dir(self, project, version: str) -> Path:
        if not _VERSION.match(str(version)):
            raise RegistryError(f"{version!r} is not a version name (v1, v2, ...)")
        return self.project_dir(project) / str(version)

    @contextmanager
    def _locked(self, project):
        pdir = self.project_dir(project)
        pdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(pdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield pdir
        finally:
            os.close(fd)

    def _state(self, project) -> dict:
        try:
            return json.loads((self.project_dir(project) / "state.json").read_text())
        except FileNotFoundError:
            return {"current": None, "history": [], "log": []}

    def _write_state(self, project, state: dict) -> None:
        path = self.project_dir(project) / "state.json"
        tmp = path.with_name(f".state.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)

    def versions(self, project) -> list[str]:
        """Saved versions, oldest first."""
        try:
            names = [p.name for p in self.project_dir(project).iterdir() if p.is_dir() and _VERSION.match(p.name)]
        except FileNotFoundError:
            return []
        return sorted(names, key=lambda n: int(_VERSION.match(n).group(1)))

    def projects(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.versions(p.name))

    # -- save / load ------------------------------------------------------------------------------
    def save(self, project, checkpoint: dict, meta: dict | None = None) -> str:
        """Write a new version (not promoted). `checkpoint` must load with ``weights_only=True``
        (tensors, dicts, lists, str/int/float/bool/None); checked before the version appears."""
        import torch

        meta = dict(meta or {})
        with self._locked(project) as pdir:
            tmp = Path(tempfile.mkdtemp(prefix=".new-", dir=pdir))
            try:
                torch.save(checkpoint, tmp / "model.pt")
                try:
                    torch.load(tmp / "model.pt", map_location="cpu", weights_only=True)
                except Exception as exc:
                    raise ValueError(f"the checkpoint does not load with weights_only=True: {exc}") from None
                existing = self.versions(project)
                n = int(_VERSION.match(existing[-1]).group(1)) + 1 if existing else 1
                version = f"v{n}"
                meta.update({"project": str(project), "version": version, "created": meta.get("created") or _now()})
                meta.setdefault("parent", self._state(project).get("current"))
                (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=_json_default))
                os.rename(tmp, pdir / version)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return version

    def save_result(self, project, result, **extra) -> str:
        """Save an :class:`explainers.training.TrainResult` with its meta (labels, counts, validation,
        seconds, backbone, layers, size, config, the label counts of the tag choice) plus `extra` (e.g. ``examples_revision=...``)."""
        meta = {"labels": list(result.labels), "counts": result.counts, "validation": result.validation,
                "seconds": result.seconds, "backbone": result.backbone, "layers": list(result.layers),
                "size": result.size, "config": result.config, **extra}
        if getattr(result, "tag_prior", None) is not None:
            meta["tag_prior"] = result.tag_prior.to_dict()     # what the tag choice learnt from
        neighbours = getattr(result, "tag_neighbours", None)
        if neighbours is not None:       # the annotated photos it compares untagged ones with
            meta["tag_neighbours"] = {"photos": len(neighbours.tags), "cut": neighbours.cut}
        return self.save(project, result.checkpoint(), meta)

    def meta(self, project, version: str) -> dict:
        path = self._version_dir(project, version) / "meta.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RegistryError(f"project {project}: no version {version}") from None

    def load(self, project, version: str | None = None, map_location="cpu") -> tuple[dict, dict]:
        """(checkpoint, meta) of `version` (default: the promoted one); loaded with weights_only=True."""
        import torch

        if version is None:
            version = self.current(project)
            if version is None:
                raise RegistryError(f"project {project}: no promoted model")
        meta = self.meta(project, version)
        ckpt = torch.load(self._version_dir(project, version) / "model.pt", map_location=map_location,
                          weights_only=True)
        return ckpt, meta

    def list(self, project) -> list[dict]:
        current = self.current(project)
        return [{**self.meta(project, v), "current": v == current} for v in self.versions(project)]

    # -- promotion --------------------------------------------------------------------------------
    def current(self, project) -> str | None:
        return self._state(project).get("current")

    def promote(self, project, version: str, force: bool = False, tolerance: float = 0.0,
                metrics=PROMOTION_METRICS) -> Promotion:
        """Make `version` the current model unless its validation regresses (see the module doc)."""
        with self._locked(project):
            new_meta = self.meta(project, version)
            state = self._state(project)
            previous = state.get("current")
            if previous == version:
                return Promotion(False, version, previous, "already current")
            regressions = []
            if previous is not None:
                regressions = compare_validation(new_meta.get("validation") or {},
                                                 self.meta(project, previous).get("validation") or {},
                                                 metrics, tolerance)
            if regressions and not force:
                worst = ", ".join(f"{r['metric']} {r['old']:.3f} -> " + ("missing" if r["new"] is None else f"{r['new']:.3f}")
                                  for r in regressions)
                state.setdefault("log", []).append({"action": "refused", "version": version, "current": previous,
                                                    "regressions": regressions, "at": _now()})
                self._write_state(project, state)
                return Promotion(False, version, previous, f"validation regresses vs {previous}: {worst}", regressions)
            state["current"] = version
            state.setdefault("history", []).append(version)
            state.setdefault("log", []).append({"action": "promote", "version": version, "previous": previous,
                                                "forced": bool(force and regressions), "at": _now()})
            self._write_state(project, state)
            reason = "first model" if previous is None else (
                "forced despite regressions" if regressions else f"validation does not regress vs {previous}")
            return Promotion(True, version, previous, reason, regressions)

    def rollback(self, project) -> str:
        """Go back to the previously promoted version; returns it. RegistryError when there is none."""
        with self._locked(project):
            state = self._state(project)
            history = list(state.get("history") or [])
            current = state.get("current")
            if current is None or len(history) < 2:
                raise RegistryError(f"project {project}: no earlier promoted version to roll back to")
            history.pop()
            while history and history[-1] == current:
                history.pop()
            if not history:
                raise RegistryError(f"project {project}: no earlier promoted version to roll back to")
            state["history"] = history
            state["current"] = history[-1]
            state.setdefault("log", []).append({"action": "rollback", "version": history[-1], "from": current,
                                                "at": _now()})
            self._write_state(project, state)
            return history[-1]


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)
