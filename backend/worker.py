"""RQ worker for tag2mask jobs, in-process (never forks), plus the scheduler/janitor loop.

``python -m backend.worker [--queues interactive batch] [--device cuda:0] [--batch-size 8] [--burst]``
(``tag2mask worker``).

* :class:`Tag2MaskWorker` is an RQ ``SimpleWorker``: jobs run in the worker process itself, so the
  model loaded by the first job stays on the device for every later job and nothing ever forks
  after CUDA has been initialised. One worker per GPU; workers on other hosts need only
  ``REDIS_URL`` and ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY``. A job's photos reach the engine
  ``--batch-size`` (``$TAG2MASK_BATCH_SIZE``, default 8) at a time (see backend/jobs.py).
* While a job runs, a heartbeat thread refreshes the job's entry in RQ's StartedJobRegistry every
  ``ttl/3`` s with a short TTL (``$TAG2MASK_JOB_HEARTBEAT_TTL``, default 60 s) instead of
  SimpleWorker's "job timeout + 60 s". When a worker dies (SIGKILL, OOM, host lost) its entries
  expire within that TTL and RQ's registry cleanup (run by every worker at start and every
  ``$TAG2MASK_MAINTENANCE_INTERVAL`` s, and by the scheduler loop) requeues the job while it has
  retries left (jobs are enqueued with ``Retry``), else records it failed (AbandonedJobError).
* :func:`run_scheduler` (``--scheduler``) runs no jobs: it moves due scheduled/retried jobs to their
  queues and cleans the registries every few seconds (the compose "scheduler" service), and, in a
  thread, :func:`backend.training_jobs.run_training_scheduler` (queues a project's retraining every
  ``TRAIN_INTERVAL`` s when enough examples changed, mirrors promoted models into Redis; it needs
  ``MODEL_DIR``; ``--no-training`` leaves it out).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import uuid
from typing import Sequence

import redis
from rq.job import Job
from rq.queue import Queue
from rq.registry import clean_registries
from rq.scheduler import RQScheduler
from rq.worker import SimpleWorker, WorkerStatus
from rq import worker_registration

from backend.queues import PRIORITIES, get_queues
from backend.redis_conn import get_connection, wait_until_up

__all__ = ["Tag2MaskWorker", "make_worker", "run_worker", "run_scheduler", "clean_queues", "build_parser", "main"]

log = logging.getLogger("tag2mask.worker")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


class Tag2MaskWorker(SimpleWorker):
    """SimpleWorker (no fork) whose running jobs keep a short, refreshed StartedJobRegistry lease."""

    def __init__(self, *args, job_heartbeat_ttl: int | None = None, **kwargs):
        kwargs.setdefault("maintenance_interval", _env_int("TAG2MASK_MAINTENANCE_INTERVAL", 60))
        super().__init__(*args, **kwargs)
        self.running: tuple[Job, object] | None = None
        self.job_heartbeat_ttl = max(2, int(job_heartbeat_ttl or _env_int("TAG2MASK_JOB_HEARTBEAT_TTL", 60)))

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.job_heartbeat_ttl

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
                job_heartbeat_ttl: int | None = None) -> Tag2MaskWorker:
    queues = get_queues(connection, priorities)
    name = name or f"tag2mask-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return Tag2MaskWorker(queues, connection=connection, name=name, job_heartbeat_ttl=job_heartbeat_ttl)


def run_worker(priorities: Sequence[str] | None = None, *, device: str | None = None, burst: bool = False,
               connection: redis.Redis | None = None, name: str | None = None, preload: bool = False,
               max_jobs: int | None = None, logging_level: str = "INFO",
               stop: threading.Event | None = None, batch_size: int | None = None) -> bool:
    """Work the queues (priority order) in this process until stopped (or empty, with `burst`).

    `device` (e.g. ``cuda:0``) is exported as ``$TAG2MASK_DEVICE`` and `batch_size` (photos per engine
    call) as ``$TAG2MASK_BATCH_SIZE``, for the jobs (:mod:`backend.jobs`, whose engine is
    :func:`backend.model.get_engine`'s); `preload` builds the engine before the first job. RQ's
    worker quits when Redis goes away in the middle of a job; this loop then waits for the server
    to answer again and starts a fresh RQ worker in the same process (the engine stays loaded), so
    a Redis/Valkey restart only pauses the work. The job that was running when the server vanished
    is requeued by the registry cleanup (it may run again: pushes are idempotent). Returns whether
    any job was processed.
    """
    if device:
        os.environ["TAG2MASK_DEVICE"] = device
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, not {batch_size}")
        os.environ["TAG2MASK_BATCH_SIZE"] = str(batch_size)
    connection = connection or get_connection()
    wait_until_up(connection, timeout=float(os.environ.get("TAG2MASK_REDIS_WAIT", 30)))
    if preload:   # the engine Label Studio tasks use (backend.model, settings from the environment)
        from backend.model import get_engine
        from backend.settings import Settings
        get_engine(Settings.from_env())
    stop = stop or threading.Event()
    worked = False
    generation = quick_restarts = 0
    while not stop.is_set():
        worker = make_worker(connection, priorities, name=name if generation == 0 else f"{name}-{generation}"
                             if name else None)
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
                  interval: float = 5.0, stop: threading.Event | None = None, training: bool = True) -> None:
    """Scheduler/janitor loop: enqueue due scheduled jobs (RQ's scheduler lock keeps one active
    per queue) and clean the registries every `interval` seconds, until SIGTERM/SIGINT or `stop`.
    With `training`, the training scheduler loop runs in a thread beside it (same `stop`)."""
    connection = connection or get_connection()
    wait_until_up(connection, timeout=float(os.environ.get("TAG2MASK_REDIS_WAIT", 30)))
    queues = get_queues(connection, priorities)
    scheduler = RQScheduler(queues, connection=connection, interval=max(1, int(interval)))
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    scheduler.register_birth()
    trainer = None
    if training:
        from backend.training_jobs import run_training_scheduler

        def _train_loop():
            try:
                run_training_scheduler(connection, stop_event=stop)
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tag2mask worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--queues", nargs="+", default=list(PRIORITIES), choices=PRIORITIES,
                   help="queues to work, highest priority first (default: all)")
    p.add_argument("--device", default=os.environ.get("TAG2MASK_DEVICE"), help="e.g. cpu, cuda:0 (default: auto)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="photos sent to the engine in one call (default: $TAG2MASK_BATCH_SIZE or 8)")
    p.add_argument("--burst", action="store_true", help="quit when the queues are empty")
    p.add_argument("--max-jobs", type=int, default=None)
    p.add_argument("--name", default=None, help="worker name (default: host-pid-random)")
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL, else the embedded Valkey")
    p.add_argument("--preload", action="store_true", help="load the model before taking jobs")
    p.add_argument("--scheduler", action="store_true",
                   help="run the scheduler/janitor loop instead of a worker (no jobs)")
    p.add_argument("--interval", type=float, default=5.0, help="scheduler loop period, seconds")
    p.add_argument("--no-training", action="store_true",
                   help="with --scheduler: no training scheduler loop (retraining checks, model sync)")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = get_connection(args.redis_url)
    if args.scheduler:
        run_scheduler(conn, args.queues, interval=args.interval, training=not args.no_training)
        return 0
    run_worker(args.queues, device=args.device, burst=args.burst, connection=conn, name=args.name,
               preload=args.preload, max_jobs=args.max_jobs, logging_level=args.log_level.upper(),
               batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
