"""The web server's side of the job queue: ``/predict`` through workers, pre-labeling, queue health.

Used by backend/web/app.py when ``Settings.use_queue`` (``TAG2MASK_QUEUE=on``, or ``auto`` with
``REDIS_URL`` set). Nothing here imports torch: inference runs in ``tag2mask worker`` processes.

``/predict`` (:meth:`PredictionQueue.predict`):

1. each task's tags are chosen as in the web process (the annotated Choices, else "the classifier
   picks", decided by the worker); a prediction already in the :class:`~backend.storage.result_cache.ResultCache`
   for (task, image reference, tags, model version) is answered at once;
2. with at most ``TAG2MASK_SYNC_MAX_TASKS`` remaining tasks, one ``interactive`` job computes them
   and the request waits for it, up to ``TAG2MASK_PREDICT_DEADLINE`` seconds (below Label Studio's
   100 s timeout). Label Studio stores what /predict answers, so that job does not push; if the
   deadline passes, the job is told (:func:`backend.storage.keys.push_late_key`) to push its predictions
   itself and the unfinished tasks are answered without ``result``;
3. with more tasks, ``batch`` jobs are enqueued (``push``: the workers write each prediction to Label
   Studio) and the answer is immediate: tasks not yet done get an entry without ``result``
   (``{"model_version", "score": 0, "status": "queued", "job": id}``). For a day after such a
   job is enqueued (:func:`backend.storage.keys.push_owner_key`; dropped when the task fails), ``/predict``
   answers its tasks without a result too: Label
   Studio stores what /predict answers, so answering them would give a task two predictions.

A malformed task (not an object, data or annotations of the wrong JSON type, an unusable id) gets
the entry ``/predict`` gives inline, with the same sentence (:func:`backend.labelstudio.tasks.task_photo`,
:func:`backend.serving.failures.task_failure_reason`); the rest of the batch goes on. TASKS_CREATED
pre-labeling skips such tasks and names the first MAX_LISTED_ERRORS of them with their sentences.

Every Redis failure surfaces as :class:`~backend.storage.connection.RedisUnavailable` (the server answers 503).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from backend.labelstudio.config import LabelConfig
from backend.queue.queues import (
    PRIORITIES,
    enqueue_predictions,
    job_info,
    project_progress,
    queue_name,
)
from backend.settings import Settings
from backend.storage.connection import RedisUnavailable, get_connection, redis_url
from backend.storage.keys import push_owner_key
from backend.storage.result_cache import ResultCache, ls_cache_tags

__all__ = ["PredictionQueue", "task_ref"]

log = logging.getLogger("backend.queue")

_POLL = 0.05
MAX_LISTED_ERRORS = 20      # skipped tasks of a TASKS_CREATED webhook named in its reply


def task_ref(task: dict, config: LabelConfig) -> str | None:
    """The image reference (URL or path) of a Label Studio task, or None (also for a malformed task)."""
    from backend.labelstudio.tasks import task_photo

    try:
        return task_photo(task, config)[1]
    except ValueError:
        return None


def _redacted(url: str) -> str:
    """A Redis URL without its password."""
    from urllib.parse import urlparse

    p = urlparse(url)
    if p.password:
        return url.replace(f":{p.password}@", ":***@", 1)
    return url


class PredictionQueue:
    """Enqueue predictions and wait for them, for one web process (thread-safe)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._lock = threading.Lock()
        self._url: str | None = None
        self._conn: redis.Redis | None = None

    # -- connection --------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """The settings' REDIS_URL; else :func:`backend.storage.connection.redis_url` (``$REDIS_URL``, else
        the embedded Valkey, started at first use; later outages are not healed here: the server
        answers 503 until it is back)."""
        with self._lock:
            if self._url is None:
                # EmbeddedServerError is a RedisUnavailable
                self._url = self.settings.redis_url or redis_url(start_embedded=True)
            return self._url

    def connection(self) -> redis.Redis:
        url = self.url
        with self._lock:
            if self._conn is None:
                self._conn = get_connection(url, socket_connect_timeout=2, socket_timeout=10,
                                            retry=Retry(NoBackoff(), 1))
            return self._conn

    def _unavailable(self, exc: BaseException) -> RedisUnavailable:
        where = _redacted(self._url) if self._url else "(not started)"
        return RedisUnavailable(f"the job queue is unavailable: Redis at {where} does not answer "
                                f"({type(exc).__name__}: {exc}); predictions resume when it is back "
                                "(start it, e.g. `tag2mask up`, or set TAG2MASK_QUEUE=off)")

    def status(self, timeout: float = 0.5) -> dict:
        """Queue state for /health, never blocking longer than about `timeout` seconds and never
        starting a server: ``{"mode": "queue", "redis": "up"|"down"|"not started", "queues": {...},
        "workers": n}`` (+ ``"error"`` when down)."""
        out: dict[str, Any] = {"mode": "queue"}
        url = self._url or self.settings.redis_url
        if url is None:
            try:
                url = redis_url(start_embedded=False)
            except RedisUnavailable:
                out["redis"] = "not started"
                return out
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                      retry=Retry(NoBackoff(), 0))
        try:
            from rq.worker_registration import get_keys

            from backend.queue.queues import get_queues

            pipe = client.pipeline(transaction=False)
            for p in PRIORITIES:
                pipe.llen(f"rq:queue:{queue_name(p)}")
            lengths = pipe.execute()
            out["redis"] = "up"
            out["queues"] = {p: int(n) for p, n in zip(PRIORITIES, lengths)}
            out["workers"] = len(set().union(*(get_keys(queue=q) for q in get_queues(client, PRIORITIES[:2]))))
        except (redis.RedisError, OSError) as exc:
            out["redis"] = "down"
            out["error"] = f"Redis at {_redacted(url)}: {type(exc).__name__}"
        finally:
            client.close()
        return out

    # -- predict -----------------------------------------------------------------------------
    def _job_tasks(self, tasks: list, config: LabelConfig, prompts: list[dict] | None = None
                   ) -> tuple[list[tuple[int, dict]], dict[int, str]]:
        """([(index, worker task)] of the usable tasks, {index: reason} of the others: the sentence
        ``/predict`` gives inline, :func:`backend.serving.failures.task_failure_reason`); a worker's
        task is built by :func:`backend.labelstudio.tasks.job_task`, as inline."""
        from backend.labelstudio.tasks import job_task, with_prompts
        from backend.serving.failures import is_input_error, task_failure_reason

        todo, refused = [], {}
        for i, task in enumerate(tasks):
            try:
                todo.append((i, with_prompts(job_task(task, config), prompts or [])))
            except Exception as exc:  # noqa: BLE001 - one bad task never sinks the batch
                refused[i] = task_failure_reason(exc)
                if is_input_error(exc):
                    log.warning("task %d of the request failed: %s", i, refused[i])
                else:
                    log.exception("task %d of the request failed", i)
        return todo, refused

    def _creds(self, model) -> dict:
        creds = {}
        if model.hostname and not self.settings.label_studio_url:
            creds["url"] = model.hostname
        if model.access_token and not self.settings.label_studio_api_key:
            creds["token"] = model.access_token
        return creds if len(creds) == 2 else {}

    def predict(self, model, tasks: list, project: str | None, context=None) -> list[dict]:
        """One entry per task, in order (see the module docstring). Raises RedisUnavailable. `context`:
        Label Studio's ``params.context``; smart-tool regions in it make the tasks interactive: one
        ``interactive`` job, waited for, never answered from the cache nor pushed."""
        from backend.serving.interactive import request_prompts

        config = model.use_label_config(None)
        version = model.model_version
        results: list[dict | None] = [None] * len(tasks)
        prompts, answer = request_prompts(context, config, version, len(tasks))
        if answer is not None:      # a malformed context, or a smart tool's regions removed
            return answer
        pending, refused = self._job_tasks(tasks, config, prompts)
        for i, reason in refused.items():
            results[i] = {"model_version": version, "score": 0.0, "error": reason}
        try:
            conn = self.connection()
            if prompts:
                if pending:
                    self._predict_waiting(conn, model, project, pending, results, interactive=True)
                return [r for r in results]
            cache = ResultCache(conn, ttl=self.settings.result_ttl)
            todo = []
            owners = conn.mget([push_owner_key(jt["id"], version) for _, jt in pending]) if pending else []
            for (i, jt), owner in zip(pending, owners):
                if owner is not None:   # a worker pushes this one to Label Studio: answering it too would
                    results[i] = {"model_version": version, "score": 0.0, "status": "pushed by a worker",
                                  "job": owner.decode() if isinstance(owner, bytes) else str(owner)}
                    continue            # make Label Studio store two predictions
                hit = cache.get(jt["id"], "ref:" + jt["image"], ls_cache_tags(jt["tags"]), version)
                if hit is not None:
                    results[i] = hit
                else:
                    todo.append((i, jt))
            if todo:
                if len(todo) <= max(0, self.settings.sync_max_tasks):
                    self._predict_waiting(conn, model, project, todo, results)
                else:
                    self._predict_batch(conn, model, project, todo, results, push=True)
        except (redis.RedisError, OSError) as exc:
            raise self._unavailable(exc) from None
        return [r for r in results]   # every entry is set

    def _enqueue(self, conn, model, project, todo, *, priority: str, push: bool, chunk: int):
        return enqueue_predictions(conn, project=project or "_", tasks=[jt for _, jt in todo],
                                   label_config=model.label_config, model_version=model.model_version,
                                   priority=priority, chunk_size=chunk, push=push,
                                   label_studio=self._creds(model))

    def _predict_batch(self, conn, model, project, todo, results, *, push: bool) -> list:
        chunk = max(1, self.settings.batch_chunk)
        jobs = self._enqueue(conn, model, project, todo, priority="batch", push=push, chunk=chunk)
        pipe = conn.pipeline(transaction=False)
        for n, (i, jt) in enumerate(todo):
            job = jobs[n // chunk][0]
            results[i] = {"model_version": model.model_version, "score": 0.0, "status": "queued", "job": job.id}
            if push:
                pipe.set(push_owner_key(jt["id"], model.model_version), job.id, ex=24 * 3600)
        pipe.execute()
        return jobs

    def _predict_waiting(self, conn, model, project, todo, results, interactive: bool = False) -> None:
        from rq.exceptions import InvalidJobOperation
        from rq.job import JobStatus

        from backend.storage.keys import push_late_key

        (job, _), = self._enqueue(conn, model, project, todo, priority="interactive", push=False,
                                  chunk=len(todo))
        deadline = time.monotonic() + max(0.0, self.settings.predict_deadline)
        status = job.get_status(refresh=True)
        while status not in (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED) \
                and time.monotonic() < deadline:
            time.sleep(_POLL)
            status = job.get_status(refresh=True)
        version = model.model_version
        if status == JobStatus.FINISHED:
            predictions = (job.return_value() or {}).get("predictions", {})
            for i, jt in todo:
                results[i] = predictions.get(str(jt["id"])) or \
                    {"model_version": version, "score": 0.0, "error": "the worker returned no prediction"}
            return
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            job.refresh()
            errors = dict(job.meta.get("errors") or {})
            info = job_info(conn, job.id) or {}
            cache = ResultCache(conn, ttl=self.settings.result_ttl)
            for i, jt in todo:   # tasks of the job that did succeed are in the cache
                hit = cache.get(jt["id"], "ref:" + jt["image"], ls_cache_tags(jt["tags"]), version)
                results[i] = hit or {"model_version": version, "score": 0.0,
                                     "error": errors.get(str(jt["id"])) or info.get("error") or f"job {status.value}"}
            return
        if interactive:      # a smart tool's answer is of no use later, and is never a stored prediction
            try:
                job.cancel()
            except InvalidJobOperation:    # another request waiting on the same job cancelled it first
                pass
            for i, jt in todo:
                results[i] = {"model_version": version, "score": 0.0,
                              "error": f"the smart tool's answer was not ready within "
                                       f"{self.settings.predict_deadline:.0f} s (TAG2MASK_PREDICT_DEADLINE): "
                                       "are workers running (tag2mask worker)?"}
            return
        # deadline: let the job write its predictions to Label Studio itself
        conn.set(push_late_key(job.id), 1, ex=7 * 24 * 3600)
        log.warning("job %s not done within %.0f s (TAG2MASK_PREDICT_DEADLINE): its predictions will be "
                    "pushed to Label Studio by the worker", job.id, self.settings.predict_deadline)
        for i, jt in todo:
            results[i] = {"model_version": version, "score": 0.0, "status": str(status.value if status else "queued"),
                          "job": job.id}

    # -- webhooks, progress ------------------------------------------------------------------
    def prelabel(self, model, tasks: list, project: str | None) -> dict:
        """Enqueue batch pre-labeling (pushed by workers) of Label Studio tasks; returns
        ``{"status": "queued", "tasks": n, "jobs": [ids], "skipped": n}``, plus ``"errors": [{"index",
        "error"}]`` for the first MAX_LISTED_ERRORS skipped tasks (the sentences ``/predict`` gives)."""
        config = model.use_label_config(None)
        todo, refused = self._job_tasks(list(tasks or []), config)
        skipped = len(refused)
        reply_errors = {"errors": [{"index": i, "error": reason} for i, reason in
                                   list(refused.items())[:MAX_LISTED_ERRORS]]} if refused else {}
        if not todo:
            return {"status": "queued", "tasks": 0, "jobs": [], "skipped": skipped, **reply_errors}
        try:
            conn = self.connection()
            results: list = [None] * (len(tasks))
            jobs = self._predict_batch(conn, model, project, todo, results, push=True)
        except (redis.RedisError, OSError) as exc:
            raise self._unavailable(exc) from None
        return {"status": "queued", "tasks": len(todo), "jobs": [j.id for j, _ in jobs], "skipped": skipped,
                **reply_errors}

    def job(self, job_id: str) -> dict | None:
        try:
            conn = self.connection()
            conn.ping()          # job_info reads "unknown job" into any error: tell an outage apart
            return job_info(conn, job_id)
        except (redis.RedisError, OSError) as exc:
            raise self._unavailable(exc) from None

    def progress(self, project: str) -> dict:
        try:
            return project_progress(self.connection(), project)
        except (redis.RedisError, OSError) as exc:
            raise self._unavailable(exc) from None
