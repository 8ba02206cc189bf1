"""Real Redis servers for the queue tests, and small job functions the worker subprocesses import.

Two servers, same tests: the embedded Valkey started by backend.storage.connection (in a temporary data
folder, stopped at the end of the session) and the machine's Redis at 127.0.0.1:6379 (db 11;
skipped with a message when it does not answer). Each test gets its own namespace token
(``t2mtest-<hex>``) used for queue names, job ids and worker names; every key containing the
token is deleted afterwards, so tests never touch other users' keys.

Import in tests with ``from redis_servers import ...`` (pytest puts tests/ on sys.path); worker
subprocesses get ``PYTHONPATH=<repo>:<repo>/tests`` from :func:`worker_env`.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

REPO = Path(__file__).resolve().parents[1]
SYSTEM_REDIS_URL = os.environ.get("TAG2MASK_TEST_SYSTEM_REDIS", "redis://127.0.0.1:6379/11")


# -- job functions (run inside worker subprocesses) -----------------------------------------
def record(key: str, label: str, sleep: float = 0.0) -> str:
    """Sleep, then append `label` to the Redis list `key`: the list shows what ran, in order, how often."""
    from rq import get_current_job

    time.sleep(sleep)
    get_current_job().connection.rpush(key, label)
    return label


def fail(message: str) -> None:
    raise ValueError(message)


# -- servers --------------------------------------------------------------------------------
@dataclass
class Server:
    kind: str           # "embedded" | "system"
    url: str
    token: str          # namespace token of the current test

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


def system_redis_or_skip() -> str:
    try:
        client = redis.Redis.from_url(SYSTEM_REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
        client.ping()
        client.close()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"the machine's Redis at {SYSTEM_REDIS_URL} does not answer PING ({exc}); "
                    "only the embedded-Valkey half of these tests ran")
    return SYSTEM_REDIS_URL


def delete_token_keys(client: redis.Redis, token: str) -> int:
    """Delete every key whose name contains `token`, and set members naming it (rq:workers, rq:queues)."""
    n = 0
    for key in client.scan_iter(match=f"*{token}*", count=500):
        n += client.delete(key)
    for key in client.scan_iter(match="rq:*", count=500):
        if client.type(key) == b"set":
            members = [m for m in client.smembers(key) if token.encode() in m]
            if members:
                client.srem(key, *members)
    return n


def worker_env(server: Server, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "REDIS_URL": server.url,
        "TAG2MASK_NAMESPACE": server.token,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")]),
        "TAG2MASK_THREADS": "1",
        "LOG_LEVEL": "INFO",
        "PYTHONFAULTHANDLER": "1",     # SIGABRT dumps every thread's stack into the log (run_worker's timeout)
        # workers read photos through backend.labelstudio.photos: local files only inside these roots
        "TAG2MASK_LOCAL_ROOTS": os.pathsep.join([str((REPO.parent / "shared" / "data" / "weizmann_horse").resolve()),
                                                 tempfile.gettempdir()]),
    })
    env.update(extra)
    return env


def start_worker(server: Server, *args: str, env: dict[str, str] | None = None,
                 log: Path | None = None) -> subprocess.Popen:
    """``python -m backend.worker <args>`` in a subprocess (its output to `log`)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "backend.worker", *args], cwd=REPO,
                            env=env or worker_env(server), stdout=out, stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (RQ's warm shutdown: the job in hand finishes), then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_worker(server: Server, *args: str, timeout: float = 60, env: dict[str, str] | None = None,
               log: Path | None = None) -> int:
    """Run a (``--burst``) worker to its end; one still running after `timeout` s is made to dump its
    threads' stacks (SIGABRT, faulthandler), killed, and failed with the end of its log."""
    proc = start_worker(server, *args, env=env, log=log)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        tail = log.read_text(errors="replace")[-6000:] if log and log.exists() else "(no log kept)"
        raise AssertionError(f"the worker {' '.join(args)} still ran after {timeout:.0f} s; "
                             f"its log ends:\n{tail}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def refused_port() -> tuple[socket.socket, int]:
    """A loopback port that refuses connections at once: bound (so nothing else takes it) but not
    listening. Keep the socket open while the port is in use; close it after."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]


def new_token() -> str:
    return f"t2mtest-{uuid.uuid4().hex[:10]}"


# -- fixtures (import them into a test module: ``from redis_servers import embedded_valkey, server``)
@pytest.fixture(scope="session")
def embedded_valkey(tmp_path_factory):
    """The embedded Valkey of backend.storage.connection, data in a temporary MODEL_DIR; stopped at the end."""
    from backend.storage.connection import EmbeddedValkey

    data_dir = tmp_path_factory.mktemp("model_dir") / "valkey"
    server = EmbeddedValkey(data_dir)
    url = server.ensure_running()
    yield server, url
    server.stop()


@pytest.fixture(params=["embedded", "system"])
def server(request, monkeypatch):
    """A real server (embedded Valkey, then the machine's Redis) with a fresh namespace token,
    exported as $TAG2MASK_NAMESPACE; the token's keys are deleted afterwards."""
    if request.param == "embedded":
        _, url = request.getfixturevalue("embedded_valkey")
    else:
        url = system_redis_or_skip()
    token = new_token()
    monkeypatch.setenv("TAG2MASK_NAMESPACE", token)
    srv = Server(request.param, url, token)
    client = srv.client()
    yield srv
    delete_token_keys(client, token)
    client.close()
