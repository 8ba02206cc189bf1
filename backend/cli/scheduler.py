"""``python -m backend.cli.scheduler [--interval S] [--once] [--redis-url URL]``: the training scheduler
loop alone (backend.training.schedule.run_training_scheduler), without RQ's janitor; ``tag2mask worker
--scheduler`` runs both.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Sequence

from backend.cli.common import log_level_option, start_logging


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m backend.cli.scheduler",
                                description="Check every project every TRAIN_INTERVAL seconds and queue a "
                                            "training when TRAIN_MIN_NEW examples changed.")
    p.add_argument("--interval", type=float, default=None, help="seconds between checks (default: $TRAIN_INTERVAL)")
    p.add_argument("--once", action="store_true", help="one check, print it as JSON, exit")
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL, else the embedded Valkey")
    log_level_option(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    start_logging(args)
    from backend.settings import Settings
    from backend.storage.connection import get_connection
    from backend.training.schedule import check_projects, run_training_scheduler

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
    sys.exit(main())
