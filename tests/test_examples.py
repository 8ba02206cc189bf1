"""Label Studio annotations built from real horse masks -> training examples; the on-disk store."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from backend.storage.examples import ExampleStore
from backend.labelstudio.annotations import example_from_annotation
from backend.labelstudio.config import DEFAULT_LABEL_CONFIG, parse_label_config
from backend.labelstudio.results import mask_to_rle
from explainers.metrics import mask_to_box
from tests.conftest import horse_stems


def _mask(horse_dir, stem: str) -> np.ndarray:
    return np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0


def _largest_contour(mask: np.ndarray) -> np.ndarray:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return max(contours, key=cv2.contourArea)[:, 0, :]          # (N, 2) x, y pixel indices


def _annotation(ann_id: int, mask: np.ndarray, brush_label="Horse", polygon_label="Horse", box_label="Horse",
                choices=("Horse",), updated_at="2026-11-27T05:00:00Z") -> dict:
    """A Label Studio 1.23-shaped annotation of one photo: choices, brush, polygon, rectangle."""
    h, w = mask.shape
    contour = _largest_contour(mask)
    x0, y0, x1, y1 = mask_to_box(mask)
    base = {"to_name": "image", "original_width": w, "original_height": h, "image_rotation": 0}
    result = [
        {"id": "c1", "from_name": "tag", "to_name": "image", "type": "choices", "value": {"choices": list(choices)}},
        {**base, "id": "b1", "from_name": "brush", "type": "brushlabels",
         "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [brush_label]}},
        {**base, "id": "p1", "from_name": "polygon", "type": "polygonlabels",
         "value": {"points": [[100.0 * x / w, 100.0 * y / h] for x, y in contour], "closed": True,
                   "polygonlabels": [polygon_label]}},
        {**base, "id": "r1", "from_name": "box", "type": "rectanglelabels",
         "value": {"x": 100.0 * x0 / w, "y": 100.0 * y0 / h, "width": 100.0 * (x1 - x0) / w,
                   "height": 100.0 * (y1 - y0) / h, "rotation": 0, "rectanglelabels": [box_label]}},
    ]
    return {"id": ann_id, "task": 7, "project": 3, "result": result, "was_cancelled": False,
            "created_at": "2026-11-27T04:00:00Z", "updated_at": updated_at}


@pytest.fixture(scope="module")
def config():
    return parse_label_config(DEFAULT_LABEL_CONFIG)


@pytest.fixture(scope="module")
def masks(horse_dir):
    return [_mask(horse_dir, s) for s in horse_stems("train")[:3]]


def test_brush_polygon_and_box_decode_to_the_original_regions(config, masks):
    mask = masks[0]
    task = {"id": 7, "data": {"image": "/data/upload/3/horse001.jpg"}}
    # brush only: the decoded mask equals the real mask pixel for pixel
    ann = _annotation(11, mask)
    ann["result"] = [r for r in ann["result"] if r["type"] in ("choices", "brushlabels")]
    ex = example_from_annotation(ann, task, config)
    assert ex.annotation_id == "11" and ex.project == "3" and ex.task_id == "7"
    assert ex.image == "/data/upload/3/horse001.jpg"
    assert (ex.width, ex.height) == (mask.shape[1], mask.shape[0])
    assert ex.tags == ["Horse"]
    assert np.array_equal(ex.masks["Horse"], mask)

    # polygon only: equals the filled outer contour it was drawn from
    ann = _annotation(12, mask, choices=())
    ann["result"] = [r for r in ann["result"] if r["type"] == "polygonlabels"]
    ex = example_from_annotation(ann, task, config)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, [_largest_contour(mask)[:, None, :]], -1, 1, thickness=cv2.FILLED)
    assert ex.tags == ["Horse"]                       # a region implies its tag
    got = ex.masks["Horse"]
    assert np.array_equal(got, filled > 0), "polygon rasterised at the wrong place"
    inter = np.count_nonzero(got & mask) / np.count_nonzero(got | mask)
    assert inter > 0.9

    # rectangle only: kept as a box (pixels), not painted into a mask
    ann = _annotation(13, mask, choices=())
    ann["result"] = [r for r in ann["result"] if r["type"] == "rectanglelabels"]
    ex = example_from_annotation(ann, task, config)
    assert ex.masks == {}
    (box,) = ex.boxes["Horse"]
    assert np.allclose(box, mask_to_box(mask), atol=0.01)


def test_all_regions_together_union_per_label_and_labels_matched_to_the_config(config, masks):
    mask = masks[1]
    ann = _annotation(21, mask, brush_label="horse", polygon_label="Cat", box_label="Dog", choices=("Horse", "Bird"))
    ex = example_from_annotation(ann, {"id": 7, "data": {"image": "x.jpg"}}, config)
    assert ex.tags == ["Horse", "Bird", "Cat", "Dog"]        # "horse" matched to the config's "Horse"
    assert np.array_equal(ex.masks["Horse"], mask)
    assert set(ex.masks) == {"Horse", "Cat"} and set(ex.boxes) == {"Dog"}

    # a region on another Image or an unknown label is not taken
    ann["result"].append({**ann["result"][1], "to_name": "other"})
    ann["result"].append({**ann["result"][1], "value": {**ann["result"][1]["value"], "brushlabels": ["Zebra"]}})
    ex2 = example_from_annotation(ann, {"id": 7, "data": {"image": "x.jpg"}}, config)
    assert ex2.tags == ex.tags and set(ex2.masks) == {"Horse", "Cat"}

    # a skipped (cancelled) annotation is no example
    assert example_from_annotation({**ann, "was_cancelled": True}, {"id": 7}, config) is None


def test_store_created_updated_deleted_idempotent_and_persistent(tmp_path, config, masks):
    store = ExampleStore.in_model_dir(tmp_path)
    task = {"id": 7, "data": {"image": "/data/upload/3/a.jpg"}, "project": 3}
    created = {"action": "ANNOTATION_CREATED", "annotation": _annotation(31, masks[0]), "task": task,
               "project": {"id": 3}}
    assert store.apply_event("ANNOTATION_CREATED", created, config)["changed"] == 1
    assert store.apply_event("ANNOTATION_CREATED", created, config)["changed"] == 0   # same again: no change
    assert store.count(3) == 1 and store.revision(3) == 1
    got = store.get(31)
    assert np.array_equal(got.masks["Horse"], masks[0] | got.masks["Horse"]) and got.tags == ["Horse"]

    # update replaces the content (another photo's mask, another label)
    upd = _annotation(31, masks[1], brush_label="Cat", polygon_label="Cat", box_label="Cat", choices=("Cat",),
                      updated_at="2026-11-27T05:10:00Z")
    assert store.apply_event("ANNOTATION_UPDATED", {"annotation": upd, "task": task, "project": 3}, config)["changed"] == 1
    got = store.get(31)
    assert got.tags == ["Cat"] and set(got.masks) == {"Cat"}
    brush_only = masks[1]
    assert np.array_equal(got.masks["Cat"] & brush_only, brush_only)
    assert store.count(3) == 1

    # an out-of-order, older update does not bring the old content back
    stale = {"annotation": _annotation(31, masks[0], updated_at="2026-11-27T04:30:00Z"), "task": task, "project": 3}
    assert store.apply_event("ANNOTATION_UPDATED", stale, config)["changed"] == 0
    assert store.get(31).tags == ["Cat"]

    # a second annotation, then the store survives a new process (reopened from disk)
    store.apply_event("ANNOTATION_CREATED", {"annotation": _annotation(32, masks[2]), "task": {**task, "id": 8},
                                             "project": 3}, config)
    rev = store.revision(3)
    reopened = ExampleStore.in_model_dir(tmp_path)
    assert [e.annotation_id for e in reopened.list(3)] == ["31", "32"]
    assert np.array_equal(reopened.get(32).masks["Horse"] & masks[2], masks[2])

    # delete removes; deleting twice is a no-op; the change counter sees one change
    assert reopened.apply_event("ANNOTATION_DELETED", {"annotation": {"id": 31}}, config)["changed"] == 1
    assert reopened.apply_event("ANNOTATIONS_DELETED", {"annotations": [{"id": 31}]}, config)["changed"] == 0
    assert reopened.get(31) is None and reopened.count(3) == 1
    assert reopened.changes_since(3, rev) == 1
    assert reopened.changes_since(3, 0) == 2          # two distinct annotations ever changed

    # a sample for training: tags, masks, boxes, photo keyed by its reference
    sample = reopened.get(32).to_sample(image=np.zeros((4, 4, 3), np.uint8))
    assert sample.key == "32" and sample.cache_key == "/data/upload/3/a.jpg"
    assert sample.all_tags() == ["Horse"] and sample.has_regions
    assert sample.shape == masks[2].shape


def _write_examples(path: str, start: int, out) -> None:
    store = ExampleStore(path)
    changed = 0
    for i in range(start, start + 10):
        mask = np.zeros((20, 30), bool)
        mask[2:10, 3 + i % 5:20] = True
        ann = {"id": i, "result": [{"from_name": "brush", "to_name": "image", "type": "brushlabels",
                                    "original_width": 30, "original_height": 20,
                                    "value": {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": ["Cat"]}}]}
        changed += store.upsert(example_from_annotation(ann, {"id": i, "data": {"image": f"{i}.jpg"}}, None, 9))
    shared = example_from_annotation({"id": "shared", "result": [{"type": "choices", "value": {"choices": ["Dog"]}}]},
                                     {"id": 0}, None, 9)
    changed += store.upsert(shared)
    out.put(changed)


def test_two_processes_write_one_store(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    path = str(tmp_path / "examples.sqlite3")
    procs = [ctx.Process(target=_write_examples, args=(path, start, q)) for start in (0, 100)]
    for p in procs:
        p.start()
    changed = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    store = ExampleStore(path)
    assert store.count(9) == 21 and sorted(changed) == [10, 11]   # the shared one is stored once
    assert store.revision(9) == 21 and store.changes_since(9, 0) == 21
    assert store.get(105).masks["Cat"].shape == (20, 30)
