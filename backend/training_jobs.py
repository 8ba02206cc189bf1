"""Background retraining of a project's heads from the corrections collected by the webhook.

The pieces of issue 5 that connect the foundation (``backend.examples``, ``explainers.training``,
``backend.registry``) to the job queue (``backend.queues``):

* :func:`handle_training_event` -- the webhook side. ``ANNOTATION_CREATED/UPDATED``,
  ``ANNOTATIONS_CREATED`` (import) and ``ANNOTATIONS_DELETED`` (Label Studio's deletion event;
  ``ANNOTATION_DELETED`` too) store, replace or remove examples (``ExampleStore.apply_event`` with the project's parsed labeling
  config); ``START_TRAINING`` enqueues :func:`train_project` at once. Redis being down never loses
  an example: the reply carries a note and the periodic check enqueues the training later.
* :func:`check_projects` -- the periodic tick. For every project in the store, a training job is
  enqueued when at least ``TRAIN_MIN_NEW`` examples changed since the revision the newest model was
  trained on. Job ids are ``train-<namespace>-<project>-r<revision>``, so a tick never enqueues two
  jobs for the same project and revision, and a project whose training is still queued or running
  gets no second job (coalesced: the next tick after it ends trains on everything changed meanwhile).
* :func:`run_training_scheduler` -- the loop that ticks every ``TRAIN_INTERVAL`` seconds (one active
  loop per Redis: a leader key with a TTL); ``python -m backend.training_jobs`` runs it alone (the
  "scheduler" service), or start it in a thread next to ``backend.worker.run_scheduler``.
  :func:`register_cron` does the same with RQ 3's ``CronScheduler`` (``rq cron``) by enqueuing
  :func:`training_tick` on the ``train`` queue. It must run on the host that holds ``MODEL_DIR``.
* :func:`train_project` -- the job (queue ``train``). One training per project at a time (a Redis
  lock with a TTL; a second job finding it held returns ``{"status": "skipped"}``). Examples ->
  :class:`explainers.training.Sample` (photos through :class:`backend.image_fetch.ImageFetcher`) ->
  :func:`explainers.training.train_heads` on the process's backbone (CUDA when present unless
  ``TAG2MASK_DEVICE`` says otherwise) -> how the heads combine with the CAM and the CRF, chosen per
  label on the validation masks (:func:`tune_fusion`, ``TAG2MASK_PRESET``'s pipeline) -> the heads
  refit on every example (:func:`explainers.training.refit_heads`) -> ``ModelRegistry.save_result(..., examples_revision=rev)``
  -> ``promote`` (refused when validation regresses; the decision is written into the version's
  ``meta.json`` under ``"promotion"`` and logged).
* :func:`train_and_register` -- the shared core (also used by ``tag2mask train``).
* Serving: :func:`load_project_heads`, :func:`current_model_version` and :class:`ProjectHeadsCache`
  (re-reads the promoted version at most every ``ttl`` seconds, so a worker switches to a newly
  promoted model within a minute without restarting). :class:`RedisModelStore` mirrors each
  project's promoted checkpoint into Redis (published by the training job, synced by the scheduler
  loop every 20 s), so workers on hosts that share only Redis load it the same way.

Where things run: the example store (sqlite) and the registry live in ``MODEL_DIR``, so the web
server, the scheduler loop and the workers of the ``train`` queue must share it (one host, or a
shared volume); prediction workers elsewhere need only Redis. A training worker reads the photos
like the web server does: ``LABEL_STUDIO_URL`` + ``LABEL_STUDIO_API_KEY`` or ``TAG2MASK_LOCAL_ROOTS``.

The backbone and the training code are imported only when a job runs: :func:`handle_training_event`
in the web process never loads a model.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from backend.examples import DELETED, EXAMPLE_EVENTS, ExampleStore
from backend.registry import ModelRegistry, RegistryError
from backend.settings import Settings

__all__ = [
    "TRAIN_FUNC", "START_TRAINING", "handle_training_event", "check_projects", "training_tick",
    "run_training_scheduler", "register_cron", "train_project", "train_and_register", "tune_fusion",
    "samples_from_store",
    "enqueue_training", "train_job_id", "last_trained_revision", "load_project_heads", "current_model_version",
    "project_model_version",
    "ProjectHeadsCache", "RedisModelStore", "get_backbone", "parse_config_cached",
]

log = logging.getLogger(__name__)

TRAIN_FUNC = "backend.training_jobs.train_project"
START_TRAINING = "START_TRAINING"
LOCK_TTL = 600                 # seconds the project lock outlives a dead trainer (renewed every ttl/3 while it runs)


# -- names in Redis ---------------------------------------------------------------------------------
def _ns() -> str:
    from backend.queues import namespace

    return namespace()


def _safe(value) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(value))[:60]


def train_job_id(project, revision: int, trigger: str = "auto") -> str:
    """``train-<namespace>-<project>-r<revision>`` (``-manual`` for Start training): one job per
    project/revision; the namespace keeps deployments sharing a Redis apart (RQ job keys are global)."""
    return f"train-{_safe(_ns())}-{_safe(project)}-r{int(revision)}" + ("-manual" if trigger == "manual" else "")


def _lock_key(project) -> str:
    return f"{_ns()}:train-lock:{_safe(project)}"


def _latest_job_key(project) -> str:
    return f"{_ns()}:train:{_safe(project)}:job"


# -- settings ----------------------------------------------------------------------------------------
def _settings(options: dict | None = None) -> Settings:
    """Settings from the environment, overridden by JSON-able job options (model_dir, local_roots,
    backbone, label_studio_url, train_min_new)."""
    options = options or {}
    over: dict[str, Any] = {}
    if options.get("model_dir"):
        over["model_dir"] = Path(options["model_dir"])
    if options.get("local_roots") is not None:
        over["local_roots"] = [Path(p) for p in options["local_roots"]]
    for key in ("backbone", "label_studio_url"):
        if options.get(key):
            over[key] = options[key]
    if options.get("train_min_new") is not None:
        over["train_min_new"] = int(options["train_min_new"])
    return Settings.from_env(**over)


def _job_options(settings: Settings) -> dict:
    """The settings a worker on the same host needs to find the same store/registry and photos."""
    return {"model_dir": str(Path(settings.model_dir).resolve()),
            "local_roots": [str(p) for p in settings.local_roots], "backbone": settings.backbone}


def _train_device() -> str:
    """``$TAG2MASK_DEVICE`` when set (a worker's ``--device``), else CUDA when present, else CPU."""
    dev = os.environ.get("TAG2MASK_DEVICE") or "auto"
    from explainers.device import pick_device

    return str(pick_device(dev))


_BACKBONES: dict[tuple[str, str], Any] = {}
_BACKBONE_LOCK = threading.Lock()


def get_backbone(name: str, device: str | None = None):
    """The process's frozen backbone `name` on `device` (loaded once per process)."""
    device = device or _train_device()
    key = (name, str(device))
    with _BACKBONE_LOCK:
        if key not in _BACKBONES:
            from explainers.backbones import load_backbone

            if os.environ.get("TAG2MASK_THREADS"):
                from explainers.device import set_cpu_threads

                set_cpu_threads()
            _BACKBONES[key] = load_backbone(name, device)
        return _BACKBONES[key]


@lru_cache(maxsize=64)
def parse_config_cached(xml: str):
    """The parsed labeling config of `xml` (None when it is unusable: labels are then taken verbatim)."""
    from backend.label_config import LabelConfigError, parse_label_config

    try:
        return parse_label_config(xml)
    except LabelConfigError as exc:
        log.warning("webhook labeling config unusable (%s); storing labels as sent", exc)
        return None


_STORES: dict[str, ExampleStore] = {}
_STORES_LOCK = threading.Lock()


def _store(settings: Settings) -> ExampleStore:
    """The process's ExampleStore of ``settings.model_dir`` (its sqlite connections are per thread)."""
    key = str(Path(settings.model_dir).resolve())
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None or not store.path.exists():     # first use, or the folder was replaced
            store = _STORES[key] = ExampleStore.in_model_dir(key)
        return store


# -- webhook -----------------------------------------------------------------------------------------
def _project_of(payload: dict) -> str | None:
    p = payload.get("project")
    if isinstance(p, dict):
        p = p.get("id")
    if p is None and isinstance(payload.get("annotation"), dict):
        p = payload["annotation"].get("project")
    return None if p is None else str(p).split(".", 1)[0]


def handle_training_event(action: str, payload: dict, settings: Settings | None = None,
                          connection=None) -> dict:
    """A Label Studio training webhook -> the example store / the train queue.

    Annotation events: ANNOTATION_CREATED / ANNOTATION_UPDATED (one ``annotation`` + its ``task``),
    ANNOTATIONS_CREATED (import: lists under ``annotation`` and ``task``), ANNOTATIONS_DELETED
    (``annotations``: ids; what Label Studio sends on deletion) and ANNOTATION_DELETED.

    Returns a JSON-able reply: ``{"status": "stored", "changed", "annotation_ids", "project",
    "revision"}`` for annotation events, ``{"status": "queued" | "coalesced", "job_id", ...}`` for
    START_TRAINING, ``{"status": "ignored"}`` otherwise; ``"note"`` explains a training that could not
    be enqueued now (Redis down: the periodic check will). `connection` defaults to
    :func:`backend.redis_conn.get_connection` (only START_TRAINING needs it).
    """
    settings = settings or Settings.from_env()
    payload = payload if isinstance(payload, dict) else {}
    project = _project_of(payload)
    if action in EXAMPLE_EVENTS:
        config = None
        proj = payload.get("project")
        if isinstance(proj, dict) and proj.get("label_config"):
            config = parse_config_cached(str(proj["label_config"]))
        store = _store(settings)
        if action == "ANNOTATIONS_CREATED" and isinstance(payload.get("annotation"), list):
            out = _apply_bulk_created(store, payload, config)
        else:
            out = store.apply_event(action, payload, config)
        if project is None and out["annotation_ids"] and action != DELETED:
            ex = store.get(out["annotation_ids"][0])
            project = ex.project if ex else None
        out["project"] = project
        if project is not None:
            out["revision"] = store.revision(project)
        return out
    if action == START_TRAINING:
        if project is None:
            return {"status": "ignored", "reason": "START_TRAINING without a project"}
        n = _store(settings).count(project)
        if n < 2:
            return {"status": "ignored", "project": project,
                    "reason": f"project {project} has {n} stored example(s); training needs at least 2"}
        try:
            conn = connection if connection is not None else \
                _connection(start_embedded=False, url=getattr(settings, "redis_url", None))
            return enqueue_training(conn, project, settings, trigger="manual")
        except Exception as exc:   # noqa: BLE001 - Redis down or refused: answer, the tick retries
            log.warning("START_TRAINING for project %s not enqueued: %s", project, exc)
            return {"status": "deferred", "project": project,
                    "note": f"training could not be queued now ({type(exc).__name__}: {exc}); the periodic "
                            "check trains the project once enough examples changed"}
    return {"status": "ignored", "action": action}


def _apply_bulk_created(store: ExampleStore, payload: dict, config) -> dict:
    """Label Studio's ANNOTATIONS_CREATED (import): ``{"annotation": [...], "task": [...]}`` -> one
    ANNOTATION_CREATED per annotation, each with its own task."""
    tasks = payload.get("task")
    tasks = tasks if isinstance(tasks, list) else [tasks] if isinstance(tasks, dict) else []
    by_id = {str(t.get("id")): t for t in tasks if isinstance(t, dict)}
    changed, ids = 0, []
    for ann in payload.get("annotation") or []:
        if not isinstance(ann, dict):
            continue
        tid = ann.get("task")
        tid = tid.get("id") if isinstance(tid, dict) else tid
        one = {"annotation": ann, "task": by_id.get(str(tid), {"id": tid}), "project": payload.get("project")}
        r = store.apply_event("ANNOTATION_CREATED", one, config)
        changed += r["changed"]
        ids += r["annotation_ids"]
    return {"status": "stored", "changed": changed, "annotation_ids": ids}


def _connection(start_embedded: bool = True, url: str | None = None):
    """`url` (``settings.redis_url``), else ``REDIS_URL``, else the embedded Valkey of ``MODEL_DIR``
    (started only when `start_embedded`: a webhook never starts it; ``tag2mask up`` / workers do)."""
    from backend.redis_conn import get_connection

    return get_connection(url or None, start_embedded=start_embedded, socket_timeout=10,
                          socket_connect_timeout=2)


# -- scheduling --------------------------------------------------------------------------------------
def last_trained_revision(registry: ModelRegistry, project) -> int:
    """The example-store revision the newest model of `project` was trained on (0 when none)."""
    revs = [int(m.get("examples_revision") or 0) for m in _safe_list(registry, project)]
    return max(revs, default=0)


def _safe_list(registry: ModelRegistry, project) -> list[dict]:
    try:
        return registry.list(project)
    except (ValueError, RegistryError):
        return []


def _active_job(conn, project):
    """The project's training job that is queued/started/scheduled/deferred, else None."""
    from rq.job import Job, JobStatus

    raw = conn.get(_latest_job_key(project))
    if raw is None:
        return None
    job_id = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        job = Job.fetch(job_id, connection=conn)
    except Exception:   # noqa: BLE001 - expired or deleted
        return None
    status = job.get_status(refresh=False)
    if status in (JobStatus.QUEUED, JobStatus.STARTED, JobStatus.SCHEDULED, JobStatus.DEFERRED):
        return job
    return None


def enqueue_training(conn, project, settings: Settings | None = None, *, trigger: str = "auto",
                     revision: int | None = None, config: dict | None = None) -> dict:
    """Enqueue :func:`train_project` for `project` unless one is queued or running (coalesced).

    ``trigger="auto"`` (the tick) never re-runs a job id that exists (finished or failed: the same
    revision is not trained twice); ``"manual"`` (Start training) re-runs a finished one.
    Returns ``{"status": "queued" | "coalesced" | "exists", "job_id", "project", "revision"}``.
    """
    from backend.queues import enqueue_unique, get_queue

    settings = settings or Settings.from_env()
    if revision is None:
        revision = _store(settings).revision(project)
    active = _active_job(conn, project)
    if active is not None:
        return {"status": "coalesced", "job_id": active.id, "project": str(project), "revision": revision,
                "note": "a training of this project is already queued or running"}
    job_id = train_job_id(project, revision, trigger)
    options = {**_job_options(settings), "trigger": trigger, "revision": int(revision)}
    if config:
        options["config"] = dict(config)
    job, created = enqueue_unique(get_queue("train", conn), TRAIN_FUNC, str(project), options, job_id=job_id,
                                  rerun_failed=(trigger == "manual"), rerun_finished=(trigger == "manual"),
                                  meta={"project": str(project), "revision": int(revision), "trigger": trigger},
                                  description=f"train project {project} at examples revision {revision}")
    conn.set(_latest_job_key(project), job.id, ex=30 * 24 * 3600)
    return {"status": "queued" if created else "exists", "job_id": job.id, "project": str(project),
            "revision": int(revision)}


def check_projects(conn, settings: Settings | None = None, min_new: int | None = None,
                   projects: Iterable[str] | None = None) -> list[dict]:
    """One periodic tick: for each project with at least `min_new` (``TRAIN_MIN_NEW``) changed
    examples since its newest model, enqueue a training (see :func:`enqueue_training`).

    Returns one entry per project looked at: ``{"project", "changes", "revision", "status"}`` where
    status is "queued", "coalesced", "exists" (that revision already had its job), "waiting"
    (too few changes) or "empty" (no examples left).
    """
    settings = settings or Settings.from_env()
    min_new = max(1, int(settings.train_min_new if min_new is None else min_new))
    store = _store(settings)
    registry = ModelRegistry.in_model_dir(settings.model_dir)
    out = []
    for project in (list(projects) if projects is not None else store.projects()):
        rev = store.revision(project)
        changes = store.changes_since(project, last_trained_revision(registry, project))
        entry = {"project": str(project), "changes": changes, "revision": rev}
        if store.count(project) == 0:
            entry["status"] = "empty"
        elif changes < min_new:
            entry["status"] = "waiting"
        else:
            entry.update(enqueue_training(conn, project, settings, trigger="auto", revision=rev))
        out.append(entry)
        if entry["status"] == "queued":
            log.info("project %s: %d examples changed since its last model: training job %s queued",
                     project, changes, entry["job_id"])
    return out


def training_tick(options: dict | None = None) -> list[dict]:
    """:func:`check_projects` as an RQ job (for ``rq cron`` / :func:`register_cron`)."""
    from rq import get_current_job

    job = get_current_job()
    conn = job.connection if job is not None else _connection()
    return check_projects(conn, _settings(options))


def register_cron(cron_scheduler, settings: Settings | None = None, interval: float | None = None,
                  name: str | None = None):
    """Register :func:`training_tick` on RQ 3's ``rq.cron.CronScheduler`` (every ``TRAIN_INTERVAL`` s,
    on the ``train`` queue). Use it in an ``rq cron`` config file::

        from rq import cron
        from backend.training_jobs import training_tick   # or: register_cron(scheduler)
        cron.register(training_tick, queue_name="tag2mask:train", interval=600,
                      args=({"model_dir": "/data/model_dir"},))

    The tick itself is idempotent, so several cron schedulers are harmless.
    """
    from backend.queues import queue_name

    settings = settings or Settings.from_env()
    options = {**_job_options(settings), "train_min_new": int(settings.train_min_new)}
    return cron_scheduler.register(training_tick, queue_name("train"), args=(options,),
                                   interval=max(1, int(interval or settings.train_interval)), result_ttl=3600,
                                   name=name or f"{_ns()}:training_tick")


def run_training_scheduler(conn, interval: float | None = None, stop_event: threading.Event | None = None,
                           settings: Settings | None = None, max_ticks: int | None = None,
                           publish_every: float = 20.0) -> int:
    """Tick :func:`check_projects` every `interval` (``TRAIN_INTERVAL``) seconds until `stop_event`,
    and every `publish_every` seconds mirror each project's promoted model into Redis
    (:class:`RedisModelStore`, so ``tag2mask models promote/rollback`` reach other hosts in time).

    Only one loop per Redis namespace works at a time (a leader key renewed each round, expiring
    after 3 rounds if its holder dies); Redis errors are logged and retried next round. Returns
    the number of ticks run (stops after `max_ticks` when given).
    """
    import redis

    settings = settings or Settings.from_env()
    interval = float(settings.train_interval if interval is None else interval)
    period = max(0.01, min(interval, float(publish_every)))
    stop_event = stop_event or threading.Event()
    me = f"{os.uname().nodename}:{os.getpid()}:{id(stop_event)}"
    key = f"{_ns()}:train-scheduler"
    lease = max(5, int(3 * period))
    ticks, last_tick = 0, None
    while not stop_event.is_set():
        try:
            leader = conn.set(key, me, nx=True, ex=lease)
            if not leader:
                holder = conn.get(key)
                leader = (holder.decode() if isinstance(holder, bytes) else holder) == me
                if leader:
                    conn.expire(key, lease)
            if leader:
                RedisModelStore(conn).sync(ModelRegistry.in_model_dir(settings.model_dir))
                if last_tick is None or time.monotonic() - last_tick >= interval - 1e-6:
                    last_tick = time.monotonic()
                    check_projects(conn, settings)
                    ticks += 1
        except (redis.RedisError, OSError) as exc:
            log.warning("training scheduler: Redis error (%s); retrying in %.0f s", exc, period)
        except Exception:   # noqa: BLE001 - a broken store must not kill the loop
            log.exception("training scheduler: tick failed")
        if max_ticks is not None and ticks >= max_ticks:
            break
        stop_event.wait(period)
    try:
        holder = conn.get(key)
        if (holder.decode() if isinstance(holder, bytes) else holder) == me:
            conn.delete(key)
    except Exception:   # noqa: BLE001 - best effort
        pass
    return ticks


# -- models for other hosts --------------------------------------------------------------------------
class RedisModelStore:
    """Promoted checkpoints mirrored into Redis, for workers on hosts that share only Redis.

    One hash per project, ``<namespace>:models:<project>``: ``current`` -> version, ``<v>:pt`` ->
    the checkpoint file's bytes, ``<v>:meta`` -> its meta.json. :meth:`publish` copies the registry's
    promoted version (the training job does it after promoting; the scheduler loop syncs every
    project every few seconds, so CLI promotions and rollbacks follow). :meth:`current` and
    :meth:`load` mirror :class:`~backend.registry.ModelRegistry`'s, so :func:`load_project_heads`
    and :class:`ProjectHeadsCache` accept either. Checkpoints load with ``weights_only=True``.
    """

    def __init__(self, conn, keep: int = 5):
        self.conn = conn
        self.keep = max(1, int(keep))      # versions kept per project (the current one always)

    def key(self, project) -> str:
        return f"{_ns()}:models:{_safe(project)}"

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


# -- training ----------------------------------------------------------------------------------------
def samples_from_store(store: ExampleStore, project, settings: Settings, fetcher=None) -> list:
    """The project's examples as :class:`explainers.training.Sample` (photos fetched lazily)."""
    from backend.image_fetch import ImageFetcher

    fetcher = fetcher or ImageFetcher(settings)
    samples = []
    for ex in store.list(project):
        def load(ex=ex):
            return fetcher.load(ex.image, task_id=ex.task_id)
        samples.append(ex.to_sample(load=load))
    return samples


def _train_config(overrides: dict | None):
    from explainers.training import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    bad = sorted(set(overrides or {}) - names)
    if bad:
        raise ValueError(f"unknown training option(s) {bad}; known: {sorted(names)}")
    return TrainConfig(**(overrides or {}))


def _record_promotion(registry: ModelRegistry, project, version: str, promotion, trigger: str) -> None:
    """Write the promotion decision into the version's meta.json (atomic replace)."""
    path = registry.project_dir(project) / version / "meta.json"
    meta = json.loads(path.read_text())
    meta["promotion"] = {"promoted": bool(promotion.promoted), "reason": promotion.reason,
                         "previous": promotion.previous, "regressions": promotion.regressions,
                         "trigger": trigger}
    tmp = path.with_name(f".meta.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, path)


def tune_fusion(result, samples: Sequence, backbone, preset: str = "balanced") -> dict | None:
    """Choose, per label, how the parts of a :class:`~explainers.training.TrainResult` combine in the
    pipeline of `preset` (seg head weight x CRF on/off; the CAM the engine serves for the tag, the
    classifier head's for labels ImageNet cannot name) on its validation samples that have masks
    (:func:`explainers.segment.fusion_tuning.choose_fusion`); set ``result.fusion`` (per label) and
    ``result.fusion_weight`` (the best over all labels) and return the choice for the version's meta
    (``validation["fusion"]``), with ``validation["pipeline_fg_iou"]`` = the served pipeline's
    validation score. Without enough validation masks the weight is
    :func:`~explainers.segment.fusion_tuning.fallback_weight`'s (box-only heads: 0.25; else None,
    the engine's default), with ``"rule"`` saying so. None when there is no seg head, or no
    validation mask and no fallback; ``{"error": ...}`` when the choice failed (logged; the training
    is kept with the default weight)."""
    if result.segmenter is None:
        return None
    from explainers.segment.fusion_tuning import Combo, choose_fusion, fallback_weight

    val_keys = set(result.val_keys)
    val = [s for s in samples if str(s.key) in val_keys and s.masks]
    meta = choice = engine = None
    if val:
        from explainers.segment import PipelineConfig, Tag2Mask
        from explainers.training import ProjectHeads

        try:
            engine = Tag2Mask(backbone, PipelineConfig.preset(preset))
            heads = ProjectHeads(backbone, result.classifier, result.segmenter, result.layers, result.size)
            choice = choose_fusion(engine, heads, val)
        except Exception as exc:   # noqa: BLE001 - the heads are still good; serve them at the default weight
            log.warning("fusion not chosen (%s: %s); the default stays", type(exc).__name__, exc)
            return {"error": f"{type(exc).__name__}: {exc}"}
        result.fusion_weight = choice.weight
        result.fusion = choice.fusion
        result.seconds["fusion_tuning"] = choice.seconds
        meta = choice.to_meta()
    fallback = fallback_weight(result.counts)
    if result.fusion_weight is None and fallback is not None:
        result.fusion_weight = fallback
        meta = {**(meta or {}), "chosen": fallback, "rule": "seg head trained on boxes only"}
    if choice is not None and choice.scores:
        # what will be served on validation: the chosen per-label mix, else the pipeline at the weight
        # the heads carry (or the preset's) with its CRF; the registry compares this score between
        # versions before promoting (PROMOTION_METRICS)
        served_weight = result.fusion_weight if result.fusion_weight is not None else engine.fusion_weight()
        served = choice.served if choice.served is not None else \
            choice.score_of(Combo(float(served_weight), bool(engine.config.crf.enabled)))
        if served is not None:
            result.validation["pipeline_fg_iou"] = served
            meta["served_weight"] = float(served_weight)
            meta["served"] = served
    return meta


def train_and_register(samples: Sequence, project, registry: ModelRegistry, backbone, *, labels=None,
                       config: dict | None = None, examples_revision: int | None = None, promote: bool = True,
                       force: bool = False, tolerance: float = 0.0, trigger: str = "manual",
                       extra_meta: dict | None = None, preset: str = "balanced") -> dict:
    """Train heads on `samples` (the hash split's train part), choose per label how they combine
    in the pipeline on the validation masks (:func:`tune_fusion`, the pipeline of `preset`), refit
    them on every example with that choice (:func:`explainers.training.refit_heads`,
    ``TrainConfig.refit``), save a registry version, promote it unless validation regresses.

    Returns ``{"project", "version", "promoted", "reason", "previous", "current", "validation",
    "counts", "seconds", "labels", "fusion_weight", "fusion"}`` (``fusion_weight`` None: the engine's
    default; ``fusion``: {label: {"weight", "crf"}}; the per-combination scores are in
    ``validation["fusion"]``; ``counts``: ``train`` / ``val`` (what the scores were validated on),
    ``refit`` (the examples the saved heads were trained on at last)). A refused promotion is
    logged (warning) and recorded in the version's ``meta.json`` (``"promotion"``) and in the
    registry's state log.
    """
    from explainers.heads import BackboneFeatures
    from explainers.training import FeatureCache, refit_heads, train_heads

    cfg = _train_config(config)
    samples = list(samples)
    cache = FeatureCache(BackboneFeatures(backbone), cfg.size, cfg.flip, cfg.extract_batch)
    result = train_heads(backbone, samples, labels=labels, config=cfg, cache=cache)
    fusion = tune_fusion(result, samples, backbone, preset)
    if fusion is not None:
        result.validation["fusion"] = fusion
    result = refit_heads(backbone, result, samples, cfg, cache)
    extra = dict(extra_meta or {})
    extra["trigger"] = trigger
    if examples_revision is not None:
        extra["examples_revision"] = int(examples_revision)
    version = registry.save_result(project, result, **extra)
    out = {"project": str(project), "version": version, "validation": result.validation,
           "counts": result.counts, "seconds": result.seconds, "labels": list(result.labels),
           "fusion_weight": result.fusion_weight, "fusion": dict(result.fusion),
           "promoted": False, "reason": "not promoted (--no-promote)", "previous": registry.current(project)}
    if promote:
        p = registry.promote(project, version, force=force, tolerance=tolerance)
        _record_promotion(registry, project, version, p, trigger)
        out.update(promoted=p.promoted, reason=p.reason, previous=p.previous, regressions=p.regressions)
        if p.promoted:
            log.info("project %s: %s promoted (%s)", project, version, p.reason)
        else:
            log.warning("project %s: %s NOT promoted: %s", project, version, p.reason)
    out["current"] = registry.current(project)
    return out


class _RenewingLock:
    """A Redis lock held while a training runs, its TTL renewed in a thread (dies with the worker)."""

    def __init__(self, conn, key: str, ttl: int = LOCK_TTL):
        self.lock = conn.lock(key, timeout=ttl, blocking=False, thread_local=False)
        self.ttl = ttl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        if not self.lock.acquire(blocking=False):
            return False
        self._thread = threading.Thread(target=self._renew, name="train-lock", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(max(1.0, self.ttl / 3)):
            try:
                self.lock.extend(self.ttl, replace_ttl=True)
            except Exception as exc:   # noqa: BLE001 - Redis blip: next round tries again
                log.warning("could not renew the training lock: %s", exc)

    def release(self) -> None:
        self._stop.set()
        try:
            self.lock.release()
        except Exception:   # noqa: BLE001 - expired or Redis gone
            pass


def train_project(project, options: dict | None = None, connection=None) -> dict:
    """The training job: train `project`'s heads on its stored examples and register the result.

    `options` (JSON-able): ``model_dir``, ``local_roots``, ``backbone``, ``label_studio_url``
    (override the environment's settings), ``config`` (TrainConfig fields), ``force`` (promote even
    if validation regresses), ``trigger``, ``min_examples`` (default 2). `connection` defaults to the
    current RQ job's. Returns the :func:`train_and_register` report plus ``status`` "trained", or
    ``{"status": "skipped", "reason"}`` (another training of the project holds the lock, too few
    examples, nothing changed since the newest model).
    """
    from rq import get_current_job

    options = dict(options or {})
    settings = _settings(options)
    job = get_current_job()
    conn = connection if connection is not None else (job.connection if job is not None else _connection())
    lock = _RenewingLock(conn, _lock_key(project))
    if not lock.acquire():
        log.info("project %s: another training holds the lock; skipped", project)
        return {"status": "skipped", "project": str(project), "reason": "another training of this project is running"}
    try:
        store = _store(settings)
        registry = ModelRegistry.in_model_dir(settings.model_dir)
        rev = store.revision(project)
        if options.get("trigger") != "manual" and registry.versions(project) and \
                last_trained_revision(registry, project) >= rev:
            return {"status": "skipped", "project": str(project), "revision": rev,
                    "reason": "no example changed since the newest model"}
        samples = samples_from_store(store, project, settings)
        min_examples = int(options.get("min_examples", 2))
        if len(samples) < min_examples:
            return {"status": "skipped", "project": str(project), "revision": rev,
                    "reason": f"{len(samples)} example(s); at least {min_examples} are needed"}
        backbone = get_backbone(settings.backbone)
        t = time.perf_counter()
        report = train_and_register(samples, project, registry, backbone, config=options.get("config"),
                                    examples_revision=rev, force=bool(options.get("force")),
                                    trigger=str(options.get("trigger") or "auto"),
                                    extra_meta={"device": str(backbone.device), "preset": settings.preset},
                                    preset=settings.preset)
        report.update(status="trained", revision=rev, wall_seconds=round(time.perf_counter() - t, 2))
        try:
            report["published"] = RedisModelStore(conn).publish(registry, project)
        except Exception as exc:   # noqa: BLE001 - the scheduler's sync publishes it later
            log.warning("project %s: could not publish the model to Redis: %s", project, exc)
        if job is not None:
            job.meta.update({"version": report["version"], "promoted": report["promoted"]})
            job.save_meta()
        return report
    finally:
        lock.release()


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


def project_model_version(base: str, project, current: str | None) -> str:
    """`base` plus ``+p<project>.<current>`` when `current` (a promoted version) is given."""
    return f"{base}+p{_safe(project)}.{current}" if (current and project is not None) else base


def current_model_version(project, settings: Settings | None = None, registry: ModelRegistry | None = None) -> str:
    """The model version string to report for `project`: the base version
    (:func:`backend.model.base_model_version`: ``tag2mask-<release>-<backbone>-<preset>-<config hash>``
    or ``TAG2MASK_MODEL_VERSION``), plus ``+p<project>.<version>`` when the project has a promoted
    trained model. Reads the registry's state file only (no torch): /setup calls it while the model loads."""
    from backend.model import base_model_version

    settings = settings or Settings.from_env()
    base = base_model_version(settings)
    if project is None:
        return base
    registry = registry or ModelRegistry.in_model_dir(settings.model_dir)
    try:
        current = registry.current(project)
    except ValueError:
        return base
    return project_model_version(base, project, current)


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


# -- python -m backend.training_jobs: the scheduler loop alone ----------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m backend.training_jobs [--interval S] [--once] [--redis-url URL]``."""
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="python -m backend.training_jobs",
                                description="Check every project every TRAIN_INTERVAL seconds and queue a "
                                            "training when TRAIN_MIN_NEW examples changed.")
    p.add_argument("--interval", type=float, default=None, help="seconds between checks (default: $TRAIN_INTERVAL)")
    p.add_argument("--once", action="store_true", help="one check, print it as JSON, exit")
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL, else the embedded Valkey")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from backend.redis_conn import get_connection

    conn = get_connection(args.redis_url)
    settings = Settings.from_env()
    if args.once:
        print(json.dumps(check_projects(conn, settings), indent=1))
        return 0
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_training_scheduler(conn, args.interval, stop, settings)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
