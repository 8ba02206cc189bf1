"""State a sender can grow or fill: the event log, the per-project models, echoed tag names.

Through the real Flask app (``create_app``'s test client, real example store on disk) and the real
engine (fast preset): a refused webhook leaves events.jsonl as it was, an accepted one with a huge
annotation is recorded in a bounded line; 1000 distinct projects in /setup keep at most MAX_PROJECTS
models in memory, the recent ones with their hostname and token; a long unusable annotated tag is
quoted cut short in the prediction's warnings and in a task's error.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from backend.serving.model import Tag2MaskModel
from backend.serving.project_model import MAX_ECHOED_TAG_CHARS
from backend.storage.event_log import MAX_EVENT_PART_CHARS
from backend.serving.engine import get_engine
from backend.web.app import MAX_PROJECTS, create_app
from backend.settings import Settings
from ls_payloads import LABEL_CONFIG, annotation, brush_result, horse_mask, webhook_body


@pytest.fixture
def settings(tmp_path, horse_dir):
    return Settings.from_env(env={}, model_dir=tmp_path / "model_dir", preset="fast", warmup=False,
                             local_roots=[horse_dir])


def _event_lines(settings) -> list[str]:
    path = settings.events_path
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def test_refused_webhooks_do_not_grow_the_event_log(settings, horse_dir):
    client = create_app(settings).test_client()
    image = str(horse_dir / "images" / "horse283.jpg")
    good = webhook_body("ANNOTATION_CREATED", 7, annotation(1, 11, 7, [brush_result(horse_mask(horse_dir, "horse283"))]),
                        image)
    assert client.post("/webhook", json=good).status_code == 200
    assert len(_event_lines(settings)) == 1
    before = settings.events_path.read_bytes()

    region = brush_result(horse_mask(horse_dir, "horse283"))
    region["original_width"] = -5                                         # refused by the example store
    big_bad = webhook_body("ANNOTATION_CREATED", 7, annotation(2, 12, 7, [region] + [{"pad": "x" * 100_000}]), image)
    for body in (big_bad, webhook_body("ANNOTATION_CREATED", 7, {"id": [1], "task": 12, "result": []}, image)):
        r = client.post("/webhook", json=body)
        assert r.status_code == 400 and "annotation not stored" in r.get_json()["error"], r.get_json()
    assert settings.events_path.read_bytes() == before


def test_a_huge_accepted_annotation_is_recorded_in_a_bounded_line(settings, horse_dir):
    client = create_app(settings).test_client()
    noise = np.random.default_rng(0).random((480, 640)) < 0.5            # an RLE of ~1 MB of JSON
    ann = annotation(3, 13, 7, [brush_result(noise)])
    assert len(json.dumps(ann)) > 5 * MAX_EVENT_PART_CHARS
    r = client.post("/webhook", json=webhook_body("ANNOTATION_CREATED", 7, ann,
                                                  str(horse_dir / "images" / "horse283.jpg")))
    assert r.status_code == 200 and r.get_json()["training"]["status"] == "stored", r.get_json()
    (line,) = _event_lines(settings)
    assert len(line) < MAX_EVENT_PART_CHARS + 2000
    record = json.loads(line)
    assert record["action"] == "ANNOTATION_CREATED" and record["project"] == 7 and record["task"]["id"] == 13
    assert record["annotation"]["omitted"].startswith("an object of ")


def test_setup_of_1000_projects_keeps_the_project_models_bounded(settings):
    app = create_app(settings)
    client = app.test_client()
    for i in range(1000):
        r = client.post("/setup", json={"project": f"{i}.1700000000", "hostname": f"http://ls-{i}:8080",
                                        "access_token": f"token-{i}"})
        assert r.status_code == 200
    projects = app.extensions["tag2mask"]["projects"]
    assert len(projects) == MAX_PROJECTS
    assert (projects["999"].hostname, projects["999"].access_token) == ("http://ls-999:8080", "token-999")
    assert projects[str(1000 - MAX_PROJECTS)].access_token == f"token-{1000 - MAX_PROJECTS}"
    assert "0" not in projects and str(999 - MAX_PROJECTS) not in projects
    # a project used again is kept: it is the most recent one now
    assert client.post("/setup", json={"project": str(1000 - MAX_PROJECTS)}).status_code == 200
    assert client.post("/setup", json={"project": "1000", "access_token": "token-1000"}).status_code == 200
    assert str(1000 - MAX_PROJECTS) in projects and str(1001 - MAX_PROJECTS) not in projects
    assert len(projects) == MAX_PROJECTS


LONG_TAG = "Zebra-like beast " * 12           # 204 characters: no label, no classifier class


@pytest.fixture(scope="module")
def engine():
    engine, _ = get_engine(Settings.from_env(env={}, preset="fast"))
    engine.set_heads(None)
    return engine


def test_a_long_unusable_tag_is_quoted_cut_short(engine, settings):
    model = Tag2MaskModel(settings, label_config=LABEL_CONFIG)
    model.setup()
    tag = LONG_TAG.strip()
    tags, skipped = model._tags_for(engine, None, ["horse"], ["horse", tag])
    assert tags == ["horse"]
    ((name, reason),) = skipped.items()
    assert name == tag[:MAX_ECHOED_TAG_CHARS] + f"… ({len(tag)} characters)"
    assert name in reason and tag not in reason
    with pytest.raises(ValueError) as info:
        model._tags_for(engine, None, ["horse"], [tag, tag + "!"])
    message = str(info.value)
    assert tag not in message and tag[:MAX_ECHOED_TAG_CHARS] in message

