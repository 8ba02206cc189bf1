"""The Redis result cache: a prediction keyed by (task, photo content or reference, tags, model version),
so a photo predicted once is not predicted again (``TAG2MASK_RESULT_TTL`` seconds, default a week).
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

import logging

import redis

from backend.settings import Settings
from backend.storage.keys import digest, namespace


log = logging.getLogger(__name__)


# -- identities -------------------------------------------------------------------------------
def image_hash(data: bytes) -> str:
    """Content hash of a photo's bytes (sha256 hex)."""
    return hashlib.sha256(data).hexdigest()


def normalize_tags(tags: Iterable[str]) -> list[str]:
    """Tags as a canonical list: stripped, de-duplicated, sorted (order does not change the work)."""
    return sorted({str(t).strip() for t in tags if str(t).strip()})


def ls_cache_tags(human: Iterable[str] | None) -> list[str]:
    """Cache/identity tags of a Label Studio task's prediction: its annotated tags, or a marker for
    "the labels the classifier picks" (kept apart from explicit-tag predictions)."""
    return normalize_tags(["@label-studio", *(human or ["@classifier"])])


# -- result cache -----------------------------------------------------------------------------
class ResultCache:
    """Predictions by (task, image content hash, tags, model version), as JSON, with a TTL.

    ``ttl`` defaults to ``Settings.result_ttl`` (``$TAG2MASK_RESULT_TTL`` seconds, 7 days). Keys:
    ``<namespace>:result:<task>:<sha1 of (image hash, tags, model version)>``. ``best_effort``: a Redis
    error is logged and counts as a miss / a put not done (the web process's inline ``/predict``, which
    works without Redis); otherwise it is raised (a worker's task then fails as transient).
    """

    def __init__(self, connection: redis.Redis, ttl: int | None = None, prefix: str | None = None,
                 best_effort: bool = False):
        self.connection = connection
        self.best_effort = best_effort
        self.ttl = int(ttl if ttl is not None else Settings.from_env().result_ttl)
        self.prefix = prefix or f"{namespace()}:result"

    def key(self, task_id: Any, image_sha: str, tags: Iterable[str], model_version: str) -> str:
        return f"{self.prefix}:{task_id}:{digest(image_sha, normalize_tags(tags), str(model_version))}"

    def _redis_error(self, exc: Exception, what: str) -> None:
        if not self.best_effort:
            raise exc
        log.warning("result cache %s skipped: %s", what, exc)

    def get(self, task_id: Any, image_sha: str, tags: Iterable[str], model_version: str) -> dict | None:
        try:
            raw = self.connection.get(self.key(task_id, image_sha, tags, model_version))
        except (redis.RedisError, OSError) as exc:
            self._redis_error(exc, "read")
            return None
        return json.loads(raw) if raw is not None else None

    def put(self, task_id: Any, image_sha: str, tags: Iterable[str], model_version: str,
            prediction: dict) -> None:
        try:
            self.connection.set(self.key(task_id, image_sha, tags, model_version),
                                json.dumps(prediction, separators=(",", ":")), ex=self.ttl if self.ttl > 0 else None)
        except (redis.RedisError, OSError) as exc:
            self._redis_error(exc, "write")

    def delete(self, task_id: Any, image_sha: str, tags: Iterable[str], model_version: str) -> bool:
        return bool(self.connection.delete(self.key(task_id, image_sha, tags, model_version)))
