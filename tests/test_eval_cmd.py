"""`tag2mask eval` on class-id masks (coco128_dev, MSRC-v2): tables, tags, per-class accumulation, the CLI.

The per-class numbers are recomputed here from the real masks by independent counting (np.bincount of
prediction x truth codes), not by the code under test.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from backend.cli.main import main
from backend.cli.evaluation import evaluate_classes, find_pairs, load_label_mask, read_classes, read_photo_tags
from explainers.metrics import ClassScores
from multiclass_data import coco_dir, coco_tags, msrc_dir, msrc_names, msrc_tags

FAST = ["--preset", "fast", "--device", "cpu", "-q"]
# MSRC-v2 test photos: car + bicycle (no void); chair (20 % void); book + face + body (48 % void);
# grass, tree, sky, road only (no coverable tag)
MSRC_STEMS = ["7_23_s", "14_20_s", "6_26_s", "2_9_s"]


def counted_iou(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> tuple[int, int, int, int]:
    """(fg intersection, fg union, bg intersection, bg union) over the valid pixels, by a 2 x 2 bincount."""
    codes = pred[valid].astype(np.int64) * 2 + gt[valid].astype(np.int64)
    tn, fn, fp, tp = np.bincount(codes, minlength=4)
    return int(tp), int(tp + fp + fn), int(tn), int(tn + fp + fn)


@pytest.fixture(scope="module")
def engine(backbone):
    from explainers.segment import PipelineConfig, Tag2Mask

    return Tag2Mask(backbone, PipelineConfig.preset("fast"))


@pytest.fixture
def msrc_split(tmp_path):
    split = tmp_path / "split.txt"
    split.write_text("\n".join(MSRC_STEMS) + "\n")
    return split


# --- the classes table and the tags files --------------------------------------------------------------

def test_read_the_real_classes_tables():
    coco = read_classes(coco_dir() / "classes.txt")
    assert coco[0] == "unlabeled" and coco[10] == "traffic light" and coco[200] == "rug-merged" and len(coco) == 130
    msrc = read_classes(msrc_dir() / "classes.txt")
    assert msrc == {int(k): v for k, v in msrc_names().items()} and len(msrc) == 23


def test_bad_classes_tables(tmp_path):
    f = tmp_path / "classes.txt"
    for text, message in [("1 cat\nx dog\n", r"classes.txt:2: expected 'id name'"),
                          ("1 cat\n1 dog\n", "class id 1 is listed twice"),
                          ("1 cat\n2 Cat\n", "class name 'Cat' is listed twice"), ("# nothing\n", "no classes")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_classes(f)


def test_read_both_tag_file_formats():
    coco = read_classes(coco_dir() / "classes.txt")
    tags = read_photo_tags(coco_dir() / "tags.csv", coco)            # image,name;name
    assert len(tags) == 100
    for stem, names in coco_tags().items():
        assert [coco[i] for i in tags[stem]] == names
    msrc = read_classes(msrc_dir() / "classes.txt")
    tags = read_photo_tags(msrc_dir() / "tags.txt", msrc)            # stem id id ...
    assert len(tags) == 591 and tags == {s: [int(i) for i in ids] for s, ids in msrc_tags().items()}


def test_tag_files_with_names_ids_headers_and_mistakes(tmp_path):
    classes = {1: "traffic light", 2: "cat", 255: "void"}
    f = tmp_path / "tags.csv"
    f.write_text("image,tags\n# a comment\na.jpg,Traffic Light;2\n\nb 2 1\nb.png,cat\n")
    assert read_photo_tags(f, classes) == {"a": [1, 2], "b": [2, 1]}
    f.write_text("a.jpg,cat\nb.jpg,cat;dog\n")
    with pytest.raises(ValueError, match=r"tags.csv:2: tag 'dog' of b.jpg is not in the classes table"):
        read_photo_tags(f, classes)
    f.write_text("a.jpg,\n")
    with pytest.raises(ValueError, match="tags.csv:1: expected"):
        read_photo_tags(f, classes)


def test_label_masks_keep_their_ids(tmp_path):
    mask = load_label_mask(msrc_dir() / "masks" / "6_26_s.png")
    assert mask.ndim == 2 and {17, 11, 22, 255} >= set(np.unique(mask).tolist()) >= {17, 255}
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(ValueError, match="colour"):
        load_label_mask(rgb)


# --- per-class accumulation -----------------------------------------------------------------------------

def test_class_scores_on_real_masks_match_counting():
    """Predictions made from the real MSRC / COCO masks (each class's truth shifted 7 px right and 3 px down),
    void left out: ClassScores gives exactly the pooled counts."""
    photos = [(msrc_dir() / "masks" / f"{s}.png", [255]) for s in ("7_23_s", "14_20_s", "6_26_s")]
    photos += [(coco_dir() / "masks" / "000000000009.png", [0])]
    scores = ClassScores()
    totals: dict[int, np.ndarray] = {}
    per_photo = []
    for path, ignore in photos:
        gt = load_label_mask(path)
        valid = ~np.isin(gt, ignore)
        ids = [int(v) for v in np.unique(gt) if v not in ignore]
        masks = {f"c{v}": (np.roll(gt == v, (3, 7), axis=(0, 1)), gt == v) for v in ids}
        ious = scores.add_photo(path.stem, masks, valid=valid)
        for v in ids:
            counts = np.array(counted_iou(*masks[f"c{v}"], valid))
            totals[v] = totals.get(v, 0) + counts
            assert ious[f"c{v}"] == pytest.approx(counts[0] / counts[1])
        per_photo.append(np.mean(list(ious.values())))
    out = scores.summary()
    assert out["n"] == 4 and out["n_classes"] == len(totals)
    expected = {f"c{v}": (t[0] / t[1], t[2] / t[3]) for v, t in totals.items()}
    for name, (fg, bg) in expected.items():
        assert out["classes"][name]["fg_iou"] == pytest.approx(fg, abs=1e-12)
        assert out["classes"][name]["bg_iou"] == pytest.approx(bg, abs=1e-12)
    assert out["mean_fg_iou"] == pytest.approx(np.mean([fg for fg, _ in expected.values()]))
    assert out["miou"] == pytest.approx(np.mean([(fg + bg) / 2 for fg, bg in expected.values()]))
    assert out["mean_photo_score"] == pytest.approx(np.mean(per_photo))
    # the void really is left out: counting it as background gives other numbers for the chair photo
    gt = load_label_mask(msrc_dir() / "masks" / "14_20_s.png")
    chair = np.roll(gt == 18, (3, 7), axis=(0, 1)), gt == 18
    assert counted_iou(*chair, gt != 255) != counted_iou(*chair, np.ones_like(gt, bool))


def test_evaluate_classes_on_real_msrc_photos(engine, msrc_split):
    """The real pipeline on 4 MSRC test photos: the photo without a coverable tag is counted apart, face and
    body are not coverable, and every per-class number equals the counts over the kept masks, void left out."""
    classes = read_classes(msrc_dir() / "classes.txt")
    tags = read_photo_tags(msrc_dir() / "tags.txt", classes)
    pairs, errors = find_pairs(msrc_dir() / "images", msrc_dir() / "masks", msrc_split)
    assert errors == [] and len(pairs) == 4
    run = evaluate_classes(engine, pairs, classes, tags, ignore=[255], progress=False, keep_masks=True)
    s = run.summary
    assert run.errors == [] and s["n"] == 3 and s["photos_without_coverable_tags"] == 1
    assert [p.name for p in run.photos] == MSRC_STEMS[:3]
    assert set(s["classes"]) == {"car", "bicycle", "chair", "book"}
    assert {name: c["photos"] for name, c in s["not_coverable"].items()} == \
        {"building": 1, "road": 2, "tree": 3, "body": 1, "face": 1, "grass": 2, "sky": 1}
    assert "part of a person" in s["not_coverable"]["face"]["reason"]
    for photo in run.photos:
        gt = load_label_mask(msrc_dir() / "masks" / f"{photo.name}.png")
        valid = gt != 255
        by_name = {v: k for k, v in classes.items()}
        assert list(photo.tags) == [classes[i] for i in tags[photo.name] if classes[i] in s["classes"]]
        for k, (tag, iou) in enumerate(photo.tags.items(), start=1):
            fg_i, fg_u, _, _ = counted_iou(photo.pred == k, gt == by_name[tag], valid)
            assert iou == pytest.approx(fg_i / fg_u if fg_u else 1.0)
            assert np.array_equal(photo.gt == k, gt == by_name[tag])
        assert photo.iou == pytest.approx(np.mean(list(photo.tags.values())))
        assert photo.cam_tag == min(photo.tags, key=photo.tags.get) and photo.cam.shape == gt.shape
    car_bike = run.photos[0]
    assert set(car_bike.tags) == {"car", "bicycle"}
    assert s["classes"]["car"]["fg_iou"] == pytest.approx(car_bike.tags["car"])  # one photo: pooled = its own
    assert s["mean_fg_iou"] == pytest.approx(np.mean([c["fg_iou"] for c in s["classes"].values()]))


def test_tags_from_the_mask_match_msrc_tags_file(engine, msrc_split):
    classes = read_classes(msrc_dir() / "classes.txt")
    pairs, _ = find_pairs(msrc_dir() / "images", msrc_dir() / "masks", msrc_split, limit=1)
    from_file = evaluate_classes(engine, pairs, classes, read_photo_tags(msrc_dir() / "tags.txt", classes),
                                 ignore=[255], progress=False)
    from_mask = evaluate_classes(engine, pairs, classes, None, ignore=[255], progress=False)
    assert from_mask.summary["classes"] == from_file.summary["classes"]
    assert set(from_mask.summary["classes"]) == {"car", "bicycle"}


# --- the command line -----------------------------------------------------------------------------------

def _coco_args(*extra: str) -> list[str]:
    d = coco_dir()
    return ["eval", "--images", str(d / "images"), "--masks", str(d / "masks"), "--classes", str(d / "classes.txt"),
            *extra, *FAST]


def test_cli_json_on_three_coco_photos(capsys):
    """coco128_dev's first 3 photos: bowl + orange + broccoli; giraffe only (nothing coverable);
    potted plant + vase + flower. person-free, so the not-coverable tags are stuff and the giraffe."""
    rc = main(_coco_args("--tags-csv", str(coco_dir() / "tags.csv"), "--ignore", "0", "--limit", "3", "--json"))
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] == 2 and out["photos_without_coverable_tags"] == 1 and out["errors"] == []
    assert set(out["classes"]) == {"bowl", "orange", "broccoli", "potted plant", "vase", "flower"}
    assert out["n_classes"] == 6 and all(c["photos"] == 1 for c in out["classes"].values())
    missing = out["not_coverable"]
    assert missing["giraffe"]["photos"] == 1 and "no giraffe class" in missing["giraffe"]["reason"]
    assert missing["grass-merged"]["photos"] == 2 and missing["grass-merged"]["id"] == 193
    expected_missing = {t for stem in sorted(coco_tags())[:3] for t in coco_tags()[stem]} - set(out["classes"])
    assert set(missing) == expected_missing
    assert out["mean_fg_iou"] == pytest.approx(np.mean([c["fg_iou"] for c in out["classes"].values()]))
    assert out["box_iou"] == pytest.approx(np.mean([c["box_iou"] for c in out["classes"].values()]))
    photos = {p["name"]: p for p in out["photos"]}
    assert set(photos) == {"000000000009", "000000000030"}
    assert list(photos["000000000009"]["tags"]) == ["bowl", "orange", "broccoli"]
    for p in photos.values():
        assert p["score"] == pytest.approx(np.mean(list(p["tags"].values())), abs=1e-3)
        for tag, v in p["tags"].items():   # one photo per class: the class's pooled IoU is this photo's
            assert v == pytest.approx(out["classes"][tag]["fg_iou"], abs=1e-4)
    assert out["worst_classes"][0][1] == min(round(c["fg_iou"], 4) for c in out["classes"].values())
    assert out["ignore"] == [0] and out["preset"] == "fast"


def test_cli_text_and_report_on_msrc(msrc_split, tmp_path, capsys):
    d = msrc_dir()
    report = tmp_path / "report"
    rc = main(["eval", "--images", str(d / "images"), "--masks", str(d / "masks"), "--classes", str(d / "classes.txt"),
               "--tags-from-mask", "--ignore", "255", "--split", str(msrc_split), "--report", str(report), *FAST])
    assert rc == 0
    text = capsys.readouterr().out
    assert "photos            3   (1 more without a coverable tag)" in text
    assert "classes           4 scored, 7 not coverable" in text
    for name in ("car", "bicycle", "chair", "book"):
        assert re.search(rf"^    {name} +\d\.\d{{3}}  \d\.\d{{3}}  1$", text, re.M), name
    assert "not coverable     tree (3)" in text
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "Classes, worst first" in page and "part of a person" in page and "<b>face</b> (1 photos)" in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 3 * 4 and all((report / s).is_file() for s in sources)
    # the truth of the car + bicycle photo is drawn in two colours
    truth = np.asarray(Image.open(next(report.glob("*-7_23_s-truth.png"))).convert("RGB")).reshape(-1, 3)
    photo = np.asarray(Image.open(next(report.glob("*-7_23_s-photo.png"))).convert("RGB")).reshape(-1, 3)
    changed = truth[np.abs(truth.astype(int) - photo).sum(axis=1) > 60]
    assert len(changed) > 1000 and len(np.unique(changed // 64, axis=0)) >= 2


@pytest.mark.parametrize("extra, message", [
    (["--tag", "horse"], "either --tag"),
    ([], "--tags-csv FILE or --tags-from-mask"),
    (["--tags-from-mask", "--tags-csv", "x.csv"], "one of them"),
    (["--tags-from-mask", "--ignore", "void"], "--ignore: 'void' is not a class id"),
    (["--tags-csv", "/no/such/tags.csv"], "/no/such/tags.csv: no such file"),
])
def test_cli_usage_errors(extra, message, capsys):
    assert main(_coco_args(*extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("tag2mask: error: ") and message in err


def test_cli_usage_errors_of_binary_mode_and_bad_tags(tmp_path, capsys):
    d = coco_dir()
    assert main(["eval", "--images", str(d / "images"), "--masks", str(d / "masks"), *FAST]) == 2
    assert "give --tag T" in capsys.readouterr().err
    assert main(["eval", "--images", str(d / "images"), "--masks", str(d / "masks"), "--tag", "cat",
                 "--ignore", "0", *FAST]) == 2
    assert "go with --classes" in capsys.readouterr().err
    bad = tmp_path / "tags.csv"
    bad.write_text("000000000009.jpg,bowl;unicorn\n")
    assert main(_coco_args("--tags-csv", str(bad))) == 2
    assert "tags.csv:1: tag 'unicorn' of 000000000009.jpg is not in the classes table" in capsys.readouterr().err
