"""Versioned checkpoints of real trained heads: round trip with weights_only, guarded promotion, rollback."""
from __future__ import annotations

import json
import multiprocessing as mp

import numpy as np
import pytest
import torch
from PIL import Image

from backend.storage.registry import ModelRegistry, RegistryError, compare_validation
from explainers.imageio import load_image
from explainers.training import ProjectHeads, Sample, TrainConfig, train_heads
from tests.conftest import horse_stems


@pytest.fixture(scope="module")
def trained(backbone, horse_dir):
    names = horse_stems("train")
    samples = []
    for i in range(8):
        s = names[i * 7]
        img = load_image(horse_dir / "images" / f"{s}.jpg")
        mask = np.asarray(Image.open(horse_dir / "masks" / f"{s}.png")) > 0
        samples.append(Sample(s, ["horse"], masks={"horse": mask}, image=img))
    samples.append(Sample("plain", [], image=np.full((120, 160, 3), 200, np.uint8)))
    return train_heads(backbone, samples, ["horse"], TrainConfig(size=128, seg_epochs=8, clf_epochs=50, seed=0)), samples


def test_save_load_round_trip_with_weights_only(tmp_path, backbone, trained):
    result, samples = trained
    reg = ModelRegistry.in_model_dir(tmp_path)
    v = reg.save_result("12", result, examples_revision=9)
    assert v == "v1" and reg.versions("12") == ["v1"] and reg.current("12") is None
    assert (tmp_path / "models" / "12" / "v1" / "model.pt").is_file()
    meta = json.loads((tmp_path / "models" / "12" / "v1" / "meta.json").read_text())
    assert meta["project"] == "12" and meta["version"] == "v1" and meta["labels"] == ["horse"]
    assert meta["parent"] is None and meta["created"] and meta["examples_revision"] == 9
    assert meta["counts"]["train"] + meta["counts"]["val"] == len(samples)
    assert meta["validation"]["n_val"] == result.validation["n_val"]

    # the file itself loads with plain torch.load(weights_only=True)
    raw = torch.load(tmp_path / "models" / "12" / "v1" / "model.pt", weights_only=True)
    assert raw["labels"] == ["horse"] and raw["backbone"] == "efficientnet_lite0"
    ckpt, meta2 = reg.load("12", "v1")
    assert meta2 == meta
    heads = ProjectHeads.from_checkpoint(ckpt, backbone)
    img = samples[0].image
    fresh = ProjectHeads(backbone, result.classifier, result.segmenter, result.layers, result.size)
    assert np.array_equal(heads.seg_probs(img)["horse"], fresh.seg_probs(img)["horse"])
    assert heads.tag_probs(img) == fresh.tag_probs(img)
    with pytest.raises(RegistryError):
        reg.load("12")                         # nothing promoted yet

    # something that would need pickle is refused before a version appears
    with pytest.raises(ValueError, match="weights_only"):
        reg.save("12", {"obj": object()})
    assert reg.versions("12") == ["v1"]
    with pytest.raises(ValueError):
        reg.save("../evil", {"x": torch.zeros(1)})


def _ckpt(value: float) -> dict:
    return {"w": torch.full((3,), value)}


def test_promotion_refused_on_regression_then_forced_and_rollback(tmp_path):
    reg = ModelRegistry.in_model_dir(tmp_path)
    v1 = reg.save("p", _ckpt(1), {"validation": {"map": 0.80, "fg_iou": 0.60}})
    first = reg.promote("p", v1)
    assert first.promoted and first.previous is None and reg.current("p") == "v1"

    v2 = reg.save("p", _ckpt(2), {"validation": {"map": 0.85, "fg_iou": 0.66}})
    assert reg.meta("p", v2)["parent"] == "v1"
    assert reg.promote("p", v2).promoted and reg.current("p") == "v2"

    v3 = reg.save("p", _ckpt(3), {"validation": {"map": 0.90, "fg_iou": 0.50}})   # masks got worse
    refused = reg.promote("p", v3)
    assert not refused.promoted and reg.current("p") == "v2"
    assert refused.regressions == [{"metric": "fg_iou", "old": 0.66, "new": 0.50}]
    assert "fg_iou" in refused.reason

    v4 = reg.save("p", _ckpt(4), {"validation": {"map": 0.95}})                   # lost its seg head
    assert not reg.promote("p", v4).promoted
    assert reg.promote("p", v4, tolerance=0.01).regressions[0]["new"] is None

    forced = reg.promote("p", v3, force=True)
    assert forced.promoted and reg.current("p") == "v3"
    ckpt, meta = reg.load("p")
    assert torch.equal(ckpt["w"], torch.full((3,), 3.0)) and meta["version"] == "v3"

    assert reg.rollback("p") == "v2" and reg.current("p") == "v2"
    assert torch.equal(reg.load("p")[0]["w"], torch.full((3,), 2.0))
    assert reg.rollback("p") == "v1"
    with pytest.raises(RegistryError):
        reg.rollback("p")
    listed = reg.list("p")
    assert [m["version"] for m in listed] == ["v1", "v2", "v3", "v4"]
    assert [m["current"] for m in listed] == [True, False, False, False]
    log = json.loads((tmp_path / "models" / "p" / "state.json").read_text())["log"]
    assert [e["action"] for e in log] == ["promote", "promote", "refused", "refused", "refused", "promote",
                                          "rollback", "rollback"]
    assert reg.projects() == ["p"]

    # within tolerance is not a regression; NaN counts as missing
    assert compare_validation({"map": 0.795}, {"map": 0.80}, tolerance=0.01) == []
    assert compare_validation({"map": float("nan")}, {"map": 0.8})[0]["new"] is None


def _save_many(root: str, n: int, out) -> None:
    reg = ModelRegistry(root)
    out.put([reg.save("race", {"w": torch.zeros(1)}) for _ in range(n)])


def test_concurrent_saves_from_two_processes_get_distinct_versions(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_save_many, args=(str(tmp_path), 4, q)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [v for _ in procs for v in q.get(timeout=60)]
    for p in procs:
        p.join(timeout=60)
    assert sorted(got, key=lambda v: int(v[1:])) == [f"v{i}" for i in range(1, 9)]
    assert ModelRegistry(tmp_path).versions("race") == [f"v{i}" for i in range(1, 9)]


def test_annotations_to_store_to_training_to_registry(tmp_path, backbone, horse_dir):
    """The whole foundation in one go: Label Studio annotations of real photos -> examples on disk ->
    heads trained from the store -> a promoted version whose meta says what it was trained on."""
    from backend.storage.examples import ExampleStore
    from backend.labelstudio.config import DEFAULT_LABEL_CONFIG, parse_label_config
    from tests.test_examples import _annotation

    config = parse_label_config(DEFAULT_LABEL_CONFIG)
    store = ExampleStore.in_model_dir(tmp_path)
    names = horse_stems("train")
    for i in range(10):
        stem = names[i * 5]
        mask = np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0
        ann = _annotation(100 + i, mask)
        if i % 3 == 2:                                   # some annotations are tags + box only
            ann["result"] = [r for r in ann["result"] if r["type"] in ("choices", "rectanglelabels")]
        task = {"id": i, "data": {"image": str(horse_dir / "images" / f"{stem}.jpg")}}
        store.apply_event("ANNOTATION_CREATED", {"annotation": ann, "task": task, "project": {"id": 5}}, config)
    examples = store.list(5)
    assert len(examples) == 10
    samples = [e.to_sample(load=lambda p=e.image: load_image(p)) for e in examples]
    assert sum(1 for s in samples if s.masks) == 7 and sum(1 for s in samples if s.boxes and not s.masks) == 3
    result = train_heads(backbone, samples, config.labels, TrainConfig(size=128, seg_epochs=10, clf_epochs=50))
    assert result.segmenter is not None and result.counts["val"] >= 1
    reg = ModelRegistry.in_model_dir(tmp_path)
    v = reg.save_result(5, result, examples_revision=store.revision(5))
    assert reg.promote(5, v).promoted
    ckpt, meta = reg.load(5)
    assert meta["labels"] == ["Horse", "Cat", "Dog", "Bird"] and meta["examples_revision"] == 10
    assert meta["counts"]["train_with_boxes"] + meta["counts"]["train_with_masks"] == meta["counts"]["train"]
    assert store.changes_since(5, meta["examples_revision"]) == 0
    heads = ProjectHeads.from_checkpoint(ckpt, backbone)
    probs = heads.tag_probs(load_image(examples[0].image))
    assert probs["Horse"] > 0.5 > probs["Cat"]
