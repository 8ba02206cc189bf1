"""Job functions run by the workers: predict a list of Label Studio tasks and push the predictions.

A job's argument is one JSON-able dict (see :func:`predict_tasks`), so the web server, the CLI and
webhooks can build it without importing torch. Inside a worker:

* the engine is built once per process and kept in a module-level cache (:func:`get_engine`);
  the device comes from ``tag2mask worker --device`` (``$TAG2MASK_DEVICE``);
* each task's photo bytes are hashed; a prediction already in the :class:`~backend.queues.ResultCache`
  for (task, image content, tags, model version) is reused instead of running the engine;
* each finished prediction is written to Label Studio through :func:`push_prediction`, which is
  idempotent: a prediction of the same ``model_version`` on the task is updated (or left alone when
  identical), never duplicated;
* transient failures (photo download, Label Studio unreachable, 5xx) are retried with exponential
  backoff inside the job; permanent ones (unreadable photo, unknown tag) are not retried. A job
  whose tasks failed raises :class:`TasksFailed` at the end (after finishing all other tasks), so
  RQ keeps it in the FailedJobRegistry with the reasons.

``push_prediction(task_id, prediction)`` is the interface the web server may replace
(:func:`set_prediction_pusher`); the default writes through label-studio-sdk 2.1.2.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Callable, Mapping

__all__ = [
    "TransientError", "TasksFailed", "with_retries", "is_transient",
    "LabelStudioPusher", "set_prediction_pusher", "push_prediction",
    "set_engine_factory", "get_engine", "read_image_bytes", "predict_one", "predict_tasks", "push_late_key",
    "push_owner_key",
]

log = logging.getLogger(__name__)


class TransientError(RuntimeError):
    """A failure worth retrying (network, server overload)."""


class TasksFailed(RuntimeError):
    """Some tasks of a job failed; ``failures`` maps task id -> reason."""

    def __init__(self, failures: Mapping[Any, str]):
        self.failures = dict(failures)
        lines = "; ".join(f"task {t}: {r}" for t, r in self.failures.items())
        super().__init__(f"{len(self.failures)} task(s) failed: {lines}")


# -- retries ------------------------------------------------------------------------------------
def is_transient(exc: BaseException) -> bool:
    """Network errors (HTTP, Redis), timeouts and HTTP 408/429/5xx are transient; the rest are not."""
    if isinstance(exc, (TransientError, ConnectionError, TimeoutError)):
        return True
    try:
        import httpx
        if isinstance(exc, (httpx.TransportError,)):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        import redis
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests
        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            return exc.response.status_code in (408, 429) or exc.response.status_code >= 500
    except ImportError:  # pragma: no cover
        pass
    status = getattr(exc, "status_code", None)   # label_studio_sdk.core.api_error.ApiError
    return isinstance(status, int) and (status in (408, 429) or status >= 500)


def with_retries(fn: Callable[[], Any], *, attempts: int | None = None, base_delay: float | None = None,
                 max_delay: float = 30.0, transient: Callable[[BaseException], bool] = is_transient,
                 what: str = "call") -> Any:
    """Call `fn()`; on a transient error retry up to `attempts` times in all, with jittered exponential
    backoff (``$TAG2MASK_RETRY_ATTEMPTS``, default 4; ``$TAG2MASK_RETRY_DELAY`` s, default 1)."""
    attempts = int(attempts if attempts is not None else os.environ.get("TAG2MASK_RETRY_ATTEMPTS", 4))
    delay = float(base_delay if base_delay is not None else os.environ.get("TAG2MASK_RETRY_DELAY", 1.0))
    for attempt in range(1, max(1, attempts) + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not transient(exc):
                raise
            wait = min(max_delay, delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(exc).__name__, exc,
                        attempt, attempts - 1, wait)
            time.sleep(wait)


# -- pushing predictions to Label Studio ------------------------------------------------------
class LabelStudioPusher:
    """``push(task_id, prediction)`` through label-studio-sdk, idempotent per (task, model_version).

    Lists the task's predictions first: one with the same ``model_version`` is updated (left alone
    when its result and score are already equal; extra duplicates are deleted); otherwise a new one
    is created. Returns ``{"action": "created"|"updated"|"unchanged", "id": prediction id}``.
    The SDK's own retries are off: :func:`push_prediction` retries with its backoff.
    """

    REQUEST_OPTIONS = {"max_retries": 0}

    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 30.0):
        from label_studio_sdk import LabelStudio

        self.url = (url or os.environ.get("LABEL_STUDIO_URL", "")).rstrip("/")
        self.api_key = api_key or os.environ.get("LABEL_STUDIO_API_KEY", "")
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
    with _pusher_lock:
        if _pusher is None and not (os.environ.get("LABEL_STUDIO_URL") and os.environ.get("LABEL_STUDIO_API_KEY")) \
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


# -- the engine, once per process --------------------------------------------------------------
_engines: dict[tuple, Any] = {}
_engine_lock = threading.Lock()
_engine_factory: Callable[..., Any] | None = None


def set_engine_factory(factory: Callable[..., Any] | None) -> None:
    """Override how an engine is built: ``factory(backbone=..., device=..., preset=...)`` -> engine.
    The engine has ``engine.predict(image_rgb_uint8, tags) -> PhotoResult`` (or is that callable)."""
    global _engine_factory
    _engine_factory = factory
    _engines.clear()


def _default_factory(backbone: str, device: str, preset: str) -> Any:
    # explainers.segment.Tag2Mask is the mask engine (see explainers/segment); built lazily so that
    # importing this module does not import torch.
    from explainers.segment import PipelineConfig, Tag2Mask

    return Tag2Mask(backbone=backbone, config=PipelineConfig.preset(preset), device=device)


def get_engine(backbone: str | None = None, device: str | None = None, preset: str | None = None) -> Any:
    """The engine for (backbone, device, preset), built on first use and cached for the process."""
    from explainers.device import pick_device, set_cpu_threads

    backbone = backbone or os.environ.get("TAG2MASK_BACKBONE", "efficientnet_lite0")
    dev = str(pick_device(device or os.environ.get("TAG2MASK_DEVICE") or None))
    preset = preset or os.environ.get("TAG2MASK_PRESET", "balanced")
    key = (backbone, dev, preset)
    with _engine_lock:
        if key not in _engines:
            set_cpu_threads()
            factory = _engine_factory or _default_factory
            t0 = time.perf_counter()
            _engines[key] = factory(backbone=backbone, device=dev, preset=preset)
            log.info("engine %s loaded in %.1f s", key, time.perf_counter() - t0)
        return _engines[key]


def _run_engine(engine: Any, image, tags: list[str]):
    if hasattr(engine, "predict"):
        return engine.predict(image, tags)
    return engine(image, tags)


# -- photos -------------------------------------------------------------------------------------
_fetcher = None


def _default_fetcher():
    """One ImageFetcher per process (settings from the environment; its HTTP session is reused)."""
    global _fetcher
    if _fetcher is None:
        from backend.image_fetch import ImageFetcher
        _fetcher = ImageFetcher()
    return _fetcher


def _fetch_is_transient(message: str) -> bool:
    """ImageFetchError messages of network trouble worth retrying (see backend.image_fetch)."""
    return any(m in message for m in ("download failed (", "download interrupted (", "HTTP 408 ", "HTTP 429 ",
                                      "HTTP 500 ", "HTTP 502 ", "HTTP 503 ", "HTTP 504 "))


def read_image_bytes(ref: str, *, task_id: Any = None, ls_url: str | None = None, api_key: str | None = None,
                     fetcher=None) -> bytes:
    """Bytes of a task's photo through :class:`backend.image_fetch.ImageFetcher`, so workers follow the
    web server's rules (``TAG2MASK_LOCAL_ROOTS``, ``TAG2MASK_ALLOWED_HOSTS``, size cap, timeouts, the
    Label Studio token only to Label Studio). `ls_url`/`api_key` are used where ``LABEL_STUDIO_URL`` /
    ``LABEL_STUDIO_API_KEY`` are unset. Network failures (download failed, HTTP 408/429/5xx) are
    retried with backoff; the rest raise ImageFetchError at once."""
    from backend.image_fetch import ImageFetchError

    fetcher = fetcher or _default_fetcher()

    def get() -> bytes:
        try:
            return fetcher.fetch_bytes(str(ref), task_id=task_id, ls_url=ls_url, api_key=api_key)
        except ImageFetchError as exc:
            if _fetch_is_transient(str(exc)):
                raise TransientError(str(exc)) from None
            raise
    return with_retries(get, what=f"fetch of the photo of task {task_id}")


# -- the job functions --------------------------------------------------------------------------
def _connection():
    from rq import get_current_job

    job = get_current_job()
    if job is not None:
        return job.connection
    from backend.redis_conn import get_connection
    return get_connection()


_models: dict[tuple, Any] = {}


def _ls_model(label_config: str, model_version: str, project: Any = None):
    """A :class:`backend.model.Tag2MaskModel` for a labeling config and project, cached per process (its
    engine is ``backend.model.get_engine``: loaded once per process, on ``$TAG2MASK_DEVICE``). It
    predicts with the project's promoted trained heads (``backend.model.get_heads_cache``) and
    reports `model_version`, the version the web server chose (and keyed the result cache by)."""
    from backend.model import Tag2MaskModel
    from backend.settings import Settings

    project = None if project in (None, "", "_") else str(project)
    key = (label_config, str(model_version), project)
    with _engine_lock:
        model = _models.get(key)
        if model is None:
            if len(_models) > 256:
                _models.clear()
            model = _models[key] = Tag2MaskModel(Settings.from_env(), project_id=project, label_config=label_config,
                                                 version=str(model_version))
            model.setup()
        return model


def predict_one(task: Mapping[str, Any], *, label_config: str, model_version: str,
                cache=None, engine_options: Mapping[str, Any] | None = None,
                label_studio: Mapping[str, Any] | None = None, project: Any = None) -> tuple[dict, bool]:
    """Prediction of one task; returns ``(prediction, from_cache)``. Label Studio tasks of a `project`
    with a promoted trained model use its heads.

    Two kinds of task:

    * ``{"id", "image", "tags"}`` (CLI, scripts): the engine runs on exactly these tags;
    * ``{"id", "image", "tags": [...] or None, "ls": true}`` (built by the web server from a Label
      Studio task): the tags are the task's annotated Choices when given, else the labels of the
      labeling config the classifier picks -- exactly what ``/predict`` does in the web process
      (:meth:`backend.model.Tag2MaskModel.predict_image`). Such a prediction is also cached under
      the image reference (``"ref:" + image``), which lets the web server answer without fetching.
    """
    from backend.queues import image_hash, ls_cache_tags, normalize_tags

    creds = label_studio or {}
    ls_task = bool(task.get("ls"))
    tags = ls_cache_tags(task.get("tags")) if ls_task else normalize_tags(task.get("tags", []))
    data = read_image_bytes(str(task["image"]), task_id=task.get("id"), ls_url=creds.get("url"),
                            api_key=creds.get("token"))
    sha = image_hash(data)
    if cache is not None:
        hit = cache.get(task["id"], sha, tags, model_version)
        if hit is not None:
            if ls_task:
                cache.put(task["id"], "ref:" + str(task["image"]), tags, model_version, hit)
            return hit, True
    from backend.label_config import parse_label_config
    from backend.ls_results import make_prediction
    from explainers.imageio import load_image

    if ls_task:
        model = _ls_model(label_config, model_version, project)
        prediction = model.predict_image(load_image(data), model.parsed, task.get("tags") or None,
                                         task_id=task.get("id"))
    else:
        engine = get_engine(**dict(engine_options or {}))
        photo = _run_engine(engine, load_image(data), tags)
        prediction = make_prediction(photo, parse_label_config(label_config), model_version)
    if cache is not None:
        cache.put(task["id"], sha, tags, model_version, prediction)
        if ls_task:
            cache.put(task["id"], "ref:" + str(task["image"]), tags, model_version, prediction)
    return prediction, False


def push_late_key(job_id: str) -> str:
    """Redis flag set by the web server when ``/predict`` stopped waiting for a (no-push) job: the job
    then writes its predictions to Label Studio itself, so none is lost."""
    from backend.queues import namespace

    return f"{namespace()}:push-late:{job_id}"


def push_owner_key(task_id: Any, model_version: str) -> str:
    """Redis key naming the job that will push (or has pushed) this task's prediction of this model
    version to Label Studio. While it exists the web server answers ``/predict`` for the task without
    a result: Label Studio stores what ``/predict`` answers, and that copy plus the worker's push would
    be two predictions. The worker deletes it when the task fails, so a later ``/predict`` answers."""
    from backend.queues import namespace

    return f"{namespace()}:push-owner:{task_id}:{model_version}"


def predict_tasks(request: Mapping[str, Any]) -> dict:
    """Job: predict every task of `request` and (when ``push``) write each to Label Studio.

    ``request``::

        {"project": 3, "model_version": "tag2mask-0.1", "label_config": "<View>...</View>",
         "tasks": [{"id": 17, "image": "/path/or/url.jpg", "tags": ["horse"]}, ...],
         "push": true, "engine": {"backbone": ..., "preset": ...},
         "label_studio": {"url": ..., "token": ...}}      # optional: where LABEL_STUDIO_URL/_API_KEY are unset

    Returns ``{"predictions": {task_id: prediction}, "cached": [ids], "pushed": {id: outcome}}``
    (JSON keys are strings). Progress is kept in the job's ``meta`` (``done``/``total``/``failed``,
    ``errors``: task id -> reason). A job enqueued without ``push`` still pushes when the web server
    has set :func:`push_late_key` (it stopped waiting).
    """
    from rq import get_current_job

    from backend.queues import ResultCache

    job = get_current_job()
    conn = _connection()
    cache = ResultCache(conn)
    tasks = list(request.get("tasks", []))
    creds = dict(request.get("label_studio") or {})

    def should_push() -> bool:
        if request.get("push", True):
            return True
        return job is not None and bool(conn.exists(push_late_key(job.id)))

    out: dict[str, Any] = {"predictions": {}, "cached": [], "pushed": {}}
    failures: dict[Any, str] = {}
    permanent_only = True
    for i, task in enumerate(tasks):
        tid = task["id"]
        try:
            prediction, cached = predict_one(task, label_config=request["label_config"],
                                             model_version=str(request["model_version"]), cache=cache,
                                             engine_options=request.get("engine"), label_studio=creds,
                                             project=request.get("project"))
            out["predictions"][str(tid)] = prediction
            if cached:
                out["cached"].append(tid)
            if should_push():
                out["pushed"][str(tid)] = push_prediction(tid, prediction, label_studio=creds)
        except Exception as exc:   # one bad task must not sink the others
            log.exception("task %s failed", tid)
            failures[tid] = f"{type(exc).__name__}: {exc}"
            permanent_only = permanent_only and not is_transient(exc)
            if request.get("push", True):
                try:
                    conn.delete(push_owner_key(tid, str(request["model_version"])))
                except Exception:   # noqa: BLE001 - Redis trouble: the key expires anyway
                    pass
        if job is not None:
            job.meta.update({"done": i + 1, "total": len(tasks), "failed": len(failures),
                             "errors": {str(k): v for k, v in failures.items()}})
            job.save_meta()
    if not request.get("push", True) and should_push():   # the flag came while we ran: push the rest
        for tid, prediction in out["predictions"].items():
            if tid not in out["pushed"]:
                try:
                    out["pushed"][tid] = push_prediction(int(tid), prediction, label_studio=creds)
                except Exception as exc:
                    failures[tid] = f"{type(exc).__name__}: {exc}"
                    permanent_only = permanent_only and not is_transient(exc)
    if failures:
        if job is not None and permanent_only:
            job.retries_left = 0   # a re-run would fail the same way: keep the failure now
        raise TasksFailed(failures)
    return out
