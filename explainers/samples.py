"""A training example of the heads and the train/validation split of a project's examples.

- :class:`Sample`: one example (a photo or its loader, its tags, its masks and boxes per label, in
  pixels of the photo), keyed for the split and for the feature cache;
- :func:`split_samples`: (train, validation) by a seeded hash of each sample's key, so a sample
  keeps its side as the set grows.

Torch-free: numpy only.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

__all__ = ["BoxPx", "Sample", "split_samples"]

BoxPx = tuple[float, float, float, float]


@dataclass
class Sample:
    """One training example: a photo (array or loader), its tags, masks and boxes per label.

    ``key`` identifies the example (e.g. the annotation id) and decides its train/validation side;
    ``photo_key`` identifies the photo for the feature cache (default: ``key``). Masks are bool
    (H, W) at the photo's size; boxes are (x0, y0, x1, y1) pixels, x1/y1 exclusive.
    """

    key: str
    tags: list[str] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: dict[str, list[BoxPx]] = field(default_factory=dict)
    image: np.ndarray | None = None
    load: Callable[[], np.ndarray] | None = None
    photo_key: str | None = None
    shape: tuple[int, int] | None = None     # (height, width) of the photo when known without loading it

    def photo(self) -> np.ndarray:
        if self.image is not None:
            return self.image
        if self.load is None:
            raise ValueError(f"sample {self.key!r} has neither an image nor a loader")
        return self.load()

    @property
    def cache_key(self) -> str:
        return str(self.photo_key if self.photo_key is not None else self.key)

    def all_tags(self) -> list[str]:
        """Tags plus the labels that have a mask or a box (a region implies its tag)."""
        return list(dict.fromkeys([*self.tags, *self.masks, *self.boxes]))

    @property
    def has_regions(self) -> bool:
        return any(np.asarray(m).any() for m in self.masks.values()) or any(self.boxes.values())


def _hash01(seed: int, key: str) -> float:
    digest = hashlib.sha1(f"{seed}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_samples(samples: Sequence[Sample], val_fraction: float = 0.2, seed: int = 0,
                  min_val: int = 1) -> tuple[list[Sample], list[Sample]]:
    """(train, validation) by a seeded hash of each key: stable as samples are added or removed."""
    ranked = sorted(samples, key=lambda s: (_hash01(seed, str(s.key)), str(s.key)))
    n_val = sum(1 for s in ranked if _hash01(seed, str(s.key)) < val_fraction)
    if len(ranked) >= 2 * min_val:
        n_val = max(n_val, min_val)
    n_val = min(n_val, max(0, len(ranked) - 1))
    val = ranked[:n_val]
    val_keys = {id(s) for s in val}
    return [s for s in samples if id(s) not in val_keys], [s for s in samples if id(s) in val_keys]
