"""A reusable harness for a real Label Studio (1.23.2) server and a real tag2mask backend process.

    from tests.labelstudio import LabelStudio, BackendProcess, ensure_ls_venv

    with LabelStudio() as ls, BackendProcess(env={"TAG2MASK_PRESET": "fast"}) as backend:
        project = ls.create_project("horses", DEFAULT_LABEL_CONFIG)
        task_ids = ls.import_files(project["id"], [photo1, photo2])
        ml = ls.connect_ml(project["id"], backend.url)
        ls.retrieve_predictions(project["id"])
        ls.predictions(task_ids[0])

- ``ensure_ls_venv()`` runs scripts/labelstudio_venv.sh (cached venv, default ~/.cache/tag2mask/ls-venv,
  override TAG2MASK_LS_VENV; ~40 s the first time, instant after).
- ``LabelStudio`` starts ``label-studio start`` on a free 127.0.0.1 port with a fresh data dir, a user
  and a legacy API token, the local-backend blocks off (ML_BLOCK_LOCAL_IP / SSRF_PROTECTION_ENABLED =
  false) and stray USERNAME/PASSWORD/USER_TOKEN removed; waits until the REST API answers with the
  token. Every REST helper raises ``LabelStudioError`` with the response body on a non-2xx.
- ``BackendProcess`` starts ``tag2mask serve`` (or ``python -m backend.serve``) on a free port.
- Both run in their own process group and are stopped by it (SIGTERM, then SIGKILL) in ``stop()``;
  their output goes to log files whose tail is shown when start-up fails.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[1]
LS_VERSION = "1.23.2"

__all__ = ["LabelStudio", "BackendProcess", "LabelStudioError", "ensure_ls_venv", "free_port", "REPO"]


class LabelStudioError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_ls_venv() -> Path:
    """The Label Studio venv (installed by scripts/labelstudio_venv.sh when missing)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "labelstudio_venv.sh")], capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0:
        raise LabelStudioError(f"installing label-studio failed:\n{out.stderr[-3000:]}")
    venv = Path(out.stdout.strip().splitlines()[-1])
    if not (venv / "bin" / "label-studio").exists():
        raise LabelStudioError(f"no label-studio in {venv}")
    return venv


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop_group(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class _Process:
    """A child in its own process group, with its output in a log file."""

    proc: subprocess.Popen | None = None
    log_path: Path

    def _spawn(self, cmd: list[str], env: dict, cwd: Path) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_until(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise LabelStudioError(f"{what} exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
            try:
                if check():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise LabelStudioError(f"{what} did not become ready in {timeout:.0f} s:\n{_tail(self.log_path)}")

    def stop(self) -> None:
        _stop_group(self.proc)
        if getattr(self, "_log", None):
            self._log.close()

    def __exit__(self, *exc) -> None:
        self.stop()


class LabelStudio(_Process):
    def __init__(self, venv: Path | None = None, data_dir: Path | None = None, port: int | None = None,
                 username: str = "u@x.org", password: str = "tag2mask-pass-1", token: str = "tag2masktoken0123456789",
                 extra_env: dict | None = None):
        self.venv = venv
        self.data_dir = Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="ls-data-"))
        self._own_dir = data_dir is None
        self.port = port or free_port()
        self.username, self.password, self.token = username, password, token
        self.extra_env = extra_env or {}
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / "label-studio.log"
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.headers["Authorization"] = f"Token {token}"
        self.start_seconds: float | None = None

    def start(self, timeout: float = 180) -> "LabelStudio":
        venv = self.venv or ensure_ls_venv()
        env = {k: v for k, v in os.environ.items()
               if k not in ("USERNAME", "PASSWORD", "USER_TOKEN") and not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}",
            "VIRTUAL_ENV": str(venv),
            "PYTHONUNBUFFERED": "1",
        })
        env.pop("PYTHONPATH", None)
        env.update(self.extra_env)
        cmd = [str(venv / "bin" / "label-studio"), "start", "--no-browser", "--internal-host", "127.0.0.1",
               "--port", str(self.port), "--username", self.username, "--password", self.password,
               "--user-token", self.token, "--enable-legacy-api-token"]
        t = time.monotonic()
        self._spawn(cmd, env, self.data_dir)
        self._wait_until(lambda: self.session.get(self.url + "/api/projects", timeout=3).status_code == 200,
                         timeout, "label-studio")
        self.start_seconds = time.monotonic() - t
        return self

    def __enter__(self) -> "LabelStudio":
        return self.start()

    def stop(self) -> None:
        super().stop()
        if self._own_dir and os.environ.get("TAG2MASK_KEEP_LS_DATA") != "1":
            shutil.rmtree(self.data_dir, ignore_errors=True)

    # -- REST ----------------------------------------------------------------------------------
    def api(self, method: str, path: str, timeout: float = 120, **kw):
        r = self.session.request(method, self.url + path, timeout=timeout, **kw)
        if not r.ok:
            raise LabelStudioError(f"{method} {path}: HTTP {r.status_code}: {r.text[:2000]}")
        return r.json() if r.content and "json" in r.headers.get("Content-Type", "") else r.text

    def create_project(self, title: str, label_config: str) -> dict:
        return self.api("POST", "/api/projects", json={"title": title, "label_config": label_config})

    def import_files(self, project_id: int, paths: list[Path]) -> list[int]:
        """Upload photos (multipart, one field per file) -> the new task ids, in upload order."""
        before = {t["id"] for t in self.tasks(project_id)}
        files = {f"file{i}": (Path(p).name, Path(p).read_bytes(), "image/jpeg") for i, p in enumerate(paths)}
        self.api("POST", f"/api/projects/{project_id}/import", files=files)
        new = [t for t in self.tasks(project_id) if t["id"] not in before]
        return [t["id"] for t in sorted(new, key=lambda t: t["id"])]

    def tasks(self, project_id: int) -> list[dict]:
        out = self.api("GET", f"/api/tasks?project={project_id}&page_size=1000")
        return out["tasks"] if isinstance(out, dict) else out

    def task(self, task_id: int) -> dict:
        return self.api("GET", f"/api/tasks/{task_id}")

    def connect_ml(self, project_id: int, url: str, title: str = "tag2mask", **extra) -> dict:
        return self.api("POST", "/api/ml", json={"project": project_id, "url": url, "title": title, **extra})

    def ml(self, ml_id: int) -> dict:
        return self.api("GET", f"/api/ml/{ml_id}")

    def retrieve_predictions(self, project_id: int) -> dict:
        """The data manager action storing predictions for all tasks (reports success even when the
        backend failed: check ``predictions(task)``)."""
        return self.api("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project_id}",
                        json={"selectedItems": {"all": True, "excluded": []}}, timeout=300)

    def predictions(self, task_id: int) -> list[dict]:
        return self.api("GET", f"/api/predictions?task={task_id}")

    def annotate(self, task_id: int, result: list[dict]) -> dict:
        return self.api("POST", f"/api/tasks/{task_id}/annotations", json={"result": result})

    def train(self, ml_id: int) -> object:
        return self.api("POST", f"/api/ml/{ml_id}/train", json={})


class BackendProcess(_Process):
    """``tag2mask serve`` (the CLI; ``python -m backend.serve`` when it is missing) on a free port."""

    def __init__(self, env: dict | None = None, port: int | None = None, workdir: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="t2m-backend-"))
        self.model_dir = self.workdir / "model_dir"
        self.log_path = self.workdir / "backend.log"
        self.extra_env = env or {}

    def start(self, timeout: float = 120) -> "BackendProcess":
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO", "BASIC_AUTH"))}
        env.update({"MODEL_DIR": str(self.model_dir), "PYTHONPATH": str(REPO), "TAG2MASK_THREADS": "1",
                    "PYTHONUNBUFFERED": "1"})
        env.update(self.extra_env)
        cli = Path(sys.executable).parent / "tag2mask"
        if cli.exists() and (REPO / "backend" / "cli.py").exists():
            cmd = [str(cli), "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        else:
            cmd = [sys.executable, "-m", "backend.serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self._spawn(cmd, env, self.workdir)
        self._wait_until(lambda: requests.get(self.url + "/health", timeout=2).json().get("status") == "UP",
                         timeout, "tag2mask backend")
        return self

    def __enter__(self) -> "BackendProcess":
        return self.start()

    @property
    def events_path(self) -> Path:
        return self.model_dir / "events.jsonl"

    def events(self) -> list[dict]:
        import json

        if not self.events_path.exists():
            return []
        return [json.loads(x) for x in self.events_path.read_text().splitlines() if x.strip()]
