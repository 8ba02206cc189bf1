"""backend.cli.labeling: collecting photos, per-photo tags, the labeling config, and one real batch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.cli.labeling import (UNUSABLE_TAG_HINT, PhotoItem, collect_photos, image_url, label_config_for, label_photos, mask_filename, read_tags_csv, tags_for)
from conftest import horse_stems


@pytest.fixture(scope="module")
def engine(backbone):
    from explainers.segment import PipelineConfig, Tag2Mask

    return Tag2Mask(backbone, config=PipelineConfig.preset("fast"))


def _horse(horse_dir: Path, i: int) -> Path:
    return horse_dir / "images" / f"{horse_stems('test')[i]}.jpg"


def test_collect_photos_files_folders_missing_and_duplicate_stems(tmp_path, horse_dir):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "empty").mkdir()
    shutil.copy(_horse(horse_dir, 0), tmp_path / "a" / "x.jpg")
    shutil.copy(_horse(horse_dir, 1), tmp_path / "a" / "deep" / "y.JPG")
    (tmp_path / "a" / "notes.txt").write_text("not a photo")
    shutil.copy(_horse(horse_dir, 2), tmp_path / "b" / "x.jpg")          # same stem as a/x.jpg

    items, errors = collect_photos([tmp_path / "a", tmp_path / "b" / "x.jpg", tmp_path / "a" / "x.jpg",
                                    tmp_path / "nope.jpg", tmp_path / "empty"])
    assert [(i.rel, i.name) for i in items] == [("deep/y.JPG", "y"), ("x.jpg", "x"), ("x.jpg", "x-2")]
    assert [Path(i.path).parent.name for i in items] == ["deep", "a", "b"]
    assert [e.error for e in errors] == [f"{tmp_path / 'nope.jpg'}: no such file or folder",
                                         f"{tmp_path / 'empty'}: no photos in this folder"]
    # the output folder inside a photo folder is not searched (a rerun must not label its own masks)
    items, errors = collect_photos([tmp_path / "a"], exclude=[tmp_path / "a" / "deep"])
    assert [i.rel for i in items] == ["x.jpg"] and not errors


def test_read_tags_csv_and_precedence(tmp_path):
    csv = tmp_path / "tags.csv"
    csv.write_text("image,tags\n# a comment\nhorse301.jpg,horse;dog\n\nhorse302, cat ; horse \n"
                   "sub/z.png,bird\n")
    m = read_tags_csv(csv)
    assert m == {"horse301.jpg": ["horse", "dog"], "horse302": ["cat", "horse"], "sub/z.png": ["bird"]}
    item = lambda p, rel: PhotoItem(Path(p), rel, Path(p).stem)  # noqa: E731
    assert tags_for(item("/d/horse301.jpg", "horse301.jpg"), ["zebra"], m) == ["horse", "dog"]
    assert tags_for(item("/d/horse302.png", "horse302.png"), ["zebra"], m) == ["cat", "horse"]   # by stem
    assert tags_for(item("/d/sub/z.png", "sub/z.png"), [], m) == ["bird"]                        # by rel path
    assert tags_for(item("/d/other.jpg", "other.jpg"), ["zebra"], m) == ["zebra"]                # default

    bad = tmp_path / "bad.csv"
    bad.write_text("image,tags\nhorse301.jpg\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: expected 'image,tag1;tag2'"):
        read_tags_csv(bad)


def test_label_config_for_default_and_generated():
    from backend.labelstudio.config import DEFAULT_LABEL_CONFIG

    assert label_config_for(["horse", "cat"]).xml == DEFAULT_LABEL_CONFIG
    cfg = label_config_for(["cup", "traffic light", "horse"])
    assert [c.from_name for c in cfg.controls] == ["tag", "brush", "polygon", "box"]
    assert cfg.labels == ["Cup", "Traffic light", "Horse"]
    assert all(c.match("traffic light") == "Traffic light" for c in cfg.controls)


def test_image_url_and_mask_filename():
    item = PhotoItem(Path("/photos/my horses/a b.jpg"), "my horses/a b.jpg", "a b")
    assert image_url(item, "/data/local-files/?d=") == "/data/local-files/?d=my%20horses/a%20b.jpg"
    assert image_url(item, "http://h/x") == "http://h/x/my%20horses/a%20b.jpg"
    assert image_url(item, None) == "/photos/my horses/a b.jpg"
    assert mask_filename("traffic light") == "traffic_light.png"
    assert mask_filename("../etc") == "etc.png"


def test_label_photos_real_batch(tmp_path, horse_dir, engine):
    from backend.labelstudio.results import decode_rle

    photos, errors = collect_photos([_horse(horse_dir, 0), _horse(horse_dir, 1), tmp_path / "gone.jpg"])
    second = photos[1].path.name
    out = tmp_path / "out"
    summary = label_photos(photos, engine, out, tags=["horse"], errors=errors,
                           tags_map={second: ["horse", "dog"], "x.jpg": ["unicornx"]},
                           image_root_url="/data/local-files/?d=horses", progress=False, report=lambda _: None)
    assert summary.ok == 2 and summary.exit_status == 1
    assert [e["path"] for e in json.loads((out / "errors.json").read_text())] == [str(tmp_path / "gone.jpg")]

    tasks = json.loads((out / "tasks.json").read_text())
    assert [t["data"]["image"] for t in tasks] == [f"/data/local-files/?d=horses/{p.path.name}" for p in photos]
    for task, item in zip(tasks, photos):
        w, h = Image.open(item.path).size
        pred = task["predictions"][0]
        assert pred["model_version"] == "tag2mask-efficientnet_lite0"
        brushes = [r for r in pred["result"] if r["type"] == "brushlabels"]
        assert brushes, "every horse photo gets a brush mask"
        for r in brushes:
            label = r["value"]["brushlabels"][0]
            saved = np.asarray(Image.open(out / item.name / f"{label.lower()}.png")) > 0
            decoded = decode_rle(r["value"]["rle"], r["original_height"], r["original_width"])
            assert (r["original_width"], r["original_height"]) == (w, h)
            assert decoded.shape == (h, w) and np.array_equal(decoded, saved)
        for r in pred["result"]:
            if r["type"] == "polygonlabels":
                assert np.all((np.array(r["value"]["points"]) >= 0) & (np.array(r["value"]["points"]) <= 100))
    # the CSV row gave the second photo two tags; the first kept the default
    assert sorted(p.name for p in (out / photos[0].name).iterdir()) == ["horse.png", "overlay.png"]
    assert sorted(p.name for p in (out / photos[1].name).iterdir()) == ["dog.png", "horse.png", "overlay.png"]
    assert "Dog" in (out / "label_config.xml").read_text()   # default config covers horse + dog
    rec = json.loads((out / "summary.json").read_text())["photos"][1]
    assert [t["tag"] for t in rec["tags"]] == ["horse", "dog"] and rec["timings"]["total"] > 0


def test_label_photos_unknown_tag_is_one_photo_error(tmp_path, horse_dir, engine):
    photos, _ = collect_photos([_horse(horse_dir, 0), _horse(horse_dir, 1)])
    lines = []
    summary = label_photos(photos, engine, tmp_path, tags=["horse"], tags_map={photos[0].path.stem: ["unicornx"]},
                           progress=False, report=lines.append)
    assert summary.ok == 1 and len(summary.errors) == 1
    assert len(lines) == 1 and lines[0].startswith(
        f"error: {photos[0].path}: none of the photo's tags can be segmented ('unicornx'). {UNUSABLE_TAG_HINT} "
        "Reason: unknown tag 'unicornx'")
    assert not (tmp_path / photos[0].name).exists()


# COCO 294, a kitchen (person, microwave, clock, ...), tagged with "person" (ImageNet-1k has no person
# class: refused on purpose) between two tags it has; COCO 25, a giraffe, whose tags none can segment.
KITCHEN, GIRAFFE = "000000000294", "000000000025"


def test_label_command_an_unusable_tag_does_not_sink_the_photos_other_tags(tmp_path, coco_dir, capsys):
    from backend.cli.main import main

    photos = [coco_dir / "images" / f"{stem}.jpg" for stem in (KITCHEN, GIRAFFE)]
    csv = tmp_path / "tags.csv"
    csv.write_text(f"image,tags\n{KITCHEN}.jpg,microwave;person;clock\n{GIRAFFE},giraffe;sky-other-merged\n")
    out = tmp_path / "out"
    assert main(["label", *map(str, photos), "--tags-csv", str(csv), "--out", str(out), "--preset", "fast",
                 "-q"]) == 1
    std = capsys.readouterr()
    assert "labelled 1 of 2 photos" in std.out and "1 failed; 1 tag left out (no mask)" in std.out

    # the kitchen's usable tags are labelled: masks at the photo's size, with pixels
    w, h = Image.open(photos[0]).size
    assert sorted(p.name for p in (out / KITCHEN).iterdir()) == ["clock.png", "microwave.png", "overlay.png"]
    for tag in ("microwave", "clock"):
        mask = np.asarray(Image.open(out / KITCHEN / f"{tag}.png"))
        assert mask.shape == (h, w) and mask.any()
    assert not (out / GIRAFFE).exists()

    # "person" has its own entry (reason + hint); the giraffe photo fails as a whole, naming each tag
    errors = json.loads((out / "errors.json").read_text())
    assert [(e["path"], e.get("tag")) for e in errors] == [(str(photos[0]), "person"), (str(photos[1]), None)]
    person, giraffe = errors[0]["error"], errors[1]["error"]
    assert person.startswith(f"{photos[0]}: tag 'person' has no class in the ImageNet-1k classifier")
    assert person.endswith(UNUSABLE_TAG_HINT)
    assert giraffe.startswith(f"{photos[1]}: none of the photo's tags can be segmented ('giraffe', "
                              f"'sky-other-merged'). {UNUSABLE_TAG_HINT} Reasons: tag 'giraffe' has no class")
    assert "; " in giraffe and "'sky-other-merged'" in giraffe.split("Reasons: ")[1]
    assert [line for line in std.err.splitlines() if line.startswith("error: ")] == \
        [f"error: {e['error']}" for e in errors]

    # tasks.json: the kitchen's prediction has the two masks and a warning naming "person"
    (task,) = json.loads((out / "tasks.json").read_text())
    pred = task["predictions"][0]
    assert {label for r in pred["result"] if r["type"] == "brushlabels" for label in r["value"]["brushlabels"]} \
        == {"Microwave", "Clock"}
    assert len(pred["warnings"]) == 1 and pred["warnings"][0].startswith("Tag 'person' has no class")
    (rec,) = json.loads((out / "summary.json").read_text())["photos"]
    assert [t["tag"] for t in rec["tags"]] == ["microwave", "clock"]
    assert list(rec["skipped"]) == ["person"] and "no class in the ImageNet-1k classifier" in rec["skipped"]["person"]
