"""RQ worker for tag2mask jobs, in-process (never forks), plus the scheduler/janitor loop.

``python -m backend.worker [--queues interactive batch] [--device cuda:0] [--batch-size 8] [--burst]``
(``tag2mask worker``).

* :class:`Tag2MaskWorker` is an RQ ``SimpleWorker``: jobs run in the worker process itself, so the
  model loaded by the first job stays on the device for every later job and nothing ever forks
  after CUDA has been initialised. One worker per GPU; workers on other hosts need only
  ``REDIS_URL`` and ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY``. A job's photos reach the engine
  ``--batch-size`` (``$TAG2MASK_BATCH_SIZE``, default 8) at a time (see backend/jobs.py). The worker's
  settings (the environment's, with ``--device`` and ``--batch-size`` on top) are the process
  settings of the jobs it runs (:func:`backend.serving.predict.use_settings`).
* While a job runs, a heartbeat thread refreshes the job's entry in RQ's StartedJobRegistry every
  ``ttl/3`` s with a short TTL (``$TAG2MASK_JOB_HEARTBEAT_TTL``, default 60 s) instead of
  SimpleWorker's "job timeout + 60 s". When a worker dies (SIGKILL, OOM, host lost) its entries
  expire within that TTL and RQ's registry cleanup (run by every worker at start and every
  ``$TAG2MASK_MAINTENANCE_INTERVAL`` s, and by the scheduler loop) requeues the job while it has
  retries left (jobs are enqueued with ``Retry``), else records it failed (AbandonedJobError).
* :func:`run_scheduler` (``--scheduler``) runs no jobs: it moves due scheduled/retried jobs to their
  queues and cleans the registries every few seconds (the compose "scheduler" service), and, in a
  thread, :func:`backend.training.schedule.run_training_scheduler` (queues a project's retraining every
  ``TRAIN_INTERVAL`` s when enough examples changed, mirrors promoted models into Redis; it needs
  ``MODEL_DIR``; ``--no-training`` leaves it out).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import uuid
from dataclasses import replace
from typing import Sequence

import redis
from rq import worker_registration
from rq.job import Job
from rq.queue import Queue
from rq.registry import clean_registries
from rq.scheduler import RQScheduler
from rq.worker import SimpleWorker, WorkerStatus

from backend.queue.queues import get_queues
from backend.settings import Settings
from backend.storage.connection import get_connection, wait_until_up

__all__ = ["Tag2MaskWorker", "make_worker", "run_worker", "run_scheduler", "clean_queues"]

log = logging.getLogger("tag2mask.worker")


class Tag2MaskWorker(SimpleWorker):
    """SimpleWorker (no fork) whose running jobs keep a short, refreshed StartedJobRegistry lease
    (`job_heartbeat_ttl`, default ``settings.job_heartbeat_ttl``; registry clean-ups every
    ``settings.maintenance_interval`` s; `settings` default: the environment's)."""

    def __init__(self, *args, job_heartbeat_ttl: int | None = None, settings: Settings | None = None, **kwargs):
        settings = settings or Settings.from_env()
        kwargs.setdefault("maintenance_interval", settings.maintenance_interval)
        super().__init__(*args, **kwargs)
        self.running: tuple[Job, object] | None = None
        self.job_heartbeat_ttl = max(2, int(job_heartbeat_ttl or settings.job_heartbeat_ttl))

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_heartbeat_ttl

    def unsubscribe(self):
        """RQ's unsubscribe from the worker's command channel, with the wait for the pub/sub thread
        bounded (1 s; it is a daemon thread). redis-py 8.2's ``PubSubWorkerThread.stop()`` joins the
        thread without a timeout, and a thread that has already seen the unsubscription waits up to
        RQ's ``sleep_time`` (60 s) for a new subscription before it looks at the stop: a ``--burst``
        worker then outlived its last job by a minute (seen in CI). Idempotent."""
        thread, self.pubsub_thread = self.pubsub_thread, None
        if not thread:
            return
        self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
        self.pubsub.unsubscribe()
        try:
            thread.stop(timeout=1)      # redis-py >= 8.2: stop() joins the thread
        except TypeError:               # older: stop() only clears the run flag
            thread.stop()
            thread.join(timeout=1)
        self.pubsub.close()

    @property
    def shutdown_requested(self) -> bool:
        """SIGTERM/SIGINT (warm or cold shutdown) was received."""
        return bool(self._stop_requested or self._shutdown_requested_date is not None)

    def execute_job(self, job: Job, queue: Queue):
        execution = self.prepare_execution(job)
        self.running = (job, execution)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat_while_running, args=(job, execution, stop),
                                name=f"heartbeat-{job.id}", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join(timeout=10)
        self.running = None
        self.set_state(WorkerStatus.IDLE)

    def release_running_job(self) -> str | None:
        """After this worker lost Redis in the middle of a job: expire that job's StartedJobRegistry
        lease now and run RQ's cleanup, which requeues it (retries left) or records it failed
        (AbandonedJobError), without waiting for the lease to run out. Returns the job id."""
        if not getattr(self, "running", None):
            return None
        job, execution = self.running
        self.running = None
        registry = job.started_job_registry
        self.connection.zadd(registry.key, {execution.composite_key: 0}, xx=True)
        registry.cleanup()
        return job.id

    def _beat_while_running(self, job: Job, execution, stop: threading.Event) -> None:
        interval = max(0.5, self.job_heartbeat_ttl / 3.0)
        while not stop.wait(interval):
            try:
                self.maintain_heartbeats(job, execution)
            except Exception as exc:   # Redis briefly down: the next beat tries again
                self.log.warning("heartbeat for job %s failed: %s", job.id, exc)


def make_worker(connection: redis.Redis, priorities: Sequence[str] | None = None, *, name: str | None = None,
                job_heartbeat_ttl: int | None = None, settings: Settings | None = None) -> Tag2MaskWorker:
    queues = get_queues(connection, priorities)
    name = name or f"tag2mask-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return Tag2MaskWorker(queues, connection=connection, name=name, job_heartbeat_ttl=job_heartbeat_ttl,
                          settings=settings)


def run_worker(priorities: Sequence[str] | None = None, *, device: str | None = None, burst: bool = False,
               connection: redis.Redis | None = None, name: str | None = None, preload: bool = False,
               max_jobs: int | None = None, logging_level: str = "INFO",
               stop: threading.Event | None = None, batch_size: int | None = None,
               settings: Settings | None = None) -> bool:
    """Work the queues (priority order) in this process until stopped (or empty, with `burst`).

    The worker's settings are `settings` (default: the environment's) with `device` (e.g. ``cuda:0``)
    and `batch_size` (photos per engine call) on top when given; they become the process settings of
    the jobs it runs (:func:`backend.serving.predict.use_settings`; :mod:`backend.jobs`, whose engine is
    :func:`backend.serving.engine.get_engine`'s) and give the wait for Redis at start
    (``redis_wait``), the heartbeat TTL and the maintenance interval. `preload` builds the engine
    before the first job.

    RQ's worker quits when Redis goes away in the middle of a job; this loop then waits for the server
    to answer again and starts a fresh RQ worker in the same process (the engine stays loaded), so
    a Redis/Valkey restart only pauses the work. The job that was running when the server vanished
    is requeued by the registry cleanup (it may run again: pushes are idempotent). Returns whether
    any job was processed.
    """
    from backend.serving.predict import use_settings

    overrides: dict = {}
    if device:
        overrides["device"] = device
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        overrides["batch_size"] = int(batch_size)
    settings = Settings.from_env(**overrides) if settings is None else replace(settings, **overrides)
    use_settings(settings)
    connection = connection or get_connection()
    wait_until_up(connection, timeout=settings.redis_wait)
    if preload:   # the engine Label Studio tasks use (backend.serving.model), on the worker's settings
        from backend.serving.engine import get_engine, warm_smart_tools
        get_engine(settings)
        if priorities is None or "interactive" in priorities:     # and the backbones of a smart tool's box
            warm_smart_tools(settings)
    stop = stop or threading.Event()
    worked = False
    generation = quick_restarts = 0
    while not stop.is_set():
        worker = make_worker(connection, priorities, name=name if generation == 0 else f"{name}-{generation}"
                             if name else None, settings=settings)
        generation += 1
        lost_redis = False
        try:
            worked = worker.work(burst=burst, max_jobs=max_jobs, logging_level=logging_level) or worked
        except (redis.ConnectionError, redis.TimeoutError) as exc:   # e.g. in teardown, Redis gone
            log.warning("worker %s lost Redis: %s", worker.name, exc)
            lost_redis = True
        finally:
            try:
                worker.unsubscribe()    # idempotent; teardown may not have reached it
            except Exception:           # noqa: BLE001 - best effort on a broken connection
                pass
        if worker.shutdown_requested or stop.is_set():
            break
        if worker.running is None and _redis_answers(connection) and (burst or max_jobs is not None):
            break   # a burst worker that ran out of jobs, or reached max_jobs
        # RQ quit on an error (Redis went away): wait for the server, hand back the interrupted
        # job, start again. SIGTERM/SIGINT during the wait end the loop. If Redis never went away
        # (some other error), back off so a persistent fault cannot spin.
        if not lost_redis and worker.running is None and _redis_answers(connection):
            quick_restarts += 1
            log.error("worker %s stopped on an error with Redis up; restarting in %d s", worker.name,
                      min(60, 2 ** quick_restarts))
            stop.wait(min(60, 2 ** quick_restarts))
        else:
            quick_restarts = 0
        _wait_for_redis(connection, stop)
        if stop.is_set():
            break
        try:
            requeued = worker.release_running_job()
            if requeued:
                log.info("job %s was interrupted by the Redis outage: handed back to RQ", requeued)
        except redis.RedisError as exc:
            log.warning("could not hand back the interrupted job: %s", exc)
        log.info("Redis answers again: restarting the worker")
    return worked


def _redis_answers(connection: redis.Redis) -> bool:
    try:
        return bool(connection.ping())
    except (redis.RedisError, OSError):
        return False


def _wait_for_redis(connection: redis.Redis, stop: threading.Event, max_delay: float = 10.0) -> None:
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        delay = 0.5
        while not stop.is_set() and not _redis_answers(connection):
            log.warning("Redis does not answer; retrying in %.1f s", delay)
            stop.wait(delay)
            delay = min(max_delay, delay * 2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def clean_queues(connection: redis.Redis, priorities: Sequence[str] | None = None) -> None:
    """RQ's registry cleanup for our queues: expired StartedJobRegistry entries (dead workers) are
    requeued or failed, old finished/failed entries dropped, dead workers unregistered."""
    for queue in get_queues(connection, priorities):
        if queue.acquire_maintenance_lock():
            try:
                clean_registries(queue)
                worker_registration.clean_worker_registry(queue)
            finally:
                queue.release_maintenance_lock()


def run_scheduler(connection: redis.Redis | None = None, priorities: Sequence[str] | None = None,
                  interval: float = 5.0, stop: threading.Event | None = None, training: bool = True,
                  settings: Settings | None = None) -> None:
    """Scheduler/janitor loop: enqueue due scheduled jobs (RQ's scheduler lock keeps one active
    per queue) and clean the registries every `interval` seconds, until SIGTERM/SIGINT or `stop`.
    With `training`, the training scheduler loop runs in a thread beside it (same `stop`, same
    `settings`; default: the environment's, which also give the wait for Redis at start)."""
    settings = settings or Settings.from_env()
    connection = connection or get_connection()
    wait_until_up(connection, timeout=settings.redis_wait)
    queues = get_queues(connection, priorities)
    scheduler = RQScheduler(queues, connection=connection, interval=max(1, int(interval)))
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    scheduler.register_birth()
    trainer = None
    if training:
        from backend.training.schedule import run_training_scheduler

        def _train_loop():
            try:
                run_training_scheduler(connection, stop_event=stop, settings=settings)
            except Exception:   # noqa: BLE001 - reported; the janitor loop goes on
                log.exception("training scheduler stopped")
        trainer = threading.Thread(target=_train_loop, name="tag2mask-training-scheduler", daemon=True)
        trainer.start()
    try:
        while not stop.is_set():
            try:
                if scheduler.should_reacquire_locks or not scheduler.acquired_locks:
                    scheduler.acquire_locks()
                if scheduler.acquired_locks:
                    scheduler.heartbeat()
                    scheduler.enqueue_scheduled_jobs()
                clean_queues(connection, priorities)
            except redis.RedisError as exc:
                log.warning("scheduler: Redis error (%s); retrying in %.0f s", exc, interval)
            stop.wait(interval)
    finally:
        stop.set()
        if trainer is not None:
            trainer.join(timeout=10)
        try:
            scheduler.stop()
        except redis.RedisError:
            pass

