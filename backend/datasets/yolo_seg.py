"""YOLO segmentation (Ultralytics' layout): ``DIR/yolo/``.

- ``images/<name><ext>``: the photos, placed by :func:`backend.datasets.files.place_image` (``link``,
  the default: a hard link, or a copy when the photo is on another file system; ``copy``; ``symlink``);
  a photo whose EXIF orientation turns it is written upright instead (re-encoded), since the polygons
  are of the upright photo and not every reader applies EXIF orientation.
- ``labels/<name>.txt``: one line per instance, ``class x1 y1 x2 y2 ...``: the 0-based class (the
  category id - 1) and the outer contour of the instance (backend.datasets.instances) with x / width
  and y / height in 0..1, 6 decimals. A photo without instances gets an empty file (a background
  photo). An instance whose outline has under 3 points (a one-pixel-wide line) is left out, and a
  hole inside an instance is filled: YOLO polygons have no holes.
- ``data.yaml``: ``path`` (this folder, absolute: edit it after moving the folder), ``train`` and
  ``val`` (both ``images``: split them yourself), ``nc`` and ``names`` (the categories in order).

Public API::

    w = YoloSegWriter(out_dir / "yolo", categories, image_mode="link")
    w.add(photo)                 # a backend.datasets.instances.PhotoInstances
    w.close() -> str             # writes data.yaml; returns a line saying what was written
"""
from __future__ import annotations

import json
from pathlib import Path

from backend.datasets.files import place_image, write_text
from backend.datasets.instances import Categories, PhotoInstances

__all__ = ["YoloSegWriter", "yolo_lines"]


def yolo_lines(photo: PhotoInstances) -> list[str]:
    """The label file's lines of one photo."""
    lines = []
    for inst in photo.instances:
        outline = inst.outline()
        if outline is None:
            continue
        coords = " ".join(f"{x / photo.width:.6f} {y / photo.height:.6f}" for x, y in outline)
        lines.append(f"{inst.category - 1} {coords}")
    return lines


class YoloSegWriter:
    """Writes each photo's label file and places its image at once; ``data.yaml`` on :meth:`close`."""

    def __init__(self, out_dir: str | Path, categories: Categories, image_mode: str = "link"):
        self.out = Path(out_dir)
        self.categories = categories
        self.image_mode = image_mode
        self.photos = 0
        self.lines = 0
        self.names: set[str] = set()

    def add(self, photo: PhotoInstances) -> None:
        lines = yolo_lines(photo)
        place_image(photo.image, self.out / "images" / f"{photo.name}{photo.image.suffix.lower()}", self.image_mode)
        write_text(self.out / "labels" / f"{photo.name}.txt", "".join(line + "\n" for line in lines))
        self.photos += 1
        self.lines += len(lines)
        self.names.add(photo.name)

    def close(self) -> str:
        (self.out / "images").mkdir(parents=True, exist_ok=True)
        (self.out / "labels").mkdir(parents=True, exist_ok=True)
        names = ", ".join(json.dumps(n, ensure_ascii=False) for n in self.categories.names)
        text = ("# YOLO segmentation dataset written by tag2mask; labels/<name>.txt belongs to images/<name>.*\n"
                f"path: {json.dumps(self.out.resolve().as_posix(), ensure_ascii=False)}\n"
                "train: images\nval: images\n"
                f"nc: {len(self.categories)}\nnames: [{names}]\n")
        write_text(self.out / "data.yaml", text)
        line = f"yolo-seg: {self.photos} images, {self.lines} instances -> {self.out / 'data.yaml'}"
        stale = sum(p.stem not in self.names for p in (self.out / "labels").glob("*.txt"))
        if stale:
            line += (f"; note: labels/ still holds {stale} photo(s) of an earlier run, which training would use: "
                     "remove them or write to a new folder")
        return line
