"""The ML backend model, shaped like Label Studio's ``LabelStudioMLBase`` (setup / predict / fit).

Public API::

    model = Tag2MaskModel(settings=None, project_id=None, label_config=None)
    model.setup()                          # parses label_config (LabelConfigError if unusable)
    model.model_version                    # str: base_model_version(settings) + "+p<project>.vN" when the
                                           # project has promoted trained heads; what /setup returns
    model.predict(tasks, context=None, **kw) -> list[dict]   # one prediction per task, in order
    model.fit(event, data, **kw) -> dict                     # records training events (events.jsonl, bounded)
    get_engine(settings) -> (Tag2Mask, threading.Lock)       # one engine per process, loaded once
    base_model_version(settings) -> str    # tag2mask-<release>-<backbone>-<preset>-<config hash> (or override)
    get_heads_cache(settings) -> ProjectHeadsCache            # one per process: promoted heads per project
    choose_tags(task, config) -> list[str] | None            # the human Choices of the latest annotation
    task_photo(task, config) -> (task id, photo reference)   # ValueError (a sentence) for a malformed task
    task_failure_reason(exc) -> str        # a failed task's "error" (web process and queue workers alike)

Tags for a task: when the task has a human annotation (most recent by updated/created time, not
cancelled) with Choices on the Image, those labels are the tags. Otherwise the classifier picks: the
config's labels whose ``tag_scores`` >= TAG2MASK_THRESHOLD (best first, at most TAG2MASK_MAX_TAGS);
when none passes, the single best label is used anyway (a low-confidence pre-annotation is still a
useful start, and its low score sorts it first for review). A label is usable when the engine can
segment it (``engine.can_segment``): the ImageNet classifier names it, or the project's promoted
classifier head was trained on it. Other labels are left out, with a warning once per config. An
annotated tag that is not usable is left out of that task alone: the others are segmented and the
prediction's ``"warnings"`` names it with the reason and a hint (``backend.ls_results``); a task none
of whose annotated tags is usable fails, its error naming each tag's reason.

Trained heads: a prediction for a project with a promoted model (``backend.registry``, trained by
``backend.training_jobs``) runs the engine with that project's heads (``engine.set_heads``, under the
inference lock) and reports ``<base>+p<project>.vN``. The seg head is fused before the CRF for the
tags it knows. The classifier head makes the project's own labels usable: a label ImageNet cannot
name ("Pony photo") that the head was trained on gets its score (to be chosen as a tag) and its
CAM (so its brush, polygon and box results) from the head (:mod:`explainers.segment.head_cam`);
labels ImageNet names take the head too when it was trained on photos without them (it learnt where
they are absent), else keep the ImageNet classifier (``fusion.head_cam`` of the preset). The heads
come from one :class:`backend.training_jobs.ProjectHeadsCache` per process (``TAG2MASK_HEADS_TTL``
seconds, default 30), reading the registry in ``MODEL_DIR``, or the Redis mirror
(:class:`backend.training_jobs.RedisModelStore`) for projects that registry lacks when
``REDIS_URL`` is set.

A task that fails (image unreadable, not allowed, no usable tag, malformed: not an object, data or
annotations of the wrong JSON type, an unusable id) becomes
``{"model_version": v, "score": 0.0, "error": "<reason>"}`` -- no "result", so Label Studio skips it --
and the batch goes on. The reason is a sentence about the task's input, cut at MAX_REASON_CHARS; a
failure that is a bug of this service reads TASK_FAILED ("the server failed on this task; the error
was logged") and its traceback goes to the log (:func:`task_failure_reason`; queue workers and the
web process's queue path give the same sentences). An annotated tag quoted in a warning or an error
is cut at MAX_ECHOED_TAG_CHARS.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any

from backend.image_fetch import ImageFetcher, ImageFetchError
from backend.label_config import LabelConfig, LabelConfigError, parse_label_config
from backend.ls_results import make_prediction
from backend.settings import Settings
from backend.untrusted import clip, json_type
from backend.untrusted import task_id as checked_task_id

__all__ = ["Tag2MaskModel", "get_engine", "engine_loaded", "choose_tags", "task_photo", "TRAINING_EVENTS",
           "VERSION", "EventLog", "base_model_version", "get_heads_cache", "TASK_FAILED", "task_failure_reason",
           "is_input_error"]

log = logging.getLogger(__name__)

VERSION = "0.1.0"
# Label Studio sends ANNOTATIONS_DELETED ({"annotations": [{"id"}]}) and, on import, ANNOTATIONS_CREATED
# ({"annotation": [...], "task": [...]}); ANNOTATION_DELETED is kept for older senders
TRAINING_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED", "ANNOTATIONS_CREATED",
                             "ANNOTATIONS_DELETED", "START_TRAINING"})

MAX_ANNOTATED_TAGS = 50    # distinct annotated tags segmented in one photo (each costs a CAM + CRF)
MAX_TAG_CHARS = 200        # an annotated choices value no Choices control names (kept verbatim as a tag)
MAX_REASON_CHARS = 500     # a failed task's "error" is cut here (it may quote the task's values)
TASK_FAILED = "the server failed on this task; the error was logged"
MAX_ECHOED_TAG_CHARS = 80  # an annotated tag quoted in a warning or an error is cut here
MAX_EVENT_PART_CHARS = 100_000   # an events.jsonl record keeps a task / an annotation up to this JSON size

_ENGINE_LOCK = threading.Lock()        # guards loading
_INFER_LOCK = threading.Lock()         # serialises inference (shared model, CPU)
_ENGINE = None
_ENGINE_KEY = None


def _engine_key(s: Settings) -> tuple:
    return (s.backbone, s.preset, s.device)


def get_engine(settings: Settings):
    """The process's Tag2Mask for these settings (loaded on first call) and the inference lock."""
    global _ENGINE, _ENGINE_KEY
    key = _engine_key(settings)
    if _ENGINE is None or _ENGINE_KEY != key:
        with _ENGINE_LOCK:
            if _ENGINE is None or _ENGINE_KEY != key:
                t = time.perf_counter()
                from explainers.device import set_cpu_threads
                from explainers.segment import PipelineConfig, Tag2Mask

                if os.environ.get("TAG2MASK_THREADS"):
                    set_cpu_threads()
                engine = Tag2Mask(backbone=settings.backbone, config=PipelineConfig.preset(settings.preset),
                                  device=settings.device)
                _ENGINE, _ENGINE_KEY = engine, key
                log.info("model loaded: %s / %s on %s in %.1f s", settings.backbone, settings.preset,
                         settings.device, time.perf_counter() - t)
    return _ENGINE, _INFER_LOCK


@functools.lru_cache(maxsize=None)
def _preset_hash(preset: str) -> str:
    """Six hex digits of the preset's pipeline settings: a tuning change makes a new model version.
    Torch-free (the settings module only), so /health and /setup answer while the model loads."""
    from explainers.segment.config import PipelineConfig

    blob = json.dumps(PipelineConfig.preset(preset).to_dict(), sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:6]


def base_model_version(settings: Settings) -> str:
    """``TAG2MASK_MODEL_VERSION``, else ``tag2mask-<release>-<backbone>-<preset>-<hash of the preset>``."""
    if settings.model_version:
        return settings.model_version
    return f"tag2mask-{VERSION}-{settings.backbone}-{settings.preset}-{_preset_hash(settings.preset)}"


class _HeadsSource:
    """Where promoted checkpoints are read: the registry in ``MODEL_DIR`` for the projects it has,
    else (when a Redis URL is configured) the Redis mirror. ``current``/``load`` as ModelRegistry's."""

    def __init__(self, settings: Settings):
        from backend.registry import ModelRegistry

        self.registry = ModelRegistry.in_model_dir(settings.model_dir)
        self.redis_url = settings.redis_url
        self._redis = None

    def _pick(self, project):
        if self.redis_url is None or self.registry.versions(project):
            return self.registry
        if self._redis is None:
            from backend.redis_conn import get_connection
            from backend.training_jobs import RedisModelStore

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

        from backend.registry import RegistryError

        try:
            return self._pick(project).load(project, version, map_location=map_location)
        except (redis.RedisError, OSError) as exc:      # Redis down: load_project_heads serves without heads
            raise RegistryError(f"project {project}: {exc}") from None


_HEADS_CACHE = None
_HEADS_KEY = None


def get_heads_cache(settings: Settings):
    """The process's :class:`backend.training_jobs.ProjectHeadsCache` on the engine's backbone."""
    global _HEADS_CACHE, _HEADS_KEY
    engine, _ = get_engine(settings)
    key = (id(engine), str(settings.model_dir), settings.redis_url)
    with _ENGINE_LOCK:
        if _HEADS_CACHE is None or _HEADS_KEY != key:
            from backend.training_jobs import ProjectHeadsCache

            ttl = float(os.environ.get("TAG2MASK_HEADS_TTL") or 30)
            _HEADS_CACHE, _HEADS_KEY = ProjectHeadsCache(_HeadsSource(settings), engine.backbone, ttl=ttl), key
        return _HEADS_CACHE


def engine_loaded(settings: Settings | None = None) -> bool:
    return _ENGINE is not None and (settings is None or _ENGINE_KEY == _engine_key(settings))


def _when(ann: dict) -> str:
    return str(ann.get("updated_at") or ann.get("created_at") or "")


def _id_key(value) -> tuple:
    """Sort key of an annotation id of any JSON type: numbers in order, then the rest as strings."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (1, 0, "" if value is None else str(value))


def choose_tags(task: dict, config: LabelConfig) -> list[str] | None:
    """Label values from the Choices of the task's most recent non-cancelled annotation, or None.

    Raises ValueError (a sentence naming the part) for annotations of the wrong JSON shape: not a
    list, an annotation / result item / value that is not an object, a choices value that is not a
    string (or one longer than MAX_TAG_CHARS where no Choices control of the config names it), or
    more than MAX_ANNOTATED_TAGS tags (each is a CAM + CRF to compute)."""
    anns = task.get("annotations")
    if anns is None:
        return None
    if not isinstance(anns, list):
        raise ValueError(f"the task's annotations must be a list, not {json_type(anns)}")
    kept = []
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict):
            raise ValueError(f"annotation {k} of the task must be a JSON object, not {json_type(ann)}")
        if not ann.get("was_cancelled"):
            kept.append((k, ann))
    kept.sort(key=lambda ka: (_when(ka[1]), _id_key(ka[1].get("id"))))
    choices_names = {c.from_name: c for c in config.choices_controls}
    for k, ann in reversed(kept):
        tags = _annotation_choices(k, ann, config, choices_names)
        if tags:
            return tags
    return None


def _annotation_choices(k: int, ann: dict, config: LabelConfig, controls: dict) -> list[str]:
    """The labels of annotation `k`'s choices items on the config's Image (ValueError when malformed)."""
    result = ann.get("result")
    if result is None:
        return []
    if not isinstance(result, list):
        raise ValueError(f"the result of annotation {k} must be a list, not {json_type(result)}")
    tags: list[str] = []
    for j, item in enumerate(result):
        where = f"result item {j} of annotation {k}"
        if not isinstance(item, dict):
            raise ValueError(f"{where} must be a JSON object, not {json_type(item)}")
        if item.get("type") != "choices" or item.get("to_name") != config.image_name:
            continue
        from_name = item.get("from_name")
        control = controls.get(from_name) if isinstance(from_name, str) else None
        value = item.get("value")
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"the value of {where} must be a JSON object, not {json_type(value)}")
        choices = value.get("choices")
        if choices is None:
            continue
        if not isinstance(choices, list):
            raise ValueError(f"the choices of {where} must be a list, not {json_type(choices)}")
        for v in choices:
            if not isinstance(v, str):
                raise ValueError(f"a choices value of {where} must be a string, not {json_type(v)}")
            if control is None and len(v) > MAX_TAG_CHARS:
                raise ValueError(f"a choices value of {where} is {len(v)} characters long; a tag has at most "
                                 f"{MAX_TAG_CHARS}")
            label = control.match(v) if control else v
            if label and label not in tags:
                tags.append(label)
    if len(tags) > MAX_ANNOTATED_TAGS:
        raise ValueError(f"annotation {k} names {len(tags)} tags; at most {MAX_ANNOTATED_TAGS} are segmented "
                         "in one photo")
    return tags


def is_input_error(exc: BaseException) -> bool:
    """Whether a task failed because of its input (a malformed task, an unreadable or refused photo, an
    unusable tag), not because of a bug of this service."""
    return isinstance(exc, (ImageFetchError, LabelConfigError, ValueError, KeyError)) \
        or type(exc).__module__.startswith("explainers")


def task_failure_reason(exc: BaseException) -> str:
    """The "error" of a task that raised `exc`, the same in the web process and in queue workers: the
    sentence about its input (cut at MAX_REASON_CHARS), or TASK_FAILED for a bug (log its traceback)."""
    return clip(str(exc), MAX_REASON_CHARS) if is_input_error(exc) else TASK_FAILED


def task_photo(task, config: LabelConfig) -> tuple:
    """(task id, photo reference) of a Label Studio task; ValueError with a sentence when the task is
    not an object, its id is unusable (:func:`backend.untrusted.task_id`), its data is not an object
    or holds no photo string under the config's image key."""
    if not isinstance(task, dict):
        raise ValueError(f"a task must be a JSON object, not {json_type(task)}")
    tid = checked_task_id(task.get("id"))
    data = task.get("data")
    key = clip(config.image_key)
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"the task's data must be a JSON object, not {json_type(data)}")
    url = (data or {}).get(config.image_key)
    if url is None or url == "":
        raise ValueError(f"task data has no {key!r} field")
    if not isinstance(url, str):
        raise ValueError(f"the task's data[{key!r}] must be a string (the photo's URL or path), not {json_type(url)}")
    return tid, url


def _unusable_reason(engine, tag: str) -> str:
    """Why an annotated `tag` is left out, the tag echoed at most MAX_ECHOED_TAG_CHARS long."""
    short = clip(tag, MAX_ECHOED_TAG_CHARS)
    reason = engine.unusable_reason(tag) or f"tag {short!r} is not a label of the labeling config"
    return reason if short == tag else reason.replace(repr(tag), repr(short)).replace(tag, short)


def _bounded(value, limit: int):
    """`value` when its JSON has at most `limit` characters, else a note saying what was left out."""
    n = len(json.dumps(value, ensure_ascii=False, default=str))
    return value if n <= limit else {"omitted": f"{json_type(value)} of {n} characters (over {limit})"}


class EventLog:
    """Append-only JSONL file of training events (one JSON object per line; safe across processes)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line)
            finally:
                os.close(fd)

    def read(self) -> list[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


class Tag2MaskModel:
    """Tags -> masks/polygons/boxes for a Label Studio project (one instance per project/config)."""

    def __init__(self, settings: Settings | None = None, project_id: str | None = None,
                 label_config: str | None = None, hostname: str | None = None, access_token: str | None = None,
                 fetcher: ImageFetcher | None = None, version: str | None = None):
        self.settings = settings or Settings.from_env()
        self.project_id = project_id
        self.label_config = label_config
        self.hostname = hostname
        self.access_token = access_token
        self.fetcher = fetcher or ImageFetcher(self.settings)
        self.parsed: LabelConfig | None = None
        self._unknown_warned: set[str] = set()
        self.fixed_version = version      # a queue worker reports the version the web process chose

    # -- LabelStudioMLBase-like ------------------------------------------------------------------
    @property
    def model_version(self) -> str:
        """What /setup and predictions report: the base version, plus ``+p<project>.vN`` when the
        project has a promoted trained model (read from the registry now)."""
        if self.fixed_version:
            return self.fixed_version
        if self.project_id is None:
            return base_model_version(self.settings)
        from backend.training_jobs import current_model_version

        return current_model_version(self.project_id, self.settings)

    def _heads(self) -> tuple[str, Any]:
        """(version to report, heads or None) for this model's project, from the process's cache."""
        if self.project_id is None:
            return self.model_version, None
        from backend.training_jobs import project_model_version

        cache = get_heads_cache(self.settings)
        current, heads = cache.get(self.project_id)
        if self.fixed_version:
            # a worker: the web process chose the version (and keys the result cache by it); re-read
            # the promoted model at once when the cache lags behind it
            marker = project_model_version("", self.project_id, "x")[:-1]      # "+p<project>."
            want = self.fixed_version.rsplit(marker, 1)[1] if marker in self.fixed_version else None
            if want != current:
                cache.invalidate(self.project_id)
                current, heads = cache.get(self.project_id)
                if want != current:
                    log.warning("project %s: asked for %s, serving %s", self.project_id, want, current)
            return self.fixed_version, heads
        return project_model_version(base_model_version(self.settings), self.project_id, current), heads

    def setup(self) -> None:
        """Parse the labeling config (when one is given); raises LabelConfigError if it is unusable."""
        if self.label_config:
            self.parsed = parse_label_config(self.label_config)

    def use_label_config(self, label_config: str | None) -> LabelConfig:
        if label_config and label_config != self.label_config:
            self.label_config = label_config
            self.parsed = None
        if self.parsed is None:
            if not self.label_config:
                raise LabelConfigError("no labeling config: call /setup first or send label_config")
            self.parsed = parse_label_config(self.label_config)
        return self.parsed

    # -- predict ---------------------------------------------------------------------------------
    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs) -> list[dict]:
        """One prediction dict per task, in order; a failed task gets an entry without "result"."""
        config = self.use_label_config(kwargs.get("label_config"))
        out = []
        for task in tasks:
            try:
                out.append(self.predict_one(task, config))
            except Exception as exc:  # noqa: BLE001 - one bad task never sinks the batch
                tid = task.get("id") if isinstance(task, dict) else None
                tid = repr(clip(tid)) if isinstance(tid, str) else clip(tid)      # short, one line
                reason = task_failure_reason(exc)
                if is_input_error(exc):
                    log.warning("task %s failed: %s", tid, reason)
                else:                                                          # a bug: logged, not echoed
                    log.exception("task %s failed", tid)
                out.append({"model_version": self.model_version, "score": 0.0, "error": reason})
        return out

    def _usable_labels(self, engine, config: LabelConfig, extra: dict) -> list[str]:
        """The config's labels the engine (with this project's heads set) can segment: named by the
        ImageNet classifier, or known to the project's promoted classifier head. The others are
        warned about once per label."""
        from explainers.errors import UnknownTagError

        usable = []
        for label in config.labels:
            if engine.can_segment(label):
                usable.append(label)
                continue
            if label not in self._unknown_warned:
                self._unknown_warned.add(label)
                try:
                    engine.class_set(label)
                except UnknownTagError as exc:
                    log.warning("label %r maps to no classifier class and no trained head knows it; it will not "
                                "be predicted (%s). Add predicted_values=\"class a,class b\" to the "
                                "<Label>/<Choice>, or annotate photos with it so that training learns it.",
                                label, exc)
        return usable

    def predict_one(self, task: dict, config: LabelConfig) -> dict:
        """One task's prediction; raises ValueError (a sentence) for a malformed task, what the fetch
        or the engine raised otherwise."""
        tid, url = task_photo(task, config)
        human = choose_tags(task, config)          # malformed annotations fail before any download
        image = self.fetcher.load(url, task_id=tid, ls_url=self.hostname, api_key=self.access_token)
        return self.predict_image(image, config, human, task_id=tid)

    def predict_image(self, image, config: LabelConfig, human: list[str] | None, task_id=None) -> dict:
        """Prediction of one photo (RGB uint8): `human` tags when given (the task's annotation), else the
        config labels the classifier picks. Used by :meth:`predict_one`; raises what the photo raised."""
        (out,) = self.predict_images([image], config, [human], [task_id])
        if isinstance(out, Exception):
            raise out
        return out

    def predict_images(self, images: list, config: LabelConfig, humans: list[list[str] | None],
                       task_ids: list | None = None) -> list[dict | Exception]:
        """Predictions of several photos in one engine call (``engine.predict_many``: photos batched
        for the device), under the inference lock. ``humans[i]``: photo i's annotated tags or None
        (the classifier picks). A photo that fails gives its Exception at its index; the rest go on.
        Annotated tags that cannot be segmented are left out of the photo's prediction and named in
        its ``"warnings"`` (:func:`backend.ls_results.make_prediction`); when none can be, the photo
        fails. Used by queue workers for their batches."""
        if not (len(images) == len(humans) == len(task_ids if task_ids is not None else images)):
            raise ValueError("predict_images needs as many tag lists and task ids as photos")
        task_ids = list(task_ids) if task_ids is not None else [None] * len(images)
        extra = {label: names for label, names in config.tag_queries().items() if names}
        engine, lock = get_engine(self.settings)
        version, heads = self._heads()
        out: list[dict | Exception | None] = [None] * len(images)
        with lock:
            engine.set_heads(heads)
            engine.tag_extra = extra or None
            usable = self._usable_labels(engine, config, extra)
            todo: list[tuple[int, list[str], dict[str, str]]] = []
            for i, (image, human) in enumerate(zip(images, humans)):
                try:
                    tags, skipped = self._tags_for(engine, image, usable, human)
                    todo.append((i, tags, skipped))
                    log.info("task %s: tags %s (from %s)", task_ids[i], tags,
                             "annotation" if human else "classifier")
                    for tag, reason in skipped.items():
                        log.warning("task %s: annotated tag %r left out: %s", task_ids[i], tag, reason)
                except Exception as exc:  # noqa: BLE001 - recorded per photo
                    out[i] = exc
            photos = engine.predict_many([images[i] for i, _, _ in todo], [tags for _, tags, _ in todo],
                                         batch_size=max(1, len(todo)))
        for (i, _, skipped), photo in zip(todo, photos):
            if not isinstance(photo, Exception):
                photo.skipped = {**skipped, **photo.skipped}
            out[i] = photo if isinstance(photo, Exception) else make_prediction(photo, config, version)
        return out

    def _tags_for(self, engine, image, usable: list[str], human: list[str] | None
                  ) -> tuple[list[str], dict[str, str]]:
        """(The tags to segment in one photo, {annotated tag left out: why}): the annotated ones among
        `usable` (the others are left out with their reason; none usable: ValueError naming every
        reason), else the `usable` labels whose score (``engine.tag_scores``: the ImageNet classifier's,
        or the project's classifier head's for its own labels) passes the threshold (at least the best
        one)."""
        from backend.ls_results import no_usable_tag_message

        if human:
            tags = [t for t in dict.fromkeys(human) if t in usable]
            skipped = {clip(t, MAX_ECHOED_TAG_CHARS): _unusable_reason(engine, t)
                       for t in dict.fromkeys(human) if t not in usable}
            if not tags:
                raise ValueError(no_usable_tag_message(skipped, "the task's annotated tags"))
            return tags, skipped
        if not usable:
            raise ValueError("no label of the labeling config maps to a classifier class or a trained head's label")
        scores = engine.tag_scores(image, usable)
        ranked = sorted(usable, key=lambda t: -scores[t])
        tags = [t for t in ranked if scores[t] >= self.settings.threshold][: max(1, self.settings.max_tags)]
        return tags or ranked[:1], {}

    # -- fit -------------------------------------------------------------------------------------
    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """Append a training event to ``events.jsonl`` (an audit trail; the examples themselves are in
        the example store). The server calls it only once the example store accepted the event. The
        task and the annotation are kept when their JSON has at most MAX_EVENT_PART_CHARS characters;
        a larger one is replaced by ``{"omitted": "<what> of <n> characters ..."}``."""
        if event not in TRAINING_EVENTS:
            return {"status": "ignored", "action": event}
        project = data.get("project") if isinstance(data, dict) else None
        task = data.get("task") if isinstance(data, dict) else None
        record: dict[str, Any] = {
            "received_at": datetime.now(timezone.utc).isoformat(),
            "action": event,
            "project": project.get("id") if isinstance(project, dict) else project,
            "model_version": self.model_version,
        }
        if isinstance(task, dict):
            record["task"] = _bounded({"id": task.get("id"), "data": task.get("data")}, MAX_EVENT_PART_CHARS)
        if isinstance(data, dict) and isinstance(data.get("annotation"), dict):
            record["annotation"] = _bounded(data["annotation"], MAX_EVENT_PART_CHARS)
        record["project"] = _bounded(record["project"], 200)
        EventLog(self.settings.events_path).append(record)
        return {"status": "recorded", "action": event}
