"""The Weizmann horse photos the benchmarks read: ``$TAG2MASK_HORSE_DIR``, else ../shared/data/weizmann_horse."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from explainers.imageio import load_image

HORSE_DIR = Path(os.environ.get("TAG2MASK_HORSE_DIR",
                                Path(__file__).resolve().parents[2] / "shared" / "data" / "weizmann_horse"))


def stems(split: str) -> list[str]:
    """The photo names of a split ("train" or "test")."""
    return (HORSE_DIR / f"split_{split}.txt").read_text().split()


def load(stem: str) -> tuple[np.ndarray, np.ndarray]:
    """(RGB uint8 photo, bool ground-truth mask) of one photo."""
    img = load_image(HORSE_DIR / "images" / f"{stem}.jpg")
    return img, np.asarray(Image.open(HORSE_DIR / "masks" / f"{stem}.png")) > 0


def spread(names: list[str], limit: int | None) -> list[str]:
    """`limit` names evenly spread over `names` (all of them when `limit` is None or not smaller)."""
    if not limit or limit >= len(names):
        return names
    step = len(names) / limit
    return [names[int(i * step)] for i in range(limit)]
