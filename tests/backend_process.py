"""The real backend as a process for tests: ``python -m backend.serve`` (gunicorn) on a free
127.0.0.1 port, in its own process group, stopped with SIGTERM (SIGKILL after 15 s).

    env = backend_env(TAG2MASK_PRESET="fast", MODEL_DIR=str(tmp / "md"))
    with backend_process(port := free_port(), env, cwd=tmp, threads=2) as proc:
        ...   # http://127.0.0.1:<port>
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys

from tests.conftest import REPO

# variables of the test machine that would change the server's behaviour
_DROPPED = ("LABEL_STUDIO", "BASIC_AUTH", "TAG2MASK_", "REDIS_URL")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def backend_env(**extra: str) -> dict[str, str]:
    """This process's environment without the backend's own settings, one torch thread, the repo on
    the path, warnings-only logs, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED)}
    env.update(TAG2MASK_THREADS="1", PYTHONPATH=str(REPO), LOG_LEVEL="WARNING")
    env.update(extra)
    return env


def stop_process_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def backend_process(port: int, env: dict[str, str], cwd, threads: int = 2, stdout=subprocess.PIPE):
    """The server listening on 127.0.0.1:`port` (not yet answering: poll /health), stopped on exit."""
    proc = subprocess.Popen([sys.executable, "-m", "backend.serve", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1", "--threads", str(threads)], cwd=str(cwd), env=env,
                            stdout=stdout, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process_group(proc)
