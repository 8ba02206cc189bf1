"""When to retrain: the periodic check of every project, its leader loop, and enqueuing a training.

* :func:`check_projects` -- one tick. For every project in the example store, a training job is
  enqueued when at least ``TRAIN_MIN_NEW`` examples changed since the revision the newest model was
  trained on. Job ids are ``train-<namespace>-<project>-r<revision>``, so a tick never enqueues two
  jobs for the same project and revision, and a project whose training is still queued or running
  gets no second job (coalesced: the next tick after it ends trains on everything changed meanwhile).
* :func:`enqueue_training` -- the one way a training is queued (the tick, and Start training through
  the webhook: ``trigger="manual"`` re-runs a finished revision). The job is
  ``backend.jobs.train_project`` (backend.training.trainer).
* :func:`run_training_scheduler` -- the loop that ticks every ``TRAIN_INTERVAL`` seconds (one active
  loop per Redis namespace: a leader key with a TTL) and mirrors each project's promoted model into
  Redis every 20 s (backend.storage.model_mirror); ``python -m backend.cli.scheduler`` runs it alone,
  ``tag2mask worker --scheduler`` in a thread next to ``backend.queue.worker.run_scheduler``.
  :func:`register_cron` does the same with RQ 3's ``CronScheduler`` (``rq cron``) by enqueuing
  :func:`training_tick` on the ``train`` queue. It must run on the host that holds ``MODEL_DIR``.

Where things run: the example store (sqlite) and the registry live in ``MODEL_DIR``, so the web
server, the scheduler loop and the workers of the ``train`` queue must share it (one host, or a
shared volume); prediction workers elsewhere need only Redis. Nothing here loads a model.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Iterable

from backend.settings import Settings
from backend.storage.connection import current_connection
from backend.storage.examples import example_store
from backend.storage.keys import (
    latest_train_job_key,
    namespace,
    safe_name,
    train_scheduler_key,
)
from backend.storage.model_mirror import RedisModelStore
from backend.storage.registry import ModelRegistry, RegistryError
from backend.training.options import job_options, settings_from_options

__all__ = ["TRAIN_FUNC", "check_projects", "training_tick", "run_training_scheduler", "register_cron",
           "enqueue_training", "train_job_id", "last_trained_revision", "RedisModelStore"]

log = logging.getLogger(__name__)

TRAIN_FUNC = "backend.jobs.train_project"


def train_job_id(project, revision: int, trigger: str = "auto") -> str:
    """``train-<namespace>-<project>-r<revision>`` (``-manual`` for Start training): one job per
    project/revision; the namespace keeps deployments sharing a Redis apart (RQ job keys are global)."""
    return f"train-{safe_name(namespace())}-{safe_name(project)}-r{int(revision)}" + ("-manual" if trigger == "manual" else "")


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

    raw = conn.get(latest_train_job_key(project))
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
    from backend.queue.queues import enqueue_unique, get_queue

    settings = settings or Settings.from_env()
    if revision is None:
        revision = example_store(settings).revision(project)
    active = _active_job(conn, project)
    if active is not None:
        return {"status": "coalesced", "job_id": active.id, "project": str(project), "revision": revision,
                "note": "a training of this project is already queued or running"}
    job_id = train_job_id(project, revision, trigger)
    options = {**job_options(settings), "trigger": trigger, "revision": int(revision)}
    if config:
        options["config"] = dict(config)
    job, created = enqueue_unique(get_queue("train", conn), TRAIN_FUNC, str(project), options, job_id=job_id,
                                  rerun_failed=(trigger == "manual"), rerun_finished=(trigger == "manual"),
                                  meta={"project": str(project), "revision": int(revision), "trigger": trigger},
                                  description=f"train project {project} at examples revision {revision}")
    conn.set(latest_train_job_key(project), job.id, ex=30 * 24 * 3600)
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
    store = example_store(settings)
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
    conn = current_connection()
    return check_projects(conn, settings_from_options(options))


def register_cron(cron_scheduler, settings: Settings | None = None, interval: float | None = None,
                  name: str | None = None):
    """Register :func:`training_tick` on RQ 3's ``rq.cron.CronScheduler`` (every ``TRAIN_INTERVAL`` s,
    on the ``train`` queue). Use it in an ``rq cron`` config file::

        from rq import cron
        from backend.jobs import training_tick   # or: register_cron(scheduler)
        cron.register(training_tick, queue_name="tag2mask:train", interval=600,
                      args=({"model_dir": "/data/model_dir"},))

    The tick itself is idempotent, so several cron schedulers are harmless.
    """
    from backend.queue.queues import queue_name

    settings = settings or Settings.from_env()
    options = {**job_options(settings), "train_min_new": int(settings.train_min_new)}
    return cron_scheduler.register(training_tick, queue_name("train"), args=(options,),
                                   interval=max(1, int(interval or settings.train_interval)), result_ttl=3600,
                                   name=name or f"{namespace()}:training_tick")


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
    key = train_scheduler_key()
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
