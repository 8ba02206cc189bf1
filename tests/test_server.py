"""backend.web.app: the Flask app through its test client (real model, real horse photos) and a real
gunicorn process on a free port."""
from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.labelstudio.results import decode_rle
from backend.serving.engine import engine_loaded
from backend.web.app import create_app
from backend.settings import Settings
from tests.backend_process import backend_env, backend_process, free_port
from tests.conftest import horse_stems

TOKEN = "tok-should-never-leak-42"
IOU_FLOOR = 0.4     # fast preset, classifier-chosen tags; measured ~0.6-0.8 on these photos


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def stems():
    """horse283: the classifier itself says horse (p~0.8); horse280: annotated; horse279: the
    classifier says dog (p~0.7), so only a human "Horse" annotation makes it a horse (all test split)."""
    chosen = ["horse283", "horse280", "horse279"]
    assert set(chosen) <= set(horse_stems("test"))
    return chosen


@pytest.fixture(scope="module")
def junk_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("junk")
    (root / "notimage.jpg").write_bytes(b"GIF89a but not really an image")
    return root


@pytest.fixture(scope="module")
def settings(horse_dir, junk_root, tmp_path_factory):
    return Settings.from_env(env={}, model_dir=tmp_path_factory.mktemp("model_dir"), preset="fast",
                             local_roots=[horse_dir, junk_root], warmup=False,
                             label_studio_url="http://127.0.0.1:9", label_studio_api_key=TOKEN)


@pytest.fixture(scope="module")
def client(settings):
    return create_app(settings).test_client()


def test_health_and_setup_never_load_the_model(horse_dir, tmp_path):
    s = Settings.from_env(env={}, backbone="mobilenet_v2", model_dir=tmp_path, warmup=False)
    c = create_app(s).test_client()
    for path in ("/health", "/"):
        r = c.get(path)
        assert r.status_code == 200 and r.json["status"] == "UP"
        assert r.json["model_class"] == "Tag2MaskModel" and r.json["model_loaded"] is False
    r = c.post("/setup", json={"project": "3.1700000000", "schema": DEFAULT_LABEL_CONFIG,
                               "hostname": "http://localhost:8080", "access_token": TOKEN})
    assert r.status_code == 200 and re.fullmatch(r"tag2mask-0\.1\.0-mobilenet_v2-balanced-[0-9a-f]{6}", r.json["model_version"])
    assert not engine_loaded(s)
    assert c.get("/versions", json={"project": "3"}).json == {"versions": [r.json["model_version"]]}
    assert c.post("/versions").json == {"versions": [r.json["model_version"]]}


def test_bad_requests_are_clean_4xx(client):
    r = client.post("/setup", data=b"{not json", content_type="application/json")
    assert r.status_code == 400 and "not valid JSON" in r.json["error"]
    r = client.post("/setup", json={"project": "1.1", "schema": "<View><Text name='t' value='$t'/></View>"})
    assert r.status_code == 400 and "no <Image> tag" in r.json["error"]
    r = client.post("/predict", json={"label_config": DEFAULT_LABEL_CONFIG})
    assert r.status_code == 400 and "tasks" in r.json["error"]
    r = client.post("/predict", json={"tasks": [{"data": {"image": "x"}}], "project": "77.1"})
    assert r.status_code == 400 and "labeling config" in r.json["error"]
    r = client.post("/predict", json=[1, 2])
    assert r.status_code == 400
    r = client.get("/nope")
    assert r.status_code == 404 and "error" in r.json
    r = client.post("/webhook", json={"no": "action"})
    assert r.status_code == 400


def test_predict_batch_with_bad_tasks_in_the_middle(client, horse_dir, stems):
    setup = client.post("/setup", json={"project": "5.1700000000", "schema": DEFAULT_LABEL_CONFIG})
    version = setup.json["model_version"]
    tasks = [
        {"id": 1, "data": {"image": f"/data/local-files/?d=images/{stems[0]}.jpg"}},
        {"id": 2, "data": {"image": "/data/local-files/?d=images/does-not-exist.jpg"}},
        {"id": 3, "data": {"image": "/data/local-files/?d=notimage.jpg"}},
        {"id": 4, "data": {"image": "/data/local-files/?d=images/../../../../etc/passwd"}},
        {"id": 5, "data": {"image": "/data/upload/5/x.jpg"}},               # Label Studio unreachable
        {"id": 6, "data": {"image": f"/data/local-files/?d=images/{stems[1]}.jpg"},
         "annotations": [
             {"id": 10, "was_cancelled": False, "created_at": "2026-01-01T00:00:00Z",
              "result": [{"from_name": "tag", "to_name": "image", "type": "choices", "value": {"choices": ["Dog"]}}]},
             {"id": 11, "was_cancelled": False, "created_at": "2026-01-02T00:00:00Z",
              "result": [{"from_name": "tag", "to_name": "image", "type": "choices", "value": {"choices": ["Horse"]}}]},
             {"id": 12, "was_cancelled": True, "created_at": "2026-01-03T00:00:00Z",
              "result": [{"from_name": "tag", "to_name": "image", "type": "choices", "value": {"choices": ["Cat"]}}]},
         ]},
        {"id": 7, "data": {"image": f"/data/local-files/?d=images/{stems[2]}.jpg"},
         "annotations": [{"id": 13, "result": [{"from_name": "tag", "to_name": "image", "type": "choices",
                                                "value": {"choices": ["horse"]}}]}]},
    ]
    r = client.post("/predict", json={"tasks": tasks, "project": "5.1700000000", "label_config": DEFAULT_LABEL_CONFIG,
                                      "params": {"login": None, "password": None, "context": None}})
    assert r.status_code == 200
    body = r.get_data(as_text=True)
    assert TOKEN not in body and "Traceback" not in body
    results = r.json["results"]
    assert len(results) == len(tasks)
    for i in (1, 2, 3, 4):
        assert "result" not in results[i] and results[i]["error"] and results[i]["model_version"] == version
    assert "no such file" in results[1]["error"]
    assert "not an image" in results[2]["error"]
    assert "not allowed" in results[3]["error"]
    assert "download failed" in results[4]["error"]
    for i, stem in ((0, stems[0]), (5, stems[1])):
        pred = results[i]
        assert pred["model_version"] == version and 0 < pred["score"] <= 1
        gt = np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0
        h, w = gt.shape
        brush = [it for it in pred["result"] if it["type"] == "brushlabels"]
        assert len(brush) == 1 and brush[0]["value"]["brushlabels"] == ["Horse"]
        mask = decode_rle(brush[0]["value"]["rle"], h, w)
        print(stem, "IoU", round(_iou(mask, gt), 3))
        assert _iou(mask, gt) > IOU_FLOOR
        assert (brush[0]["original_width"], brush[0]["original_height"]) == (w, h)
        for it in pred["result"]:
            assert it["to_name"] == "image" and "score" in it
            if it["type"] == "polygonlabels":
                pts = np.array(it["value"]["points"])
                assert pts.min() >= 0 and pts.max() <= 100
        choices = [it for it in pred["result"] if it["type"] == "choices"]
        assert choices[0]["value"]["choices"][0] == "Horse"
    # task 6: the latest non-cancelled annotation says Horse only
    assert [it["value"]["choices"] for it in results[5]["result"] if it["type"] == "choices"] == [["Horse"]]
    # task 7: the classifier would say Dog; the human tag (case-insensitive "horse") wins
    assert {lab for it in results[6]["result"] for lab in it["value"][it["type"]]} == {"Horse"}
    m = client.get("/metrics").json
    assert m["predict_tasks_total"] >= 7 and m["predict_tasks_failed"] >= 4
    text = client.get("/metrics?format=prometheus")
    assert text.mimetype == "text/plain" and "tag2mask_predict_tasks_total" in text.get_data(as_text=True)


def test_predicted_values_and_unmappable_labels(client, stems):
    xml = """<View><Image name="photo" value="$url"/>
      <BrushLabels name="mask" toName="photo">
        <Label value="Pony" predicted_values="sorrel"/>
        <Label value="Unicorn"/>
      </BrushLabels></View>"""
    r = client.post("/predict", json={"label_config": xml, "project": "9.1", "tasks": [
        {"id": 1, "data": {"url": f"/data/local-files/?d=images/{stems[0]}.jpg"}},
        {"id": 2, "data": {"image": "wrong key"}}]})
    res = r.json["results"]
    assert [it["value"]["brushlabels"] for it in res[0]["result"]] == [["Pony"]]
    assert all(it["from_name"] == "mask" and it["to_name"] == "photo" for it in res[0]["result"])
    assert "result" not in res[1] and "'url'" in res[1]["error"]


def test_webhook_records_training_events(client, settings):
    events = Path(settings.model_dir) / "events.jsonl"
    before = len(events.read_text().splitlines()) if events.exists() else 0
    ann = {"id": 42, "result": [{"from_name": "tag", "to_name": "image", "type": "choices",
                                 "value": {"choices": ["Horse"]}}]}
    r = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": ann,
                                      "task": {"id": 7, "data": {"image": "/data/upload/1/a.jpg"}},
                                      "project": {"id": 1, "label_config": DEFAULT_LABEL_CONFIG}})
    assert r.status_code == 200 and r.json["status"] == "recorded"
    assert client.post("/webhook", json={"action": "TASKS_CREATED", "tasks": [], "project": {"id": 1}}).json["status"] == "ignored"
    assert client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": 1}}).json["status"] == "recorded"
    lines = [json.loads(x) for x in events.read_text().splitlines()[before:]]
    assert [x["action"] for x in lines] == ["ANNOTATION_CREATED", "START_TRAINING"]
    assert lines[0]["annotation"]["id"] == 42 and lines[0]["task"]["id"] == 7 and lines[0]["project"] == 1


def test_basic_auth(settings, tmp_path):
    s = Settings.from_env(env={}, model_dir=tmp_path, warmup=False, basic_auth_user="ann", basic_auth_pass="s3cret")
    c = create_app(s).test_client()
    assert c.get("/health").status_code == 200
    r = c.post("/setup", json={"schema": DEFAULT_LABEL_CONFIG})
    assert r.status_code == 401 and r.json == {"error": "authentication required"}
    assert "Basic" in r.headers["WWW-Authenticate"]
    bad = base64.b64encode(b"ann:wrong").decode()
    assert c.post("/setup", json={}, headers={"Authorization": f"Basic {bad}"}).status_code == 401
    good = base64.b64encode(b"ann:s3cret").decode()
    r = c.post("/setup", json={"schema": DEFAULT_LABEL_CONFIG}, headers={"Authorization": f"Basic {good}"})
    assert r.status_code == 200 and "model_version" in r.json
    assert c.get("/metrics").status_code == 401


def test_gunicorn_smoke(horse_dir, stems, tmp_path):
    port = free_port()
    env = backend_env(TAG2MASK_PRESET="fast", TAG2MASK_LOCAL_ROOTS=str(horse_dir), MODEL_DIR=str(tmp_path / "md"))
    base = f"http://127.0.0.1:{port}"
    with backend_process(port, env, cwd=tmp_path):
        for _ in range(120):
            try:
                if requests.get(base + "/health", timeout=1).json()["status"] == "UP":
                    break
            except requests.RequestException:
                time.sleep(0.5)
        else:
            pytest.fail("gunicorn did not answer /health")
        version = requests.post(base + "/setup", json={"project": "1.2", "schema": DEFAULT_LABEL_CONFIG},
                                timeout=5).json()["model_version"]
        r = requests.post(base + "/predict", timeout=120, json={
            "tasks": [{"id": 1, "data": {"image": f"/data/local-files/?d=images/{stems[0]}.jpg"}},
                      {"id": 2, "data": {"image": "/data/local-files/?d=../x.jpg"}}],
            "label_config": DEFAULT_LABEL_CONFIG, "project": "1.2"})
        res = r.json()["results"]
        assert len(res) == 2 and res[0]["model_version"] == version and "result" not in res[1]
        assert {it["type"] for it in res[0]["result"]} == {"choices", "brushlabels", "polygonlabels", "rectanglelabels"}
        assert requests.post(base + "/predict", data="{bad", timeout=5).status_code == 400


def test_inline_predict_uses_the_result_cache_and_survives_a_dead_redis(settings, stems, tmp_path):
    """Inline /predict (queue off) goes through the workers' predict function: with REDIS_URL set, a
    second /predict of the same task is answered from the result cache; with that Redis gone, the
    cache is skipped and every task is still predicted."""
    import os
    from dataclasses import replace

    import redis

    from tests.redis_servers import delete_token_keys, new_token, system_redis_or_skip

    url = system_redis_or_skip()
    token = new_token()
    os.environ["TAG2MASK_NAMESPACE"] = token          # the keys of this test only
    try:
        s = replace(settings, model_dir=tmp_path, redis_url=url, queue="off")
        c = create_app(s).test_client()
        task = {"id": 41, "data": {"image": f"/data/local-files/?d=images/{stems[0]}.jpg"},
                "annotations": [{"id": 1, "result": [{"from_name": "tag", "to_name": "image", "type": "choices",
                                                      "value": {"choices": ["Horse"]}}]}]}
        first = c.post("/predict", json={"tasks": [task], "label_config": DEFAULT_LABEL_CONFIG}).json["results"][0]
        assert first["result"], first
        keys = list(redis.Redis.from_url(url).scan_iter(match=f"{token}:result:41:*"))
        assert len(keys) == 2, keys                      # by photo content and by photo reference
        again = c.post("/predict", json={"tasks": [task], "label_config": DEFAULT_LABEL_CONFIG}).json["results"][0]
        assert again == first
        dead = create_app(replace(s, redis_url="redis://127.0.0.1:9/0")).test_client()
        out = dead.post("/predict", json={"tasks": [task], "label_config": DEFAULT_LABEL_CONFIG}).json["results"][0]
        assert out.get("result") and "error" not in out, out
    finally:
        os.environ.pop("TAG2MASK_NAMESPACE", None)
        delete_token_keys(redis.Redis.from_url(url), token)
