"""``tag2mask train`` (photo+mask folders, Label Studio export) and ``tag2mask models`` on real horses."""
from __future__ import annotations

import json

import pytest

from conftest import horse_stems
from ls_payloads import ls_export

from backend.cli.main import main
from backend.storage.registry import ModelRegistry


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("TAG2MASK_THREADS", "1")


def test_train_from_folders_then_models_list_promote_rollback(tmp_path, horse_dir, capsys):
    md = tmp_path / "md"
    rc = main(["train", "--images", str(horse_dir / "images"), "--masks", str(horse_dir / "masks"), "--tag", "horse",
               "--split", str(horse_dir / "split_train.txt"), "--limit", "12", "--model-dir", str(md), "-q",
               "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "project horse: v1 trained on" in out and "promoted" in out and "fusion " in out
    assert "; refit on all 12;" in out
    reg = ModelRegistry.in_model_dir(md)
    meta = reg.list("horse")[0]
    assert meta["current"] and meta["labels"] == ["horse"] and meta["counts"]["train"] + meta["counts"]["val"] == 12
    assert meta["validation"]["fg_iou"] > 0.6 and meta["source"].startswith("folders:")
    fusion = meta["validation"]["fusion"]                  # how the parts combine, chosen on the validation masks
    assert fusion["n_masks"] == meta["validation"]["n_val_masks"] and len(fusion["scores"]) == 12
    chosen = fusion["chosen"]
    assert (chosen is None) == (fusion["n_masks"] < fusion["min_masks"])
    assert reg.load("horse")[0].get("fusion_weight") == chosen
    assert meta["counts"]["refit"] == 12                   # the served heads learnt from every example
    per = fusion["per_label"]
    shown = ",".join(f"{k}:{e['weight']:g}" + ("" if e["crf"] else "/no-crf") for k, e in per.items()) if per \
        else ("default" if chosen is None else format(chosen, "g"))
    if per:
        assert f"(chosen on {fusion['n_masks']} masks: served fg_iou {fusion['served']:.3f}" in out

    # a second version from 3 photos: saved but (--no-promote) not current
    rc = main(["train", "--images", str(horse_dir / "images"), "--masks", str(horse_dir / "masks"), "--tag", "horse",
               "--limit", "3", "--model-dir", str(md), "-q", "--device", "cpu", "--no-promote", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["version"] == "v2" and not report["promoted"] and report["current"] == "v1"

    assert main(["models", "list", "--model-dir", str(md)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0] == "project horse:" and listing[1].lstrip().startswith("* v1") and "v2" in listing[2]
    assert f"fusion={shown} " in listing[1]
    assert f"train={meta['counts']['train']} val={meta['counts']['val']} refit=12 " in listing[1]
    assert "pipe=" in listing[1] and "refit=" in listing[2]
    assert main(["models", "list", "--project", "horse", "--json", "--model-dir", str(md)]) == 0
    assert [m["version"] for m in json.loads(capsys.readouterr().out)["horse"]] == ["v1", "v2"]

    assert main(["models", "promote", "horse", "v2", "--force", "--model-dir", str(md)]) == 0
    assert reg.current("horse") == "v2" and "promoted" in capsys.readouterr().out
    assert main(["models", "rollback", "horse", "--model-dir", str(md)]) == 0
    assert reg.current("horse") == "v1"
    assert main(["models", "rollback", "horse", "--model-dir", str(md)]) == 1       # nothing earlier
    assert main(["models", "promote", "horse", "v9", "--model-dir", str(md)]) == 2
    assert main(["models", "list", "--project", "nope", "--model-dir", str(md)]) == 2
    err = capsys.readouterr().err
    assert "no earlier promoted version" in err and "no version v9" in err and "project nope" in err


def test_train_from_label_studio_export(tmp_path, horse_dir, capsys):
    stems = horse_stems("train")[:8]
    tasks = ls_export(horse_dir, stems, image_prefix="/data/local-files/?d=horses/")    # resolved by file name
    tasks[1]["data"]["image"] = f"/data/upload/3/1a2b3c4d-{stems[1]}.jpg"                # an uploaded photo
    tasks.append({"id": 990, "project": 3, "data": {"image": "/data/upload/3/ffffffff-missing.jpg"},
                  "annotations": [dict(tasks[0]["annotations"][0], id=77)]})            # its photo is not there
    tasks.append({"id": 991, "project": 3, "data": {"image": tasks[0]["data"]["image"]},
                  "annotations": [dict(tasks[0]["annotations"][0], id=78, was_cancelled=True)]})   # skipped
    export = tmp_path / "export.json"
    export.write_text(json.dumps(tasks))
    md = tmp_path / "md"
    rc = main(["train", "--ls-export", str(export), "--images-root", str(horse_dir / "images"),
               "--model-dir", str(md), "-q", "--device", "cpu", "--json"])
    captured = capsys.readouterr()
    assert rc == 1, captured.err             # trained, but two tasks were left out (listed)
    report = json.loads(captured.out)
    assert report["project"] == "3" and report["version"] == "v1" and report["promoted"]
    assert report["counts"]["train"] + report["counts"]["val"] == 8
    assert report["labels"] == ["horse"] and report["validation"]["fg_iou"] > 0.5
    assert "skipped 990: photo" in captured.err and "missing.jpg" in captured.err
    assert "skipped 991: no annotation" in captured.err
    meta = ModelRegistry.in_model_dir(md).meta("3", "v1")
    assert meta["source"] == "ls-export:export.json" and meta["trigger"] == "cli"

    # photos outside the images root are never read
    tasks[0]["data"]["image"] = "/data/local-files/?d=../masks/" + stems[0] + ".png"
    from backend.labelstudio.export import resolve_export_image

    assert resolve_export_image(tasks[0]["data"]["image"], horse_dir / "images") is None
    assert resolve_export_image(f"s3://bucket/x/{stems[2]}.jpg", horse_dir / "images").name == f"{stems[2]}.jpg"
    # an absolute local path (tasks made by `tag2mask label` without --image-root-url) inside the root
    inside = (horse_dir / "images" / f"{stems[2]}.jpg").resolve()
    assert resolve_export_image(str(inside), horse_dir) == inside
    assert resolve_export_image(str((horse_dir / "masks" / f"{stems[2]}.png").resolve()), horse_dir / "images") is None


def test_train_usage_errors(tmp_path, horse_dir, capsys):
    assert main(["train", "--tag", "horse"]) == 2
    assert main(["train", "--images", str(tmp_path / "none"), "--masks", str(tmp_path), "--tag", "horse"]) == 2
    assert main(["train", "--ls-export", str(tmp_path / "none.json"), "--images-root", str(tmp_path)]) == 2
    (tmp_path / "two.json").write_text(json.dumps([{"id": 1, "project": 1}, {"id": 2, "project": 2}]))
    assert main(["train", "--ls-export", str(tmp_path / "two.json"), "--images-root", str(tmp_path)]) == 2
    assert main(["train", "--images", str(horse_dir / "images"), "--masks", str(horse_dir / "masks"),
                 "--tag", "horse", "--limit", "1", "--model-dir", str(tmp_path / "md")]) == 2
    err = capsys.readouterr().err
    assert "give either" in err and "no such folder" in err and "no such file" in err
    assert "several projects (1, 2)" in err and "training needs at least 2" in err


def test_train_from_folders_learns_absence_from_negatives_and_empty_masks(tmp_path, horse_dir, capsys):
    """A label ImageNet lacks, from folders: photos of --negatives and a photo whose mask is empty are
    photos without the label, so the classifier head knows where it is absent (its negative count) and
    the project's head serves it (fusion.head_cam "auto" needs at least 5 such photos)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from conftest import rgb_uint8

    stems = horse_stems("train")[:8]
    images, masks, negatives = tmp_path / "images", tmp_path / "masks", tmp_path / "negatives"
    for d in (images, masks, negatives):
        d.mkdir()
    for stem in stems:
        (images / f"{stem}.jpg").write_bytes((horse_dir / "images" / f"{stem}.jpg").read_bytes())
        (masks / f"{stem}.png").write_bytes((horse_dir / "masks" / f"{stem}.png").read_bytes())
    photo = rgb_uint8(data.coffee())                                   # no horse, and its mask says so
    Image.fromarray(photo).save(images / "coffee.png")
    Image.fromarray(np.zeros(photo.shape[:2], np.uint8)).save(masks / "coffee.png")
    for i, f in enumerate([data.astronaut, data.rocket, data.camera, data.brick, data.chelsea]):
        Image.fromarray(rgb_uint8(f())).save(negatives / f"other{i}.png")
    md = tmp_path / "md"
    args = ["train", "--images", str(images), "--masks", str(masks), "--tag", "Pony photo", "--project", "5",
            "--model-dir", str(md), "-q", "--device", "cpu", "--seg-epochs", "10"]
    assert main(args + ["--negatives", str(negatives)]) == 0, capsys.readouterr()
    capsys.readouterr()
    ckpt, meta = ModelRegistry.in_model_dir(md).load("5")
    spec = ckpt["classifier"]["spec"]
    assert spec["labels"] == ["Pony photo"] and spec["negatives"] == [6]   # coffee + the 5 negatives
    assert meta["negatives"] == "folder:negatives"
    assert main(["train", "--ls-export", str(tmp_path / "x.json"), "--images-root", str(tmp_path),
                 "--negatives", str(negatives)]) == 2
    assert main(args + ["--negatives", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--negatives goes with --images" in err and "is not a folder" in err
