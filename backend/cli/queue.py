"""``tag2mask jobs`` and ``tag2mask up``: the job queue from the command line.

    tag2mask jobs [--project P] [--watch] [--interval S] [--json]
        queue counts (queued / started / finished / failed per queue), or one project's progress
        (queued / running / done / failed tasks, rate, ETA); --watch: a progress bar until done
    tag2mask up [--host H] [--port P] [--no-scheduler] [--device D]
        one machine: the embedded Valkey (unless REDIS_URL is set), one worker, the scheduler (RQ's
        janitor and the training scheduler: ``backend.worker --scheduler``) and the
        web server (TAG2MASK_QUEUE=on); Ctrl-C / SIGTERM stops them all, and the Valkey it started
    tag2mask dashboard [--host H] [--port P] [--redis-url URL]
        rq-dashboard (queues, jobs, workers, failures with their reasons) on the queue's server:
        --redis-url, else $REDIS_URL, else the running embedded Valkey of $MODEL_DIR

:func:`add_parsers` hooks them into backend/cli/main.py's sub-commands.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Sequence

from backend.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    child_environment,
    host_port_options,
)
from backend.settings import Settings

__all__ = ["add_parsers", "cmd_jobs", "cmd_up", "Stack", "cmd_dashboard", "dashboard_app", "DASHBOARD_PORT"]


def _err(message: str) -> None:
    print(f"tag2mask: error: {message}", file=sys.stderr)


# -- tag2mask jobs --------------------------------------------------------------------------------
def _connect():
    from backend.storage.connection import (
        RedisUnavailable,
        get_connection,
        wait_until_up,
    )

    try:
        conn = get_connection(start_embedded=False)
        wait_until_up(conn, timeout=3)
    except RedisUnavailable as exc:
        _err(f"{exc} (is `tag2mask up` running?)")
        return None
    return conn


def _stage_text(training: dict) -> str:
    """The training job's stage as text: "pseudo-masks 12/40", or only its name when it has no count."""
    if training.get("total"):
        return f"{training['stage']} {training['done']}/{training['total']}"
    return str(training["stage"])


def _progress_line(p: dict) -> str:
    rate = f"{p['rate']:.2f} tasks/s" if p.get("rate") else "rate -"
    eta = f"ETA {p['eta_s']:.0f} s" if p.get("eta_s") is not None else "ETA -"
    line = (f"project {p['project']}: {p['tasks']} tasks in {p['jobs']} jobs: {p['queued']} queued, "
            f"{p['running']} running, {p['done']} done, {p['failed']} failed; {rate}, {eta}")
    training = p.get("training")
    if training:
        line += f"; training {training['status']}"
        if training.get("stage"):
            line += f" ({_stage_text(training)})"
    return line


def cmd_jobs(args) -> int:
    import redis

    from backend.queue.queues import project_progress, queue_counts

    conn = _connect()
    if conn is None:
        return EXIT_FAILED
    try:
        if args.project is None:
            counts = queue_counts(conn)
            if args.json:
                print(json.dumps(counts, indent=2))
            else:
                print(f"{'queue':28s} {'queued':>7s} {'started':>8s} {'finished':>9s} {'failed':>7s}")
                for name, c in counts.items():
                    print(f"{name:28s} {c['queued']:7d} {c['started']:8d} {c['finished']:9d} {c['failed']:7d}")
            return EXIT_OK
        progress = project_progress(conn, args.project)
        if not args.watch:
            print(json.dumps(progress, indent=2) if args.json else _progress_line(progress))
            return EXIT_OK if progress["failed"] == 0 else EXIT_FAILED
        from tqdm import tqdm

        bar = tqdm(total=progress["tasks"], unit="task", desc=f"project {args.project}", dynamic_ncols=True)
        try:
            while True:
                bar.total = progress["tasks"]
                bar.n = progress["done"] + progress["failed"]
                bar.set_postfix(queued=progress["queued"], running=progress["running"], failed=progress["failed"],
                                eta=f"{progress['eta_s']:.0f}s" if progress.get("eta_s") is not None else "-",
                                refresh=False)
                bar.refresh()
                training = progress.get("training") or {}
                if progress["queued"] + progress["running"] == 0 and training.get("status") not in ("queued", "started"):
                    break
                if training.get("status") == "started" and training.get("stage"):
                    bar.set_description(f"project {args.project} ({_stage_text(training)})", refresh=False)
                time.sleep(args.interval)
                progress = project_progress(conn, args.project)
        finally:
            bar.close()
        print(_progress_line(progress))
        return EXIT_OK if progress["failed"] == 0 else EXIT_FAILED
    except redis.RedisError as exc:
        _err(f"the queue server stopped answering: {exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


# -- tag2mask up ----------------------------------------------------------------------------------
class Stack:
    """The processes of ``tag2mask up``: each in its own session (so a terminal's Ctrl-C reaches only
    this parent, which stops them in order: web server, worker, scheduler, then the Valkey it started)."""

    def __init__(self, host: str, port: int, device: str | None = None, scheduler: bool = True,
                 log=None):
        self.host, self.port, self.device, self.scheduler = host, port, device, scheduler
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.valkey = None          # EmbeddedValkey started here (stopped at the end)
        self.url: str | None = None
        self.log = log or (lambda msg: print(f"tag2mask up: {msg}", file=sys.stderr, flush=True))

    def start(self) -> None:
        from backend.storage.connection import EmbeddedValkey, wait_until_up

        url = Settings.from_env().redis_url
        if not url:
            server = EmbeddedValkey()
            running = server.status()
            url = server.ensure_running()
            if running is None:
                self.valkey = server
            self.log(f"embedded Valkey at {url} (data in {server.data_dir})"
                     f"{'' if running is None else ', already running'}")
        else:
            wait_until_up(url, timeout=10)
            self.log(f"Redis at {url}")
        self.url = url
        env = child_environment(REDIS_URL=url, TAG2MASK_QUEUE="on",
                                **({"TAG2MASK_DEVICE": self.device} if self.device else {}))
        worker = [sys.executable, "-m", "backend.worker", "--preload"]
        if self.device:
            worker += ["--device", self.device]
        self._spawn("worker", worker, env)
        if self.scheduler:
            self._spawn("scheduler", [sys.executable, "-m", "backend.worker", "--scheduler"], env)
        self._spawn("web", [sys.executable, "-m", "backend.serve", "--host", self.host, "--port", str(self.port)], env)
        self.log(f"ML backend on http://{self.host}:{self.port} (Ctrl-C stops everything)")

    def _spawn(self, name: str, cmd: list[str], env: dict) -> None:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        self.procs.append((name, proc))

    def dead(self) -> list[str]:
        return [f"{name} (exit {p.returncode})" for name, p in self.procs if p.poll() is not None]

    def stop(self, timeout: float = 30.0) -> None:
        for name, proc in reversed(self.procs):       # web first: no new jobs; then the worker
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for name, proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log(f"{name} did not stop within {timeout:.0f} s: killed")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)
            try:   # leftovers of its group (gunicorn workers)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.valkey is not None:
            self.valkey.stop()
            self.log("embedded Valkey stopped")
            self.valkey = None


def cmd_up(args) -> int:
    from backend.storage.connection import RedisUnavailable

    stack = Stack(args.host, args.port, device=args.device, scheduler=not args.no_scheduler)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = EXIT_OK
    try:
        try:
            stack.start()
        except RedisUnavailable as exc:
            _err(str(exc))
            return EXIT_FAILED
        while not stop.wait(0.5):
            dead = stack.dead()
            if dead:
                _err(f"stopped: {', '.join(dead)} exited")
                code = EXIT_FAILED
                break
    finally:
        stack.log("stopping")
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


# -- tag2mask dashboard ---------------------------------------------------------------------------
DASHBOARD_PORT = 9181   # rq-dashboard's own default


def dashboard_app(redis_url: str, username: str | None = None, password: str | None = None):
    """rq-dashboard's Flask app (pinned 0.9.0, works with rq 3.0.0) reading `redis_url`; HTTP basic
    auth when `username` and `password` are given. Its JSON API: ``/0/data/queues.json``,
    ``/0/data/jobs/<queue>/<registry>/<per page>/asc/<page>.json``, ``/0/data/job/<id>.json``,
    ``/0/data/workers.json``."""
    from rq_dashboard.cli import make_flask_app
    from rq_dashboard.web import setup_rq_connection

    app = make_flask_app(None, username if password else None, password, "")
    app.config["RQ_DASHBOARD_REDIS_URL"] = redis_url
    setup_rq_connection(app)
    return app


def cmd_dashboard(args) -> int:
    from backend.queue.queues import PRIORITIES, queue_name
    from backend.storage.connection import RedisUnavailable, redis_url, wait_until_up

    try:
        import rq_dashboard  # noqa: F401
    except ImportError:
        _err("rq-dashboard is not installed: pip install 'tag2mask[dashboard]'")
        return EXIT_FAILED
    try:
        url = args.redis_url or redis_url(start_embedded=False)
        wait_until_up(url, timeout=3)
    except RedisUnavailable as exc:
        _err(f"{exc} (is `tag2mask up` running?)")
        return EXIT_FAILED
    settings = Settings.from_env()
    user, password = settings.basic_auth_user, settings.basic_auth_pass
    app = dashboard_app(url, user, password)
    print(f"rq-dashboard on http://{args.host}:{args.port} for {url}; tag2mask's queues: "
          f"{', '.join(queue_name(p) for p in PRIORITIES)}", file=sys.stderr, flush=True)
    app.run(host=args.host, port=args.port, threaded=True)
    return EXIT_OK


def add_parsers(sub) -> None:
    """Add ``jobs``, ``up`` and ``dashboard`` to backend/cli/main.py's sub-parsers."""
    p = sub.add_parser("jobs", help="job queue counts, or a project's prediction progress",
                       description="Queue counts per queue, or --project P's progress (queued / running / "
                                   "done / failed tasks, rate, ETA). Uses $REDIS_URL, else the embedded Valkey.")
    p.add_argument("--project", default=None, help="a Label Studio project id")
    p.add_argument("--watch", action="store_true", help="a progress bar until the project's jobs are done")
    p.add_argument("--interval", type=float, default=1.0, help="--watch refresh period, seconds (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("up", help="embedded Valkey + a worker + the scheduler + the web server, on one machine",
                       description="Start everything for one machine: the embedded Valkey (unless REDIS_URL is "
                                   "set), one worker, the scheduler and the ML backend (TAG2MASK_QUEUE=on). "
                                   "Ctrl-C or SIGTERM stops them all.")
    host_port_options(p)
    p.add_argument("--device", default=None, help="the worker's torch device (default: $TAG2MASK_DEVICE)")
    p.add_argument("--no-scheduler", action="store_true", help="no scheduler process")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("dashboard", help="rq-dashboard on the job queue (queues, jobs, workers, failures)",
                       description="Serve rq-dashboard for the queue's Redis: --redis-url, else $REDIS_URL, else the "
                                   "running embedded Valkey of $MODEL_DIR. BASIC_AUTH_USER/_PASS protect it when "
                                   "set. Needs the `dashboard` extra (pip install 'tag2mask[dashboard]').")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    p.add_argument("--port", type=int, default=DASHBOARD_PORT, help=f"default: {DASHBOARD_PORT}")
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL, else the embedded Valkey")
    p.set_defaults(func=cmd_dashboard)


def main(argv: Sequence[str] | None = None) -> int:   # pragma: no cover - use `tag2mask`
    parser = argparse.ArgumentParser(prog="tag2mask")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
