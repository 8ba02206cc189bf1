"""Job functions run by the workers: predict a list of Label Studio tasks and push the predictions.

A job's argument is one JSON-able dict (see :func:`predict_tasks`), so the web server, the CLI and
webhooks can build it without importing torch. Inside a worker:

* the engine is ``backend.model.get_engine``'s, built once per process and shared with its inference
  lock by both kinds of task (Label Studio tasks, with the project's trained heads, and explicit-tag
  tasks, without); the device comes from ``tag2mask worker --device`` (``$TAG2MASK_DEVICE``);
* tasks go in chunks of ``$TAG2MASK_BATCH_SIZE`` (default 8; ``tag2mask worker --batch-size``):
  each task's photo is fetched and hashed; a prediction already in the
  :class:`~backend.queues.ResultCache` for (task, image content, tags, model version) is reused; the
  chunk's other photos go to the engine in one call (:func:`predict_chunk`);
* each finished prediction is written to Label Studio through :func:`push_prediction`, which is
  idempotent: a prediction of the same ``model_version`` on the task is updated (or left alone when
  identical), never duplicated;
* transient failures (photo download, Label Studio unreachable, 5xx) are retried with exponential
  backoff inside the job; permanent ones (unreadable photo, unknown tag) are not retried. A job
  whose tasks failed raises :class:`TasksFailed` at the end (after finishing all other tasks), so
  RQ keeps it in the FailedJobRegistry with the reasons.
* a malformed task (not an object, an unusable id, no image string, tags not strings) fails alone
  with a sentence (:func:`checked_job_task`); a failed task's reason in the job's ``meta["errors"]``
  (what ``/predict`` answers) is the sentence the web process gives inline (:func:`task_error`),
  while the job's error (TasksFailed) keeps each exception's type for the operator.

``push_prediction(task_id, prediction)`` is the interface the web server may replace
(:func:`set_prediction_pusher`); the default writes through label-studio-sdk 2.1.2.
"""
from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

__all__ = [
    "TransientError", "TasksFailed", "with_retries", "is_transient",
    "LabelStudioPusher", "set_prediction_pusher", "push_prediction",
    "batch_size", "read_image_bytes", "TaskOutcome", "predict_chunk", "predict_one", "predict_tasks",
    "checked_job_task", "task_error",
    "push_late_key", "push_owner_key",
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



# -- the engine: backend.model's, one per process ------------------------------------------------
def batch_size() -> int:
    """Photos per engine call in a worker: ``$TAG2MASK_BATCH_SIZE`` (default 8; set by
    ``tag2mask worker --batch-size N``)."""
    from backend.settings import Settings

    return max(1, Settings.from_env().batch_size)


def _engine_settings(engine_options: Mapping[str, Any] | None):
    """Settings from the environment, with a job's ``engine`` options (backbone, preset, device) on top."""
    from backend.settings import Settings

    opts = {k: str(v) for k, v in dict(engine_options or {}).items() if k in ("backbone", "preset", "device") and v}
    return Settings.from_env(**opts)


@functools.lru_cache(maxsize=64)
def _label_config(label_config: str):
    from backend.label_config import parse_label_config

    return parse_label_config(label_config)


_models: dict[tuple, Any] = {}
_models_lock = threading.Lock()


def _ls_model(label_config: str, model_version: str, project: Any = None):
    """A :class:`backend.model.Tag2MaskModel` for a labeling config and project, cached per process (its
    engine is ``backend.model.get_engine``: loaded once per process, on ``$TAG2MASK_DEVICE``). It
    predicts with the project's promoted trained heads (``backend.model.get_heads_cache``) and
    reports `model_version`, the version the web server chose (and keyed the result cache by)."""
    from backend.model import Tag2MaskModel
    from backend.settings import Settings

    project = None if project in (None, "", "_") else str(project)
    key = (label_config, str(model_version), project)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            if len(_models) > 256:
                _models.clear()
            model = _models[key] = Tag2MaskModel(Settings.from_env(), project_id=project, label_config=label_config,
                                                 version=str(model_version))
            model.setup()
        return model


def _predict_ls(outcomes: list["TaskOutcome"], label_config: str, model_version: str,
                project: Any) -> list[dict | Exception]:
    """Label Studio tasks: one :meth:`Tag2MaskModel.predict_images` call (the task's annotated tags, else
    the labels the classifier picks; the project's trained heads when it has promoted ones)."""
    model = _ls_model(label_config, model_version, project)
    return model.predict_images([o.image for o in outcomes], model.parsed,
                                [o.task.get("tags") or None for o in outcomes], [o.task.get("id") for o in outcomes])


def _predict_explicit(outcomes: list["TaskOutcome"], label_config: str, model_version: str,
                      engine_options: Mapping[str, Any] | None) -> list[dict | Exception]:
    """Explicit-tag tasks: one ``engine.predict_many`` call on the process's engine, under its inference
    lock, without project heads; the labeling config's ``predicted_values`` map tags to classes."""
    from backend.ls_results import make_prediction
    from backend.model import get_engine

    config = _label_config(label_config)
    extra = {label: names for label, names in config.tag_queries().items() if names}
    engine, lock = get_engine(_engine_settings(engine_options))
    with lock:
        engine.set_heads(None)
        engine.tag_extra = extra or None
        photos = engine.predict_many([o.image for o in outcomes], [o.tags for o in outcomes],
                                     batch_size=max(1, len(outcomes)))
    out: list[dict | Exception] = []
    for photo in photos:
        try:
            out.append(photo if isinstance(photo, Exception) else make_prediction(photo, config, model_version))
        except Exception as exc:   # noqa: BLE001 - recorded per task
            out.append(exc)
    return out


# -- the job functions --------------------------------------------------------------------------
def _connection():
    from rq import get_current_job

    job = get_current_job()
    if job is not None:
        return job.connection
    from backend.redis_conn import get_connection
    return get_connection()


@dataclass
class TaskOutcome:
    """One task of a chunk: its prediction, or the exception that stopped it; ``cached``: the prediction
    came from the result cache. ``sha`` (the photo's content hash) and ``image`` (the decoded photo,
    dropped after the engine call) are kept between the stages."""
    task: Mapping[str, Any]
    tags: list[str]
    sha: str | None = None
    image: Any = None
    prediction: dict | None = None
    cached: bool = False
    error: Exception | None = None


def checked_job_task(task: Any) -> tuple[Any, str, list[str] | None]:
    """(id, image reference, tags or None) of a job's task; ValueError with a sentence (the ones
    ``/predict`` gives for a Label Studio task where they apply) when it is malformed."""
    from backend.untrusted import json_type
    from backend.untrusted import task_id as checked_task_id

    if not isinstance(task, Mapping):
        raise ValueError(f"a task must be a JSON object, not {json_type(task)}")
    tid = checked_task_id(task.get("id"))
    image = task.get("image")
    if not isinstance(image, str) or not image:
        raise ValueError(f"the task's image must be a string (the photo's URL or path), not "
                         f"{json_type(image) if image != '' else 'an empty string'}")
    tags = task.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
        raise ValueError(f"the task's tags must be a list of strings, not {json_type(tags)}"
                         + (" holding other values" if isinstance(tags, list) else ""))
    return tid, image, tags


def task_error(exc: BaseException) -> str:
    """A failed task's reason in the job's ``meta["errors"]`` (what ``/predict`` answers): the sentence
    the web process gives (:func:`backend.model.task_failure_reason`); a photo download that kept
    failing gives its last message."""
    from backend.model import MAX_REASON_CHARS, task_failure_reason
    from backend.untrusted import clip

    return clip(str(exc), MAX_REASON_CHARS) if isinstance(exc, TransientError) else task_failure_reason(exc)


def _task_key(task: Any, index: int) -> Any:
    """The id a task's outcome is reported under: its own when usable, else ``"#<index in the job>"``."""
    from backend.untrusted import task_id as checked_task_id

    try:
        tid = checked_task_id(task.get("id")) if isinstance(task, Mapping) else None
    except ValueError:
        tid = None
    return f"#{index}" if tid is None else tid


def _fetch(task: Mapping[str, Any], model_version: str, cache, creds: Mapping[str, Any]) -> TaskOutcome:
    """Stage 1 of a task: check it (:func:`checked_job_task`), read its photo (retrying network
    trouble), hash it, look it up in the result cache; a miss is decoded for the engine. Failures are
    kept in the outcome."""
    from backend.queues import image_hash, ls_cache_tags, normalize_tags
    from explainers.imageio import load_image

    outcome = TaskOutcome(task, [])
    try:
        _, image, tags = checked_job_task(task)
        ls_task = bool(task.get("ls"))
        outcome.tags = ls_cache_tags(tags) if ls_task else normalize_tags(tags or [])
        data = read_image_bytes(image, task_id=task.get("id"), ls_url=creds.get("url"),
                                api_key=creds.get("token"))
        outcome.sha = image_hash(data)
        hit = cache.get(task.get("id"), outcome.sha, outcome.tags, model_version) if cache is not None else None
        if hit is not None:
            outcome.prediction, outcome.cached = hit, True
            if ls_task:
                cache.put(task.get("id"), "ref:" + image, outcome.tags, model_version, hit)
        else:
            outcome.image = load_image(data)
    except Exception as exc:   # noqa: BLE001 - recorded per task
        outcome.error = exc
    return outcome


def _run_engine(outcomes: list[TaskOutcome], predict: Callable[[list[TaskOutcome]], list]) -> None:
    """Stage 2: one engine call for the chunk's misses; each result (or exception) goes to its task. A
    call that fails as a whole fails each of its tasks with that reason."""
    if not outcomes:
        return
    log.info("tasks %s: %d photo(s) in one engine call", [o.task.get("id") for o in outcomes], len(outcomes))
    try:
        results = predict(outcomes)
    except Exception as exc:   # noqa: BLE001 - e.g. the device ran out of memory: every task gets the reason
        results = [exc] * len(outcomes)
    for outcome, result in zip(outcomes, results):
        outcome.image = None
        if isinstance(result, Exception):
            outcome.error = result
        else:
            outcome.prediction = result


def predict_chunk(tasks: Sequence[Mapping[str, Any]], *, label_config: str, model_version: str, cache=None,
                  engine_options: Mapping[str, Any] | None = None, label_studio: Mapping[str, Any] | None = None,
                  project: Any = None) -> list[TaskOutcome]:
    """Predictions of several tasks with one engine call per kind of task, in the tasks' order.

    Each photo is fetched, hashed and looked up in the result cache (a hit skips the engine); the
    misses go to the device together: Label Studio tasks through one
    :meth:`backend.model.Tag2MaskModel.predict_images` call, explicit-tag tasks through one
    ``engine.predict_many`` call (both on ``backend.model.get_engine``'s engine, under its lock); each
    new prediction is then cached. A task that fails keeps its exception in ``.error``; the others go on.
    Task kinds (see :func:`predict_one`) may be mixed.
    """
    creds = dict(label_studio or {})
    version = str(model_version)
    outcomes = [_fetch(task, version, cache, creds) for task in tasks]
    misses = [o for o in outcomes if o.error is None and o.prediction is None]
    _run_engine([o for o in misses if o.task.get("ls")],
                lambda batch: _predict_ls(batch, label_config, version, project))
    _run_engine([o for o in misses if not o.task.get("ls")],
                lambda batch: _predict_explicit(batch, label_config, version, engine_options))
    if cache is not None:
        for o in misses:
            if o.prediction is None:
                continue
            try:
                cache.put(o.task.get("id"), o.sha, o.tags, version, o.prediction)
                if o.task.get("ls"):
                    cache.put(o.task.get("id"), "ref:" + str(o.task["image"]), o.tags, version, o.prediction)
            except Exception as exc:   # noqa: BLE001 - Redis trouble: the task fails (transient), others go on
                o.error = exc
    return outcomes


def predict_one(task: Mapping[str, Any], *, label_config: str, model_version: str,
                cache=None, engine_options: Mapping[str, Any] | None = None,
                label_studio: Mapping[str, Any] | None = None, project: Any = None) -> tuple[dict, bool]:
    """Prediction of one task; returns ``(prediction, from_cache)``, raises what the task raised. Label
    Studio tasks of a `project` with a promoted trained model use its heads.

    Two kinds of task:

    * ``{"id", "image", "tags"}`` (CLI, scripts): the engine runs on exactly these tags, without
      project heads;
    * ``{"id", "image", "tags": [...] or None, "ls": true}`` (built by the web server from a Label
      Studio task): the tags are the task's annotated Choices when given, else the labels of the
      labeling config the classifier picks -- exactly what ``/predict`` does in the web process
      (:meth:`backend.model.Tag2MaskModel.predict_image`). Such a prediction is also cached under
      the image reference (``"ref:" + image``), which lets the web server answer without fetching.
    """
    (outcome,) = predict_chunk([task], label_config=label_config, model_version=model_version, cache=cache,
                               engine_options=engine_options, label_studio=label_studio, project=project)
    if outcome.error is not None:
        raise outcome.error
    return outcome.prediction, outcome.cached


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

    The tasks go through :func:`predict_chunk` in chunks of :func:`batch_size` (one engine call per
    chunk), then each is pushed in order. Returns ``{"predictions": {task_id: prediction}, "cached":
    [ids], "pushed": {id: outcome}}`` (JSON keys are strings). Progress is kept in the job's ``meta``
    (``done``/``total``/``failed``, ``errors``: task id -> reason), updated after each task. A job
    enqueued without ``push`` still pushes when the web server has set :func:`push_late_key` (it
    stopped waiting).
    """
    from rq import get_current_job

    from backend.queues import ResultCache

    job = get_current_job()
    conn = _connection()
    cache = ResultCache(conn)
    tasks = list(request.get("tasks", []))
    creds = dict(request.get("label_studio") or {})
    version = str(request["model_version"])
    push = bool(request.get("push", True))

    def should_push() -> bool:
        return push or (job is not None and bool(conn.exists(push_late_key(job.id))))

    out: dict[str, Any] = {"predictions": {}, "cached": [], "pushed": {}}
    failures: dict[Any, str] = {}     # task id -> "<exception type>: <message>" (TasksFailed: the job's error)
    errors: dict[Any, str] = {}       # task id -> its reason for /predict (meta["errors"])
    transient = False

    def fail(tid: Any, exc: BaseException, reason: str | None = None) -> None:
        """`reason`: the task's sentence (a prediction that failed); None: a push, "<type>: <message>"."""
        nonlocal transient
        from backend.model import is_input_error

        if reason is not None and is_input_error(exc):
            log.warning("task %s failed: %s", tid, reason)
        else:
            log.error("task %s failed: %s: %s", tid, type(exc).__name__, exc, exc_info=exc)
        failures[tid] = f"{type(exc).__name__}: {exc}"
        errors[tid] = reason if reason is not None else failures[tid]
        transient = transient or is_transient(exc)
        if push:
            try:
                conn.delete(push_owner_key(tid, version))
            except Exception:   # noqa: BLE001 - Redis trouble: the key expires anyway
                pass

    done = 0
    size = batch_size()
    for start in range(0, len(tasks), size):
        outcomes = predict_chunk(tasks[start:start + size], label_config=request["label_config"],
                                 model_version=version, cache=cache, engine_options=request.get("engine"),
                                 label_studio=creds, project=request.get("project"))
        for k, outcome in enumerate(outcomes):
            tid = _task_key(outcome.task, start + k)
            if outcome.error is not None:
                fail(tid, outcome.error, task_error(outcome.error))
            else:
                out["predictions"][str(tid)] = outcome.prediction
                if outcome.cached:
                    out["cached"].append(tid)
                try:
                    if should_push():
                        out["pushed"][str(tid)] = push_prediction(tid, outcome.prediction, label_studio=creds)
                except Exception as exc:   # noqa: BLE001 - one bad task must not sink the others
                    fail(tid, exc)
            done += 1
            if job is not None:
                job.meta.update({"done": done, "total": len(tasks), "failed": len(failures),
                                 "errors": {str(k): v for k, v in errors.items()}})
                job.save_meta()
    if not push and should_push():   # the flag came while we ran: push the rest
        for tid, prediction in out["predictions"].items():
            if tid not in out["pushed"]:
                try:
                    out["pushed"][tid] = push_prediction(int(tid), prediction, label_studio=creds)
                except Exception as exc:   # noqa: BLE001 - kept with its reason
                    failures[tid] = f"{type(exc).__name__}: {exc}"
                    transient = transient or is_transient(exc)
    if failures:
        if job is not None and not transient:
            job.retries_left = 0   # a re-run would fail the same way: keep the failure now
        raise TasksFailed(failures)
    return out
