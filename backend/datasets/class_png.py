"""Class-id masks (semantic segmentation): ``DIR/png/``.

- ``<name>.png``: uint8 grey PNG at the photo's (EXIF-upright) size: 0 background, ``i`` where the
  ``i``-th category's instances lie (ids as in COCO's categories), 255 where instances of two or
  more categories overlap (ambiguous: give it to the loss as the ignore index, e.g. PyTorch's
  ``ignore_index=255``). Specks left out of the instances are background here too.
- ``classes.txt``: ``id name`` per line, ``0 background`` first (``tag2mask eval --classes`` reads it);
  a ``#`` comment says what 255 is.

At most 254 categories fit (ids 1..254); :class:`ClassPngWriter` refuses more.

Public API::

    w = ClassPngWriter(out_dir / "png", categories)
    w.add(photo)                 # a backend.datasets.instances.PhotoInstances
    w.close() -> str             # writes classes.txt; returns a line saying what was written
    class_id_mask(photo) -> uint8 (H, W)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from backend.datasets.files import write_text
from backend.datasets.instances import Categories, PhotoInstances

__all__ = ["MAX_CLASSES", "OVERLAP", "ClassPngWriter", "class_id_mask"]

OVERLAP = 255
MAX_CLASSES = 254


def class_id_mask(photo: PhotoInstances) -> np.ndarray:
    """The photo's class-id mask: 0 background, category id, OVERLAP where categories overlap."""
    out = np.zeros((photo.height, photo.width), np.uint8)
    for inst in photo.instances:
        h, w = inst.mask.shape
        view = out[inst.y:inst.y + h, inst.x:inst.x + w]
        clash = inst.mask & (view != 0) & (view != inst.category)
        view[inst.mask] = inst.category
        view[clash] = OVERLAP
    return out


def _check(categories: Categories) -> None:
    if len(categories) > MAX_CLASSES:
        raise ValueError(f"class-id PNGs hold at most {MAX_CLASSES} categories (ids 1..{MAX_CLASSES}; 255 marks "
                         f"overlaps), not {len(categories)}")


class ClassPngWriter:
    """Writes each photo's class-id PNG at once; ``classes.txt`` on :meth:`close`."""

    def __init__(self, out_dir: str | Path, categories: Categories):
        _check(categories)
        self.out = Path(out_dir)
        self.categories = categories
        self.photos = 0
        self.names: set[str] = set()

    def add(self, photo: PhotoInstances) -> None:
        from PIL import Image

        _check(self.categories)
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"{photo.name}.png"
        tmp = path.with_name(path.name + ".partial")
        Image.fromarray(class_id_mask(photo)).save(tmp, format="PNG")
        tmp.replace(path)
        self.photos += 1
        self.names.add(photo.name)

    def close(self) -> str:
        lines = ["# id name; 255 = pixels of more than one class (ignore them in training)", "0 background"]
        lines += [f"{i} {' '.join(name.split()) or '?'}" for i, name in enumerate(self.categories.names, 1)]
        write_text(self.out / "classes.txt", "\n".join(lines) + "\n")
        line = f"png: {self.photos} class-id masks, {len(self.categories)} classes -> {self.out}/"
        stale = sum(p.stem not in self.names for p in self.out.glob("*.png"))
        if stale:
            line += f"; note: it still holds {stale} mask(s) of an earlier run: remove them or write to a new folder"
        return line
