"""The job queue is visible in rq-dashboard (0.9.0, on rq 3.0.0): ``tag2mask dashboard`` serves it
for the queue's real server (the embedded Valkey, found through MODEL_DIR as `tag2mask jobs` finds it,
and the machine's Redis through REDIS_URL), and its JSON API lists tag2mask's queues with their job
counts, a finished predict job with its progress and a failed one with its reason."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from rq.job import Job

from backend.storage.result_cache import ResultCache, image_hash
from backend.queue.queues import enqueue_predictions
from conftest import horse_stems
from redis_servers import REPO, embedded_valkey, run_worker, server, worker_env  # noqa: F401
from tests.labelstudio import free_port

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="horse"/></BrushLabels>
</View>"""


def _dashboard_env(server, request) -> dict[str, str]:
    """The system Redis through REDIS_URL; the embedded Valkey with no REDIS_URL, through its MODEL_DIR."""
    env = worker_env(server)
    if server.kind == "embedded":
        valkey, _ = request.getfixturevalue("embedded_valkey")
        del env["REDIS_URL"]
        env["MODEL_DIR"] = str(valkey.data_dir.parent)
    return env


def _get_json(url: str, proc: subprocess.Popen, log: Path, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = requests.get(url, timeout=5)
            if r.status_code == 200:
                return r.json()
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def test_dashboard_lists_the_queues_and_jobs(server, request, horse_dir, tmp_path):
    pytest.importorskip("rq_dashboard", reason="rq-dashboard is not installed (pip install 'tag2mask[dashboard]')")
    conn = server.client()
    photos = [horse_dir / "images" / f"{s}.jpg" for s in horse_stems("test")[:3]]
    tasks = [{"id": f"{server.token}-{i}", "image": str(p), "tags": ["horse"]} for i, p in enumerate(photos)]
    stored = {"result": [], "score": 0.5, "model_version": "v1"}
    ResultCache(conn).put(tasks[0]["id"], image_hash(photos[0].read_bytes()), ["horse"], "v1", stored)
    (done, _), = enqueue_predictions(conn, project=server.token, tasks=tasks[:1], label_config=LABEL_CONFIG,
                                     model_version="v1", push=False)
    gone = {"id": f"{server.token}-x", "image": str(tmp_path / "gone.jpg"), "tags": ["horse"]}
    (failed, _), = enqueue_predictions(conn, project=server.token, tasks=[gone], priority="batch",
                                       label_config=LABEL_CONFIG, model_version="v1", push=False)
    assert run_worker(server, "--burst", "--name", f"{server.token}-w", log=tmp_path / "w.log") == 0
    queued = enqueue_predictions(conn, project=server.token, tasks=tasks[1:], label_config=LABEL_CONFIG,
                                 model_version="v1", chunk_size=1, push=False)

    port = free_port()
    log = tmp_path / "dashboard.log"
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "dashboard", "--port", str(port)], cwd=REPO,
                            env=_dashboard_env(server, request), stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/0/data"
    try:
        queues = {q["name"]: q for q in _get_json(f"{base}/queues.json", proc, log)["queues"]}
        interactive, batch = queues[f"{server.token}:interactive"], queues[f"{server.token}:batch"]
        assert (interactive["count"], interactive["finished_job_registry_count"]) == (0, 1)
        assert (batch["count"], batch["failed_job_registry_count"]) == (2, 1)

        listed = _get_json(f"{base}/jobs/{server.token}:batch/queued/8/asc/1.json", proc, log)
        assert sorted(j["id"] for j in listed["jobs"]) == sorted(job.id for job, _ in queued)

        info = _get_json(f"{base}/job/{done.id}.json", proc, log)
        assert info["status"] == "finished" and info["origin"] == f"{server.token}:interactive"
        assert info["result"]["predictions"][tasks[0]["id"]] == stored
        assert '"done": 1' in info["metadata"] and '"total": 1' in info["metadata"]

        info = _get_json(f"{base}/job/{failed.id}.json", proc, log)
        assert info["status"] == "failed"
        assert "TasksFailed" in info["exc_info"] and "no such file" in info["exc_info"]
        assert Job.fetch(failed.id, connection=conn).retries_left == 0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert f"tag2mask's queues: {server.token}:interactive, {server.token}:batch" in log.read_text()


def test_dashboard_without_a_server_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(PYTHONPATH=str(REPO), MODEL_DIR=str(tmp_path))          # no embedded Valkey runs there
    out = subprocess.run([sys.executable, "-m", "backend.cli", "dashboard", "--port", str(free_port())], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "no embedded Valkey runs" in out.stderr, out.stderr

