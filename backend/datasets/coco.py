"""COCO instance segmentation: ``DIR/coco/annotations.json``.

- ``images``: ``{"id", "file_name", "width", "height"}``, ids 1, 2, ... in the order the photos came.
  ``file_name`` is the photo's path relative to the image root when one is given and the photo lies
  under it (``tag2mask export --images ROOT``; the root is also written as ``info["image_root"]``),
  else its absolute path (``tag2mask label``: the photos stay where they are). Trainers that join an
  image root with ``file_name`` (detectron2, mmdetection) keep an absolute ``file_name`` as it is.
  ``width`` / ``height`` are the EXIF-upright size, that of the masks.
- ``categories``: ``{"id", "name", "supercategory": ""}``, one per tag, ids 1, 2, ... in tag order.
- ``annotations``: one per instance (a connected component of a tag's mask, specks left out; see
  backend.datasets.instances): ``segmentation`` as compressed RLE (``{"size": [h, w], "counts": str}``,
  as ``pycocotools.mask.encode`` gives), ``area`` (pixels), ``bbox`` ``[x, y, w, h]``, ``iscrowd`` 0,
  and ``score`` when the engine gave one (pre-labels; absent for Label Studio annotations).

Public API::

    w = CocoWriter(out_dir / "coco", categories, image_root=None)
    w.add(photo)                 # a backend.datasets.instances.PhotoInstances
    w.close() -> str             # writes annotations.json; returns a line saying what was written

Needs pycocotools (for the RLE encoding).
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np

from backend.datasets.files import write_json
from backend.datasets.instances import Categories, PhotoInstances

__all__ = ["CocoWriter", "coco_rle"]


def coco_rle(mask: np.ndarray) -> dict:
    """bool (H, W) -> COCO compressed RLE ``{"size": [H, W], "counts": str}``."""
    from pycocotools import mask as mask_util

    rle = mask_util.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def _file_name(image: Path, root: Path | None) -> str:
    path = Path(image).resolve()
    if root is not None and path.is_relative_to(root):
        return path.relative_to(root).as_posix()
    return path.as_posix()


class CocoWriter:
    """Collects images and instances; writes ``annotations.json`` on :meth:`close`."""

    def __init__(self, out_dir: str | Path, categories: Categories, image_root: str | Path | None = None):
        self.out = Path(out_dir)
        self.categories = categories
        self.root = Path(image_root).resolve() if image_root is not None else None
        self.images: list[dict] = []
        self.annotations: list[dict] = []

    def add(self, photo: PhotoInstances) -> None:
        image_id = len(self.images) + 1
        anns = []
        for inst in photo.instances:
            x, y, w, h = inst.bbox
            ann = {"id": len(self.annotations) + len(anns) + 1, "image_id": image_id, "category_id": inst.category,
                   "segmentation": coco_rle(inst.full_mask(photo.height, photo.width)), "area": inst.area,
                   "bbox": [x, y, w, h], "iscrowd": 0}
            if inst.score is not None:
                ann["score"] = round(float(inst.score), 4)
            anns.append(ann)
        self.images.append({"id": image_id, "file_name": _file_name(photo.image, self.root),
                            "width": photo.width, "height": photo.height})
        self.annotations.extend(anns)

    def close(self) -> str:
        info = {"description": "tag2mask dataset", "version": "1.0",
                "date_created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}  # noqa: UP017 - 3.10
        if self.root is not None:
            info["image_root"] = self.root.as_posix()
        cats = [{"id": i, "name": name, "supercategory": ""} for i, name in enumerate(self.categories.names, 1)]
        path = self.out / "annotations.json"
        write_json(path, {"info": info, "licenses": [], "images": self.images, "annotations": self.annotations,
                          "categories": cats})
        return (f"coco: {len(self.images)} images, {len(self.annotations)} instances, {len(cats)} categories "
                f"-> {path}")
