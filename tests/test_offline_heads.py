"""Issue 13, offline: ``tag2mask label`` / ``tag2mask eval`` with ``--model-dir DIR --project P`` use the
project's promoted heads as the service serves them. A real project is trained on real Weizmann horses
under a label ImageNet cannot name ("Pony photo"), with skimage photos as negatives; the registry on
disk; real efficientnet_lite0 on the CPU."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from skimage import data

from backend.cli.main import main
from backend.serving.model import Tag2MaskModel
from backend.storage.registry import ModelRegistry
from backend.settings import Settings
from backend.training.trainer import train_and_register
from explainers.training import Sample
from tests.conftest import horse_and_mask, horse_stems, rgb_uint8, spread_names

LABEL, PROJECT = "Pony photo", "7"
OTHERS = [data.astronaut, data.coffee, data.rocket, data.camera, data.brick, data.chelsea]
TEST_STEMS = spread_names(horse_stems("test"), 2)
Q = ["-q", "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("TAG2MASK_THREADS", "1")
    monkeypatch.delenv("TAG2MASK_MODEL_VERSION", raising=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, backbone, horse_dir):
    """Project 7 trained and promoted: 10 train-split horses with masks as "Pony photo", 6 other photos without it;
    project 8: the same checkpoint saved but never promoted."""
    md = tmp_path_factory.mktemp("md")
    horses = [Sample(f"h-{s}", [LABEL], masks={LABEL: m}, image=img)
              for s in spread_names(horse_stems("train"), 10) for img, m in [horse_and_mask(horse_dir, s)]]
    others = [Sample(f"o{i}", [], image=rgb_uint8(f())) for i, f in enumerate(OTHERS)]
    registry = ModelRegistry.in_model_dir(md)
    report = train_and_register(horses + others, PROJECT, registry, backbone, labels=[LABEL], trigger="test")
    assert report["promoted"] and report["current"] == "v1"
    ckpt, meta = registry.load(PROJECT)
    registry.save("8", ckpt, {k: v for k, v in meta.items() if k not in ("project", "version")})
    assert registry.current("8") is None
    return md


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_label_with_project_heads_masks_a_label_imagenet_lacks(model_dir, horse_dir, tmp_path, capsys):
    out = tmp_path / "out"
    photos = [str(horse_dir / "images" / f"{s}.jpg") for s in TEST_STEMS]
    rc = main(["label", *photos, "--tags", LABEL, "--out", str(out), "--model-dir", str(model_dir),
               "--project", PROJECT, *Q])
    std = capsys.readouterr()
    assert rc == 0, std.err
    # the version the service reports for project 7 (what /setup and its predictions say)
    served = Tag2MaskModel(settings=Settings(model_dir=model_dir), project_id=PROJECT).model_version
    assert served.endswith(f"+p{PROJECT}.v1")
    assert f"model version {served}" in std.out and "trained heads v1" in std.err
    tasks = json.loads((out / "tasks.json").read_text())
    assert len(tasks) == 2 and all(t["predictions"][0]["model_version"] == served for t in tasks)
    assert json.loads((out / "summary.json").read_text())["model_version"] == served
    for stem, task in zip(TEST_STEMS, tasks):
        labels = {v for r in task["predictions"][0]["result"] for k, v in r["value"].items() if k.endswith("labels")
                  for v in v}
        assert labels == {LABEL}
        _, gt = horse_and_mask(horse_dir, stem)
        mask = np.asarray(Image.open(out / stem / "Pony_photo.png")) > 0
        assert mask.shape == gt.shape and _iou(mask, gt) > 0.55, stem


def test_without_project_the_label_is_refused(horse_dir, tmp_path, capsys):
    photo = str(horse_dir / "images" / f"{TEST_STEMS[0]}.jpg")
    rc = main(["label", photo, "--tags", f"horse,{LABEL}", "--out", str(tmp_path / "out"), *Q])
    err = capsys.readouterr().err
    assert rc == 2 and f"'{LABEL}'" in err and "--project P --model-dir DIR" in err
    assert not (tmp_path / "out" / "tasks.json").exists()


def test_eval_with_project_heads(model_dir, horse_dir, tmp_path, capsys):
    split = tmp_path / "split.txt"
    split.write_text("\n".join(TEST_STEMS) + "\n")
    common = ["eval", "--images", str(horse_dir / "images"), "--masks", str(horse_dir / "masks"), "--split", str(split),
              "--model-dir", str(model_dir), "--project", PROJECT, "--json", *Q]
    assert main([*common, "--tag", LABEL]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 2 and report["fg_iou"] > 0.55
    assert report["project"] == PROJECT and report["model_version"].endswith(f"+p{PROJECT}.v1")

    # class-id masks (0 = sky, 1 = the pony): the trained label is a coverable class, sky is not
    classes = tmp_path / "classes.txt"
    classes.write_text(f"0 sky\n1 {LABEL}\n")
    assert main([*common, "--classes", str(classes), "--tags-from-mask"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["classes"]) == {LABEL} and report["classes"][LABEL]["fg_iou"] > 0.55
    assert set(report["not_coverable"]) == {"sky"}


def test_heads_usage_errors(model_dir, horse_dir, tmp_path, capsys):
    photo = str(horse_dir / "images" / f"{TEST_STEMS[0]}.jpg")
    out = str(tmp_path / "out")

    def run(*extra) -> str:
        assert main(["label", photo, "--tags", "horse", "--out", out, *Q, *extra]) == 2
        return capsys.readouterr().err

    err = run("--model-dir", str(model_dir), "--project", "8")
    assert "none is promoted" in err and f"tag2mask models promote 8 v1 --model-dir {model_dir}" in err
    err = run("--model-dir", str(model_dir), "--project", "9")
    assert "project 9 has no trained model" in err and "projects there: 7, 8" in err
    assert "no such folder" in run("--model-dir", str(tmp_path / "nope"), "--project", PROJECT)
    assert "--model-dir goes with --project" in run("--model-dir", str(model_dir))
    assert "trained on the efficientnet_lite0 backbone" in run("--model-dir", str(model_dir), "--project", PROJECT,
                                                               "--backbone", "mobilenet_v2")
    # eval refuses the same way
    assert main(["eval", "--images", str(horse_dir / "images"), "--masks", str(horse_dir / "masks"), "--tag", LABEL,
                 "--limit", "1", "--model-dir", str(model_dir), "--project", "8", *Q]) == 2
    assert "none is promoted" in capsys.readouterr().err
