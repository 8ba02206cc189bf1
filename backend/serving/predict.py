"""The predict function: Label Studio tasks (or explicit-tag tasks) -> predictions, for queue workers
(``backend.jobs.predict_tasks``) and for the web process's inline ``/predict``
(:meth:`backend.serving.model.Tag2MaskModel.predict`) alike: :func:`predict_chunk`.

Each task is checked (a malformed one fails alone, with a sentence), its photo fetched through
backend.labelstudio.photos with the retry policy (backend.queue.retry: an ImageFetchError that is
``retryable`` is tried again), hashed and looked up in the result cache when one is given; the misses
go to the engine in one call per kind of task (Label Studio tasks through
:meth:`backend.serving.project_model.ProjectModel.predict_images`, with the project's promoted heads;
explicit-tag tasks through ``engine.predict_many``), and each new prediction is cached. A failed task
keeps its exception; :func:`task_error` is its sentence. A task with ``"prompts"`` (a smart tool's box
or clicks, backend.labelstudio.context) is answered by :func:`backend.serving.interactive.predict_prompts`,
one by one, and never read from nor written to the cache.

Settings: a worker passes its own (device, batch size) down with :func:`use_settings`; otherwise
:func:`settings` reads the environment. The web process passes its model and photo fetcher (so its
settings) to :func:`predict_chunk` instead.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from backend.queue.retry import TransientError, with_retries
from backend.settings import Settings

log = logging.getLogger(__name__)


# -- settings -----------------------------------------------------------------------------------
_settings: Settings | None = None


def use_settings(settings: Settings | None) -> None:
    """Process settings for the jobs run in this process: a worker passes its device and batch size
    down this way (None: back to the environment). The process's photo fetcher and models are made
    again with them."""
    global _settings, _fetcher
    _settings = settings
    with _models_lock:
        _fetcher = None
        _models.clear()


def settings() -> Settings:
    """The settings of this process's jobs: those given to :func:`use_settings`, else ``Settings.from_env()``."""
    return _settings or Settings.from_env()


# -- photos -------------------------------------------------------------------------------------
_fetcher = None


def _default_fetcher():
    """One ImageFetcher per process (:func:`settings`; its HTTP session is reused)."""
    global _fetcher
    if _fetcher is None:
        from backend.labelstudio.photos import ImageFetcher
        _fetcher = ImageFetcher(settings())
    return _fetcher


def read_image_bytes(ref: str, *, task_id: Any = None, ls_url: str | None = None, api_key: str | None = None,
                     fetcher=None) -> bytes:
    """Bytes of a task's photo through `fetcher` (a :class:`backend.labelstudio.photos.ImageFetcher`;
    default: the process's, :func:`settings`), so every path follows the same rules
    (``TAG2MASK_LOCAL_ROOTS``, ``TAG2MASK_ALLOWED_HOSTS``, size cap, timeouts, the Label Studio token
    only to Label Studio). `ls_url`/`api_key` are used where ``LABEL_STUDIO_URL`` /
    ``LABEL_STUDIO_API_KEY`` are unset. Network failures (an ImageFetchError that is ``retryable``:
    download failed or interrupted, HTTP 408/429/5xx) are retried with backoff (the fetcher's settings'
    ``retry_attempts`` / ``retry_delay``), then raise TransientError with the last message; the rest
    raise ImageFetchError at once."""
    from backend.labelstudio.photos import ImageFetchError

    fetcher = fetcher or _default_fetcher()

    def get() -> bytes:
        try:
            return fetcher.fetch_bytes(str(ref), task_id=task_id, ls_url=ls_url, api_key=api_key)
        except ImageFetchError as exc:
            if exc.retryable:
                raise TransientError(str(exc)) from None
            raise
    return with_retries(get, attempts=fetcher.settings.retry_attempts, base_delay=fetcher.settings.retry_delay,
                        what=f"fetch of the photo of task {task_id}")


# -- the engine: backend.serving.engine's, one per process -----------------------------------------------
def batch_size() -> int:
    """Photos per engine call in a worker: :func:`settings`' ``batch_size`` (``TAG2MASK_BATCH_SIZE``,
    default 8; ``tag2mask worker --batch-size N``)."""
    return max(1, settings().batch_size)


def _engine_settings(engine_options: Mapping[str, Any] | None) -> Settings:
    """:func:`settings`, with a job's ``engine`` options (backbone, preset, device) on top."""
    opts = {k: str(v) for k, v in dict(engine_options or {}).items() if k in ("backbone", "preset", "device") and v}
    return replace(settings(), **opts)


_models: dict[tuple, Any] = {}


_models_lock = threading.Lock()


def _ls_model(label_config: str, model_version: str, project: Any = None):
    """A :class:`backend.serving.project_model.ProjectModel` for a labeling config and project, cached per
    process (its engine is ``backend.serving.engine.get_engine``: loaded once per process, on
    :func:`settings`' device). It predicts with the project's promoted trained heads
    (``backend.serving.heads.get_heads_cache``) and reports `model_version`, the version the web server
    chose (and keyed the result cache by)."""
    from backend.serving.project_model import ProjectModel

    project = None if project in (None, "", "_") else str(project)
    key = (label_config, str(model_version), project)
    with _models_lock:
        model = _models.get(key)
        if model is None:
            if len(_models) > 256:
                _models.clear()
            model = _models[key] = ProjectModel(settings(), project_id=project, label_config=label_config,
                                                version=str(model_version))
            model.setup()
        return model


def _predict_ls(outcomes: list["TaskOutcome"], label_config: str, model_version: str, project: Any,
                model=None) -> list[dict | Exception]:
    """Label Studio tasks: one :meth:`ProjectModel.predict_images` call of `model` (default: the process's
    for the config, version and project, :func:`_ls_model`): the task's annotated tags, else the labels
    the classifier picks; the heads of `model_version` when the project has promoted ones."""
    model = model or _ls_model(label_config, model_version, project)
    return model.predict_images([o.image for o in outcomes], model.use_label_config(None),
                                [o.task.get("tags") or None for o in outcomes], [o.task.get("id") for o in outcomes],
                                version=model_version)


def _predict_prompts(outcomes: list["TaskOutcome"], label_config: str, model_version: str, project: Any,
                     model=None) -> list[dict | Exception]:
    """Interactive tasks (``"prompts"``: Label Studio's smart tools, backend.labelstudio.context), one by
    one: :func:`backend.serving.interactive.predict_prompts` with `model` (default: the process's for
    the config, version and project)."""
    from backend.labelstudio.context import SmartPrompt
    from backend.serving.interactive import predict_prompts

    model = model or _ls_model(label_config, model_version, project)
    config = model.use_label_config(None)
    out: list[dict | Exception] = []
    for o in outcomes:
        try:
            prompts = [SmartPrompt.from_json(p) for p in o.task["prompts"]]
            out.append(predict_prompts(model, o.image, config, prompts, version=model_version))
        except Exception as exc:   # noqa: BLE001 - recorded per task
            out.append(exc)
    return out


def _predict_explicit(outcomes: list["TaskOutcome"], label_config: str, model_version: str,
                      engine_options: Mapping[str, Any] | None) -> list[dict | Exception]:
    """Explicit-tag tasks: one ``engine.predict_many`` call on the process's engine, under its inference
    lock, without project heads; the labeling config's ``predicted_values`` map tags to classes."""
    from backend.labelstudio.config import parse_label_config_cached
    from backend.labelstudio.results import make_prediction
    from backend.serving.engine import get_engine

    config = parse_label_config_cached(label_config)
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
    the web process gives (:func:`backend.serving.failures.task_failure_reason`); a photo download that kept
    failing gives its last message."""
    from backend.serving.failures import MAX_REASON_CHARS, task_failure_reason
    from backend.untrusted import clip

    return clip(str(exc), MAX_REASON_CHARS) if isinstance(exc, TransientError) else task_failure_reason(exc)


def task_key(task: Any, index: int) -> Any:
    """The id a task's outcome is reported under: its own when usable, else ``"#<index in the job>"``."""
    from backend.untrusted import task_id as checked_task_id

    try:
        tid = checked_task_id(task.get("id")) if isinstance(task, Mapping) else None
    except ValueError:
        tid = None
    return f"#{index}" if tid is None else tid


def _fetch(task: Mapping[str, Any], model_version: str, cache, creds: Mapping[str, Any],
           fetcher=None) -> TaskOutcome:
    """Stage 1 of a task: check it (:func:`checked_job_task`), read its photo (:func:`read_image_bytes`
    with `fetcher`: retrying network trouble), hash it, look it up in the result cache; a miss is
    decoded for the engine (an undecodable photo's error names its reference). Failures are kept in
    the outcome."""
    from backend.labelstudio.urls import safe_url
    from backend.storage.result_cache import image_hash, ls_cache_tags, normalize_tags
    from explainers.imageio import load_image

    outcome = TaskOutcome(task, [])
    try:
        _, image, tags = checked_job_task(task)
        ls_task = bool(task.get("ls"))
        outcome.tags = ls_cache_tags(tags) if ls_task else normalize_tags(tags or [])
        data = read_image_bytes(image, task_id=task.get("id"), ls_url=creds.get("url"),
                                api_key=creds.get("token"), fetcher=fetcher)
        outcome.sha = image_hash(data)
        interactive = bool(task.get("prompts"))        # the answer depends on the prompt: never cached
        hit = cache.get(task.get("id"), outcome.sha, outcome.tags, model_version) \
            if cache is not None and not interactive else None
        if hit is not None:
            outcome.prediction, outcome.cached = hit, True
            if ls_task:
                cache.put(task.get("id"), "ref:" + image, outcome.tags, model_version, hit)
        else:
            outcome.image = load_image(data, name=safe_url(image))
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
                  project: Any = None, model=None, fetcher=None) -> list[TaskOutcome]:
    """Predictions of several tasks with one engine call per kind of task, in the tasks' order.

    Each photo is fetched (`fetcher`, default the process's; `label_studio`: ``{"url", "token"}`` used
    where the settings name no Label Studio), hashed and looked up in `cache` (a ResultCache or None; a
    hit skips the engine); the misses go to the device together: Label Studio tasks through one
    :meth:`backend.serving.project_model.ProjectModel.predict_images` call of `model` (default: the
    process's one for the config, version and project), explicit-tag tasks through one
    ``engine.predict_many`` call (both on ``backend.serving.engine.get_engine``'s engine, under its lock); each
    new prediction is then cached. Predictions report `model_version`. A task that fails keeps its
    exception in ``.error``; the others go on. Task kinds (see :func:`predict_one`) may be mixed.
    """
    creds = dict(label_studio or {})
    version = str(model_version)
    outcomes = [_fetch(task, version, cache, creds, fetcher) for task in tasks]
    misses = [o for o in outcomes if o.error is None and o.prediction is None]
    interactive = [o for o in misses if o.task.get("prompts")]
    misses = [o for o in misses if not o.task.get("prompts")]
    for o in interactive:
        _run_engine([o], lambda batch: _predict_prompts(batch, label_config, version, project, model))
    _run_engine([o for o in misses if o.task.get("ls")],
                lambda batch: _predict_ls(batch, label_config, version, project, model))
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
    * ``{"id", "image", "tags": [...] or None, "ls": true}`` (built from a Label Studio task by
      :func:`backend.labelstudio.tasks.job_task`, in the web process for inline ``/predict`` and for
      the job queue): the tags are the task's annotated Choices when given, else the labels of the
      labeling config the classifier picks (:class:`backend.serving.project_model.ProjectModel`). Such a
      prediction is also cached under the image reference (``"ref:" + image``), which lets the web
      server answer without fetching.
    """
    (outcome,) = predict_chunk([task], label_config=label_config, model_version=model_version, cache=cache,
                               engine_options=engine_options, label_studio=label_studio, project=project)
    if outcome.error is not None:
        raise outcome.error
    return outcome.prediction, outcome.cached
