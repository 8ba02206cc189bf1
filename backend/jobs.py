"""The RQ job functions, at import paths that stay put: queued jobs name them by these strings.

=====================================  ==========  ===========================================================
job                                    queue       what it does
=====================================  ==========  ===========================================================
``backend.jobs.predict_tasks``         interactive predict Label Studio tasks (or explicit-tag tasks) and push
                                       batch       each prediction to Label Studio (below)
``backend.jobs.train_project``         train       retrain a project's heads (backend.training.trainer)
``backend.jobs.training_tick``         train       the periodic retraining check (backend.training.schedule)
=====================================  ==========  ===========================================================

``backend.training_jobs.train_project`` / ``training_tick`` (the paths before the backend was split
into packages) stay importable for jobs queued by an older release.

:func:`predict_tasks` takes one JSON-able dict, so the web server, the CLI and webhooks build it
without importing torch. The tasks go through :func:`backend.serving.predict.predict_chunk`, the
predict function the web process uses inline too (same photo fetch, result cache and per-task
errors), in chunks of the worker's batch size; each finished prediction is written to Label Studio
through :func:`backend.labelstudio.client.push_prediction` (idempotent per task and model version).
Transient failures were already retried inside the chunk (backend.queue.retry); a job whose tasks
failed raises :class:`TasksFailed` at the end, after finishing all the others, so RQ keeps it in the
FailedJobRegistry with each reason; a failed task's sentence for ``/predict`` is in ``meta["errors"]``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from backend.labelstudio.client import push_prediction
from backend.queue.retry import is_transient
from backend.serving.predict import batch_size, predict_chunk, task_error, task_key
from backend.storage.connection import current_connection
from backend.storage.keys import push_late_key, push_owner_key
from backend.training.schedule import training_tick
from backend.training.trainer import train_project

__all__ = ["TasksFailed", "predict_tasks", "train_project", "training_tick"]

log = logging.getLogger(__name__)


class TasksFailed(RuntimeError):
    """Some tasks of a job failed; ``failures`` maps task id -> reason."""

    def __init__(self, failures: Mapping[Any, str]):
        self.failures = dict(failures)
        lines = "; ".join(f"task {t}: {r}" for t, r in self.failures.items())
        super().__init__(f"{len(self.failures)} task(s) failed: {lines}")


# -- the job functions --------------------------------------------------------------------------
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

    from backend.storage.result_cache import ResultCache

    job = get_current_job()
    conn = current_connection()
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
        from backend.serving.failures import is_input_error

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
            tid = task_key(outcome.task, start + k)
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
