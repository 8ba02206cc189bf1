"""Promoted checkpoints mirrored into Redis (:class:`RedisModelStore`), for workers on hosts that share
only Redis with the one holding ``MODEL_DIR``.
"""
from __future__ import annotations

import json
import logging
from typing import Iterable

from backend.storage.keys import models_key
from backend.storage.registry import ModelRegistry, RegistryError

log = logging.getLogger(__name__)


# -- models for other hosts --------------------------------------------------------------------------
class RedisModelStore:
    """Promoted checkpoints mirrored into Redis, for workers on hosts that share only Redis.

    One hash per project, ``<namespace>:models:<project>``: ``current`` -> version, ``<v>:pt`` ->
    the checkpoint file's bytes, ``<v>:meta`` -> its meta.json. :meth:`publish` copies the registry's
    promoted version (the training job does it after promoting; the scheduler loop syncs every
    project every few seconds, so CLI promotions and rollbacks follow). :meth:`current` and
    :meth:`load` mirror :class:`~backend.storage.registry.ModelRegistry`'s, so :func:`load_project_heads`
    and :class:`ProjectHeadsCache` accept either. Checkpoints load with ``weights_only=True``.
    """

    def __init__(self, conn, keep: int = 5):
        self.conn = conn
        self.keep = max(1, int(keep))      # versions kept per project (the current one always)

    def key(self, project) -> str:
        return models_key(project)

    def current(self, project) -> str | None:
        v = self.conn.hget(self.key(project), "current")
        return v.decode() if isinstance(v, bytes) else v

    def publish(self, registry: ModelRegistry, project) -> str | None:
        """Copy `project`'s promoted version (if not there yet) and point ``current`` at it."""
        current = registry.current(project)
        key = self.key(project)
        if current is None:
            self.conn.hdel(key, "current")
            return None
        if self.current(project) == current:
            return current
        vdir = registry.project_dir(project) / current
        pipe = self.conn.pipeline()
        pipe.hset(key, mapping={f"{current}:pt": (vdir / "model.pt").read_bytes(),
                                f"{current}:meta": (vdir / "meta.json").read_text(), "current": current})
        listed = sorted({f.decode().split(":", 1)[0] for f in self.conn.hkeys(key) if b":" in f} | {current},
                        key=lambda v: int(v[1:]) if v[1:].isdigit() else 0)
        others = [v for v in listed if v != current]            # oldest first
        for old in others[:max(0, len(others) - (self.keep - 1))]:
            pipe.hdel(key, f"{old}:pt", f"{old}:meta")
        pipe.execute()
        log.info("project %s: %s published to Redis", project, current)
        return current

    def sync(self, registry: ModelRegistry, projects: Iterable[str] | None = None) -> dict:
        """:meth:`publish` every project of the registry; returns {project: current}."""
        return {p: self.publish(registry, p) for p in (projects if projects is not None else registry.projects())}

    def load(self, project, version: str | None = None, map_location="cpu") -> tuple[dict, dict]:
        import io

        import torch

        version = version or self.current(project)
        if version is None:
            raise RegistryError(f"project {project}: no promoted model in Redis")
        blob, meta = self.conn.hmget(self.key(project), f"{version}:pt", f"{version}:meta")
        if blob is None:
            raise RegistryError(f"project {project}: version {version} is not in Redis")
        ckpt = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=True)
        return ckpt, json.loads(meta) if meta else {}
