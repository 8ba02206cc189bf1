"""A Label Studio JSON export's tasks -> photos with one mask per label (``tag2mask export``).

Which result of a task: ``source="any"`` (default) the task's latest annotation that was not
cancelled, else its latest prediction; ``"annotations"`` / ``"predictions"`` only those ("latest": by
``updated_at``/``created_at``, then id). An annotation with an empty result is a photo without
objects (a background photo), kept.

Which regions make a label's mask (result items on any image control; choices and rectangles are
not masks and are not used): ``regions="auto"`` (default) a label's brush regions when it has any in
that result, else its polygons. Label Studio copies a prediction's brush and polygon regions into
the annotation made from it, and an annotator corrects one of them, so the union would undo a
correction; ``"brush"`` / ``"polygon"``: only those. Brush RLE is decoded and polygons rasterised by
:func:`backend.labelstudio.annotations.annotation_regions`, with its checks and limits (the RLE must
encode the region's ``original_width`` x ``original_height``; points finite and within ±10 000 %;
points outside 0..100 % are clipped to the photo).

The photo: ``data["image"]`` (else the task's only string value), found under ``images_root`` as
``tag2mask train --images-root`` finds it (backend.labelstudio.export.resolve_export_image), or,
without a root, as a local path (absolute, relative to the working folder, or ``file://``). Its
EXIF-upright size must be the regions' size.

Every problem of a task is one ValueError sentence; the caller reports it and goes on.

Public API::

    labels = export_labels(tasks, source="any", regions="auto")   # label names, in order of appearance
    photo = read_task(task, index, images_root=None, source="any", regions="auto")
    photo.where, photo.image, photo.width, photo.height, photo.masks   # masks: {label: bool (H, W)}
    task_name(task, index) -> "task 12" (its id) or "item 3" (1-based position)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from backend.untrusted import MAX_ID_CHARS, clip, json_type

__all__ = ["REGIONS", "SOURCES", "ExportPhoto", "export_labels", "read_task", "task_name"]

SOURCES = ("any", "annotations", "predictions")
REGIONS = ("auto", "brush", "polygon")
_KINDS = {"brush": ("brushlabels",), "polygon": ("polygonlabels",), "auto": ("brushlabels", "polygonlabels")}


@dataclass
class ExportPhoto:
    where: str                  # "task 12": names the task in messages
    image: Path
    width: int
    height: int
    masks: dict[str, np.ndarray] = field(default_factory=dict)


def task_name(task, index: int) -> str:
    tid = task.get("id") if isinstance(task, dict) else None
    if isinstance(tid, int) and not isinstance(tid, bool):
        return f"task {tid}"
    if isinstance(tid, str) and 0 < len(tid) <= MAX_ID_CHARS and tid.isprintable():
        return f"task {tid!r}"
    return f"item {index + 1}"


def _latest(items, what: str) -> dict | None:
    if items is None:
        return None
    if not isinstance(items, list):
        raise ValueError(f"the task's {what} must be a list, not {json_type(items)}")  # noqa: TRY004 - a sentence
    usable = [a for a in items if isinstance(a, dict) and not a.get("was_cancelled")]
    if not usable:
        return None

    def key(a: dict):
        when = a.get("updated_at") or a.get("created_at") or ""
        aid = a.get("id")
        number = aid if isinstance(aid, int) and not isinstance(aid, bool) else -1
        return (when if isinstance(when, str) else "", number)

    return max(usable, key=key)


def _chosen(task: dict, source: str) -> tuple[str, dict]:
    """(what, annotation or prediction) whose result to export; ValueError when the task has none."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}: choose from {', '.join(SOURCES)}")
    if source in ("any", "annotations"):
        ann = _latest(task.get("annotations"), "annotations")
        if ann is not None:
            return "annotation", ann
    if source in ("any", "predictions"):
        pred = _latest(task.get("predictions"), "predictions")
        if pred is not None:
            return "prediction", pred
    wanted = {"any": "annotation or prediction", "annotations": "annotation", "predictions": "prediction"}[source]
    preds = task.get("predictions")
    if source != "annotations" and isinstance(preds, list) and preds and not any(isinstance(p, dict) for p in preds):
        raise ValueError(f"it has no {wanted} to export: its predictions are ids only, as Label Studio's plain JSON "
                         "export writes them (an export snapshot with predictions not as ids holds their results)")
    raise ValueError(f"it has no {wanted} to export (cancelled ones do not count)")


def export_labels(tasks: list, source: str = "any", regions: str = "auto") -> list[str]:
    """The labels of the regions that would be exported, in order of first appearance (malformed
    tasks and items are passed over here; :func:`read_task` reports them)."""
    labels: dict[str, None] = {}
    kinds = _KINDS.get(regions, ())
    for task in tasks if isinstance(tasks, list) else ():
        if not isinstance(task, dict):
            continue
        try:
            _, chosen = _chosen(task, source)
        except ValueError:
            continue
        result = chosen.get("result")
        for item in result if isinstance(result, list) else ():
            if not isinstance(item, dict) or str(item.get("type") or "").lower() not in kinds:
                continue
            value = item.get("value")
            names = value.get(str(item.get("type")).lower()) if isinstance(value, dict) else None
            for name in names if isinstance(names, list) else ():
                if isinstance(name, str) and name:
                    labels.setdefault(name, None)
    return list(labels)


def _image_ref(task: dict):
    data = task.get("data")
    if not isinstance(data, dict):
        raise ValueError(f"the task's data must be a JSON object, not {json_type(data)}")  # noqa: TRY004
    ref = data.get("image")
    if ref is None:
        strings = [v for v in data.values() if isinstance(v, str)]
        ref = strings[0] if len(strings) == 1 else None
    if not isinstance(ref, str) or not ref.strip():
        raise ValueError('the task names no photo (data["image"] must be a path or URL)')
    return ref.strip()


def _local_file(ref: str) -> Path | None:
    path = unquote(urlparse(ref).path) if ref.startswith("file://") else ref
    try:
        found = Path(path)
        return found if found.is_file() else None
    except (OSError, ValueError):       # a name the file system refuses (NUL, too long)
        return None


def _find_photo(ref: str, root: Path | None) -> Path:
    if root is not None:
        from backend.labelstudio.export import resolve_export_image

        found = resolve_export_image(ref, root)     # also a local path inside the root (tag2mask label's)
        if found is None:
            raise ValueError(f"its photo {clip(ref)!r} is not under {root}")
        return found
    found = _local_file(ref)
    if found is None:
        raise ValueError(f"its photo {clip(ref)!r} is not a file here; give --images ROOT, the folder that holds "
                         "the photos")
    return found


def photo_size(path: Path) -> tuple[int, int]:
    """The photo's EXIF-upright (width, height), from its header; ValueError when it is no image or
    larger than the pixel cap."""
    from PIL import Image

    from explainers.imageio import DEFAULT_MAX_PIXELS

    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112)
    except Exception as exc:  # noqa: BLE001 - PIL raises many kinds (OSError, SyntaxError, DecompressionBomb...)
        raise ValueError(f"its photo {path} cannot be read as an image ({type(exc).__name__}: {clip(str(exc))})") \
            from None
    if orientation in (5, 6, 7, 8):     # rotated a quarter turn: the upright photo is the other way round
        width, height = height, width
    if width * height > DEFAULT_MAX_PIXELS:
        raise ValueError(f"its photo {path} has {width}x{height} pixels; at most {DEFAULT_MAX_PIXELS} are "
                         "accepted (TAG2MASK_MAX_PIXELS)")
    return width, height


def _only(result, kind: str):
    """`result` with the region items of other types blanked ({}), so that item numbers stay; items
    that are not objects stay, so that they are reported."""
    if not isinstance(result, list):
        return result
    return [it if not isinstance(it, dict) or str(it.get("type") or "").lower() == kind else {} for it in result]


def read_task(task, index: int, images_root: str | Path | None = None, source: str = "any",
              regions: str = "auto") -> ExportPhoto:
    """One exported task -> its photo and masks. Raises ValueError with a sentence naming the task."""
    from backend.labelstudio.annotations import annotation_regions

    where = task_name(task, index)
    try:
        if not isinstance(task, dict):
            raise ValueError(f"it must be a JSON object (a Label Studio task), not {json_type(task)}")  # noqa: TRY004
        if regions not in REGIONS:
            raise ValueError(f"unknown regions {regions!r}: choose from {', '.join(REGIONS)}")
        what, chosen = _chosen(task, source)
        root = Path(images_root).resolve() if images_root is not None else None
        image = _find_photo(_image_ref(task), root)
        width, height = photo_size(image)
        result = chosen.get("result")
        by_kind = {}
        for kind in _KINDS[regions]:
            try:
                _, masks, _, _ = annotation_regions(_only(result, kind), None, size=(width, height))
            except ValueError as exc:
                raise ValueError(f"the {what}: {exc}") from None
            by_kind[kind] = masks
        masks = {**by_kind.get("polygonlabels", {}), **by_kind.get("brushlabels", {})}   # brush wins
        for label, mask in masks.items():
            if mask.shape != (height, width):
                raise ValueError(f"the {what}'s {clip(label)!r} regions are on a {mask.shape[1]}x{mask.shape[0]} "
                                 f"photo, but {image} is {width}x{height}")
        return ExportPhoto(where=where, image=image, width=width, height=height, masks=masks)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
