"""The class-id data sets of the multi-class tests (coco128_dev, MSRC-v2), read-only, outside the repository.

Their places: $TAG2MASK_COCO_DIR and $TAG2MASK_MSRC_DIR, default ../shared/data/{coco128_dev,msrc_v2}.
A missing set fails the test that needs it, saying where it was looked for.
"""
from __future__ import annotations

import csv
import os
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COCO_DIR = Path(os.environ.get("TAG2MASK_COCO_DIR", REPO.parent / "shared" / "data" / "coco128_dev"))
MSRC_DIR = Path(os.environ.get("TAG2MASK_MSRC_DIR", REPO.parent / "shared" / "data" / "msrc_v2"))


def _need(folder: Path, variable: str) -> Path:
    if not (folder / "images").is_dir() or not (folder / "masks").is_dir():
        pytest.fail(f"the data set is missing at {folder} (set {variable})")
    return folder


def coco_dir() -> Path:
    """coco128_dev: images/<stem>.jpg, masks/<stem>.png (COCO panoptic ids, 0 = unlabeled), classes.txt, tags.csv."""
    return _need(COCO_DIR, "TAG2MASK_COCO_DIR")


def msrc_dir() -> Path:
    """MSRC-v2: images/<stem>.png, masks/<stem>.png (ids 1..23, 255 = void), classes.txt, tags.txt, splits."""
    return _need(MSRC_DIR, "TAG2MASK_MSRC_DIR")


@lru_cache(maxsize=1)
def coco_tags() -> dict[str, list[str]]:
    """{stem: [class names]} from coco128_dev/tags.csv (plain csv reading, independent of the code under test)."""
    with open(coco_dir() / "tags.csv", newline="") as f:
        return {Path(row[0]).stem: row[1].split(";") for row in csv.reader(f) if row}


@lru_cache(maxsize=1)
def msrc_names() -> dict[str, str]:
    """{id as text: name} from msrc_v2/classes.txt."""
    lines = (msrc_dir() / "classes.txt").read_text().splitlines()
    return dict(line.split(None, 1) for line in lines if line.strip())


@lru_cache(maxsize=1)
def msrc_tags() -> dict[str, list[str]]:
    """{stem: [class ids as text]} from msrc_v2/tags.txt."""
    lines = (msrc_dir() / "tags.txt").read_text().splitlines()
    return {line.split()[0]: line.split()[1:] for line in lines if line.strip()}
