"""Queues, workers and the result cache against real servers: the embedded Valkey and the machine's
Redis (each test runs on both; the Redis half is skipped with a message when 6379 does not answer).

Workers are real ``python -m backend.worker`` subprocesses (RQ SimpleWorker: no fork)."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry, StartedJobRegistry

from backend.queue.queues import (PRIORITIES, enqueue_predictions, enqueue_unique, get_queue, get_queues, job_id_for, job_info, project_progress, queue_counts, queue_name)
from backend.storage.result_cache import ResultCache, image_hash, ls_cache_tags
from redis_servers import embedded_valkey, refused_port, run_worker, server, start_worker, worker_env  # noqa: F401
from conftest import horse_stems

LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="horse"/></BrushLabels>
</View>"""


def _jid(server, label: str) -> str:
    return f"{server.token}-{label}"


def test_queue_names_follow_the_namespace(server):
    assert [q.name for q in get_queues(server.client())] == [f"{server.token}:{p}" for p in PRIORITIES]
    with pytest.raises(ValueError, match="unknown queue"):
        queue_name("urgent")


def test_priority_order_and_failures_kept(server, tmp_path):
    conn = server.client()
    key = f"{server.token}:ran"
    plan = [("batch", "b1"), ("train", "t1"), ("interactive", "i1"), ("batch", "b2"), ("interactive", "i2")]
    for prio, label in plan:
        enqueue_unique(get_queue(prio, conn), "redis_servers.record", key, label, job_id=_jid(server, label))
    bad, _ = enqueue_unique(get_queue("batch", conn), "redis_servers.fail", "the photo is unreadable",
                            job_id=_jid(server, "bad"))
    assert bad.retries_left == 2
    rc = run_worker(server, "--burst", "--name", f"{server.token}-w1", log=tmp_path / "worker.log")
    assert rc == 0, (tmp_path / "worker.log").read_text()[-3000:]

    ran = [x.decode() for x in conn.lrange(key, 0, -1)]
    assert ran == ["i1", "i2", "b1", "b2", "t1"]          # interactive, then batch, then train
    for _, label in plan:
        assert Job.fetch(_jid(server, label), connection=conn).get_status() == JobStatus.FINISHED

    failed = FailedJobRegistry(queue=get_queue("batch", conn))
    assert bad.id in failed.get_job_ids()
    bad = Job.fetch(bad.id, connection=conn)
    assert bad.get_status() == JobStatus.FAILED and bad.retries_left == 0   # retried twice, then kept
    assert "ValueError: the photo is unreadable" in bad.latest_result().exc_string
    counts = queue_counts(conn)
    assert counts[queue_name("batch")]["failed"] == 1 and counts[queue_name("batch")]["finished"] == 2


def test_a_worker_unsubscribes_at_once_even_when_its_pubsub_thread_waits(server):
    """A worker's end: its command-channel thread, once it has seen the unsubscription, waits up to
    RQ's 60 s for a new one; unsubscribing must not wait for that (with RQ's own unsubscribe and
    redis-py 8.2 it did, and --burst workers outlived their last job by a minute)."""
    from backend.queue.worker import make_worker

    worker = make_worker(server.client(), ["batch"])
    worker.subscribe()
    thread = worker.pubsub_thread
    deadline = time.monotonic() + 10
    while not worker.pubsub.subscribed:           # the thread has read the subscription's reply
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker.pubsub.unsubscribe()                  # the thread reads this reply, then waits (the race CI hit)
    while worker.pubsub.subscribed:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    t = time.monotonic()
    worker.unsubscribe()
    worker.unsubscribe()                         # idempotent (run_worker's finally calls it again)
    assert time.monotonic() - t < 5
    assert worker.pubsub_thread is None and thread.daemon


def test_same_work_enqueued_twice_is_one_job(server):
    conn = server.client()
    queue = get_queue("batch", conn)
    jid = job_id_for("predict", server.token, 17, "abc", ["horse", "dog"], "v1")
    assert jid == job_id_for("predict", server.token, 17, "abc", ["dog", "horse", "horse"], "v1")
    assert jid != job_id_for("predict", server.token, 17, "abd", ["horse", "dog"], "v1")
    assert jid != job_id_for("predict", server.token, 17, "abc", ["horse", "dog"], "v2")
    first, created1 = enqueue_unique(queue, "redis_servers.record", "k", "x", job_id=jid)
    second, created2 = enqueue_unique(queue, "redis_servers.record", "k", "x", job_id=jid)
    assert (created1, created2) == (True, False) and first.id == second.id
    assert queue.count == 1

    tasks = [{"id": i, "image": f"/photos/{i}.jpg", "tags": ["horse"]} for i in range(5)]
    a = enqueue_predictions(conn, project=server.token, tasks=tasks, label_config=LABEL_CONFIG,
                            model_version="v1", chunk_size=2, push=False)
    b = enqueue_predictions(conn, project=server.token, tasks=tasks, label_config=LABEL_CONFIG,
                            model_version="v1", chunk_size=2, push=False)
    assert [created for _, created in a] == [True] * 3 and [created for _, created in b] == [False] * 3
    assert [j.id for j, _ in a] == [j.id for j, _ in b]
    assert get_queue("batch", conn).count == 1 + 3
    single = enqueue_predictions(conn, project=server.token, tasks=tasks[:1], label_config=LABEL_CONFIG,
                                 model_version="v1", push=False)
    assert single[0][0].origin == queue_name("interactive")
    for job, _ in a + single:
        job.delete()


def test_result_cache(server):
    conn = server.client()
    cache = ResultCache(conn, ttl=60)
    pred = {"result": [{"type": "brushlabels", "value": {"brushlabels": ["horse"]}}], "score": 0.9,
            "model_version": "v1"}
    sha = image_hash(b"photo bytes")
    assert cache.get(f"{server.token}-7", sha, ["horse"], "v1") is None
    cache.put(f"{server.token}-7", sha, ["horse"], "v1", pred)
    assert cache.get(f"{server.token}-7", sha, ["horse"], "v1") == pred
    assert cache.get(f"{server.token}-7", sha, ["horse"], "v2") is None          # model version counts
    assert cache.get(f"{server.token}-7", image_hash(b"other"), ["horse"], "v1") is None   # content counts
    assert cache.get(f"{server.token}-7", sha, ["horse", "dog"], "v1") is None   # tags count
    assert 0 < conn.ttl(cache.key(f"{server.token}-7", sha, ["horse"], "v1")) <= 60


def test_sigkilled_worker_job_is_requeued_and_done_once(server, tmp_path):
    conn = server.client()
    key = f"{server.token}:ran"
    queue = get_queue("batch", conn)
    labels = ["j1", "j2", "j3"]
    jobs = [enqueue_unique(queue, "redis_servers.record", key, label, 2.0, job_id=_jid(server, label))[0]
            for label in labels]
    env = worker_env(server, TAG2MASK_JOB_HEARTBEAT_TTL="2")
    victim = start_worker(server, "--name", f"{server.token}-victim", env=env, log=tmp_path / "victim.log")
    started = StartedJobRegistry(queue=queue)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not started.get_job_ids(cleanup=False):
        time.sleep(0.05)
    assert started.get_job_ids(cleanup=False), (tmp_path / "victim.log").read_text()[-3000:]
    time.sleep(0.4)                                    # mid-job (each job sleeps 2 s)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    killed_at = time.monotonic()
    abandoned = [j for j in jobs if Job.fetch(j.id, connection=conn).get_status() == JobStatus.STARTED]
    assert len(abandoned) == 1
    done_before = [x.decode() for x in conn.lrange(key, 0, -1)]

    # the dead worker's lease (2 s) runs out; the next worker's start-up cleanup requeues the job
    time.sleep(max(0.0, killed_at + 2.5 - time.monotonic()))
    rc = run_worker(server, "--burst", "--name", f"{server.token}-rescuer", env=env,
                    log=tmp_path / "rescuer.log")
    assert rc == 0, (tmp_path / "rescuer.log").read_text()[-3000:]

    ran = [x.decode() for x in conn.lrange(key, 0, -1)]
    assert sorted(ran) == labels, (done_before, ran)   # every job done, exactly once
    for job in jobs:
        job = Job.fetch(job.id, connection=conn)
        assert job.get_status() == JobStatus.FINISHED
    assert Job.fetch(abandoned[0].id, connection=conn).retries_left == 1   # one retry used by the requeue
    assert FailedJobRegistry(queue=queue).count == 0
    assert set(FinishedJobRegistry(queue=queue).get_job_ids()) == {j.id for j in jobs}


def test_predict_job_on_real_photos(server, horse_dir, tmp_path):
    """The predict job on real horse photos: a cached prediction is returned without the engine;
    a task whose photo cannot be read fails permanently (no retries) with the reason kept, while the
    cached task of the same chunk still gets its prediction."""
    conn = server.client()
    stems = horse_stems("test")[:2]
    tasks = [{"id": f"{server.token}-{i}", "image": str(horse_dir / "images" / f"{s}.jpg"), "tags": ["horse"]}
             for i, s in enumerate(stems)]
    cache = ResultCache(conn)
    stored = {"result": [{"type": "choices", "value": {"choices": ["horse"]}}], "score": 0.8, "model_version": "v1"}
    for t in tasks:
        cache.put(t["id"], image_hash(open(t["image"], "rb").read()), ["horse"], "v1", stored)
    ok = enqueue_predictions(conn, project=server.token, tasks=tasks, label_config=LABEL_CONFIG,
                             model_version="v1", push=False)
    missing = tmp_path / "gone.jpg"
    bad = enqueue_predictions(conn, project=server.token, priority="batch", label_config=LABEL_CONFIG,
                              tasks=[{"id": f"{server.token}-x", "image": str(missing), "tags": ["horse"]}, tasks[0]],
                              model_version="v1", push=False)
    before = project_progress(conn, server.token)
    assert (before["jobs"], before["tasks"], before["queued"], before["done"], before["eta_s"]) == (2, 4, 4, 0, None)
    assert job_info(conn, ok[0][0].id)["status"] == "queued"
    rc = run_worker(server, "--burst", "--name", f"{server.token}-w", log=tmp_path / "w.log")
    assert rc == 0, (tmp_path / "w.log").read_text()[-3000:]
    after = project_progress(conn, server.token)
    assert (after["queued"], after["running"], after["done"], after["failed"]) == (0, 0, 3, 1)
    assert after["rate"] > 0 and after["eta_s"] == 0
    info = job_info(conn, bad[0][0].id)
    assert info["status"] == "failed" and info["error"].startswith("backend.jobs.TasksFailed: 1 task(s) failed")
    assert job_info(conn, "no-such-job") is None

    job = Job.fetch(ok[0][0].id, connection=conn)
    assert job.get_status() == JobStatus.FINISHED, (tmp_path / "w.log").read_text()[-3000:]
    out = job.return_value()
    assert sorted(out["cached"]) == sorted(t["id"] for t in tasks)
    assert all(out["predictions"][str(t["id"])] == stored for t in tasks)
    assert job.meta["done"] == job.meta["total"] == 2

    failed = Job.fetch(bad[0][0].id, connection=conn)
    assert failed.get_status() == JobStatus.FAILED
    assert failed.retries_left == 0 and failed.meta["failed"] == 1     # permanent: not re-run
    assert failed.meta["done"] == failed.meta["total"] == 2 and set(failed.meta["errors"]) == {f"{server.token}-x"}
    exc = failed.latest_result().exc_string
    assert "TasksFailed" in exc and "ImageFetchError" in exc and "no such file" in exc and f"task {server.token}-x" in exc


def test_predict_jobs_share_one_engine_and_batch_the_photos(server, horse_dir, tmp_path):
    """One worker with the real engine (Tag2Mask) gets both kinds of job: explicit tags (three horse
    photos, one already cached) and a Label Studio task (the classifier picks the label). The model
    is loaded once for both; the two uncached photos of the first job go to the engine in one call;
    every prediction has a horse mask and is cached."""
    conn = server.client()
    stems = horse_stems("test")[1:5]
    tasks = [{"id": f"{server.token}-{i}", "image": str(horse_dir / "images" / f"{s}.jpg"), "tags": ["horse"]}
             for i, s in enumerate(stems[:3])]
    stored = {"result": [], "score": 0.5, "model_version": "v-engine"}
    ResultCache(conn).put(tasks[2]["id"], image_hash(open(tasks[2]["image"], "rb").read()), ["horse"], "v-engine",
                          stored)
    (job, _), = enqueue_predictions(conn, project=server.token, tasks=tasks, label_config=LABEL_CONFIG,
                                    model_version="v-engine", push=False)
    ls_task = {"id": f"{server.token}-ls", "image": str(horse_dir / "images" / f"{stems[3]}.jpg"), "tags": [],
               "ls": True}
    (ls_job, _), = enqueue_predictions(conn, project=server.token, tasks=[ls_task], label_config=LABEL_CONFIG,
                                       model_version="v-ls", push=False)
    env = worker_env(server, TAG2MASK_PRESET="fast")
    rc = run_worker(server, "--burst", "--device", "cpu", "--batch-size", "4", "--name", f"{server.token}-w",
                    env=env, timeout=150, log=tmp_path / "w.log")
    log = (tmp_path / "w.log").read_text()
    assert rc == 0, log[-3000:]
    assert log.count("model loaded:") == 1, log[-3000:]                 # one engine for both kinds of job
    assert f"tasks {[t['id'] for t in tasks[:2]]}: 2 photo(s) in one engine call" in log, log[-3000:]

    job = Job.fetch(job.id, connection=conn)
    assert job.get_status() == JobStatus.FINISHED, log[-3000:]
    out = job.return_value()
    assert out["cached"] == [tasks[2]["id"]] and out["predictions"][tasks[2]["id"]] == stored
    assert job.meta["done"] == job.meta["total"] == 3 and job.meta["failed"] == 0
    for t in tasks[:2]:
        pred = out["predictions"][str(t["id"])]
        assert pred["model_version"] == "v-engine"
        assert any(r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["horse"] for r in pred["result"])
        sha = image_hash(open(t["image"], "rb").read())
        assert ResultCache(conn).get(t["id"], sha, ["horse"], "v-engine") == json.loads(json.dumps(pred))

    ls_job = Job.fetch(ls_job.id, connection=conn)
    assert ls_job.get_status() == JobStatus.FINISHED, log[-3000:]
    pred = ls_job.return_value()["predictions"][ls_task["id"]]
    assert pred["model_version"] == "v-ls"
    assert any(r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["horse"] for r in pred["result"])
    assert ResultCache(conn).get(ls_task["id"], "ref:" + ls_task["image"], ls_cache_tags([]), "v-ls") == pred


def test_a_chunk_is_one_call_of_the_shared_engine(horse_dir, tmp_path, monkeypatch):
    """In-process, no Redis: both kinds of task run on backend.serving.model's engine (the one the web
    process uses), each chunk's photos in one ``predict_many`` call (observed by a wrapper that calls
    the real method); explicit-tag tasks run without project heads; a photo that cannot be read fails
    alone."""
    from backend.serving import predict
    from backend.labelstudio.photos import ImageFetchError
    from backend.serving.engine import get_engine
    from backend.settings import Settings

    monkeypatch.setenv("TAG2MASK_PRESET", "fast")
    monkeypatch.setenv("TAG2MASK_DEVICE", "cpu")
    monkeypatch.setenv("TAG2MASK_LOCAL_ROOTS", f"{horse_dir}{os.pathsep}{tmp_path}")
    monkeypatch.setattr(predict, "_fetcher", None)
    engine, _ = get_engine(Settings.from_env())
    calls = []
    real = engine.predict_many

    def counted(images, tags_per_image, *args, **kwargs):
        calls.append(len(images))
        return real(images, tags_per_image, *args, **kwargs)
    monkeypatch.setattr(engine, "predict_many", counted)
    photos = [str(horse_dir / "images" / f"{s}.jpg") for s in horse_stems("test")[5:7]]
    explicit = [{"id": i, "image": p, "tags": ["horse"]} for i, p in enumerate(photos)]
    explicit.append({"id": 9, "image": str(tmp_path / "gone.jpg"), "tags": ["horse"]})
    out = predict.predict_chunk(explicit, label_config=LABEL_CONFIG, model_version="v-chunk")
    assert calls == [2] and engine.heads is None
    assert isinstance(out[2].error, ImageFetchError) and out[2].prediction is None
    for o in out[:2]:
        assert o.error is None and not o.cached
        assert any(r["type"] == "brushlabels" and r["value"]["brushlabels"] == ["horse"] for r in o.prediction["result"])
    ls = [{"id": 10 + i, "image": p, "tags": [], "ls": True} for i, p in enumerate(photos)]
    out = predict.predict_chunk(ls, label_config=LABEL_CONFIG, model_version="v-chunk")
    assert calls == [2, 2] and all(o.error is None and o.prediction["model_version"] == "v-chunk" for o in out)


@pytest.mark.labelstudio
def test_workers_push_one_prediction_per_task(server, label_studio, horse_dir, tmp_path):
    """Real Label Studio: a worker runs the engine on 2 real photos and pushes; a re-run job (same
    predictions, from the cache) and a changed prediction never create a second prediction of the
    same model version. Runs on the embedded server only: which Redis holds the queue does not
    change what reaches Label Studio, and Label Studio's start-up already costs about a minute."""
    from backend.labelstudio.client import LabelStudioPusher

    if server.kind != "embedded":
        pytest.skip("Label Studio push checked on the embedded server only")

    ls = label_studio
    stems = horse_stems("test")[1:3]
    paths = [horse_dir / "images" / f"{s}.jpg" for s in stems]
    project = ls.create_project(f"queue {server.token}", LABEL_CONFIG)
    task_ids = ls.import_files(project["id"], paths)
    tasks = [{"id": tid, "image": str(p), "tags": ["horse"]} for tid, p in zip(task_ids, paths)]
    env = worker_env(server, LABEL_STUDIO_URL=ls.url, LABEL_STUDIO_API_KEY=ls.token)
    conn = server.client()

    for run in range(2):      # the second run's job is new (rerun_finished) but its predictions are cached
        (job, created), = enqueue_predictions(conn, project=server.token, tasks=tasks, label_config=LABEL_CONFIG,
                                              model_version="v-push", push=True, rerun_finished=bool(run))
        assert created
        rc = run_worker(server, "--burst", "--device", "cpu", "--name", f"{server.token}-w{run}", env=env,
                        timeout=100, log=tmp_path / "w.log")
        job = Job.fetch(job.id, connection=conn)
        assert rc == 0 and job.get_status() == JobStatus.FINISHED, (tmp_path / "w.log").read_text()[-3000:]
        out = job.return_value()
        actions = {out["pushed"][str(t)]["action"] for t in task_ids}
        assert actions == ({"created"} if run == 0 else {"unchanged"})
        assert len(out["cached"]) == (0 if run == 0 else 2)
        for tid in task_ids:
            preds = ls.predictions(tid)
            assert len(preds) == 1 and preds[0]["model_version"] == "v-push"
            assert any(r["type"] == "brushlabels" for r in preds[0]["result"])

    pusher = LabelStudioPusher(ls.url, ls.token)
    changed = {"result": [], "score": 0.5, "model_version": "v-push"}
    first = ls.predictions(task_ids[0])[0]["id"]
    assert pusher(task_ids[0], changed) == {"action": "updated", "id": first}
    assert [p["result"] for p in ls.predictions(task_ids[0])] == [[]]
    other = pusher(task_ids[0], {**changed, "model_version": "v-other"})
    assert other["action"] == "created"
    assert sorted(p["model_version"] for p in ls.predictions(task_ids[0])) == ["v-other", "v-push"]


def test_label_studio_unreachable_is_retried_then_failed_with_reason(server, horse_dir, tmp_path):
    """Pushing to a Label Studio that refuses connections: retried in the job with backoff, the job
    re-run by RQ (transient), then kept failed with the connection error as its reason."""
    conn = server.client()
    photo = horse_dir / "images" / f"{horse_stems('test')[0]}.jpg"
    task = {"id": 1, "image": str(photo), "tags": ["horse"]}   # the cache key carries the test's namespace
    stored = {"result": [], "score": 0.5, "model_version": "v1"}
    ResultCache(conn).put(task["id"], image_hash(photo.read_bytes()), ["horse"], "v1", stored)
    (job, _), = enqueue_predictions(conn, project=server.token, tasks=[task], label_config=LABEL_CONFIG,
                                    model_version="v1", push=True)
    sock, port = refused_port()
    env = worker_env(server, LABEL_STUDIO_URL=f"http://127.0.0.1:{port}", LABEL_STUDIO_API_KEY="token",
                     TAG2MASK_RETRY_ATTEMPTS="2", TAG2MASK_RETRY_DELAY="0.05")
    with sock:
        rc = run_worker(server, "--burst", "--name", f"{server.token}-w", env=env, log=tmp_path / "w.log")
    log = (tmp_path / "w.log").read_text()
    assert rc == 0, log[-3000:]
    job = Job.fetch(job.id, connection=conn)
    assert job.get_status() == JobStatus.FAILED and job.retries_left == 0
    exc = job.latest_result().exc_string
    assert "TasksFailed" in exc and "ConnectError" in exc
    assert log.count("retry 1/1") == 3          # in-job retry, in the first run and both RQ re-runs


def test_scheduler_requeues_abandoned_and_due_jobs(server, tmp_path):
    """The scheduler/janitor loop (compose "scheduler" service) alone requeues a dead worker's job
    and enqueues a job scheduled for later, without any worker starting."""
    import threading
    from datetime import timedelta

    from backend.queue.worker import run_scheduler

    conn = server.client()
    key = f"{server.token}:ran"
    queue = get_queue("batch", conn)
    job, _ = enqueue_unique(queue, "redis_servers.record", key, "slow", 3.0, job_id=_jid(server, "slow"))
    later = queue.enqueue_in(timedelta(seconds=1), "redis_servers.record", key, "later",
                             job_id=_jid(server, "later"))
    env = worker_env(server, TAG2MASK_JOB_HEARTBEAT_TTL="2")
    victim = start_worker(server, "--name", f"{server.token}-victim", env=env, log=tmp_path / "victim.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and job.get_status() != JobStatus.STARTED:
        time.sleep(0.05)
    assert job.get_status() == JobStatus.STARTED, (tmp_path / "victim.log").read_text()[-3000:]
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)

    stop = threading.Event()
    loop = threading.Thread(target=run_scheduler, args=(conn, None, 0.5, stop),
                            kwargs={"training": False}, daemon=True)
    loop.start()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (job.get_status() == JobStatus.QUEUED and
                                                   later.get_status() == JobStatus.QUEUED):
            time.sleep(0.1)
    finally:
        stop.set()
        loop.join(timeout=10)
    assert job.get_status() == JobStatus.QUEUED and later.get_status() == JobStatus.QUEUED
    assert set(queue.get_job_ids()) == {job.id, later.id}
    assert conn.lrange(key, 0, -1) == []


def test_worker_resumes_after_the_server_restarts(server, request, tmp_path):
    """The embedded Valkey stops and starts again (same port, data kept): a running worker reconnects
    by itself and does the work enqueued after the restart; a job queued before it is not lost."""
    if server.kind != "embedded":
        pytest.skip("the machine's Redis is shared: only the embedded Valkey is restarted")
    valkey, _ = request.getfixturevalue("embedded_valkey")
    conn = server.client()
    key = f"{server.token}:ran"
    queue = get_queue("batch", conn)
    worker = start_worker(server, "--name", f"{server.token}-w", log=tmp_path / "w.log",
                          env=worker_env(server, TAG2MASK_JOB_HEARTBEAT_TTL="30"))
    try:
        enqueue_unique(queue, "redis_servers.record", key, "before", job_id=_jid(server, "before"))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and conn.llen(key) < 1:
            time.sleep(0.05)
        assert conn.lrange(key, 0, -1) == [b"before"], (tmp_path / "w.log").read_text()[-3000:]
        # a job that is running when the server goes away (and writes to it while it is away)
        enqueue_unique(get_queue("train", conn), "redis_servers.record", key, "during", 1.0,
                       job_id=_jid(server, "during"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Job.fetch(_jid(server, "during"), connection=conn).get_status() \
                != JobStatus.STARTED:
            time.sleep(0.02)
        assert valkey.stop() is True
        time.sleep(3.0)     # down for longer than the job's remaining second: its write hits the outage
        assert valkey.ensure_running() == server.url
        enqueue_unique(queue, "redis_servers.record", key, "after", job_id=_jid(server, "after"))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not {b"after", b"during"} <= set(conn.lrange(key, 0, -1)):
            time.sleep(0.1)
        ran = [x.decode() for x in conn.lrange(key, 0, -1)]
        log = (tmp_path / "w.log").read_text()
        assert set(ran) == {"before", "during", "after"}, log[-3000:]
        assert ran.count("before") == 1 and ran.count("after") == 1   # "during" may have run twice
        assert worker.poll() is None                                   # the same process went on
        assert "restarting the worker" in log and "interrupted by the Redis outage" in log
    finally:
        worker.terminate()
        assert worker.wait(timeout=30) == 0                            # SIGTERM: a clean exit


def test_with_retries_retries_only_transient_errors():
    from backend.queue.retry import is_transient, with_retries

    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("refused")
        return "ok"
    assert with_retries(flaky, attempts=4, base_delay=0.01) == "ok" and len(calls) == 3

    calls.clear()

    def broken():
        calls.append(1)
        raise FileNotFoundError("gone.jpg")
    with pytest.raises(FileNotFoundError):
        with_retries(broken, attempts=4, base_delay=0.01)
    assert len(calls) == 1                     # permanent: not retried
    import redis as _redis
    assert is_transient(_redis.ConnectionError("down")) and not is_transient(ValueError("bad tag"))
