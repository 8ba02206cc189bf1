"""The dataset formats by name, and one object that feeds a photo to every chosen format.

Formats (each in its own folder under the output folder; see its module for the layout):

    coco       DIR/coco/annotations.json                      backend.datasets.coco
    yolo-seg   DIR/yolo/{images,labels}/, DIR/yolo/data.yaml   backend.datasets.yolo_seg
    png        DIR/png/<name>.png, DIR/png/classes.txt         backend.datasets.class_png

Public API::

    formats = parse_formats(["coco,png", "yolo-seg"], extra=("ls",))   # -> ["coco", "png", "yolo-seg"]
    export = DatasetExport(out_dir, ["coco", "png"], categories=["horse", "dog"], image_root=None,
                           image_mode="link", min_pixels=MIN_INSTANCE_PIXELS)
    export.add(image_path, name, width, height, [Segment(tag, mask, score), ...])   # -> PhotoInstances
    export.add_photo(image_path, name, result)     # an explainers.segment PhotoResult (``tag2mask label``)
    lines = export.close()                         # one line per format: what was written where (.lines)
    export.dropped_pixels                          # speck pixels left out, all photos

The photo's instances are computed once (backend.datasets.instances) and given to every format.
A ValueError from ``parse_formats`` or the constructor is a sentence for the user.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from backend.datasets.instances import MIN_INSTANCE_PIXELS, Categories, PhotoInstances, Segment, photo_instances

__all__ = ["DATASET_FORMATS", "DatasetExport", "parse_formats"]

DATASET_FORMATS = ("coco", "yolo-seg", "png")
_ALIASES = {"yolo": "yolo-seg", "yoloseg": "yolo-seg", "yolo_seg": "yolo-seg"}


def parse_formats(values: Iterable[str] | None, extra: Sequence[str] = ()) -> list[str]:
    """Repeated and/or comma-separated format names -> the distinct names, in order. `extra`: names
    also accepted (``ls`` for ``tag2mask label``). Raises ValueError for an unknown name."""
    known = (*extra, *DATASET_FORMATS)
    out: list[str] = []
    for value in values or ():
        for raw in str(value).split(","):
            name = raw.strip().lower()
            if not name:
                continue
            name = _ALIASES.get(name, name)
            if name not in known:
                raise ValueError(f"unknown format {raw.strip()!r}: choose from {', '.join(known)}")
            if name not in out:
                out.append(name)
    return out


class DatasetExport:
    """Writers of the chosen dataset formats under one output folder."""

    def __init__(self, out_dir: str | Path, formats: Sequence[str], categories: Iterable[str] = (),
                 image_root: str | Path | None = None, image_mode: str = "link",
                 min_pixels: int = MIN_INSTANCE_PIXELS):
        from backend.datasets.class_png import ClassPngWriter
        from backend.datasets.coco import CocoWriter
        from backend.datasets.files import IMAGE_MODES
        from backend.datasets.yolo_seg import YoloSegWriter

        if image_mode not in IMAGE_MODES:
            raise ValueError(f"unknown image mode {image_mode!r}: choose from {', '.join(IMAGE_MODES)}")
        if "coco" in formats:
            try:
                import pycocotools.mask  # noqa: F401 - the RLE encoder the coco format needs
            except ImportError:
                raise ValueError("the coco format needs pycocotools: pip install pycocotools") from None
        out = Path(out_dir)
        self.categories = Categories(categories)
        self.min_pixels = max(0, int(min_pixels))
        self.dropped_pixels = 0
        self.photos = 0
        self.lines: list[str] = []
        self.writers = []
        for fmt in formats:
            if fmt == "coco":
                self.writers.append(CocoWriter(out / "coco", self.categories, image_root=image_root))
            elif fmt == "yolo-seg":
                self.writers.append(YoloSegWriter(out / "yolo", self.categories, image_mode=image_mode))
            elif fmt == "png":
                self.writers.append(ClassPngWriter(out / "png", self.categories))
            else:
                raise ValueError(f"unknown dataset format {fmt!r}: choose from {', '.join(DATASET_FORMATS)}")

    def add(self, image: str | Path, name: str, width: int, height: int,
            segments: Sequence[Segment]) -> PhotoInstances:
        """One photo into every format (ValueError: a mask of another size than the photo)."""
        photo = photo_instances(image, name, width, height, list(segments), self.categories, self.min_pixels)
        for w in self.writers:
            w.add(photo)
        self.photos += 1
        self.dropped_pixels += photo.dropped_pixels
        return photo

    def add_photo(self, image: str | Path, name: str, result) -> PhotoInstances:
        """One engine result (PhotoResult: width, height, tags of TagMask) into every format."""
        segments = [Segment(tm.tag, tm.mask, tm.score) for tm in result.tags]
        return self.add(image, name, result.width, result.height, segments)

    def close(self) -> list[str]:
        """Write each format's index files; one line per format (also kept as ``lines``)."""
        self.lines = [w.close() for w in self.writers]
        if self.dropped_pixels:
            self.lines.append(f"{self.dropped_pixels} pixels of specks (components under {self.min_pixels} "
                              "pixels) left out of the datasets")
        return self.lines
