"""`tag2mask eval --report DIR`: the HTML page of best / median / worst photos and its PNGs, on 3 real horses."""
from __future__ import annotations

import json
import re

import numpy as np
from PIL import Image

from backend.cli.main import main
from backend.cli.report import pick_photos
from conftest import horse_stems

FAST = ["--preset", "fast", "--device", "cpu", "-q"]


def test_report_page_and_images(horse_dir, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["eval", "--images", str(horse_dir / "images"), "--masks", str(horse_dir / "masks"), "--tag", "horse",
               "--split", str(horse_dir / "split_test.txt"), "--limit", "3", "--json", "--report", str(out), *FAST])
    assert rc == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)            # the JSON on stdout stays parseable
    assert summary["n"] == 3 and str(out / "index.html") in captured.err
    page = (out / "index.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img src="([^"]+)"', page)
    stems = horse_stems("test")[:3]
    assert len(sources) == 3 * 4                  # 3 photos x (photo, CAM, mask, truth)
    for src in sources:
        assert "/" not in src and (out / src).is_file(), src
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == set(sources)                   # nothing written that the page does not show
    for stem in stems:
        assert stem in page
        kinds = {k for k in ("photo", "cam", "mask", "truth") if any(f"-{stem}-{k}.png" in s for s in sources)}
        assert kinds == {"photo", "cam", "mask", "truth"}
    for group in ("best", "median", "worst"):
        assert f">{group}<" in page
    assert f"{summary['fg_iou']:.3f}" in page
    # the overlays differ from the photo: the mask (red) and the truth (green) are drawn on it
    stem = stems[0]
    photo = np.asarray(Image.open(next(out.glob(f"*-{stem}-photo.png")))).astype(int)
    for kind in ("cam", "mask", "truth"):
        img = np.asarray(Image.open(next(out.glob(f"*-{stem}-{kind}.png")))).astype(int)
        assert img.shape == photo.shape and np.abs(img - photo).mean() > 1.0, kind


class _P:
    def __init__(self, name, iou):
        self.name, self.iou = name, iou


def test_pick_photos_groups_without_repeats():
    photos = [_P(f"p{i}", i / 10) for i in range(10)]
    groups = dict(pick_photos(photos, 3))
    assert [p.name for p in groups["best"]] == ["p9", "p8", "p7"]
    assert [p.name for p in groups["worst"]] == ["p0", "p1", "p2"]
    assert len(groups["median"]) == 3 and {p.name for p in groups["median"]} <= {"p3", "p4", "p5", "p6"}
    few = pick_photos(photos[:2], 3)
    assert sum(len(g) for _, g in few) == 2
