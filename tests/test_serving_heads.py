"""Issue 5, serving: predictions of a project use its promoted trained heads and report their version.

Real everything: heads trained on Weizmann horse photos with their ground-truth masks (efficientnet_lite0,
CPU), the Flask app through its test client (inline predictions), the queue worker's job function
(:func:`backend.predict.predict_one`, no Redis needed without a result cache), the registry on disk, the
machine's Redis at 127.0.0.1:6379 db 12 for the Redis model mirror and the scheduler (skipped when down).
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import horse_stems
from ls_payloads import LABEL_CONFIG, horse_mask, horse_webhooks
from test_training_jobs import REDIS_URL, rconn  # noqa: F401 - the machine's Redis (db 12), own namespace

from backend.labelstudio.results import decode_rle
from backend.storage.registry import ModelRegistry
from backend.settings import Settings

PROJECT = "88"
FAST = {"seg_epochs": 10, "clf_epochs": 50}
BASE = re.compile(r"^tag2mask-\d+\.\d+\.\d+-efficientnet_lite0-fast-[0-9a-f]{6}$")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, horse_dir, backbone):
    """MODEL_DIR with project 88's v1 (seg + classifier heads on 6 horse photos) promoted."""
    from backend.training.trainer import train_and_register
    from explainers.imageio import load_image
    from explainers.training import Sample

    model_dir = tmp_path_factory.mktemp("model_dir")
    registry = ModelRegistry.in_model_dir(model_dir)
    stems = horse_stems("train")[:6]
    samples = [Sample(key=s, tags=["horse"], masks={"horse": horse_mask(horse_dir, s)},
                      load=lambda s=s: load_image(horse_dir / "images" / f"{s}.jpg")) for s in stems]
    r = train_and_register(samples, PROJECT, registry, backbone, config=FAST)
    assert r["promoted"] and r["version"] == "v1"
    return model_dir


@pytest.fixture
def settings(trained, horse_dir, monkeypatch):
    monkeypatch.setenv("TAG2MASK_HEADS_TTL", "0.5")
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("TAG2MASK_MODEL_VERSION", raising=False)
    return Settings.from_env(env={}, model_dir=trained, preset="fast", device="cpu", local_roots=[horse_dir],
                             warmup=False, queue="off", heads_ttl=0.5)


def _brush(pred: dict, h: int, w: int) -> np.ndarray:
    (brush,) = [it for it in pred["result"] if it["type"] == "brushlabels"]
    assert brush["value"]["brushlabels"] == ["horse"]
    return decode_rle(brush["value"]["rle"], h, w)


def test_base_version_hashes_the_preset_and_keeps_the_override():
    from backend.serving.versions import base_model_version

    fast, balanced = (base_model_version(Settings.from_env(env={}, preset=p)) for p in ("fast", "balanced"))
    assert BASE.match(fast) and fast.startswith("tag2mask-") and fast[-6:] != balanced[-6:]
    assert base_model_version(Settings.from_env(env={"TAG2MASK_MODEL_VERSION": "mine-3"})) == "mine-3"


def test_a_project_is_served_with_its_promoted_heads(settings, trained, horse_dir):
    import time

    from backend.web.app import create_app

    stem = horse_stems("test")[0]
    truth = horse_mask(horse_dir, stem).astype(bool)
    h, w = truth.shape
    task = {"id": 5, "data": {"image": str(horse_dir / "images" / f"{stem}.jpg")}}
    client = create_app(settings).test_client()

    r = client.post("/setup", json={"project": f"{PROJECT}.1700000000", "schema": LABEL_CONFIG})
    assert r.status_code == 200
    version = r.json["model_version"]
    assert version.endswith(f"+p{PROJECT}.v1") and BASE.match(version.split("+")[0]), version
    r = client.post("/setup", json={"project": "89.1700000000", "schema": LABEL_CONFIG})
    base = r.json["model_version"]
    assert BASE.match(base), base

    (with_heads,) = client.post("/predict", json={"project": f"{PROJECT}.1", "tasks": [task]}).json["results"]
    (without,) = client.post("/predict", json={"project": "89.1", "tasks": [task]}).json["results"]
    assert with_heads["model_version"] == version and without["model_version"] == base
    m_heads, m_cam = _brush(with_heads, h, w), _brush(without, h, w)
    assert (m_heads ^ m_cam).sum() > 0.005 * h * w          # the seg head changed the mask
    assert _iou(m_heads, truth) > 0.5, _iou(m_heads, truth)  # and it still covers the horse
    print(f"IoU with heads {_iou(m_heads, truth):.3f}, CAM alone {_iou(m_cam, truth):.3f}")

    # a newer version promoted (here: v1's weights saved again) and a rollback reach the running app
    registry = ModelRegistry.in_model_dir(trained)
    ckpt, meta = registry.load(PROJECT)
    v2 = registry.save(PROJECT, ckpt, {k: v for k, v in meta.items() if k not in ("version", "promotion")})
    assert registry.promote(PROJECT, v2, force=True).promoted and v2 == "v2"
    try:
        assert client.post("/setup", json={"project": PROJECT}).json["model_version"].endswith("+p88.v2")
        time.sleep(0.6)                                      # the heads cache's ttl
        (pred,) = client.post("/predict", json={"project": PROJECT, "tasks": [task]}).json["results"]
        assert pred["model_version"].endswith("+p88.v2")
        assert (_brush(pred, h, w) == m_heads).all()        # same weights, same mask
    finally:
        registry.rollback(PROJECT)
    time.sleep(0.6)
    (pred,) = client.post("/predict", json={"project": PROJECT, "tasks": [task]}).json["results"]
    assert pred["model_version"] == version
    assert client.post("/versions", json={"project": PROJECT}).json == {"versions": [version]}


def test_a_queue_worker_uses_the_heads_of_the_version_it_was_asked_for(settings, trained, horse_dir, monkeypatch):
    """The worker's job function: the web process chose the version (it keys the result cache)."""
    from backend.serving import predict
    from backend.serving.versions import current_model_version

    monkeypatch.setenv("MODEL_DIR", str(trained))
    monkeypatch.setenv("TAG2MASK_PRESET", "fast")
    monkeypatch.setenv("TAG2MASK_DEVICE", "cpu")
    monkeypatch.setenv("TAG2MASK_LOCAL_ROOTS", str(horse_dir))
    monkeypatch.setattr(predict, "_fetcher", None)
    stem = horse_stems("test")[0]
    truth = horse_mask(horse_dir, stem).astype(bool)
    h, w = truth.shape
    task = {"id": 6, "image": str(horse_dir / "images" / f"{stem}.jpg"), "tags": None, "ls": True}
    version = current_model_version(PROJECT, settings)
    assert version.endswith("+p88.v1")
    pred, cached = predict.predict_one(task, label_config=LABEL_CONFIG, model_version=version, project=PROJECT)
    base_pred, _ = predict.predict_one(task, label_config=LABEL_CONFIG, model_version=version.split("+")[0],
                                    project="_")
    assert not cached and pred["model_version"] == version
    m_heads, m_cam = _brush(pred, h, w), _brush(base_pred, h, w)
    assert (m_heads ^ m_cam).sum() > 0.005 * h * w
    assert _iou(m_heads, truth) > 0.5

    # v2 promoted after the worker cached v1 (long ttl): asked for v2, it re-reads the registry at once
    from backend.serving.heads import get_heads_cache

    cache = get_heads_cache(Settings.from_env())
    monkeypatch.setattr(cache, "ttl", 3600.0)
    assert cache.get(PROJECT)[0] == "v1"
    registry = ModelRegistry.in_model_dir(trained)
    ckpt, meta = registry.load(PROJECT, "v1")
    v = registry.save(PROJECT, ckpt, {k: v for k, v in meta.items() if k not in ("version", "promotion")})
    assert registry.promote(PROJECT, v, force=True).promoted
    try:
        task["id"] = 7
        newer = current_model_version(PROJECT, settings)
        assert newer.endswith(f"+p88.{v}")
        pred, _ = predict.predict_one(task, label_config=LABEL_CONFIG, model_version=newer, project=PROJECT)
        assert pred["model_version"] == newer and cache.get(PROJECT)[0] == v
    finally:
        registry.promote(PROJECT, "v1", force=True)


def test_a_worker_on_another_host_reads_the_heads_from_redis(trained, horse_dir, rconn, tmp_path, monkeypatch):
    """No registry on this host (an empty MODEL_DIR), REDIS_URL set: the heads come from the Redis mirror."""
    from backend.serving.model import Tag2MaskModel
    from backend.storage.model_mirror import RedisModelStore
    from backend.serving.versions import current_model_version
    from explainers.imageio import load_image

    monkeypatch.setenv("TAG2MASK_HEADS_TTL", "0.5")
    web = Settings.from_env(env={}, model_dir=trained, preset="fast", device="cpu")
    assert RedisModelStore(rconn).publish(ModelRegistry.in_model_dir(trained), PROJECT) == "v1"
    remote = Settings.from_env(env={}, model_dir=tmp_path / "empty", preset="fast", device="cpu", redis_url=REDIS_URL,
                               warmup=False, heads_ttl=0.5)
    version = current_model_version(PROJECT, web)
    stem = horse_stems("test")[1]
    photo = load_image(horse_dir / "images" / f"{stem}.jpg")
    truth = horse_mask(horse_dir, stem).astype(bool)
    h, w = truth.shape
    model = Tag2MaskModel(remote, project_id=PROJECT, label_config=LABEL_CONFIG, version=version)
    plain = Tag2MaskModel(remote, label_config=LABEL_CONFIG)
    model.setup(), plain.setup()
    pred = model.predict_image(photo, model.parsed, ["horse"])
    base = plain.predict_image(photo, plain.parsed, ["horse"])
    assert pred["model_version"] == version and base["model_version"] == version.split("+")[0]
    m_heads, m_cam = _brush(pred, h, w), _brush(base, h, w)
    assert (m_heads ^ m_cam).sum() > 0.005 * h * w and _iou(m_heads, truth) > 0.5


def test_worker_scheduler_runs_the_training_scheduler(tmp_path, horse_dir, rconn, monkeypatch):
    """``tag2mask worker --scheduler`` (and so ``tag2mask up``): the training check runs beside RQ's janitor."""
    import threading
    import time

    from backend.queue.queues import get_queue
    from backend.training.webhook import handle_training_event
    from backend.queue.worker import run_scheduler

    monkeypatch.setenv("MODEL_DIR", str(tmp_path / "model_dir"))
    monkeypatch.setenv("TRAIN_MIN_NEW", "2")
    monkeypatch.setenv("TRAIN_INTERVAL", "1")
    settings = Settings.from_env()
    for body in horse_webhooks(horse_dir, horse_stems("train")[:2], project=93):
        assert handle_training_event(body["action"], body, settings)["changed"] == 1
    stop = threading.Event()
    thread = threading.Thread(target=run_scheduler, kwargs={"connection": rconn, "interval": 1, "stop": stop})
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not get_queue("train", rconn).job_ids and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive()
    ids = get_queue("train", rconn).job_ids
    assert len(ids) == 1 and "-93-" in ids[0], ids
