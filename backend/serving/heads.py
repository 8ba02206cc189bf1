"""A project's promoted trained heads in serving: read from the registry in ``MODEL_DIR`` or its Redis
mirror, loaded on the engine's backbone, re-checked at most every ``TAG2MASK_HEADS_TTL`` seconds
(:class:`ProjectHeadsCache`; :func:`get_heads_cache` is the process's one).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from backend.serving.engine import get_engine
from backend.settings import Settings
from backend.storage.registry import ModelRegistry, RegistryError

log = logging.getLogger(__name__)


class _HeadsSource:
    """Where promoted checkpoints are read: the registry in ``MODEL_DIR`` for the projects it has,
    else (when a Redis URL is configured) the Redis mirror. ``current``/``load`` as ModelRegistry's."""

    def __init__(self, settings: Settings):
        from backend.storage.registry import ModelRegistry

        self.registry = ModelRegistry.in_model_dir(settings.model_dir)
        self.redis_url = settings.redis_url
        self._redis = None

    def _pick(self, project):
        if self.redis_url is None or self.registry.versions(project):
            return self.registry
        if self._redis is None:
            from backend.storage.connection import get_connection
            from backend.storage.model_mirror import RedisModelStore

            self._redis = RedisModelStore(get_connection(self.redis_url, start_embedded=False, socket_timeout=10))
        return self._redis

    def current(self, project):
        try:
            return self._pick(project).current(project)
        except Exception as exc:  # noqa: BLE001 - Redis down / bad project name: serve without heads
            log.warning("project %s: promoted model unknown (%s)", project, exc)
            return None

    def load(self, project, version=None, map_location="cpu"):
        import redis

        from backend.storage.registry import RegistryError

        try:
            return self._pick(project).load(project, version, map_location=map_location)
        except (redis.RedisError, OSError) as exc:      # Redis down: load_project_heads serves without heads
            raise RegistryError(f"project {project}: {exc}") from None


_HEADS_CACHE = None


_HEADS_KEY = None
_HEADS_LOCK = threading.Lock()


def get_heads_cache(settings: Settings):
    """The process's :class:`backend.serving.heads.ProjectHeadsCache` on the engine's backbone (re-checking
    a project's promoted version every ``settings.heads_ttl`` seconds, as its first caller's settings
    said; a new one when the engine, model folder or Redis URL changes)."""
    global _HEADS_CACHE, _HEADS_KEY
    engine, _ = get_engine(settings)
    key = (id(engine), str(settings.model_dir), settings.redis_url)
    with _HEADS_LOCK:
        if _HEADS_CACHE is None or _HEADS_KEY != key:
            _HEADS_CACHE = ProjectHeadsCache(_HeadsSource(settings), engine.backbone, ttl=settings.heads_ttl)
            _HEADS_KEY = key
        return _HEADS_CACHE


# -- serving -----------------------------------------------------------------------------------------
def load_project_heads(registry: ModelRegistry, project, backbone, version: str | None = None):
    """The promoted (or given) version's :class:`explainers.training.ProjectHeads` on `backbone`;
    None when the project has no promoted model or it was trained on another backbone (logged)."""
    from explainers.training import ProjectHeads

    try:
        ckpt, meta = registry.load(project, version, map_location=str(backbone.device))
    except (RegistryError, ValueError, FileNotFoundError):
        return None
    try:
        return ProjectHeads.from_checkpoint(ckpt, backbone)
    except ValueError as exc:
        log.warning("project %s %s not usable: %s", project, meta.get("version"), exc)
        return None


class ProjectHeadsCache:
    """Per-project promoted heads for a worker, re-checked at most every `ttl` seconds.

    ``version, heads = cache.get(project)`` -> (None, None) without a promoted model. A newly
    promoted (or rolled back) version is picked up on the first ``get`` after `ttl` seconds; loading
    happens outside any job lock, and a job already holding the old heads keeps them.
    """

    def __init__(self, registry: ModelRegistry, backbone, ttl: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.registry = registry
        self.backbone = backbone
        self.ttl = float(ttl)
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[float, str | None, Any]] = {}

    def get(self, project) -> tuple[str | None, Any]:
        key = str(project)
        now = self.clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and now - entry[0] < self.ttl:
                return entry[1], entry[2]
        try:
            current = self.registry.current(project)
        except ValueError:
            current = None
        if entry is not None and entry[1] == current:
            heads = entry[2]
        else:
            heads = load_project_heads(self.registry, project, self.backbone, current) if current else None
            if current:
                log.info("project %s: serving trained heads %s", project, current)
        with self._lock:
            self._entries[key] = (now, current if heads is not None else None, heads)
        return (current if heads is not None else None), heads

    def invalidate(self, project=None) -> None:
        with self._lock:
            if project is None:
                self._entries.clear()
            else:
                self._entries.pop(str(project), None)
