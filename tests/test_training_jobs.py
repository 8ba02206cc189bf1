"""Issue 5 wiring: webhook -> example store, periodic tick -> one training job, the job -> registry.

Real everything: the Flask app, the machine's Redis at 127.0.0.1:6379 (db 12, a unique namespace
per test, its keys deleted afterwards; skipped with a message when Redis does not answer), RQ's
SimpleWorker, efficientnet_lite0 on the CPU, Weizmann horse photos with their masks as corrections.
"""
from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
import redis

from conftest import horse_stems
from ls_payloads import LABEL_CONFIG, annotation, brush_result, horse_mask, horse_webhooks, webhook_body

from backend.storage.examples import ExampleStore
from backend.storage.registry import ModelRegistry
from backend.settings import Settings

REDIS_URL = os.environ.get("TAG2MASK_TEST_TRAIN_REDIS", "redis://127.0.0.1:6379/12")


@pytest.fixture
def settings(tmp_path, horse_dir):
    return Settings.from_env(model_dir=tmp_path / "model_dir", local_roots=[horse_dir / "images"], warmup=False,
                             train_min_new=10)


@pytest.fixture
def rconn(monkeypatch):
    """A client of the machine's Redis with this test's own namespace; its keys are removed after."""
    conn = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        conn.ping()
    except (redis.RedisError, OSError) as exc:
        pytest.skip(f"the machine's Redis at {REDIS_URL} does not answer ({exc})")
    token = f"t2mtj{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("TAG2MASK_NAMESPACE", token)
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    conn.token = token
    yield conn
    for key in conn.scan_iter("rq:job:*"):        # jobs with random ids (cron ticks) on our queues
        if token.encode() in (conn.hget(key, "origin") or b""):
            job_id = key.decode().split(":", 2)[2]
            conn.delete(key, f"rq:results:{job_id}")
    for key in conn.scan_iter(f"*{token}*"):
        conn.delete(key)
    for setkey in ("rq:queues", "rq:workers"):
        for member in conn.smembers(setkey):
            if token.encode() in member:
                conn.srem(setkey, member)
    for member in conn.zrange("rq:cron_jobs", 0, -1):
        if token.encode() in member:
            conn.zrem("rq:cron_jobs", member)
    conn.close()


@pytest.fixture
def shared_backbone(backbone):
    """Let the job functions reuse the session's efficientnet_lite0 instead of loading another."""
    from backend.serving import engine

    engine._BACKBONES[(backbone.name, str(backbone.device))] = backbone
    os.environ.setdefault("TAG2MASK_DEVICE", "cpu")
    return backbone


def _store_webhooks(bodies, settings):
    from backend.training.webhook import handle_training_event

    return [handle_training_event(b["action"], b, settings) for b in bodies]


def _queued_ids(conn):
    from backend.queue.queues import get_queue

    return get_queue("train", conn).job_ids


def _run_train_queue(conn):
    """A burst RQ SimpleWorker on the train queue (in this process); returns the finished jobs' results."""
    from rq import SimpleWorker
    from rq.job import Job

    from backend.queue.queues import get_queue

    q = get_queue("train", conn)
    ids = list(q.job_ids)
    SimpleWorker([q], connection=conn, name=f"w-{conn.token}").work(burst=True)
    jobs = [Job.fetch(i, connection=conn) for i in ids]
    for j in jobs:
        assert j.get_status().value == "finished", (j.id, j.latest_result() and j.latest_result().exc_string)
    return [j.return_value() for j in jobs]


# -- webhook ---------------------------------------------------------------------------------------
def test_webhook_stores_updates_and_deletes_examples(settings, horse_dir, monkeypatch):
    from backend.web.app import create_app

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")   # nothing listens: training must be deferred
    client = create_app(settings).test_client()
    stem_a, stem_b = horse_stems("train")[:2]
    mask_a, mask_b = horse_mask(horse_dir, stem_a), horse_mask(horse_dir, stem_b)
    image = str(horse_dir / "images" / f"{stem_a}.jpg")

    created = webhook_body("ANNOTATION_CREATED", 5, annotation(1, 11, 5, [brush_result(mask_a)]), image)
    r = client.post("/webhook", json=created)
    assert r.status_code == 200 and r.json["status"] == "recorded"
    assert r.json["training"]["status"] == "stored" and r.json["training"]["changed"] == 1
    store = ExampleStore.in_model_dir(settings.model_dir)
    ex = store.get(1)
    assert ex.project == "5" and ex.tags == ["horse"] and ex.image == image
    assert np.array_equal(ex.masks["horse"], mask_a)

    assert client.post("/webhook", json=created).json["training"]["changed"] == 0     # idempotent

    # the annotator corrects the mask (here: another real horse outline cropped to this photo's size)
    corrected = np.zeros_like(mask_a)
    h, w = min(mask_a.shape[0], mask_b.shape[0]), min(mask_a.shape[1], mask_b.shape[1])
    corrected[:h, :w] = mask_b[:h, :w]
    updated = webhook_body("ANNOTATION_UPDATED", 5, annotation(1, 11, 5, [brush_result(corrected)],
                                                               updated_at="2026-01-02T00:00:00Z"), image)
    r = client.post("/webhook", json=updated)
    assert r.status_code == 200 and r.json["training"]["changed"] == 1
    assert np.array_equal(store.get(1).masks["horse"], corrected)
    assert store.count(5) == 1 and store.revision(5) == 2

    r = client.post("/webhook", json={"action": "ANNOTATION_DELETED", "project": {"id": 5}, "annotation": {"id": 1}})
    assert r.status_code == 200 and r.json["training"]["changed"] == 1
    assert store.get(1) is None and store.count(5) == 0

    # Label Studio's own bulk events: an import (ANNOTATIONS_CREATED, lists) and a deletion (ANNOTATIONS_DELETED)
    stems = horse_stems("train")[2:4]
    bulk = {"action": "ANNOTATIONS_CREATED", "project": {"id": 5, "label_config": LABEL_CONFIG},
            "annotation": [annotation(40 + i, 50 + i, 5, [brush_result(horse_mask(horse_dir, s))])
                           for i, s in enumerate(stems)],
            "task": [{"id": 50 + i, "data": {"image": str(horse_dir / "images" / f"{s}.jpg")}}
                     for i, s in enumerate(stems)]}
    r = client.post("/webhook", json=bulk)
    assert r.status_code == 200 and r.json["training"]["changed"] == 2
    assert store.get(41).image.endswith(f"{stems[1]}.jpg") and store.get(41).masks["horse"].any()
    r = client.post("/webhook", json={"action": "ANNOTATIONS_DELETED", "project": {"id": 5},
                                      "annotations": [{"id": 40}, {"id": 41}]})
    assert r.status_code == 200 and r.json["training"]["changed"] == 2 and store.count(5) == 0

    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
    assert r.status_code == 200 and r.json["training"]["status"] == "ignored"
    assert "0 stored example(s)" in r.json["training"]["reason"]

    # Redis unreachable: Start training still answers 200, with a note; nothing is lost
    _store_webhooks(horse_webhooks(horse_dir, horse_stems("train")[4:6], project=5), settings)
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 5}})
    assert r.status_code == 200 and r.json["status"] == "recorded"
    assert r.json["training"]["status"] == "deferred" and "periodic check" in r.json["training"]["note"]

    events = [json.loads(line) for line in settings.events_path.read_text().splitlines()]
    assert [e["action"] for e in events] == ["ANNOTATION_CREATED", "ANNOTATION_CREATED", "ANNOTATION_UPDATED",
                                             "ANNOTATION_DELETED", "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED",
                                             "START_TRAINING", "START_TRAINING"]
    # a malformed annotation is refused with a clear 400, not a 500
    region = brush_result(mask_a)
    del region["original_width"], region["original_height"]
    r = client.post("/webhook", json=webhook_body("ANNOTATION_CREATED", 5, annotation(2, 12, 5, [region]), image))
    assert r.status_code == 400 and "original_width" in r.json["error"]
    assert store.get(2) is None


def test_start_training_webhook_enqueues_one_job(settings, horse_dir, rconn):
    from backend.web.app import create_app

    client = create_app(settings).test_client()
    for body in horse_webhooks(horse_dir, horse_stems("train")[:3], project=8):
        assert client.post("/webhook", json=body).json["training"]["changed"] == 1
    r = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 8, "label_config": LABEL_CONFIG}})
    assert r.status_code == 200
    assert r.json["training"]["status"] == "queued" and rconn.token in r.json["training"]["job_id"]
    again = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 8}}).json["training"]
    assert again["status"] == "coalesced" and again["job_id"] == r.json["training"]["job_id"]
    assert _queued_ids(rconn) == [r.json["training"]["job_id"]]


# -- tick -> job -> registry ---------------------------------------------------------------------
def test_tick_trains_once_and_a_regressing_version_is_not_promoted(settings, horse_dir, rconn, shared_backbone):
    from backend.training.schedule import check_projects, run_training_scheduler
    from backend.serving.versions import current_model_version
    from backend.training.webhook import handle_training_event
    from backend.serving.heads import load_project_heads

    project = "21"
    stems = horse_stems("train")[:12]
    bodies = horse_webhooks(horse_dir, stems, project)
    _store_webhooks(bodies[:9], settings)
    assert [e["status"] for e in check_projects(rconn, settings)] == ["waiting"]     # 9 < TRAIN_MIN_NEW
    assert _queued_ids(rconn) == []

    _store_webhooks(bodies[9:], settings)
    first = check_projects(rconn, settings)
    assert len(first) == 1 and first[0]["status"] == "queued" and first[0]["changes"] == 12
    second = check_projects(rconn, settings)
    assert second[0]["status"] == "coalesced" and second[0]["job_id"] == first[0]["job_id"]
    # the scheduler loop's tick sees the same: still one job
    assert run_training_scheduler(rconn, interval=0.01, settings=settings, max_ticks=1) == 1
    assert _queued_ids(rconn) == [first[0]["job_id"]]

    (report,) = _run_train_queue(rconn)
    assert report["status"] == "trained" and report["version"] == "v1" and report["promoted"]
    registry = ModelRegistry.in_model_dir(settings.model_dir)
    meta = registry.list(project)[-1]
    assert meta["current"] and meta["examples_revision"] == 12 and meta["promotion"]["promoted"]
    assert meta["counts"]["train"] + meta["counts"]["val"] == 12
    # every correction reaches the served heads: refit on all 12 after the choice on the held-out part
    assert meta["counts"]["refit"] == 12 and meta["counts"]["refit_mode"] == "continue" and "refit" in meta["seconds"]
    good_iou = meta["validation"]["fg_iou"]
    assert good_iou > 0.6, meta["validation"]
    fusion = meta["validation"]["fusion"]          # how the parts combine, chosen on the validation masks
    assert fusion["n_masks"] == meta["validation"]["n_val_masks"] and len(fusion["scores"]) == 12
    assert (fusion["chosen"] is None) == (fusion["n_masks"] < fusion["min_masks"])
    assert report["fusion_weight"] == fusion["chosen"] == registry.load(project)[0].get("fusion_weight")
    assert current_model_version(project, settings).endswith(f"+p{project}.v1")

    # nothing changed since v1: the tick waits, the job id of that revision is never enqueued again
    assert check_projects(rconn, settings)[0]["status"] == "waiting"
    assert _queued_ids(rconn) == []

    # the served heads segment a held-out horse
    heads = load_project_heads(registry, project, shared_backbone)
    assert heads.fusion_weight == fusion["chosen"]
    from explainers.imageio import load_image

    stem = horse_stems("test")[0]
    prob = heads.seg_probs(load_image(horse_dir / "images" / f"{stem}.jpg"))["horse"]
    gt = horse_mask(horse_dir, stem)
    iou = ((prob >= 0.5) & gt).sum() / ((prob >= 0.5) | gt).sum()
    assert iou > 0.5, iou

    # 10 corrections are withdrawn: the tick retrains on the 2 left, validation regresses -> kept out
    for b in bodies[2:]:
        out = handle_training_event("ANNOTATION_DELETED", {"project": {"id": project}, "annotation": b["annotation"]},
                                    settings)
        assert out["changed"] == 1
    tick = check_projects(rconn, settings)
    assert tick[0]["status"] == "queued" and tick[0]["changes"] == 10
    (report,) = _run_train_queue(rconn)
    assert report["version"] == "v2" and not report["promoted"]
    assert "fg_iou" in report["reason"] and report["validation"]["fg_iou"] < good_iou
    meta2 = registry.list(project)[-1]
    assert meta2["version"] == "v2" and not meta2["current"] and meta2["promotion"]["promoted"] is False
    assert meta2["promotion"]["regressions"][0]["metric"] == "fg_iou"
    assert registry.current(project) == "v1"
    assert current_model_version(project, settings).endswith(".v1")


def test_one_training_per_project_at_a_time(settings, horse_dir, rconn, shared_backbone):
    from backend.storage.keys import train_lock_key
    from backend.training.trainer import train_project

    _store_webhooks(horse_webhooks(horse_dir, horse_stems("train")[:3], project=31), settings)
    opts = {"model_dir": str(settings.model_dir), "local_roots": [str(horse_dir / "images")]}
    held = rconn.lock(train_lock_key(31), timeout=30)
    assert held.acquire(blocking=False)
    try:
        out = train_project("31", opts, connection=rconn)
        assert out["status"] == "skipped" and "running" in out["reason"]
    finally:
        held.release()
    assert ModelRegistry.in_model_dir(settings.model_dir).versions("31") == []


def test_heads_cache_switches_to_a_new_promoted_version(settings, horse_dir, shared_backbone):
    from backend.serving.heads import ProjectHeadsCache
    from backend.training.trainer import train_and_register
    from explainers.imageio import load_image
    from explainers.training import Sample

    registry = ModelRegistry.in_model_dir(settings.model_dir)
    stems = horse_stems("train")[:6]
    samples = [Sample(key=s, tags=["horse"], masks={"horse": horse_mask(horse_dir, s)},
                      load=lambda s=s: load_image(horse_dir / "images" / f"{s}.jpg")) for s in stems]
    clock = [0.0]
    cache = ProjectHeadsCache(registry, shared_backbone, ttl=30, clock=lambda: clock[0])
    assert cache.get("41") == (None, None)
    fast = {"seg_epochs": 10, "clf_epochs": 50}
    assert train_and_register(samples, "41", registry, shared_backbone, config=fast)["version"] == "v1"
    assert cache.get("41") == (None, None)            # within the ttl: the cached answer
    clock[0] += 31
    version, heads = cache.get("41")
    assert version == "v1" and heads.labels == ["horse"]
    r = train_and_register(samples, "41", registry, shared_backbone, config=fast, force=True)
    assert r["promoted"] and r["version"] == "v2"
    clock[0] += 31
    version2, heads2 = cache.get("41")
    assert version2 == "v2" and heads2 is not heads
    registry.rollback("41")
    clock[0] += 31
    assert cache.get("41")[0] == "v1"


def test_rq_cron_tick_queues_and_a_worker_trains(settings, horse_dir, rconn, shared_backbone):
    """RQ 3's CronScheduler enqueues the tick; a burst worker runs it and then the training it queued."""
    from rq.cron import CronScheduler

    from backend.training.schedule import register_cron

    settings.train_min_new = 3
    _store_webhooks(horse_webhooks(horse_dir, horse_stems("train")[:4], project=51), settings)
    cron = CronScheduler(rconn, name=f"cron-{rconn.token}")
    job = register_cron(cron, settings, interval=3600)
    assert rconn.token in job.name
    assert [j.name for j in cron.enqueue_jobs()] == [job.name]
    assert cron.enqueue_jobs() == []                        # not due again for an hour
    results = _run_train_queue(rconn)                       # the tick job
    assert results[0][0]["status"] == "queued"
    reg = ModelRegistry.in_model_dir(settings.model_dir)
    assert reg.current("51") == "v1" and reg.meta("51", "v1")["examples_revision"] == 4


def test_a_label_imagenet_lacks_becomes_predictable_from_tagged_photos(settings, horse_dir, tmp_path, rconn,
                                                                       shared_backbone):
    """Choices only (no masks): "pony-photo" on 5 horses, "other-photo" on 4 other real photos."""
    from PIL import Image
    from skimage import data

    from ls_payloads import choices_result
    from backend.training.webhook import handle_training_event
    from backend.serving.heads import load_project_heads
    from explainers.imageio import load_image

    others = {"chelsea": data.chelsea(), "coffee": data.coffee(), "rocket": data.rocket(),
              "motorcycle": data.stereo_motorcycle()[0], "astronaut": data.astronaut()}
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, img in others.items():
        Image.fromarray(img).save(photos / f"{name}.png")
    settings.local_roots = [horse_dir / "images", photos]
    items = [(str(horse_dir / "images" / f"{s}.jpg"), "pony-photo") for s in horse_stems("train")[:5]]
    items += [(str(photos / f"{n}.png"), "other-photo") for n in ("chelsea", "coffee", "rocket", "motorcycle")]
    for i, (image, label) in enumerate(items):
        body = webhook_body("ANNOTATION_CREATED", 61, annotation(600 + i, 700 + i, 61, [choices_result(label)]), image)
        assert handle_training_event(body["action"], body, settings)["changed"] == 1
    queued = handle_training_event("START_TRAINING", {"project": {"id": 61}}, settings, connection=rconn)
    assert queued["status"] == "queued"
    (report,) = _run_train_queue(rconn)
    assert report["labels"] == ["other-photo", "pony-photo"] and report["promoted"]
    heads = load_project_heads(ModelRegistry.in_model_dir(settings.model_dir), 61, shared_backbone)
    assert heads.segmenter is None                          # tags only: the CAM path stays for masks
    horse = heads.tag_probs(load_image(horse_dir / "images" / f"{horse_stems('test')[0]}.jpg"))
    astronaut = heads.tag_probs(others["astronaut"])
    assert horse["pony-photo"] > 0.5 > horse["other-photo"], horse
    assert astronaut["other-photo"] > 0.5 > astronaut["pony-photo"], astronaut


def test_scheduler_loop_survives_redis_being_down(settings, caplog):
    import threading

    from backend.training.schedule import run_training_scheduler

    dead = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    assert run_training_scheduler(dead, interval=0.1, stop_event=stop, settings=settings) == 0
    assert "Redis error" in caplog.text


def test_models_reach_a_host_that_shares_only_redis(settings, horse_dir, rconn, shared_backbone):
    """The training job publishes the promoted heads to Redis; a worker elsewhere (no MODEL_DIR)
    serves them through ProjectHeadsCache(RedisModelStore), and follows a rollback synced by the loop."""
    from backend.serving.heads import ProjectHeadsCache
    from backend.storage.model_mirror import RedisModelStore
    from backend.training.schedule import run_training_scheduler
    from backend.training.trainer import train_and_register, train_project
    from explainers.imageio import load_image

    _store_webhooks(horse_webhooks(horse_dir, horse_stems("train")[:6], project=71), settings)
    opts = {"model_dir": str(settings.model_dir), "local_roots": [str(horse_dir / "images")], "trigger": "manual",
            "config": {"seg_epochs": 10, "clf_epochs": 50}}
    report = train_project("71", opts, connection=rconn)
    assert report["published"] == "v1"

    remote = RedisModelStore(rconn)
    clock = [0.0]
    cache = ProjectHeadsCache(remote, shared_backbone, ttl=30, clock=lambda: clock[0])
    version, heads = cache.get("71")
    assert version == "v1" and heads.segmenter is not None
    photo = load_image(horse_dir / "images" / f"{horse_stems('test')[1]}.jpg")
    local = ProjectHeadsCache(ModelRegistry.in_model_dir(settings.model_dir), shared_backbone).get("71")[1]
    assert abs(heads.tag_probs(photo)["horse"] - local.tag_probs(photo)["horse"]) < 1e-6

    registry = ModelRegistry.in_model_dir(settings.model_dir)
    samples = [e.to_sample(load=lambda e=e: load_image(e.image))
               for e in ExampleStore.in_model_dir(settings.model_dir).list("71")]
    # v2 promoted on the training host outside a job (as `tag2mask train` / `models promote` do)
    assert train_and_register(samples, "71", registry, shared_backbone, config=opts["config"], force=True)["promoted"]
    assert remote.current("71") == "v1"                           # not published yet
    run_training_scheduler(rconn, interval=3600, settings=settings, max_ticks=1)
    assert remote.current("71") == "v2"
    clock[0] += 31
    assert cache.get("71")[0] == "v2"
