"""Training datasets from `tag2mask label --format coco,yolo-seg,png` and `tag2mask export`, read back with
the formats' own readers: pycocotools for COCO, supervision's YOLO loader for YOLO-seg, PIL for the PNGs.

Photos: two Weizmann horses (train split) and two COCO dev photos with two tags each (horse + potted
plant, bicycle + dog), labelled once through the real CLI with the fast preset.
"""
from __future__ import annotations

import copy
import filecmp
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import horse_stems
from PIL import Image

from backend.cli.main import main
from backend.datasets import MIN_INSTANCE_PIXELS

FAST = ["--preset", "fast", "--device", "cpu", "-q"]
COCO_PHOTOS = {"000000000049": ["horse", "potted plant"], "000000000074": ["bicycle", "dog"]}
TAGS = ["horse", "potted plant", "bicycle", "dog"]            # the categories, in the batch's tag order
LS_LABELS = {"horse": "Horse", "potted plant": "Potted plant", "bicycle": "Bicycle", "dog": "Dog"}


def _specks(mask: np.ndarray, min_pixels: int = MIN_INSTANCE_PIXELS) -> np.ndarray:
    """The pixels of `mask`'s 8-connected components smaller than `min_pixels`."""
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    small = [k for k in range(1, n) if stats[k, cv2.CC_STAT_AREA] < min_pixels]
    return np.isin(comp, small) & mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def run(tmp_path_factory, horse_dir, coco_dir):
    """One `tag2mask label` of 4 photos with --format coco,yolo-seg --format png, and the masks it wrote:
    {"out", "photos": {name: path}, "masks": {name: {tag: bool mask}}}."""
    root = tmp_path_factory.mktemp("datasets")
    photos = [horse_dir / "images" / f"{s}.jpg" for s in horse_stems("train")[:2]]
    photos += [coco_dir / "images" / f"{stem}.jpg" for stem in COCO_PHOTOS]
    csv = root / "tags.csv"
    csv.write_text("image,tags\n" + "".join(f"{s}.jpg,{';'.join(t)}\n" for s, t in COCO_PHOTOS.items()))
    out = root / "out"
    rc = main(["label", *map(str, photos), "--tags", "horse", "--tags-csv", str(csv), "--out", str(out),
               "--format", "coco,yolo-seg", "--format", "png", *FAST])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    masks = {r["name"]: {t["tag"]: np.asarray(Image.open(out / t["mask"])) > 0 for t in r["tags"]}
             for r in summary["photos"]}
    assert sorted(masks) == sorted(p.stem for p in photos)
    return {"out": out, "root": root, "photos": {p.stem: p for p in photos}, "masks": masks}


def _kept(mask: np.ndarray) -> np.ndarray:
    return mask & ~_specks(mask)


def test_coco_loads_in_pycocotools_and_equals_the_masks_but_specks(run, capsys):
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO

    coco = COCO(str(run["out"] / "coco" / "annotations.json"))
    cats = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in cats] == list(enumerate(TAGS, 1))
    dropped = 0
    for img in coco.loadImgs(coco.getImgIds()):
        name = Path(img["file_name"]).stem
        assert Path(img["file_name"]) == run["photos"][name].resolve()          # absolute: label keeps photos
        masks = run["masks"][name]
        assert (img["height"], img["width"]) == next(iter(masks.values())).shape
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert {coco.cats[a["category_id"]]["name"] for a in anns} == set(masks)
        for tag, mask in masks.items():
            mine = [a for a in anns if coco.cats[a["category_id"]]["name"] == tag]
            union = np.zeros_like(mask)
            for a in mine:
                m = coco.annToMask(a).astype(bool)
                assert isinstance(a["segmentation"]["counts"], str) and a["iscrowd"] == 0
                assert cv2.connectedComponents(m.astype(np.uint8), connectivity=8)[0] == 2    # one instance
                assert a["area"] == m.sum() == mask_util.area(a["segmentation"])
                assert a["bbox"] == [int(v) for v in mask_util.toBbox(a["segmentation"])]
                assert not (union & m).any()
                union |= m
            assert np.array_equal(union, _kept(mask)), (name, tag)
            assert (mask & ~union).sum() == _specks(mask).sum()
            dropped += int(_specks(mask).sum())
    with capsys.disabled():
        print(f"\n[coco] {len(coco.anns)} instances in {len(coco.imgs)} photos; speck pixels left out: {dropped}")


def test_yolo_seg_reads_with_supervision_and_matches_the_masks(run):
    import supervision as sv
    import yaml

    yolo = run["out"] / "yolo"
    data = yaml.safe_load((yolo / "data.yaml").read_text())
    assert data["names"] == TAGS and data["nc"] == len(TAGS)
    assert Path(data["path"]) == yolo.resolve() and (yolo / data["train"]).is_dir()
    ds = sv.DetectionDataset.from_yolo(images_directory_path=str(yolo / "images"),
                                       annotations_directory_path=str(yolo / "labels"),
                                       data_yaml_path=str(yolo / "data.yaml"), force_masks=True)
    assert ds.classes == TAGS and len(ds) == len(run["masks"])
    coco = json.loads((run["out"] / "coco" / "annotations.json").read_text())
    per_image = {Path(i["file_name"]).stem: sum(a["image_id"] == i["id"] for a in coco["annotations"])
                 for i in coco["images"]}
    for path, image, det in ds:
        name = Path(path).stem
        assert filecmp.cmp(path, run["photos"][name], shallow=False)             # the photo itself
        masks = run["masks"][name]
        assert image.shape[:2] == next(iter(masks.values())).shape
        assert len(det) == per_image[name]                                      # one line per instance
        for tag, mask in masks.items():
            got = det.mask[det.class_id == TAGS.index(tag)].any(axis=0)
            assert _iou(got, _kept(mask)) >= 0.9, (name, tag, _iou(got, _kept(mask)))


def test_class_png_equals_the_masks(run):
    from backend.cli.evaluation import read_classes

    assert read_classes(run["out"] / "png" / "classes.txt") == {0: "background", **dict(enumerate(TAGS, 1))}
    for name, masks in run["masks"].items():
        png = np.asarray(Image.open(run["out"] / "png" / f"{name}.png"))
        assert png.dtype == np.uint8
        want = np.zeros(png.shape, np.uint8)
        for tag, mask in masks.items():
            kept = _kept(mask)
            want[kept & (want != 0)] = 255                                      # overlaps (none from the engine)
            want[kept & (want == 0)] = TAGS.index(tag) + 1
        assert np.array_equal(png, want), name


def test_label_without_format_writes_no_datasets_and_a_bad_format_is_a_usage_error(run, tmp_path, capsys):
    photo = next(iter(run["photos"].values()))
    assert main(["label", str(photo), "--tags", "horse", "--out", str(tmp_path / "o"), "--format", "ls", *FAST]) == 0
    assert (tmp_path / "o" / "tasks.json").is_file()
    assert not any((tmp_path / "o" / d).exists() for d in ("coco", "yolo", "png"))
    capsys.readouterr()
    assert main(["label", str(photo), "--tags", "horse", "--out", str(tmp_path / "p"), "--format", "coco,voc"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "tag2mask: error: --format: unknown format 'voc': choose from ls, coco, yolo-seg, png"
    assert main(["export", str(tmp_path / "x.json"), "--out", str(tmp_path / "q"), "--format", "ls"]) == 2


def test_an_exif_rotated_photo_is_upright_in_every_format(run, horse_dir, tmp_path):
    """A horse stored turned a quarter (EXIF orientation 6: show it turned clockwise): the masks, COCO's size,
    YOLO's image (written upright) and the export's photo size are all of the upright photo."""
    import supervision as sv

    upright = Image.open(horse_dir / "images" / f"{horse_stems('train')[2]}.jpg")
    stored = upright.transpose(Image.Transpose.ROTATE_90)          # what exif_transpose turns back
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = tmp_path / "turned.jpg"
    stored.save(photo, quality=95, exif=exif)
    out = tmp_path / "out"
    assert main(["label", str(photo), "--tags", "horse", "--out", str(out), "--format", "coco,yolo-seg,png",
                 *FAST]) == 0
    mask = np.asarray(Image.open(out / "turned" / "horse.png")) > 0
    assert mask.shape == (upright.height, upright.width)
    image = json.loads((out / "coco" / "annotations.json").read_text())["images"][0]
    assert (image["width"], image["height"]) == upright.size
    with Image.open(out / "yolo" / "images" / "turned.jpg") as im:
        assert im.size == upright.size and im.getexif().get(0x0112, 1) == 1
    ds = sv.DetectionDataset.from_yolo(images_directory_path=str(out / "yolo" / "images"),
                                       annotations_directory_path=str(out / "yolo" / "labels"),
                                       data_yaml_path=str(out / "yolo" / "data.yaml"), force_masks=True)
    _, _, det = ds[0]
    assert _iou(det.mask.any(axis=0), _kept(mask)) >= 0.9
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_ls_export(out)))
    assert main(["export", str(export), "--format", "png", "--out", str(tmp_path / "e"), "--labels", "horse",
                 "-q"]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "e" / "png" / "turned.png")),
                          np.asarray(Image.open(out / "png" / "turned.png")))


# -- tag2mask export: a Label Studio export --------------------------------------------------------
def _ls_export(out: Path) -> list[dict]:
    """tasks.json as a Label Studio export snapshot holds it (predictions with their results)."""
    tasks = json.loads((out / "tasks.json").read_text())
    return [{"id": i + 1, "annotations": [], "drafts": [], "data": t["data"], "meta": {}, "project": 1,
             "predictions": [{"id": 100 + i, "result": t["predictions"][0]["result"],
                              "model_version": t["predictions"][0]["model_version"],
                              "score": t["predictions"][0]["score"], "created_at": "2026-01-01T00:00:00Z",
                              "task": i + 1, "project": 1}]} for i, t in enumerate(tasks)]


def _same_datasets(a: Path, b: Path, names) -> None:
    for name in names:
        assert np.array_equal(np.asarray(Image.open(a / "png" / f"{name}.png")),
                              np.asarray(Image.open(b / "png" / f"{name}.png"))), name
        yolo_a, yolo_b = (d / "yolo" / "labels" / f"{name}.txt" for d in (a, b))
        assert yolo_a.read_text() == yolo_b.read_text(), name
    ca, cb = (json.loads((d / "coco" / "annotations.json").read_text()) for d in (a, b))
    assert ca["categories"] == cb["categories"] and ca["images"] == cb["images"]
    strip = [{k: v for k, v in x.items() if k != "score"} for x in ca["annotations"]]   # LS keeps no region score
    assert strip == [{k: v for k, v in x.items() if k != "score"} for x in cb["annotations"]]


def test_export_of_the_predictions_gives_the_same_datasets(run, tmp_path):
    export = tmp_path / "export.json"
    export.write_text(json.dumps(_ls_export(run["out"])))
    out = tmp_path / "ds"
    assert main(["export", str(export), "--format", "coco,yolo-seg,png", "--out", str(out), "--labels",
                 ",".join(TAGS), "-q"]) == 0
    _same_datasets(run["out"], out, run["masks"])
    assert json.loads((out / "export_errors.json").read_text()) == []
    # without --labels: Label Studio's label values, in order of appearance
    assert main(["export", str(export), "--format", "png", "--out", str(tmp_path / "ds2"), "-q"]) == 0
    lines = (tmp_path / "ds2" / "png" / "classes.txt").read_text().splitlines()[1:]
    assert lines == ["0 background"] + [f"{i} {LS_LABELS[t]}" for i, t in enumerate(TAGS, 1)]


def _photo_task(tid: int, photo: Path, result: list, key: str = "annotations") -> dict:
    return {"id": tid, "data": {"image": str(photo)}, key: [{"id": tid, "result": result, "was_cancelled": False}]}


def _poly(label: str, points, w: int, h: int, kind: str = "polygonlabels") -> dict:
    return {"type": kind, "from_name": "polygon", "to_name": "image", "original_width": w, "original_height": h,
            "value": {"points": points, "closed": True, kind: [label]}}


def test_export_regions_overlaps_and_brush_over_polygon(run, tmp_path, capsys):
    from backend.labelstudio.results import mask_to_rle

    photo = run["photos"]["000000000074"]
    w, h = Image.open(photo).size
    square = np.zeros((h, w), bool)
    square[100:200, 100:300] = True
    brush = {"type": "brushlabels", "from_name": "brush", "to_name": "image", "original_width": w,
             "original_height": h, "value": {"format": "rle", "rle": mask_to_rle(square), "brushlabels": ["Dog"]}}
    tasks = [
        _photo_task(1, photo, [_poly("Horse", [[10, 10], [60, 10], [60, 60], [10, 60]], w, h),
                               _poly("Dog", [[40, 40], [90, 40], [90, 90], [40, 90]], w, h)]),
        _photo_task(2, photo, [brush, _poly("Dog", [[0, 0], [100, 0], [100, 100]], w, h)]),
        _photo_task(3, photo, []),                       # submitted without regions: a background photo
    ]
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    assert main(["export", str(export), "--format", "coco,png", "--out", str(tmp_path / "a"), "-q"]) == 0
    png = {n: np.asarray(Image.open(tmp_path / "a" / "png" / f"{n}.png")) for n in ("000000000074", "000000000074-2",
                                                                                 "000000000074-3")}
    x0, x1, y0, y1 = round(0.4 * w), round(0.6 * w), round(0.4 * h), round(0.6 * h)
    assert (png["000000000074"][y0 + 2:y1 - 2, x0 + 2:x1 - 2] == 255).all()       # Horse and Dog overlap
    assert set(np.unique(png["000000000074"])) == {0, 1, 2, 255}
    assert np.array_equal(png["000000000074-2"] == 2, square)                     # the brush, not the polygon
    assert not png["000000000074-3"].any()
    coco = json.loads((tmp_path / "a" / "coco" / "annotations.json").read_text())
    assert len(coco["images"]) == 3 and [a["image_id"] for a in coco["annotations"]] == [1, 1, 2]
    assert all(Path(i["file_name"]) == photo.resolve() for i in coco["images"])    # no --images: absolute
    # --regions polygon: the polygon (a triangle over half the photo); --images: file_name under the root
    assert main(["export", str(export), "--format", "coco,png", "--out", str(tmp_path / "b"), "--regions", "polygon",
                 "--images", str(photo.parent), "-q"]) == 0
    tri = np.asarray(Image.open(tmp_path / "b" / "png" / "000000000074-2.png")) == 2
    assert abs(tri.mean() - 0.5) < 0.01
    coco = json.loads((tmp_path / "b" / "coco" / "annotations.json").read_text())
    assert [i["file_name"] for i in coco["images"]] == [photo.name] * 3
    assert coco["info"]["image_root"] == photo.parent.resolve().as_posix()
    # again into the same folder with one task: the masks of the other two are still there, and it says so
    export.write_text(json.dumps(tasks[:1]))
    capsys.readouterr()
    assert main(["export", str(export), "--format", "coco,png,yolo-seg", "--out", str(tmp_path / "a"), "-q"]) == 0
    said = capsys.readouterr().out
    assert "still holds 2 mask(s) of an earlier run" in said and "yolo-seg: 1 images" in said
    assert len(json.loads((tmp_path / "a" / "coco" / "annotations.json").read_text())["images"]) == 1


def test_export_hostile_items_are_one_sentence_each(run, tmp_path, capsys):
    from backend.labelstudio.results import mask_to_rle

    good = _ls_export(run["out"])
    photo = run["photos"]["000000000074"]
    w, h = Image.open(photo).size
    wrong_rle = copy.deepcopy(good[3])
    wrong_rle["id"] = 11
    brush = next(r for r in wrong_rle["predictions"][0]["result"] if r["type"] == "brushlabels")
    brush["value"]["rle"] = mask_to_rle(np.ones((10, 10), bool))                # 10x10 on a w x h photo
    missing = copy.deepcopy(good[0])
    missing["id"], missing["data"]["image"] = 15, str(tmp_path / "no-such-photo.jpg")
    bad = [
        "not a task",                                                                       # item 5
        wrong_rle,                                                                          # task 11
        _photo_task(12, photo, [_poly("Dog", [[float("nan"), 10], [50, 50], [10, 60]], w, h)]),
        _photo_task(13, photo, [_poly("Dog", [[1e9, 10], [50, 50], [10, 60]], w, h)]),
        {"id": 14, "data": {"image": str(photo)}, "annotations": "x"},
        missing,                                                                            # task 15
        {"id": 16, "data": {"image": str(photo)}, "annotations": [], "predictions": [7]},
        {"id": 17, "data": {"image": str(photo)}, "annotations": [{"result": [{"type": "polygonlabels",
                                                                               "value": "x"}]}]},
    ]
    clipped = _photo_task(18, photo, [_poly("Dog", [[50, 50], [150, 50], [150, 150], [50, 150]], w, h)])
    export = tmp_path / "export.json"
    export.write_text(json.dumps(good + bad + [clipped]))                  # NaN is written as NaN, as Python does
    capsys.readouterr()
    out = tmp_path / "ds"
    assert main(["export", str(export), "--format", "coco,yolo-seg,png", "--out", str(out), "-q"]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == len(bad) and all(line.startswith("error: ") for line in lines), lines
    assert "Traceback" not in captured.err
    said = dict(line[len("error: "):].split(": ", 1) for line in lines)
    assert set(said) == {"item 5", "task 11", "task 12", "task 13", "task 14", "task 15", "task 16", "task 17"}
    assert "must be a JSON object" in said["item 5"]
    assert "rle encodes 400 values" in said["task 11"] and f"{w * h * 4}" in said["task 11"]
    assert "nan" in said["task 12"].lower() and "1000000000" in said["task 13"].replace(".0", "")
    assert "must be a list" in said["task 14"] and "no-such-photo.jpg" in said["task 15"]
    assert "ids only" in said["task 16"] and "must be a JSON object" in said["task 17"]
    errors = json.loads((out / "export_errors.json").read_text())
    assert [e["task"] for e in errors] == list(said) and [e["error"] for e in errors] == [ln[7:] for ln in lines]
    coco = json.loads((out / "coco" / "annotations.json").read_text())
    assert len(coco["images"]) == len(good) + 1                               # the rest went on
    dog = np.asarray(Image.open(out / "png" / f"{photo.stem}-2.png")) > 0      # 50..150 %: clipped to the photo
    assert dog[h // 2 + 1:, w // 2 + 1:].all() and not dog[: h // 2 - 1].any()
    assert "exported 5 of 13 tasks" in captured.out


@pytest.mark.parametrize("text, words", [("{not json", "not a JSON file"), ("42", "expected a list of tasks")])
def test_export_file_that_is_no_export_is_a_usage_error(tmp_path, capsys, text, words):
    path = tmp_path / "export.json"
    path.write_text(text)
    assert main(["export", str(path), "--format", "coco", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tag2mask: error: {path}: ") and words in err and len(err.splitlines()) == 1
    assert main(["export", str(tmp_path / "none.json"), "--format", "coco", "--out", str(tmp_path / "o")]) == 2
    assert "none.json: no such file" in capsys.readouterr().err


@pytest.mark.labelstudio
def test_export_of_a_real_label_studio_export(run, label_studio, tmp_path, capsys):
    """tasks.json imported into Label Studio, one prediction accepted as the annotation; the snapshot
    export (predictions with results) gives the label run's datasets; the plain JSON export (predictions
    as ids) only the annotated task, and a sentence for each of the others."""
    import time

    ls = label_studio
    out = run["out"]
    pid = ls.create_project("datasets", (out / "label_config.xml").read_text())["id"]
    ls.api("POST", f"/api/projects/{pid}/import", data=(out / "tasks.json").read_bytes(),
           headers={"Content-Type": "application/json"})
    ids = sorted(t["id"] for t in ls.tasks(pid))
    ls.annotate(ids[0], ls.predictions(ids[0])[0]["result"])
    snap = ls.api("POST", f"/api/projects/{pid}/exports",
                  json={"title": "datasets", "serialization_options": {"predictions": {"only_id": False}}})
    for _ in range(60):
        if ls.api("GET", f"/api/projects/{pid}/exports/{snap['id']}").get("status") == "completed":
            break
        time.sleep(1)
    full = ls.api("GET", f"/api/projects/{pid}/exports/{snap['id']}/download?exportType=JSON")
    plain = ls.api("GET", f"/api/projects/{pid}/export?exportType=JSON&download_all_tasks=true")
    for name, body in (("full", full), ("plain", plain)):
        (tmp_path / f"{name}.json").write_text(body if isinstance(body, str) else json.dumps(body))
    assert main(["export", str(tmp_path / "full.json"), "--format", "coco,yolo-seg,png", "--out", str(tmp_path / "a"),
                 "--labels", ",".join(TAGS), "-q"]) == 0
    _same_datasets(out, tmp_path / "a", run["masks"])
    capsys.readouterr()
    assert main(["export", str(tmp_path / "plain.json"), "--format", "png", "--out", str(tmp_path / "b"), "-q"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == len(ids) - 1 and all("predictions are ids only" in line for line in err)
    assert len(list((tmp_path / "b" / "png").glob("*.png"))) == 1
