"""RQ queues by priority, idempotent job ids, enqueuing predictions, and progress.

Three queues, highest priority first: ``interactive`` (one task, an annotator waits), ``batch``
(pre-labeling many tasks) and ``train``. A worker listening on several queues always empties the
earlier ones first (RQ dequeues in the order the queues are given). Queue names carry a namespace
(``$TAG2MASK_NAMESPACE``, default ``tag2mask``) so several deployments or test runs can share a
Redis: ``tag2mask:interactive`` etc.

Job ids are derived from what the job computes (project, task id, image content hash, tags, model
version), so enqueuing the same work twice yields one job (:func:`enqueue_unique`). Every job gets
an RQ ``Retry`` so a job abandoned by a dead worker is requeued by RQ's StartedJobRegistry cleanup
(see backend/queue/worker.py for the short execution heartbeat that makes the death visible quickly).
Finished predictions are cached by backend.storage.result_cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import redis
from rq import Queue, Retry
from rq.exceptions import DuplicateJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from backend.storage.keys import digest, latest_train_job_key, namespace, project_jobs_key
from backend.storage.result_cache import normalize_tags

__all__ = ["QueueSpec", "PRIORITIES", "QUEUE_SPECS", "queue_name", "get_queue", "get_queues", "job_id_for",
           "enqueue_unique", "enqueue_predictions", "queue_counts", "job_info", "project_progress"]

PRIORITIES: tuple[str, ...] = ("interactive", "batch", "train")


@dataclass(frozen=True)
class QueueSpec:
    """Defaults of the jobs of one queue."""
    timeout: int          # seconds a job may run before RQ stops it
    result_ttl: int       # seconds a finished job (and its return value) is kept
    retries: int          # re-runs after a failure or after its worker died


QUEUE_SPECS: dict[str, QueueSpec] = {
    "interactive": QueueSpec(timeout=120, result_ttl=3600, retries=2),
    "batch": QueueSpec(timeout=3600, result_ttl=24 * 3600, retries=2),
    "train": QueueSpec(timeout=6 * 3600, result_ttl=7 * 24 * 3600, retries=1),
}

FAILURE_TTL = 7 * 24 * 3600   # failed jobs (with their reason) are kept a week


def queue_name(priority: str) -> str:
    """Full RQ queue name of a priority, e.g. ``tag2mask:interactive``."""
    if priority not in PRIORITIES:
        raise ValueError(f"unknown queue {priority!r}; choose from {', '.join(PRIORITIES)}")
    return f"{namespace()}:{priority}"


def get_queue(priority: str, connection: redis.Redis) -> Queue:
    spec = QUEUE_SPECS[priority] if priority in QUEUE_SPECS else None
    return Queue(queue_name(priority), connection=connection,
                 default_timeout=spec.timeout if spec else None)


def get_queues(connection: redis.Redis, priorities: Iterable[str] | None = None) -> list[Queue]:
    """Queues in priority order (the order given is kept, duplicates dropped)."""
    names = list(dict.fromkeys(priorities or PRIORITIES))
    return [get_queue(p, connection) for p in names]


def job_id_for(kind: str, project: Any, task_id: Any, content: str, tags: Iterable[str],
               model_version: str) -> str:
    """Deterministic job id of one unit of work, e.g. ``predict-<project>-<task>-<sha1[:16]>``.

    `content` is the image content hash (or, for a job over many tasks, any stable digest of them).
    """
    key = digest(kind, str(project), str(task_id), content, normalize_tags(tags), str(model_version))
    safe = lambda v: "".join(c if c.isalnum() or c in "-." else "_" for c in str(v))[:40]   # noqa: E731
    return f"{kind}-{safe(project)}-{safe(task_id)}-{key[:16]}"


def enqueue_unique(queue: Queue, func: Callable | str, *args: Any, job_id: str,
                   rerun_failed: bool = True, rerun_finished: bool = False,
                   meta: dict | None = None, **options: Any) -> tuple[Job, bool]:
    """Enqueue ``func(*args)`` as job `job_id` unless that job already exists; returns ``(job, created)``.

    An existing queued/started/scheduled/deferred job is returned as is. A finished one is returned
    as is (its result stands) unless `rerun_finished`; a failed, stopped or canceled one is replaced
    by a new run when `rerun_failed`. A short Redis lock makes the check-and-enqueue atomic across
    processes. Other `options` go to ``Queue.enqueue_call``-style arguments (job_timeout,
    result_ttl, failure_ttl, retry, at_front, description).
    """
    conn = queue.connection
    priority = queue.name.rsplit(":", 1)[-1]
    spec = QUEUE_SPECS.get(priority)
    if spec:
        options.setdefault("job_timeout", spec.timeout)
        options.setdefault("result_ttl", spec.result_ttl)
        if spec.retries:
            options.setdefault("retry", Retry(max=spec.retries))
    options.setdefault("failure_ttl", FAILURE_TTL)
    with conn.lock(f"{namespace()}:enqueue-lock:{job_id}", timeout=30, blocking_timeout=30):
        try:
            existing = Job.fetch(job_id, connection=conn)
        except Exception:   # NoSuchJobError, or a half-written job: enqueue afresh
            existing = None
        if existing is not None:
            status = existing.get_status(refresh=False)
            rerun = (status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED) and rerun_failed) or \
                    (status == JobStatus.FINISHED and rerun_finished) or status is None
            if not rerun:
                return existing, False
            existing.delete(remove_from_queue=True)
        try:   # unique=True: RQ's atomic check, a second guard against writers that skip the lock
            job = queue.enqueue(func, *args, job_id=job_id, meta=meta or {}, unique=True, **options)
        except DuplicateJobError:
            return Job.fetch(job_id, connection=conn), False
        return job, True


PREDICT_FUNC = "backend.jobs.predict_tasks"


def enqueue_predictions(connection: redis.Redis, *, project: Any, tasks: Sequence[Mapping[str, Any]],
                        label_config: str, model_version: str, priority: str | None = None,
                        chunk_size: int = 8, push: bool = True, engine: Mapping[str, Any] | None = None,
                        label_studio: Mapping[str, Any] | None = None,
                        **options: Any) -> list[tuple[Job, bool]]:
    """Enqueue :func:`backend.jobs.predict_tasks` over `tasks` (``{"id", "image", "tags"}``, optionally
    ``"image_sha"``: the photo's content hash, else the image reference stands for its content).

    One job per task when there is a single task (queue ``interactive`` by default), else one job per
    chunk of `chunk_size` tasks (queue ``batch``). `label_studio` (``{"url", "token"}``) tells workers
    where to push when they have no ``LABEL_STUDIO_URL``/``_API_KEY``. Job ids come from (project, task ids, content,
    tags, model version), so re-enqueuing the same work returns the existing jobs.
    """
    tasks = list(tasks)
    priority = priority or ("interactive" if len(tasks) <= 1 else "batch")
    queue = get_queue(priority, connection)
    out = []
    for start in range(0, len(tasks), max(1, chunk_size)):
        chunk = tasks[start:start + max(1, chunk_size)]
        ids = [t["id"] for t in chunk]
        content = digest([(t["id"], t.get("image_sha") or str(t["image"]), normalize_tags(t.get("tags", [])),
                           t.get("prompts") or []) for t in chunk])
        task_key = ids[0] if len(ids) == 1 else f"{ids[0]}+{len(ids) - 1}"
        job_id = job_id_for("predict", project, task_key, content, [], model_version)
        request = {"project": project, "model_version": str(model_version), "label_config": label_config,
                   "tasks": [dict(t) for t in chunk], "push": push, "engine": dict(engine or {})}
        if label_studio:   # Label Studio's URL/token from /setup, for workers without LABEL_STUDIO_URL/_API_KEY
            request["label_studio"] = dict(label_studio)
        job, created = enqueue_unique(queue, PREDICT_FUNC, request, job_id=job_id,
                                      meta={"project": project, "tasks": ids, "total": len(ids), "done": 0},
                                      description=f"predict project {project} tasks {ids}", **options)
        connection.sadd(project_jobs_key(project), job.id)
        out.append((job, created))
    connection.expire(project_jobs_key(project), 30 * 24 * 3600)
    return out


def _ts(value) -> float | None:
    return value.timestamp() if value is not None else None


def job_info(connection: redis.Redis, job_id: str) -> dict | None:
    """What ``GET /jobs/<id>`` shows: status, queue, progress (meta done/total/failed), times (unix s),
    failure reason (the last line of the exception), retries left. None when the job is unknown."""
    try:
        job = Job.fetch(job_id, connection=connection)
    except Exception:
        return None
    status = job.get_status(refresh=False)
    info = {
        "id": job.id, "status": str(status.value if status else "unknown"), "queue": job.origin,
        "description": job.description, "meta": dict(job.meta or {}),
        "enqueued_at": _ts(job.enqueued_at), "started_at": _ts(job.started_at), "ended_at": _ts(job.ended_at),
        "retries_left": job.retries_left, "error": None,
    }
    if status == JobStatus.FAILED:
        result = job.latest_result()
        exc = (result.exc_string if result is not None else None) or job.exc_info or ""
        lines = [ln for ln in exc.strip().splitlines() if ln.strip()]
        info["error"] = lines[-1] if lines else "failed"
    return info


def project_progress(connection: redis.Redis, project: Any, now: float | None = None) -> dict:
    """Progress of a project's predict jobs, counted in tasks: ``{"jobs", "tasks", "queued", "running",
    "done", "failed", "rate" (tasks/s since the first start), "eta_s" (None when unknown)}``, and of its
    latest training, ``"training"``: ``{"job", "status", "stage", "done", "total"}`` (the photos of the
    running stage, e.g. the self-training's pseudo-masks) or None."""
    import time as _time

    ids = sorted(m.decode() if isinstance(m, bytes) else m for m in connection.smembers(project_jobs_key(project)))
    jobs = [j for j in Job.fetch_many(ids, connection=connection) if j is not None] if ids else []
    out = {"project": project, "jobs": len(jobs), "tasks": 0, "queued": 0, "running": 0, "done": 0, "failed": 0,
           "rate": None, "eta_s": None}
    first_start = None
    for job in jobs:
        total = int(job.meta.get("total", 1))
        done = int(job.meta.get("done", 0))
        failed = int(job.meta.get("failed", 0))
        status = job.get_status(refresh=False)
        out["tasks"] += total
        if status == JobStatus.FINISHED:
            out["done"] += total
        elif status == JobStatus.FAILED:
            out["failed"] += max(failed, 1) if failed else total
            out["done"] += max(0, total - (max(failed, 1) if failed else total))
        elif status == JobStatus.STARTED:
            out["done"] += done - failed
            out["failed"] += failed
            out["running"] += total - done
        else:
            out["queued"] += total
        if job.started_at is not None:
            t = job.started_at.timestamp()
            first_start = t if first_start is None else min(first_start, t)
    now = _time.time() if now is None else now
    if first_start is not None and out["done"] > 0 and now > first_start:
        out["rate"] = out["done"] / (now - first_start)
        out["eta_s"] = (out["queued"] + out["running"]) / out["rate"]
    out["training"] = training_progress(connection, project)
    return out


def training_progress(connection: redis.Redis, project: Any) -> dict | None:
    """The project's latest training job: ``{"job", "status", "stage", "done", "total"}``, None without one."""
    job_id = connection.get(latest_train_job_key(project))
    if not job_id:
        return None
    job = Job.fetch_many([job_id.decode() if isinstance(job_id, bytes) else job_id], connection=connection)[0]
    if job is None:
        return None
    meta, status = job.meta or {}, job.get_status(refresh=False)
    return {"job": job.id, "status": status.value if status is not None else None,
            "stage": meta.get("stage"), "done": meta.get("done"), "total": meta.get("total")}


def queue_counts(connection: redis.Redis, priorities: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """Per queue: queued / started / finished / failed job counts (runs RQ's registry cleanup)."""
    out: dict[str, dict[str, int]] = {}
    for q in get_queues(connection, priorities):
        out[q.name] = {
            "queued": q.count,
            "started": StartedJobRegistry(queue=q).count,
            "finished": FinishedJobRegistry(queue=q).count,
            "failed": FailedJobRegistry(queue=q).count,
        }
    return out


