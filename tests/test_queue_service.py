"""The job queue through the web server: /predict answered by real worker processes, /jobs and
/projects/<id>/progress, Redis outages (503), Label Studio unreachable, SIGKILLed workers, a real
Label Studio getting exactly one prediction per task, and ``tag2mask up``.

Servers are real: the embedded Valkey and the machine's Redis (tests/redis_servers.py; the Redis
half is skipped with a message where 127.0.0.1:6379 does not answer), ``python -m backend.worker``
subprocesses, gunicorn (tests/labelstudio.BackendProcess) and Label Studio 1.23.2 (one server for
the module, tests marked ``labelstudio``). The worker-level versions of these faults are in
tests/test_queues.py; here they are seen from the HTTP side.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.web.app import create_app
from backend.settings import Settings
from conftest import horse_stems
from redis_servers import REPO, embedded_valkey, server, start_worker, stop_worker, worker_env  # noqa: F401

PROJECT = "41"


def _settings(server, horse_dir, tmp_path, **env) -> Settings:
    base = {"REDIS_URL": server.url, "TAG2MASK_QUEUE": "on", "TAG2MASK_PRESET": "fast", "TAG2MASK_WARMUP": "0",
            "TAG2MASK_LOCAL_ROOTS": str(horse_dir), "MODEL_DIR": str(tmp_path / "model_dir"),
            "TAG2MASK_PREDICT_DEADLINE": "80"}
    base.update(env)
    return Settings.from_env(env=base)


def _task(tid, horse_dir, stem) -> dict:
    return {"id": tid, "data": {"image": str(horse_dir / "images" / f"{stem}.jpg")}}


def _wait(check, timeout: float, what: str, log: Path | None = None, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what} did not happen within {timeout:.0f} s\n{tail}")


def _brush(pred: dict) -> list:
    return [r for r in pred.get("result", []) if r["type"] == "brushlabels"]


# -- without Label Studio -------------------------------------------------------------------------
def test_predict_through_workers_cache_jobs_progress_and_unreachable_label_studio(server, horse_dir, tmp_path):
    """A few tasks: /predict waits for a worker and answers with the prediction; the same /predict
    again is answered from the result cache (no new job); /jobs/<id> and /projects/<id>/progress
    report it. Many tasks (over TAG2MASK_SYNC_MAX_TASKS): answered at once without "result"; the
    worker's push to a Label Studio that refuses connections is retried, then the job is failed
    with the reason, visible through /jobs/<id> and the project's progress."""
    stems = horse_stems("test")
    app = create_app(_settings(server, horse_dir, tmp_path, TAG2MASK_SYNC_MAX_TASKS="1")).test_client()
    log = tmp_path / "worker.log"
    worker = start_worker(server, "--name", f"{server.token}-w", log=log,
                          env=worker_env(server, TAG2MASK_PRESET="fast", TAG2MASK_RETRY_ATTEMPTS="2",
                                         TAG2MASK_RETRY_DELAY="0.05"))
    try:
        health = app.get("/health").get_json()
        assert health["queue"]["mode"] == "queue" and health["queue"]["redis"] == "up"
        # /setup gives Label Studio's address and token: nothing listens on port 1
        assert app.post("/setup", json={"project": f"{PROJECT}.1700000000", "schema": DEFAULT_LABEL_CONFIG,
                                        "hostname": "http://127.0.0.1:1", "access_token": "tok"}).status_code == 200

        body = {"tasks": [_task(1, horse_dir, "horse283")], "project": f"{PROJECT}.1700000000"}
        r = app.post("/predict", json=body)
        assert r.status_code == 200, r.get_json()
        (pred,) = r.get_json()["results"]
        assert _brush(pred) and _brush(pred)[0]["value"]["rle"], (pred, log.read_text()[-2000:])
        progress = app.get(f"/projects/{PROJECT}/progress").get_json()
        assert (progress["jobs"], progress["tasks"], progress["done"], progress["failed"]) == (1, 1, 1, 0)

        again = app.post("/predict", json=body).get_json()["results"]
        assert again == [pred]
        assert app.get(f"/projects/{PROJECT}/progress").get_json()["jobs"] == 1     # cache: no new job

        # two tasks > TAG2MASK_SYNC_MAX_TASKS=1: a batch job, answered at once
        batch = {"tasks": [_task(2, horse_dir, stems[1]), _task(3, horse_dir, stems[1])],
                 "project": f"{PROJECT}.1700000000"}
        r = app.post("/predict", json=batch)
        results = r.get_json()["results"]
        assert r.status_code == 200 and len(results) == 2
        assert all("result" not in e and e["status"] == "queued" for e in results)
        job_id = results[0]["job"]
        info = _wait(lambda: (lambda i: i if i["status"] == "failed" else None)(app.get(f"/jobs/{job_id}").get_json()),
                     120, "the batch job failing", log)
        assert info["retries_left"] == 0 and "TasksFailed" in info["error"] and "ConnectError" in info["error"]
        assert set(info["meta"]["errors"]) == {"2", "3"}
        assert log.read_text().count("retry 1/1") >= 2          # retried in the job (twice per run)
        progress = app.get(f"/projects/{PROJECT}/progress").get_json()
        assert (progress["tasks"], progress["done"], progress["failed"], progress["queued"]) == (3, 1, 2, 0)
        assert app.get("/jobs/no-such-job").status_code == 404
    finally:
        stop_worker(worker)


SMART_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="brush" toName="image"><Label value="Horse"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Horse" smart="true"/></KeyPointLabels>
</View>"""


def test_smart_tool_answer_comes_from_an_interactive_job_never_from_the_cache(server, horse_dir, tmp_path):
    """A /predict with a smart tool's click (params.context) in queue mode: one ``interactive`` job the
    web process waits for; the answer is the clicked object's brush; a plain /predict of the same task
    after it is a new job (nothing of the interactive answer was cached), and a second click elsewhere
    is a new job with its own answer."""
    from PIL import Image

    from backend.labelstudio.results import decode_rle

    app = create_app(_settings(server, horse_dir, tmp_path)).test_client()
    log = tmp_path / "worker.log"
    worker = start_worker(server, "--name", f"{server.token}-smart", log=log,
                          env=worker_env(server, TAG2MASK_PRESET="fast"))
    try:
        stem = "horse290"
        gt = np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0
        h, w = gt.shape
        ys, xs = np.nonzero(gt)
        x, y = float(np.median(xs)), float(np.median(ys))
        click = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
                 "value": {"x": 100 * x / w, "y": 100 * y / h, "width": 0.6, "keypointlabels": ["Horse"]}}
        body = {"tasks": [_task(9, horse_dir, stem)], "project": f"{PROJECT}.1700000000",
                "label_config": SMART_CONFIG, "params": {"context": {"result": [click]}}}
        r = app.post("/predict", json=body)
        assert r.status_code == 200, r.get_json()
        (pred,) = r.get_json()["results"]
        brushes = [i for i in pred.get("result", []) if i["type"] == "brushlabels"]
        assert len(brushes) == 1, (pred, log.read_text()[-2000:])
        brush = brushes[0]
        mask = decode_rle(brush["value"]["rle"], h, w)
        assert mask[int(y), int(x)] and (mask & gt).sum() / (mask | gt).sum() >= 0.4   # the horse, not the scene
        from rq.job import Job

        from backend.storage.keys import project_jobs_key

        conn = server.client()
        (job_id,) = [i.decode() for i in conn.smembers(project_jobs_key(PROJECT))]
        assert Job.fetch(job_id, connection=conn).origin.endswith(":interactive")
        jobs = app.get(f"/projects/{PROJECT}/progress").get_json()["jobs"]
        plain = app.post("/predict", json={**body, "params": {"context": None}}).get_json()["results"][0]
        assert plain != pred and app.get(f"/projects/{PROJECT}/progress").get_json()["jobs"] == jobs + 1
    finally:
        stop_worker(worker)


def test_smart_tool_answer_not_ready_in_time_is_a_sentence_and_the_job_is_cancelled(server, horse_dir, tmp_path):
    """No worker: the interactive job is not done by the deadline; the task gets a sentence (never a late
    push to Label Studio), and the job is cancelled, not left for a worker to run later."""
    from rq.job import Job

    from backend.storage.keys import project_jobs_key

    app = create_app(_settings(server, horse_dir, tmp_path, TAG2MASK_PREDICT_DEADLINE="1")).test_client()
    click = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
             "value": {"x": 50, "y": 50, "width": 0.6, "keypointlabels": ["Horse"]}}
    body = {"tasks": [_task(11, horse_dir, "horse290")], "project": f"{PROJECT}.1700000000",
            "label_config": SMART_CONFIG, "params": {"context": {"result": [click]}}}
    (entry,) = app.post("/predict", json=body).get_json()["results"]
    assert "result" not in entry and "not ready within 1 s" in entry["error"] and "tag2mask worker" in entry["error"]
    conn = server.client()
    ids = [i.decode() for i in conn.smembers(project_jobs_key(PROJECT))]
    assert len(ids) == 1
    statuses = {Job.fetch(i, connection=conn).get_status(refresh=True).value for i in ids}
    assert statuses == {"canceled"}, statuses


def test_redis_down_gives_503_and_work_resumes(server, request, horse_dir, tmp_path):
    """The embedded Valkey stops while the web server and a worker run: /predict answers 503 with a
    clear message, /health answers at once and says Redis is down; once the server is back (same
    port, data kept) the same worker process answers the next /predict."""
    if server.kind != "embedded":
        pytest.skip("the machine's Redis is shared: only the embedded Valkey is restarted")
    valkey, _ = request.getfixturevalue("embedded_valkey")
    stems = horse_stems("test")
    app = create_app(_settings(server, horse_dir, tmp_path)).test_client()
    log = tmp_path / "worker.log"
    worker = start_worker(server, "--name", f"{server.token}-w", log=log,
                          env=worker_env(server, TAG2MASK_PRESET="fast"))
    body = lambda tid, stem: {"tasks": [_task(tid, horse_dir, stem)], "label_config": DEFAULT_LABEL_CONFIG,  # noqa: E731
                              "project": PROJECT}
    try:
        r = app.post("/predict", json=body(1, stems[2]))
        assert r.status_code == 200 and _brush(r.get_json()["results"][0]), log.read_text()[-2000:]
        assert valkey.stop() is True
        try:
            r = app.post("/predict", json=body(2, stems[3]))
            assert r.status_code == 503
            message = r.get_json()["error"]
            assert message.startswith("the job queue is unavailable: Redis at redis://127.0.0.1:") and \
                "does not answer" in message
            t = time.monotonic()
            health = app.get("/health")
            assert health.status_code == 200 and time.monotonic() - t < 5
            assert health.get_json()["status"] == "UP" and health.get_json()["queue"]["redis"] == "down"
            assert app.get("/jobs/anything").status_code == 503
        finally:
            assert valkey.ensure_running() == server.url
        r = app.post("/predict", json=body(2, stems[3]))
        assert r.status_code == 200 and _brush(r.get_json()["results"][0]), log.read_text()[-3000:]
        assert worker.poll() is None          # the same worker process went on
    finally:
        stop_worker(worker)


def test_queue_off_keeps_inline_mode(horse_dir, tmp_path):
    """TAG2MASK_QUEUE=auto without REDIS_URL (and =off) predicts in the web process; the queue
    routes say the queue is off; TASKS_CREATED is ignored."""
    for queue in ("auto", "off"):
        s = Settings.from_env(env={"TAG2MASK_QUEUE": queue, "MODEL_DIR": str(tmp_path), "TAG2MASK_WARMUP": "0"})
        assert not s.use_queue
        app = create_app(s).test_client()
        assert app.get("/health").get_json()["queue"] == {"mode": "inline"}
        assert app.get("/jobs/x").status_code == 404
        r = app.post("/webhook", json={"action": "TASKS_CREATED", "tasks": [], "project": {"id": 1}})
        assert r.get_json()["status"] == "ignored"
    assert Settings.from_env(env={"REDIS_URL": "redis://x:1/0"}).use_queue
    assert not Settings.from_env(env={"REDIS_URL": "redis://x:1/0", "TAG2MASK_QUEUE": "off"}).use_queue


def test_tag2mask_jobs_counts_and_watch(server, horse_dir, tmp_path):
    """``tag2mask jobs``: the queue table, a project's progress while queued, and ``--watch`` until a
    burst worker has done the project (predictions already cached: no engine needed)."""
    from backend.storage.result_cache import ResultCache, image_hash
    from backend.queue.queues import enqueue_predictions
    from redis_servers import run_worker

    conn = server.client()
    stems = horse_stems("test")[:2]
    tasks = [{"id": f"{server.token}-{i}", "image": str(horse_dir / "images" / f"{s}.jpg"), "tags": ["horse"]}
             for i, s in enumerate(stems)]
    for t in tasks:
        ResultCache(conn).put(t["id"], image_hash(Path(t["image"]).read_bytes()), ["horse"], "v1",
                              {"result": [], "score": 0.5, "model_version": "v1"})
    enqueue_predictions(conn, project="77", tasks=tasks, label_config=DEFAULT_LABEL_CONFIG, model_version="v1",
                        chunk_size=1, push=False)
    env = worker_env(server)
    cli = lambda *a: subprocess.run([sys.executable, "-m", "backend.cli", "jobs", *a], cwd=REPO, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    out = cli()
    assert out.returncode == 0, out.stderr
    assert f"{server.token}:batch" in out.stdout and f"{server.token}:interactive" in out.stdout
    out = cli("--project", "77")
    assert out.returncode == 0 and "2 tasks in 2 jobs: 2 queued, 0 running, 0 done, 0 failed" in out.stdout, out
    assert run_worker(server, "--burst", env=env, log=tmp_path / "w.log") == 0
    out = cli("--project", "77", "--watch", "--interval", "0.2")
    assert out.returncode == 0 and "0 queued, 0 running, 2 done, 0 failed" in out.stdout, (out.stdout, out.stderr)
    bad = subprocess.run([sys.executable, "-m", "backend.cli", "jobs"], cwd=REPO, capture_output=True, text=True,
                         env={**env, "REDIS_URL": "redis://127.0.0.1:1/0"}, timeout=60)
    assert bad.returncode == 1 and "does not answer" in bad.stderr


# -- tag2mask up ----------------------------------------------------------------------------------
def _processes_with(marker: str) -> list[int]:
    """Pids of this user's processes whose environment contains `marker`."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker.encode() in f.read():
                    with open(f"/proc/{entry}/stat") as st:
                        if st.read().split(")")[-1].split()[0] != "Z":
                            out.append(int(entry))
        except OSError:
            continue
    return out


def test_tag2mask_up_serves_and_stops_cleanly(horse_dir, tmp_path):
    """``tag2mask up``: the embedded Valkey, a worker, the scheduler and the web server come up;
    /health answers with the queue up; /predict of one local photo returns a mask; SIGINT stops
    every process it started, the Valkey included."""
    from redis_servers import new_token
    from tests.labelstudio import free_port

    port = free_port()
    model_dir = tmp_path / f"up-{new_token()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_URL", "LABEL_STUDIO", "TAG2MASK_QUEUE"))}
    env.update({"MODEL_DIR": str(model_dir), "TAG2MASK_LOCAL_ROOTS": str(horse_dir), "TAG2MASK_PRESET": "fast",
                "TAG2MASK_THREADS": "1", "PYTHONPATH": str(REPO), "TAG2MASK_NAMESPACE": model_dir.name,
                "WORKERS": "1", "THREADS": "2", "PYTHONUNBUFFERED": "1"})
    log = tmp_path / "up.log"
    proc = subprocess.Popen([sys.executable, "-m", "backend.cli", "up", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=REPO, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def healthy():
            try:
                h = requests.get(url + "/health", timeout=2).json()
            except requests.RequestException:
                return None
            return h if h["queue"].get("redis") == "up" and h["queue"].get("workers", 0) >= 1 else None
        health = _wait(healthy, 120, "tag2mask up answering /health with a worker", log, interval=0.5)
        assert health["status"] == "UP"
        state = (model_dir / "valkey" / "server.json")
        assert state.exists()
        r = requests.post(url + "/predict", timeout=100, json={
            "tasks": [_task(7, horse_dir, horse_stems("test")[0])], "label_config": DEFAULT_LABEL_CONFIG,
            "project": "3"})
        assert r.status_code == 200, r.text
        assert _brush(r.json()["results"][0]), (r.json(), log.read_text()[-3000:])
        assert len(_processes_with(str(model_dir))) >= 4      # up, worker, scheduler, web (+ gunicorn worker)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = None
    text = log.read_text(errors="replace")
    assert rc == 0, text[-3000:]
    assert "embedded Valkey stopped" in text
    assert not state.exists()
    _wait(lambda: not _processes_with(str(model_dir)), 10, "every process of tag2mask up ending", log)


# -- with a real Label Studio -----------------------------------------------------------------------
@pytest.mark.labelstudio
def test_label_studio_batch_workers_push_once_despite_a_killed_worker(server, label_studio, horse_dir, tmp_path):
    """A real Label Studio retrieves predictions for a project of real photos from the backend
    (gunicorn, queue mode): the answer is immediate (batch), the workers push; the first worker is
    SIGKILLed in the middle of the batch and another takes over. Every task ends with exactly one
    prediction (of the backend's model version). Then a TASKS_CREATED webhook pre-labels two new
    tasks the same way. Runs on the embedded server only (which Redis holds the queue does not change
    what reaches Label Studio; the outage and retry paths run on both above)."""
    from tests.labelstudio import BackendProcess

    if server.kind != "embedded":
        pytest.skip("Label Studio checked on the embedded server only")
    ls = label_studio
    stems = horse_stems("test")[4:12]
    project = ls.create_project(f"queue {server.token}", DEFAULT_LABEL_CONFIG)
    pid = project["id"]
    task_ids = ls.import_files(pid, [horse_dir / "images" / f"{s}.jpg" for s in stems[:6]])
    ls_env = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token}
    (tmp_path / "backend").mkdir()
    backend = BackendProcess(workdir=tmp_path / "backend", env={
        "REDIS_URL": server.url, "TAG2MASK_QUEUE": "on", "TAG2MASK_NAMESPACE": server.token,
        "TAG2MASK_PRESET": "fast", "TAG2MASK_SYNC_MAX_TASKS": "2", "TAG2MASK_BATCH_CHUNK": "2", **ls_env})
    wenv = worker_env(server, TAG2MASK_PRESET="fast", TAG2MASK_JOB_HEARTBEAT_TTL="2",
                      TAG2MASK_MAINTENANCE_INTERVAL="2", **ls_env)
    victim = rescuer = None
    try:
        backend.start()
        ml = ls.connect_ml(pid, backend.url)
        version = ls.ml(ml["id"]).get("model_version")
        victim = start_worker(server, "--name", f"{server.token}-victim", env=wenv, log=tmp_path / "victim.log")
        t = time.monotonic()
        ls.retrieve_predictions(pid)
        assert time.monotonic() - t < 60          # answered without waiting for the photos
        conn = server.client()
        from backend.queue.queues import project_progress

        _wait(lambda: project_progress(conn, str(pid))["done"] >= 2 and
              project_progress(conn, str(pid))["running"] > 0, 120, "the first job done, the next running",
              tmp_path / "victim.log", interval=0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=10)
        assert project_progress(conn, str(pid))["done"] < 6
        rescuer = start_worker(server, "--name", f"{server.token}-rescuer", env=wenv, log=tmp_path / "rescuer.log")
        progress = _wait(lambda: (lambda p: p if p["queued"] + p["running"] == 0 else None)(
            project_progress(conn, str(pid))), 180, "the batch finishing", tmp_path / "rescuer.log")
        assert (progress["done"], progress["failed"]) == (6, 0), progress
        versions = set()
        for tid in task_ids:
            preds = ls.predictions(tid)
            assert len(preds) == 1, (tid, preds)
            assert _brush(preds[0]) and preds[0]["result"]
            versions.add(preds[0]["model_version"])
        assert len(versions) == 1 and (version is None or versions == {version})

        # TASKS_CREATED (sent here as Label Studio's webhook would): pre-labeled by the workers
        new_ids = ls.import_files(pid, [horse_dir / "images" / f"{s}.jpg" for s in stems[6:8]])
        payload = {"action": "TASKS_CREATED", "project": ls.api("GET", f"/api/projects/{pid}"),
                   "tasks": [ls.task(tid) for tid in new_ids]}
        r = requests.post(backend.url + "/webhook", json=payload, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["tasks"] == 2, r.text
        try:
            _wait(lambda: all(len(ls.predictions(tid)) == 1 for tid in new_ids), 120, "the new tasks pre-labeled",
                  tmp_path / "rescuer.log", interval=0.5)
        except AssertionError as exc:
            seen = {tid: [(p["id"], p["model_version"], len(p["result"])) for p in ls.predictions(tid)]
                    for tid in new_ids}
            raise AssertionError(f"{seen}; webhook reply {r.json()}; {exc}") from None
        for tid in task_ids + new_ids:
            assert len(ls.predictions(tid)) == 1
    finally:
        for proc in (victim, rescuer):
            if proc is not None:
                stop_worker(proc)
        backend.stop()
