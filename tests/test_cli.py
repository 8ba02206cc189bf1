"""The tag2mask command line, run in-process through main(argv) and once through the installed script."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.cli.common import EXPLAIN_METHODS, PRESETS
from backend.cli.main import main
from conftest import horse_stems

FAST = ["--preset", "fast", "--device", "cpu", "-q"]


@pytest.fixture(scope="module")
def label_run(tmp_path_factory, horse_dir):
    """One `tag2mask label` over 3 horses, a truncated JPEG, a text file named .jpg and a missing path;
    a CSV gives the third horse the tags horse + dog."""
    root = tmp_path_factory.mktemp("label")
    photos = root / "photos"
    photos.mkdir()
    stems = horse_stems("test")[:4]
    for stem in stems[:3]:
        shutil.copy(horse_dir / "images" / f"{stem}.jpg", photos)
    data = (horse_dir / "images" / f"{stems[3]}.jpg").read_bytes()
    (photos / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (photos / "text.jpg").write_text("this is not a photo\n")
    csv = root / "tags.csv"
    csv.write_text(f"image,tags\n{stems[2]}.jpg,horse;dog\n")
    out = root / "out"
    argv = ["label", str(photos), str(root / "missing.jpg"), "--tags", "horse", "--tags-csv", str(csv),
            "--out", str(out), *FAST]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TAG2MASK_MODEL_VERSION", raising=False)
        rc = main(argv)
    return {"rc": rc, "out": out, "photos": photos, "stems": stems[:3], "root": root}


def test_label_writes_masks_overlays_tasks_and_errors(label_run):
    out, stems = label_run["out"], label_run["stems"]
    assert label_run["rc"] == 1                          # some photos failed
    for stem in stems:
        size = Image.open(label_run["photos"] / f"{stem}.jpg").size
        mask = Image.open(out / stem / "horse.png")
        assert mask.size == size and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(out / stem / "overlay.png").size == size
    assert (out / stems[2] / "dog.png").is_file() and not (out / stems[0] / "dog.png").exists()

    errors = {Path(e["path"]).name: e["error"] for e in json.loads((out / "errors.json").read_text())}
    assert set(errors) == {"truncated.jpg", "text.jpg", "missing.jpg"}
    assert "truncated" in errors["truncated.jpg"]
    assert "not an image" in errors["text.jpg"]
    assert "no such file" in errors["missing.jpg"]
    assert not (out / "truncated").exists() and not (out / "text").exists()


def test_label_tasks_json_brush_rle_decodes_to_photo_size(label_run):
    from backend.labelstudio.results import decode_rle
    from backend.serving.versions import VERSION, base_model_version
    from backend.settings import Settings

    tasks = json.loads((label_run["out"] / "tasks.json").read_text())
    assert len(tasks) == 3
    for task in tasks:
        photo = Path(task["data"]["image"])
        assert photo.is_absolute() and photo.parent == label_run["photos"].resolve()
        w, h = Image.open(photo).size
        pred = task["predictions"][0]
        assert set(pred) == {"model_version", "score", "result"}
        assert pred["model_version"] == base_model_version(Settings(preset="fast"))   # what the backend reports
        assert pred["model_version"].startswith(f"tag2mask-{VERSION}-efficientnet_lite0-fast-")
        types = {r["type"] for r in pred["result"]}
        assert {"choices", "brushlabels", "polygonlabels", "rectanglelabels"} <= types
        for r in pred["result"]:
            if r["type"] == "brushlabels":
                label = r["value"]["brushlabels"][0].lower()
                decoded = decode_rle(r["value"]["rle"], h, w)
                saved = np.asarray(Image.open(label_run["out"] / photo.stem / f"{label}.png")) > 0
                assert np.array_equal(decoded, saved)
            if r["type"] == "rectanglelabels":
                v = r["value"]
                assert 0 <= v["x"] <= v["x"] + v["width"] <= 100.001
                assert 0 <= v["y"] <= v["y"] + v["height"] <= 100.001


def test_label_errors_are_one_line_each(label_run, capsys):
    # the module fixture's output is gone; run a small bad batch again and look at stderr
    rc = main(["label", str(label_run["photos"] / "text.jpg"), "--tags", "horse",
               "--out", str(label_run["root"] / "again"), *FAST])
    captured = capsys.readouterr()
    assert rc == 1
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert lines == [f"error: {label_run['photos'] / 'text.jpg'}: not an image (format not recognised)"]
    assert "Traceback" not in captured.err
    assert "labelled 0 of 1 photos" in captured.out


@pytest.mark.parametrize("tag, words", [("unicornx", "unknown tag 'unicornx'"),
                                        ("person", "no class in the ImageNet-1k classifier")])
def test_label_unknown_tag_is_a_usage_error(tmp_path, horse_photo, horse_dir, capsys, tag, words):
    photo = horse_dir / "images" / f"{horse_stems('test')[0]}.jpg"
    rc = main(["label", str(photo), "--tags", f"horse,{tag}", "--out", str(tmp_path / "o"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("tag2mask: error: --tags: ") and words in err and len(err.strip().splitlines()) == 1


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["label", str(tmp_path), "--out", str(tmp_path / "o")]) == 2          # no tags
    assert "give the photos' tags" in capsys.readouterr().err
    assert main(["label", str(tmp_path), "--tags", "horse"]) == 2                     # no --out
    assert main(["label", str(tmp_path), "--tags", "horse", "--out", "o", "--preset", "slow"]) == 2
    assert main(["label", str(tmp_path), "--tags-csv", str(tmp_path / "none.csv"), "--out", "o"]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err
    assert main(["explain", str(tmp_path / "none.jpg"), "--method", "gradcam", "--out", "x.png"]) == 2
    assert main(["serve", "--port", "nine"]) == 2
    assert main(["worker", "--bogus"]) == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert main(["worker", "--batch-size", "0"]) == 2 and "must be at least 1" in capsys.readouterr().err
    assert main(["dashboard", "--port", "nine"]) == 2
    assert main([]) == 2
    assert main(["--help"]) == 0


def test_names_match_the_library():
    from explainers.explain import EXPLAIN_METHODS as LIB_METHODS
    from explainers.segment.config import PRESETS as LIB_PRESETS

    assert list(EXPLAIN_METHODS) == list(LIB_METHODS)
    assert list(PRESETS) == list(LIB_PRESETS)


@pytest.mark.parametrize("method, extra", [("gradcam", ["--tag", "horse"]), ("cam", []),
                                           ("layercam", ["--tag", "horse"]), ("activations", [])])
def test_explain_writes_a_png(tmp_path, horse_dir, method, extra):
    photo = horse_dir / "images" / f"{horse_stems('test')[0]}.jpg"
    out = tmp_path / "x" / f"{method}.png"
    assert main(["explain", str(photo), "--method", method, *extra, "--device", "cpu", "--out", str(out)]) == 0
    pic = np.asarray(Image.open(out))
    assert pic.ndim == 3 and pic.shape[2] == 3 and pic.std() > 10
    if method != "activations":   # heatmaps are drawn over the photo at its own size
        assert Image.open(out).size == Image.open(photo).size


def test_explain_bad_layer_and_method(tmp_path, horse_dir, capsys):
    photo = horse_dir / "images" / f"{horse_stems('test')[0]}.jpg"
    out = str(tmp_path / "x.png")
    assert main(["explain", str(photo), "--method", "gradcam", "--layer", "no.such", "--device", "cpu",
                 "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tag2mask: error: --layer: ") and "no.such" in err
    assert main(["explain", str(photo), "--method", "magic", "--out", out]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err
    assert not Path(out).exists()


def test_eval_json(horse_dir, capsys):
    rc = main(["eval", "--images", str(horse_dir / "images"), "--masks", str(horse_dir / "masks"), "--tag", "horse",
               "--split", str(horse_dir / "split_test.txt"), "--limit", "3", "--json", *FAST])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert {"fg_iou", "bg_iou", "miou", "box_iou", "seconds_per_photo", "n", "worst"} <= set(report)
    assert report["n"] == 3 and report["errors"] == []
    assert 0 < report["fg_iou"] < 1 and report["miou"] == pytest.approx((report["fg_iou"] + report["bg_iou"]) / 2)
    assert [name for name, _ in report["worst"]] and set(n for n, _ in report["worst"]) <= set(horse_stems("test")[:3])


def test_eval_text_and_missing_folder(horse_dir, tmp_path, capsys):
    rc = main(["eval", "--images", str(horse_dir / "images"), "--masks", str(tmp_path / "nomasks"), "--tag", "horse"])
    assert rc == 2 and "--masks" in capsys.readouterr().err


def test_demo_writes_index_and_overlays(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *FAST]) == 0
    page = (out / "index.html").read_text()
    for name, tag in [("chelsea", "cat"), ("coffee", "cup"), ("motorcycle", "motorcycle")]:
        assert Image.open(out / name / "overlay.png").size == Image.open(out / "photos" / f"{name}.png").size
        assert (out / name / f"{tag}.png").is_file()
        assert f"{name}/overlay.png" in page and f"<b>{tag}</b>" in page
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == 3 and all(t["predictions"][0]["result"] for t in tasks)


def test_installed_console_script(tmp_path, horse_dir):
    script = Path(sys.executable).parent / "tag2mask"
    if not script.exists():
        pytest.fail(f"{script} is missing: run scripts/setup.sh (pip install -e .)")
    photo = horse_dir / "images" / f"{horse_stems('test')[1]}.jpg"
    env = {**os.environ, "TAG2MASK_THREADS": os.environ.get("TAG2MASK_THREADS", "1")}
    proc = subprocess.run([str(script), "label", str(photo), "--tags", "horse", "--out", str(tmp_path), *FAST],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "labelled 1 of 1 photos" in proc.stdout
    assert len(json.loads((tmp_path / "tasks.json").read_text())) == 1
    bad = subprocess.run([str(script), "label", str(photo), "--out", str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("tag2mask: error:") and "Traceback" not in bad.stderr
