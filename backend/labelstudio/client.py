"""Writing predictions to Label Studio through label-studio-sdk (:func:`push_prediction`), idempotent
per task and model version, with the retry policy.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

from backend.queue.retry import with_retries
from backend.settings import Settings

log = logging.getLogger(__name__)


# -- pushing predictions to Label Studio ------------------------------------------------------
class LabelStudioPusher:
    """``push(task_id, prediction)`` through label-studio-sdk, idempotent per (task, model_version).

    Lists the task's predictions first: one with the same ``model_version`` is updated (left alone
    when its result and score are already equal; extra duplicates are deleted); otherwise a new one
    is created. Returns ``{"action": "created"|"updated"|"unchanged", "id": prediction id}``.
    The SDK's own retries are off: :func:`push_prediction` retries with its backoff. `url` and
    `api_key` default to the settings' ``LABEL_STUDIO_URL`` and ``LABEL_STUDIO_API_KEY``.
    """

    REQUEST_OPTIONS = {"max_retries": 0}

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 30.0):
        from label_studio_sdk import LabelStudio

        settings = Settings.from_env() if not (url and api_key) else None
        self.url = (url or settings.label_studio_url or "").rstrip("/")
        self.api_key = api_key or settings.label_studio_api_key or ""
        if not self.url or not self.api_key:
            raise RuntimeError("pushing predictions needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        self.client = LabelStudio(base_url=self.url, api_key=self.api_key, timeout=timeout)

    def __call__(self, task_id: int, prediction: Mapping[str, Any]) -> dict:
        version = str(prediction.get("model_version", ""))
        result = list(prediction.get("result", []))
        score = prediction.get("score")
        ro = self.REQUEST_OPTIONS
        existing = [p for p in self.client.predictions.list(task=int(task_id), request_options=ro)
                    if str(p.model_version) == version]
        if existing:
            keep, extra = existing[0], existing[1:]
            for p in extra:
                self.client.predictions.delete(id=p.id, request_options=ro)
            if keep.result == result and (score is None or keep.score == score):
                return {"action": "unchanged", "id": keep.id}
            kw = {"score": float(score)} if score is not None else {}
            self.client.predictions.update(id=keep.id, result=result, model_version=version, request_options=ro, **kw)
            return {"action": "updated", "id": keep.id}
        kw = {"score": float(score)} if score is not None else {}
        created = self.client.predictions.create(task=int(task_id), result=result, model_version=version,
                                                 request_options=ro, **kw)
        return {"action": "created", "id": created.id}


_pusher: Callable[[int, Mapping[str, Any]], Any] | None = None


_pusher_lock = threading.Lock()


def set_prediction_pusher(fn: Callable[[int, Mapping[str, Any]], Any] | None) -> None:
    """Replace how predictions reach Label Studio (None: back to :class:`LabelStudioPusher`)."""
    global _pusher
    with _pusher_lock:
        _pusher = fn


_pushers_by_creds: dict[tuple[str, str], LabelStudioPusher] = {}


def push_prediction(task_id: int, prediction: Mapping[str, Any],
                    label_studio: Mapping[str, Any] | None = None) -> Any:
    """Write one task's prediction to Label Studio, idempotently, retrying transient failures.

    ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` name the server; where they are unset, `label_studio`
    (``{"url", "token"}``, what Label Studio sent to ``/setup``) does."""
    global _pusher
    settings = Settings.from_env()
    with _pusher_lock:
        if _pusher is None and not (settings.label_studio_url and settings.label_studio_api_key) \
                and label_studio and label_studio.get("url") and label_studio.get("token"):
            key = (str(label_studio["url"]), str(label_studio["token"]))
            if key not in _pushers_by_creds:
                _pushers_by_creds[key] = LabelStudioPusher(*key)
            pusher = _pushers_by_creds[key]
        else:
            if _pusher is None:
                _pusher = LabelStudioPusher()
            pusher = _pusher
    return with_retries(lambda: pusher(task_id, prediction), what=f"push of task {task_id}")
