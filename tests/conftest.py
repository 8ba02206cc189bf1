"""Shared fixtures: real photos and real pretrained backbones, offline."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from explainers.device import set_cpu_threads

REPO = Path(__file__).resolve().parents[1]
HORSE_DIR = Path(os.environ.get("TAG2MASK_HORSE_DIR", REPO.parent / "shared" / "data" / "weizmann_horse"))
# COCO photos of cluttered scenes with several tags each (tags.csv); set TAG2MASK_COCO_DIR to put them elsewhere
COCO_DIR = Path(os.environ.get("TAG2MASK_COCO_DIR", REPO.parent / "shared" / "data" / "coco128_dev"))

set_cpu_threads()


def horse_stems(split: str = "test") -> list[str]:
    return (HORSE_DIR / f"split_{split}.txt").read_text().split()


def spread_names(names: list[str], n: int) -> list[str]:
    """`n` names evenly spread over `names`."""
    step = len(names) / n
    return [names[int(i * step)] for i in range(n)]


def horse_and_mask(horse_dir: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 photo, bool ground-truth mask) of one Weizmann horse."""
    from PIL import Image

    from explainers.imageio import load_image

    return (load_image(horse_dir / "images" / f"{stem}.jpg"),
            np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0)


def rgb_uint8(x) -> np.ndarray:
    """An skimage.data image (gray, float or RGB; first item of a tuple) as RGB uint8."""
    from skimage import color

    x = x[0] if isinstance(x, tuple) else x
    return x if x.ndim == 3 else (color.gray2rgb(x) if x.dtype == np.uint8 else (color.gray2rgb(x) * 255).astype(np.uint8))


@pytest.fixture(scope="session")
def horse_dir() -> Path:
    if not (HORSE_DIR / "images").is_dir():
        pytest.fail(f"the Weizmann horse photos are missing at {HORSE_DIR} (set TAG2MASK_HORSE_DIR)")
    return HORSE_DIR


@pytest.fixture(scope="session")
def coco_dir() -> Path:
    """The COCO dev photos (images/<stem>.jpg, tags.csv)."""
    if not (COCO_DIR / "images").is_dir():
        pytest.fail(f"the COCO dev photos are missing at {COCO_DIR} (set TAG2MASK_COCO_DIR)")
    return COCO_DIR


@pytest.fixture(scope="session")
def backbone():
    from explainers import load_backbone

    return load_backbone("efficientnet_lite0", device="cpu")


@pytest.fixture(scope="session")
def mobilenet():
    from explainers import load_backbone

    return load_backbone("mobilenet_v2", device="cpu")


@pytest.fixture(scope="session")
def chelsea() -> np.ndarray:
    from skimage import data

    return data.chelsea()


@pytest.fixture(scope="session")
def horse_photo(horse_dir):
    """(photo RGB uint8, ground-truth bool mask) of one real test-split horse."""
    from explainers.imageio import load_image
    from PIL import Image

    stem = horse_stems("test")[0]
    img = load_image(horse_dir / "images" / f"{stem}.jpg")
    mask = np.asarray(Image.open(horse_dir / "masks" / f"{stem}.png")) > 0
    return img, mask


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    """One real Label Studio server (own venv, fresh data dir) for the tests that need it."""
    from tests.labelstudio import LabelStudio

    ls = LabelStudio(data_dir=tmp_path_factory.mktemp("ls-data"))
    ls.start()
    try:
        yield ls
    finally:
        ls.stop()
