"""An annotated tag that cannot be segmented does not sink the task's other tags, in /predict inline
and through the job queue (real workers, real Redis), and in explicit-tag jobs.

Photos: COCO dev 294, a kitchen (person, microwave, clock), annotated Microwave, Person, Clock
(ImageNet-1k has no person class: refused on purpose); COCO dev 25, a giraffe, annotated Person,
Giraffe (no class for either). Real engine (fast preset), real photos.
"""
from __future__ import annotations

import pytest

from backend.labelstudio.results import UNUSABLE_TAG_HINT
from backend.web.app import create_app
from backend.settings import Settings
from redis_servers import embedded_valkey, server, start_worker, worker_env  # noqa: F401

KITCHEN, GIRAFFE = "000000000294", "000000000025"
LABELS = ["Microwave", "Person", "Clock", "Giraffe"]
CONFIG = "\n".join([
    "<View>",
    '  <Image name="image" value="$image"/>',
    '  <Choices name="tag" toName="image" choice="multiple">',
    *[f'    <Choice value="{v}"/>' for v in LABELS],
    "  </Choices>",
    '  <BrushLabels name="brush" toName="image">',
    *[f'    <Label value="{v}"/>' for v in LABELS],
    "  </BrushLabels>",
    "</View>",
])
PROJECT = "77"


def _task(tid: int, coco_dir, stem: str, choices: list[str]) -> dict:
    return {"id": tid, "data": {"image": str(coco_dir / "images" / f"{stem}.jpg")},
            "annotations": [{"id": 100 + tid, "result": [{"from_name": "tag", "to_name": "image", "type": "choices",
                                                          "value": {"choices": choices}}]}]}


def _tasks(coco_dir) -> list[dict]:
    return [_task(1, coco_dir, KITCHEN, ["Microwave", "Person", "Clock"]),
            _task(2, coco_dir, GIRAFFE, ["Person", "Giraffe"])]


def _predict(app, tasks) -> list[dict]:
    setup = app.post("/setup", json={"project": f"{PROJECT}.1700000000", "schema": CONFIG})
    assert setup.status_code == 200, setup.get_json()
    r = app.post("/predict", json={"tasks": tasks, "project": f"{PROJECT}.1700000000", "label_config": CONFIG})
    assert r.status_code == 200, r.get_json()
    results = r.get_json()["results"]
    assert len(results) == len(tasks)
    return results


def _brush_labels(pred: dict) -> set[str]:
    return {label for r in pred["result"] if r["type"] == "brushlabels" and r["value"]["rle"]
            for label in r["value"]["brushlabels"]}


def _check(results: list[dict]) -> None:
    """The kitchen: Microwave and Clock masks, one warning naming Person (reason + hint); the giraffe:
    no result, an error naming both tags' reasons and the hint."""
    kitchen, giraffe = results
    assert _brush_labels(kitchen) == {"Microwave", "Clock"}
    assert {c for r in kitchen["result"] if r["type"] == "choices" for c in r["value"]["choices"]} == \
        {"Microwave", "Clock"}
    (warning,) = kitchen["warnings"]
    assert warning.startswith("Tag 'Person' has no class in the ImageNet-1k classifier")
    assert warning.endswith(UNUSABLE_TAG_HINT)
    assert "result" not in giraffe and "warnings" not in giraffe
    error = giraffe["error"]
    assert (f"none of the task's annotated tags can be segmented ('Person', 'Giraffe'). {UNUSABLE_TAG_HINT} "
            "Reasons: tag 'Person' has no class in the ImageNet-1k classifier") in error


@pytest.fixture(scope="module")
def inline_results(coco_dir, tmp_path_factory):
    """/predict answered in the web process (no queue)."""
    settings = Settings.from_env(env={}, model_dir=tmp_path_factory.mktemp("model_dir"), preset="fast",
                                 local_roots=[coco_dir], warmup=False)
    return _predict(create_app(settings).test_client(), _tasks(coco_dir))


def test_predict_keeps_the_usable_tags_and_names_the_unusable_one(inline_results):
    _check(inline_results)


def test_the_same_through_the_job_queue(server, coco_dir, tmp_path, inline_results):
    """/predict waiting for a real worker: the same masks, the same warning, the same reason for the
    task that fails (the same sentence as inline, cut at the same length)."""
    settings = Settings.from_env(env={
        "REDIS_URL": server.url, "TAG2MASK_QUEUE": "on", "TAG2MASK_PRESET": "fast", "TAG2MASK_WARMUP": "0",
        "TAG2MASK_LOCAL_ROOTS": str(coco_dir), "MODEL_DIR": str(tmp_path / "model_dir"),
        "TAG2MASK_PREDICT_DEADLINE": "120"})
    app = create_app(settings).test_client()
    log = tmp_path / "worker.log"
    worker = start_worker(server, "--name", f"{server.token}-w", log=log,
                          env=worker_env(server, TAG2MASK_PRESET="fast", TAG2MASK_LOCAL_ROOTS=str(coco_dir)))
    try:
        assert app.get("/health").get_json()["queue"]["mode"] == "queue"
        results = _predict(app, _tasks(coco_dir))
    finally:
        if worker.poll() is None:
            worker.terminate()
            worker.wait(timeout=30)
    assert "error" not in results[0], (results, log.read_text()[-3000:])
    _check(results)
    assert results[0]["warnings"] == inline_results[0]["warnings"]
    assert results[1]["error"] == inline_results[1]["error"]
    assert "left out" in log.read_text()          # the worker logs the left-out tag


def test_explicit_tag_jobs_carry_the_same_warning(coco_dir, inline_results, monkeypatch):
    """An explicit-tag task (CLI, scripts) goes through engine.predict_many directly: the same warning."""
    from backend.serving import predict

    monkeypatch.setenv("TAG2MASK_PRESET", "fast")
    monkeypatch.setenv("TAG2MASK_DEVICE", "cpu")
    monkeypatch.setenv("TAG2MASK_LOCAL_ROOTS", str(coco_dir))
    monkeypatch.setattr(predict, "_fetcher", None)
    (outcome,) = predict.predict_chunk([{"id": 1, "image": str(coco_dir / "images" / f"{KITCHEN}.jpg"),
                                      "tags": ["Microwave", "Person", "Clock"]}],
                                    label_config=CONFIG, model_version="v-explicit")
    assert outcome.error is None, outcome.error
    assert _brush_labels(outcome.prediction) == {"Microwave", "Clock"}
    assert outcome.prediction["warnings"] == inline_results[0]["warnings"]
