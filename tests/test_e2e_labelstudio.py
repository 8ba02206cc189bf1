"""End to end: a real Label Studio 1.23.2 (own venv) + the real tag2mask backend over 127.0.0.1.

Run: ``TAG2MASK_THREADS=1 pytest tests/test_e2e_labelstudio.py -m labelstudio -q``
(first run installs Label Studio into ~/.cache/tag2mask/ls-venv, ~40 s; start ~25 s).
The raw exchange of one /predict is written to $TAG2MASK_E2E_EXCHANGE (default
/tmp/predict_exchange.json) with the RLE trimmed.
"""
from __future__ import annotations

import copy
import json
import os
import time

import numpy as np
import pytest
from PIL import Image

from backend.labelstudio.config import DEFAULT_LABEL_CONFIG
from backend.labelstudio.results import decode_rle
from tests.conftest import horse_stems
from tests.labelstudio import BackendProcess

pytestmark = pytest.mark.labelstudio

# photos the classifier itself tags as horses (so the classifier path is exercised); test split
STEMS = ["horse283", "horse280", "horse284", "horse285"]
IOU_FLOOR = 0.35


def _iou(a, b) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(scope="module")
def stack(label_studio, tmp_path_factory):
    assert set(STEMS) <= set(horse_stems("test"))
    timings = {}
    t = time.monotonic()
    ls = label_studio
    backend = BackendProcess(env={"TAG2MASK_PRESET": "fast"}, workdir=tmp_path_factory.mktemp("backend"))
    try:
        backend.start()
        timings["ls_start_s"] = ls.start_seconds
        timings["stack_ready_s"] = time.monotonic() - t
        yield ls, backend, timings
    finally:
        backend.stop()
        print("\nbackend log tail:\n", backend.log_path.read_text(errors="replace")[-1500:]
              if backend.log_path.exists() else "")


@pytest.fixture(scope="module")
def project(stack, horse_dir):
    ls, backend, timings = stack
    proj = ls.create_project("tag2mask e2e", DEFAULT_LABEL_CONFIG)
    task_ids = ls.import_files(proj["id"], [horse_dir / "images" / f"{s}.jpg" for s in STEMS])
    assert len(task_ids) == len(STEMS)
    # upload order == task id order; map each task to its photo by the stored file name
    stem_of = {}
    for tid in task_ids:
        url = ls.task(tid)["data"]["image"]
        assert url.startswith("/data/upload/")
        stem_of[tid] = next(s for s in STEMS if url.endswith(f"-{s}.jpg") or url.endswith(f"/{s}.jpg"))
    ml = ls.connect_ml(proj["id"], backend.url)
    return proj, task_ids, stem_of, ml


def test_connect_predict_store(stack, project, horse_dir):
    ls, backend, timings = stack
    proj, task_ids, stem_of, ml = project
    assert ls.ml(ml["id"])["state"] == "CO"
    version = ls.ml(ml["id"]).get("model_version")

    # the raw exchange of one /predict, recorded for the docs
    exchange = ls.api("POST", f"/api/ml/{ml['id']}/predict/test?random=true", json={}, timeout=300)
    _record_exchange(exchange)

    t = time.monotonic()
    ls.retrieve_predictions(proj["id"])
    timings["retrieve_s"] = time.monotonic() - t
    setup_version = None
    for tid in task_ids:
        preds = ls.predictions(tid)
        assert len(preds) == 1, f"task {tid}: {len(preds)} predictions"
        pred = preds[0]
        setup_version = setup_version or pred["model_version"]
        assert pred["model_version"] == setup_version and pred["model_version"].startswith("tag2mask-")
        assert pred["score"] is not None and 0 < pred["score"] <= 1
        gt = np.asarray(Image.open(horse_dir / "masks" / f"{stem_of[tid]}.png")) > 0
        h, w = gt.shape
        types = [r["type"] for r in pred["result"]]
        assert {"choices", "brushlabels", "polygonlabels", "rectanglelabels"} <= set(types)
        for r in pred["result"]:
            assert r["to_name"] == "image" and r["from_name"] in ("tag", "brush", "polygon", "box")
            assert "score" in r
            v = r["value"]
            if r["type"] == "brushlabels":
                assert v["brushlabels"] == ["Horse"]
                mask = decode_rle(v["rle"], h, w)
                iou = _iou(mask, gt)
                timings[f"iou_{stem_of[tid]}"] = round(iou, 3)
                assert iou > IOU_FLOOR
            elif r["type"] == "polygonlabels":
                pts = np.array(v["points"])
                assert len(pts) >= 3 and pts.min() >= 0 and pts.max() <= 100
            elif r["type"] == "rectanglelabels":
                assert 0 <= v["x"] and 0 <= v["y"] and v["x"] + v["width"] <= 100.001 and v["y"] + v["height"] <= 100.001
            elif r["type"] == "choices":
                assert "Horse" in v["choices"]
            if r["type"] != "choices":
                assert (r["original_width"], r["original_height"]) == (w, h)
    if version:
        assert version == setup_version

    # a second retrieve adds no duplicates (same model_version as /setup)
    ls.retrieve_predictions(proj["id"])
    for tid in task_ids:
        assert len(ls.predictions(tid)) == 1
    print("\ne2e timings:", json.dumps(timings))


def test_annotation_and_training_events_reach_the_backend(stack, project):
    ls, backend, _ = stack
    proj, task_ids, _, ml = project
    result = [{"from_name": "tag", "to_name": "image", "type": "choices", "value": {"choices": ["Horse"]}}]
    ann = ls.annotate(task_ids[0], result)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e["action"] == "ANNOTATION_CREATED" for e in backend.events()):
        time.sleep(0.5)
    created = [e for e in backend.events() if e["action"] == "ANNOTATION_CREATED"]
    assert created and created[-1]["annotation"]["id"] == ann["id"]
    assert created[-1]["task"]["id"] == task_ids[0] and created[-1]["project"] == proj["id"]

    ls.train(ml["id"])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(e["action"] == "START_TRAINING" for e in backend.events()):
        time.sleep(0.5)
    assert any(e["action"] == "START_TRAINING" and e["project"] == proj["id"] for e in backend.events())


def _record_exchange(exchange) -> None:
    """Write Label Studio's raw /predict test exchange (RLE trimmed) for the docs."""
    data = copy.deepcopy(exchange)

    def trim(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if k == "rle" and isinstance(v, list) and len(v) > 12:
                    obj[k] = v[:12] + [f"... {len(v) - 12} more"]
                elif k in ("access_token",) and isinstance(v, str):
                    obj[k] = "<redacted>"
                else:
                    trim(v)
        elif isinstance(obj, list):
            for v in obj:
                trim(v)
        elif isinstance(obj, str) and obj.lstrip().startswith("{"):
            pass
        return obj

    if isinstance(data, dict):
        for key in ("request", "response"):
            if isinstance(data.get(key), str):
                try:
                    data[key] = json.loads(data[key])
                except ValueError:
                    pass
    trim(data)
    path = os.environ.get("TAG2MASK_E2E_EXCHANGE", "/tmp/predict_exchange.json")
    try:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    except OSError:
        pass


def test_label_command_output_imports_into_label_studio(stack, horse_dir, tmp_path):
    """`tag2mask label`'s tasks.json and label_config.xml are accepted by Label Studio as they are:
    one task per photo, each with its stored prediction whose brush mask overlaps the ground truth."""
    from backend.cli.main import main

    ls, _, _ = stack
    stems = STEMS[:2]
    out = tmp_path / "out"
    assert main(["label", *[str(horse_dir / "images" / f"{s}.jpg") for s in stems],
                 "--tags", "horse", "--preset", "fast", "--out", str(out), "-q"]) == 0
    proj = ls.create_project("tag2mask label import", (out / "label_config.xml").read_text())
    ls.api("POST", f"/api/projects/{proj['id']}/import", data=(out / "tasks.json").read_bytes(),
           headers={"Content-Type": "application/json"})
    tasks = ls.tasks(proj["id"])
    assert len(tasks) == len(stems)
    for task in tasks:
        stem = next(s for s in stems if task["data"]["image"].endswith(f"{s}.jpg"))
        preds = ls.predictions(task["id"])
        assert len(preds) == 1 and preds[0]["model_version"].startswith("tag2mask-")
        brush = [r for r in preds[0]["result"] if r["type"] == "brushlabels"]
        assert len(brush) == 1
        gt = np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0
        assert _iou(decode_rle(brush[0]["value"]["rle"], *gt.shape), gt) > IOU_FLOOR
