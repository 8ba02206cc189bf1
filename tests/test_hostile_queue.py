"""Hostile tasks through the job queue: the same per-task sentences as inline.

The web app runs in queue mode (``create_app`` with TAG2MASK_QUEUE=on, as in tests/test_queue_service.py)
with a real ``python -m backend.worker`` subprocess, on the embedded Valkey and on the machine's Redis
(tests/redis_servers.py). The malformed tasks are those of tests/test_hostile_input.py: each fails alone,
with exactly the "error" the web process gives inline (no exception type in front), the good horse task
is answered, and /health is UP after. Malformed tasks that reach a worker directly (a job enqueued by a
script) fail alone with a sentence too, and TASKS_CREATED pre-labeling names the tasks it skipped.
"""
from __future__ import annotations

import time

import pytest
from rq.job import Job, JobStatus

from backend.serving import predict
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.queue.queues import enqueue_predictions
from backend.web.app import create_app
from backend.settings import Settings
from redis_servers import embedded_valkey, server, start_worker, stop_worker, worker_env  # noqa: F401
from tests.test_hostile_input import BAD_TASKS, FETCH_JUNK, GOOD_PHOTO

PROJECT = "43"


def _settings(env: dict, horse_dir, tmp_path) -> Settings:
    base = {"TAG2MASK_PRESET": "fast", "TAG2MASK_WARMUP": "0", "TAG2MASK_LOCAL_ROOTS": str(horse_dir),
            "MODEL_DIR": str(tmp_path / "model_dir"), "TAG2MASK_PREDICT_DEADLINE": "80",
            "TAG2MASK_SYNC_MAX_TASKS": "10"}
    return Settings.from_env(env={**base, **env})


def _predict(client, tasks) -> list[dict]:
    r = client.post("/predict", json={"tasks": tasks, "label_config": DEFAULT_LABEL_CONFIG, "project": PROJECT})
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    results = r.get_json()["results"]
    assert len(results) == len(tasks)
    return results


@pytest.fixture
def inline_errors(horse_dir, tmp_path):
    """The inline web process's "error" of each malformed task (none of them needs the model)."""
    client = create_app(_settings({"TAG2MASK_QUEUE": "off"}, horse_dir, tmp_path / "inline")).test_client()
    cases = BAD_TASKS + FETCH_JUNK
    results = _predict(client, [t for _, t, _ in cases])
    for (case, _, expected), entry in zip(cases, results):
        assert expected in entry["error"], (case, entry)
    return {case: entry["error"] for (case, _, _), entry in zip(cases, results)}


def test_malformed_tasks_through_the_queue_fail_alone_with_the_inline_sentences(server, horse_dir, tmp_path,
                                                                                inline_errors):
    app = create_app(_settings({"REDIS_URL": server.url, "TAG2MASK_QUEUE": "on"}, horse_dir, tmp_path))
    client = app.test_client()
    log = tmp_path / "worker.log"
    worker = start_worker(server, "--name", f"{server.token}-w", log=log,
                          env=worker_env(server, TAG2MASK_PRESET="fast"))
    cases = BAD_TASKS + FETCH_JUNK      # BAD_TASKS fail in the web process, FETCH_JUNK in the worker
    try:
        tasks = [{"id": 1, "data": {"image": GOOD_PHOTO}}] + [t for _, t, _ in cases]
        results = _predict(client, tasks)
        good = results[0]
        assert "error" not in good, (good, log.read_text(errors="replace")[-3000:])
        assert {it["type"] for it in good["result"]} == {"choices", "brushlabels", "polygonlabels",
                                                         "rectanglelabels"}
        for (case, _, _), entry in zip(cases, results[1:]):
            assert "result" not in entry and entry["score"] == 0.0, (case, entry)
            assert entry["error"] == inline_errors[case], case

        # TASKS_CREATED: the malformed tasks are skipped, the first 20 named with the same sentences
        r = client.post("/webhook", json={"action": "TASKS_CREATED", "tasks": [t for _, t, _ in BAD_TASKS],
                                          "project": {"id": int(PROJECT), "label_config": DEFAULT_LABEL_CONFIG}})
        assert r.status_code == 200, r.get_data(as_text=True)[:500]
        reply = r.get_json()
        assert (reply["status"], reply["tasks"], reply["jobs"], reply["skipped"]) == ("queued", 0, [], len(BAD_TASKS))
        assert [e["index"] for e in reply["errors"]] == list(range(20))
        assert [e["error"] for e in reply["errors"]] == [inline_errors[c] for c, _, _ in BAD_TASKS[:20]]

        health = client.get("/health")
        assert health.status_code == 200 and health.get_json()["status"] == "UP"
        assert health.get_json()["queue"]["redis"] == "up"
        assert worker.poll() is None
    finally:
        stop_worker(worker)


JOB_TASKS = [  # (task of a job enqueued directly, its key in meta["errors"], the sentence)
    ({"id": 1, "image": 5}, "1", "the task's image must be a string (the photo's URL or path), not a number"),
    ({"id": [1], "image": GOOD_PHOTO}, "#1", "the task's id must be an integer, not a list"),
    ({"id": 10 ** 30, "image": GOOD_PHOTO}, "#2", "the task's id must be an integer from 0 to 2^63-1, not 1000"),
    ({"id": 3, "image": GOOD_PHOTO, "tags": [5]}, "3",
     "the task's tags must be a list of strings, not a list holding other values"),
    ({"id": 4, "image": GOOD_PHOTO, "tags": "horse", "ls": True}, "4",
     "the task's tags must be a list of strings, not a string"),
    ({"id": 5, "image": "/data/local-files/?d=images/no-such.jpg", "ls": True}, "5",
     "images/no-such.jpg: no such file under the local roots"),
]


def test_malformed_tasks_of_a_job_fail_alone_in_the_worker(server, tmp_path):
    """A job enqueued by a script, not the web server: each malformed task fails alone, its reason in
    the job's meta a sentence without the exception's type; the job's own error keeps the types."""
    conn = server.client()
    log = tmp_path / "worker.log"
    worker = start_worker(server, "--name", f"{server.token}-w", log=log,
                          env=worker_env(server, TAG2MASK_PRESET="fast"))
    try:
        ((job, _),) = enqueue_predictions(conn, project=PROJECT, tasks=[t for t, _, _ in JOB_TASKS],
                                          label_config=DEFAULT_LABEL_CONFIG, model_version="v-hostile",
                                          chunk_size=len(JOB_TASKS), push=False)
        deadline = time.monotonic() + 120
        while job.get_status(refresh=True) not in (JobStatus.FINISHED, JobStatus.FAILED) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        job = Job.fetch(job.id, connection=conn)
        assert job.get_status() == JobStatus.FAILED, log.read_text(errors="replace")[-3000:]
        errors = job.meta["errors"]
        assert set(errors) == {key for _, key, _ in JOB_TASKS}
        for _, key, expected in JOB_TASKS:
            assert errors[key].startswith(expected) and not errors[key].startswith("ValueError"), (key, errors[key])
        assert "ImageFetchError: " in job.latest_result().exc_string      # the operator still sees the type
        assert job.retries_left == 0
    finally:
        stop_worker(worker)


def test_predict_chunk_survives_tasks_that_are_not_objects():
    """No Redis, no engine: a chunk of tasks that are not objects fails task by task, in order."""
    outcomes = predict.predict_chunk(["x", 5, None, [1]], label_config=DEFAULT_LABEL_CONFIG, model_version="v")
    assert [predict.task_error(o.error) for o in outcomes] == [
        "a task must be a JSON object, not a string", "a task must be a JSON object, not a number",
        "a task must be a JSON object, not null", "a task must be a JSON object, not a list"]
