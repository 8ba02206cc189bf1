"""``tag2mask worker`` / ``python -m backend.worker``: the options of a job-queue worker
(backend.queue.worker) or, with ``--scheduler``, of the scheduler loop.
"""
from __future__ import annotations

import argparse
import logging
from typing import Sequence

from backend.cli.common import env_default, log_level_option, start_logging
from backend.queue.queues import PRIORITIES
from backend.queue.worker import run_scheduler, run_worker
from backend.storage.connection import get_connection

log = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tag2mask worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--queues", nargs="+", default=list(PRIORITIES), choices=PRIORITIES,
                   help="queues to work, highest priority first (default: all)")
    p.add_argument("--device", default=env_default("TAG2MASK_DEVICE"), help="e.g. cpu, cuda:0 (default: auto)")
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
    log_level_option(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging(args)
    conn = get_connection(args.redis_url)
    if args.scheduler:
        run_scheduler(conn, args.queues, interval=args.interval, training=not args.no_training)
        return 0
    run_worker(args.queues, device=args.device, burst=args.burst, connection=conn, name=args.name,
               preload=args.preload, max_jobs=args.max_jobs, logging_level=args.log_level.upper(),
               batch_size=args.batch_size)
    return 0
