"""End to end: a Label Studio project learns its tags and masks from its annotators (issue 14).

A real Label Studio 1.23.2, the real backend (gunicorn, inline predictions, ``balanced``), a real
train-queue worker on the embedded Valkey. The project's labels are horse and dog; before any
training the ImageNet classifier tags many Weizmann horses "dog" (Great Danes). Then 20 train horses
get annotations (Choices "horse" and their true brush mask), Start training makes a version, and
Retrieve predictions runs again on 20 other horses (the test split's first 20): their tags and the
fg IoU of their brush masks (every brush region, whatever its label, against the horse) are counted
before and after. Measured: 9 -> 20 of 20 tagged "horse" alone, brush fg IoU 0.7889 -> 0.8392
(+0.0503), Start training to a promoted version 30 s (2 CPU cores); the issue asks for 19 of 20 and
+0.05. With the label frequencies alone it was 17 of 20 and +0.037: three photos where ImageNet's
"horse" (sorrel) is below 0.005 and its "dog" above 0.5 stayed "dog" (and a horse tagged "dog" gets
no seg head); the nearest annotated photo (:mod:`explainers.tag_neighbours`) makes them "horse".

    TAG2MASK_THREADS=1 pytest tests/test_e2e_learning_cycle.py -m labelstudio -s
"""
from __future__ import annotations

import time

import numpy as np
import pytest

from conftest import horse_stems
from ls_payloads import brush_result, horse_mask
from redis_servers import embedded_valkey, server, start_worker, stop_worker, worker_env  # noqa: F401

from backend.labelstudio.results import decode_rle

pytestmark = pytest.mark.labelstudio

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="tag" toName="image" choice="multiple"><Choice value="horse"/><Choice value="dog"/></Choices>
  <BrushLabels name="brush" toName="image"><Label value="horse"/><Label value="dog"/></BrushLabels>
</View>"""


def _latest(preds: list[dict]) -> dict:
    return max(preds, key=lambda p: p["id"])


def _tags_and_iou(ls, task_ids, stem_of, horse_dir, version_part: str | None = None):
    tags, ious = [], []
    for tid in task_ids:
        preds = [p for p in ls.predictions(tid) if version_part is None or version_part in p["model_version"]]
        assert preds, f"task {tid}: no prediction{' of ' + version_part if version_part else ''}"
        pred = _latest(preds)
        truth = horse_mask(horse_dir, stem_of[tid])
        h, w = truth.shape
        mask = np.zeros((h, w), bool)
        chosen = []
        for r in pred["result"]:
            if r["type"] == "choices":
                chosen = r["value"]["choices"]
            elif r["type"] == "brushlabels":
                mask |= decode_rle(r["value"]["rle"], h, w)
        tags.append(chosen)
        ious.append(float((mask & truth).sum() / max(1, (mask | truth).sum())))
    return tags, ious


def test_corrections_make_the_project_tag_its_horses_horse_and_improve_their_masks(server, label_studio, horse_dir,
                                                                                  tmp_path):
    from backend.storage.examples import ExampleStore
    from backend.storage.registry import ModelRegistry
    from tests.labelstudio import BackendProcess

    if server.kind != "embedded":
        pytest.skip("the cycle runs on the embedded server only")
    ls = label_studio
    annotated, others = horse_stems("train")[:20], horse_stems("test")[:20]
    project = ls.create_project(f"learning cycle {server.token}", CONFIG)
    pid = project["id"]
    ann_ids = ls.import_files(pid, [horse_dir / "images" / f"{s}.jpg" for s in annotated])
    other_ids = ls.import_files(pid, [horse_dir / "images" / f"{s}.jpg" for s in others])
    stem_of = dict(zip(ann_ids + other_ids, annotated + others))
    ls_env = {"LABEL_STUDIO_URL": ls.url, "LABEL_STUDIO_API_KEY": ls.token}
    backend = BackendProcess(workdir=tmp_path / "backend", env={
        "REDIS_URL": server.url, "TAG2MASK_QUEUE": "off", "TAG2MASK_NAMESPACE": server.token,
        "TAG2MASK_PRESET": "balanced", "TAG2MASK_HEADS_TTL": "1", **ls_env})
    (tmp_path / "backend").mkdir()
    worker = None
    try:
        backend.start()
        wenv = worker_env(server, MODEL_DIR=str(backend.model_dir), TAG2MASK_PRESET="balanced", **ls_env)
        worker = start_worker(server, env=wenv, log=tmp_path / "worker.log")
        ml = ls.connect_ml(pid, backend.url)

        ls.retrieve_predictions(pid)
        tags_before, iou_before = _tags_and_iou(ls, other_ids, stem_of, horse_dir)

        for tid in ann_ids:
            truth = horse_mask(horse_dir, stem_of[tid])
            ls.annotate(tid, [{"type": "choices", "from_name": "tag", "to_name": "image",
                               "value": {"choices": ["horse"]}}, brush_result(truth)])
        registry = ModelRegistry.in_model_dir(backend.model_dir)
        store = ExampleStore.in_model_dir(backend.model_dir)
        deadline = time.monotonic() + 60          # the ANNOTATION_CREATED webhooks reach the backend
        while time.monotonic() < deadline and store.count(str(pid)) < len(ann_ids):
            time.sleep(0.5)
        assert store.count(str(pid)) == len(ann_ids)
        t = time.monotonic()
        ls.train(ml["id"])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and registry.current(str(pid)) is None:
            time.sleep(1)
        train_s = time.monotonic() - t
        current = registry.current(str(pid))
        assert current is not None, (tmp_path / "worker.log").read_text(errors="replace")[-3000:]
        meta = registry.meta(str(pid), current)
        assert meta["counts"]["refit"] == 20 and meta["tag_prior"]["counts"] == {"horse": 20}

        time.sleep(1.5)                       # the web process's heads cache (TAG2MASK_HEADS_TTL 1)
        ls.retrieve_predictions(pid)
        tags_after, iou_after = _tags_and_iou(ls, other_ids, stem_of, horse_dir, f"+p{pid}.{current}")
    finally:
        if worker is not None:
            stop_worker(worker)
        backend.stop()

    horse_before = sum(t == ["horse"] for t in tags_before)
    horse_after = sum(t == ["horse"] for t in tags_after)
    gain = float(np.mean(iou_after) - np.mean(iou_before))
    print(f"\n20 other horses tagged 'horse' alone: {horse_before} before -> {horse_after} after "
          f"(dog among the tags {sum('dog' in t for t in tags_before)} -> {sum('dog' in t for t in tags_after)}); "
          f"brush fg IoU {np.mean(iou_before):.4f} -> {np.mean(iou_after):.4f} ({gain:+.4f}); "
          f"Start training to a promoted version {train_s:.0f} s")
    assert horse_before <= 15                 # the premise: ImageNet alone calls many of them dogs
    assert horse_after >= 19 and sum("dog" in t for t in tags_after) < sum("dog" in t for t in tags_before), tags_after
    assert gain >= 0.04, (iou_before, iou_after)      # measured +0.050; the label frequencies alone gave +0.037
