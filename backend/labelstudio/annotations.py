"""Label Studio annotations -> training examples (:class:`Example`; the store that keeps them is
backend.storage.examples).

Public API::

    ex = example_from_annotation(annotation, task, config=None, project=None)   # -> Example | None
    annotation_regions(result, config=None, ...)   # the per-label masks and boxes of a result list
    ex.to_sample(load=None) -> explainers.training.Sample

What an annotation gives (only result items on the Image named by ``config.image_name`` when a
config is given; labels are matched to the control's label values, case-insensitively):

- tags: the ``choices`` values, plus every label that has a region (brush, polygon, rectangle);
- masks: per label, the union of its brush regions (RLE decoded with
  :func:`backend.labelstudio.results.decode_rle`) and polygons (percent points rasterised with OpenCV at
  ``original_width`` x ``original_height``), bool (H, W);
- boxes: per label, rectangles as (x0, y0, x1, y1) pixels (a rotated rectangle gives the box around
  its rotated corners), kept as box supervision, not painted into the mask.

Untrusted input: every malformed annotation raises ValueError with a sentence naming the item (the
webhook answers 400): values of the wrong JSON type, ids that are not integers or short strings,
project ids unsafe in paths/keys (:func:`backend.untrusted.project_id`), a photo size over the pixel
cap (``TAG2MASK_MAX_PIXELS``, also for brush/polygon canvases), an RLE whose header does not encode
the photo size, more than MAX_RLE_VALUES RLE values, MAX_POLYGON_POINTS points in a polygon,
coordinates beyond ±MAX_PERCENT percent, or regions covering more than MAX_REGION_PIXELS pixels.
A cancelled (skipped) annotation is no example.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import cv2
import numpy as np

from backend.labelstudio.config import LabelConfig
from backend.labelstudio.results import decode_rle
from backend.untrusted import MAX_ID_CHARS, clip, json_type, project_id

__all__ = ["Example", "example_from_annotation", "annotation_regions", "CREATED", "UPDATED", "DELETED",
           "EXAMPLE_EVENTS"]

CREATED, UPDATED, DELETED = "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED"
EXAMPLE_EVENTS = frozenset({CREATED, UPDATED, DELETED, "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"})
# the webhook actions that feed training (the example events, and Start training). Label Studio sends
# ANNOTATIONS_DELETED ({"annotations": [{"id"}]}) and, on import, ANNOTATIONS_CREATED ({"annotation":
# [...], "task": [...]}); ANNOTATION_DELETED is kept for older senders
TRAINING_EVENTS = EXAMPLE_EVENTS | frozenset({"START_TRAINING"})

REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels")

# limits on one annotation (webhook payloads are untrusted; see the module docstring)
MAX_RLE_VALUES = 1_000_000         # brush RLE values in all; a real 4000x3000 mask is ~30 000, decoding
                                   # 1 M takes ~3 s (label_studio_sdk decodes bit by bit in Python)
MAX_POLYGON_POINTS = 50_000        # per polygon; hand-drawn and predicted ones have tens to hundreds
MAX_REGION_PIXELS = 400_000_000    # brush + polygon regions x photo pixels: 10 regions on a 40 Mpx
                                   # photo, ~850 on an 800x590 one; bounds memory and time
MAX_PERCENT = 10_000.0             # coordinates are percent of the photo; beyond this they are junk


@dataclass
class Example:
    """One annotation as a training example (masks bool (H, W); boxes (x0, y0, x1, y1) pixels)."""

    annotation_id: str
    project: str
    task_id: str | None
    image: str | None                 # the task's photo reference (URL or path), as in task["data"]
    width: int | None = None
    height: int | None = None
    tags: list[str] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    updated_at: str = ""

    def digest(self) -> str:
        """A hash of the content that training uses (tags, masks, boxes, photo)."""
        h = hashlib.sha1()
        h.update(json.dumps([self.project, self.task_id, self.image, self.width, self.height, sorted(self.tags),
                             {k: [list(b) for b in v] for k, v in sorted(self.boxes.items())}],
                            sort_keys=True, default=str).encode())
        for label in sorted(self.masks):
            m = np.ascontiguousarray(self.masks[label], dtype=bool)
            h.update(label.encode())
            h.update(str(m.shape).encode())
            h.update(np.packbits(m).tobytes())
        return h.hexdigest()

    def to_sample(self, load: Callable[[], np.ndarray] | None = None, image: np.ndarray | None = None):
        """The :class:`explainers.training.Sample` of this example (photo keyed by its reference)."""
        from explainers.training import Sample

        return Sample(key=self.annotation_id, tags=list(self.tags), masks=dict(self.masks),
                      boxes={k: [tuple(b) for b in v] for k, v in self.boxes.items()}, image=image, load=load,
                      photo_key=self.image or f"task:{self.task_id}",
                      shape=(self.height, self.width) if self.height and self.width else None)


def example_id(value) -> str | None:
    """An annotation / task / project reference (an id, or an object with an "id") -> its id string, or
    None. Raises ValueError for an id that is not an integer or a short printable string."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("id")
        if value is None:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS and value.isprintable():
        return value
    shown = repr(clip(value)) if isinstance(value, str) else json_type(value)
    raise ValueError(f"an id must be an integer or a short printable string, not {shown}")


def _project(value) -> str | None:
    """A project reference -> its id, safe in file names and Redis keys (ValueError otherwise)."""
    return project_id(value, "the annotation's project")


def _label_matcher(config: LabelConfig | None, from_name: str | None) -> Callable[[str], str | None]:
    if config is None:
        return lambda v: str(v)
    try:
        control = config.control(from_name) if isinstance(from_name, str) and from_name else None
    except KeyError:
        control = None
    if control is None:
        return lambda v: None
    return control.match


# -- checking result items (every malformed value is a ValueError with a sentence) -------------------
def _object(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a JSON object, not {json_type(value)}")
    return value


def _items(value, what: str) -> list:
    """A list value (None: empty)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"{what} must be a list, not {json_type(value)}")
    return value


def _strings(value, what: str) -> list[str]:
    items = _items(value, what)
    for v in items:
        if not isinstance(v, str):
            raise ValueError(f"the values of {what} must be strings, not {json_type(v)}")
    return items


def _percent(value, what: str, default: float = 0.0) -> float:
    """A coordinate in percent of the photo (Label Studio's unit): a finite number within ±MAX_PERCENT."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number (percent of the photo), not {json_type(value)}")
    if not -MAX_PERCENT <= value <= MAX_PERCENT:
        raise ValueError(f"{what} is {clip(value)}; a position in percent of the photo lies within "
                         f"±{MAX_PERCENT:g}")
    return float(value)


def _photo_size(item: dict, where: str) -> tuple[int, int] | None:
    """(width, height) from a region's original_width/original_height (None when absent); refused
    when not positive integers or larger than the photo pixel cap (TAG2MASK_MAX_PIXELS)."""
    w, h = item.get("original_width"), item.get("original_height")
    if w is None and h is None:
        return None
    sizes = []
    for name, v in (("original_width", w), ("original_height", h)):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            shown = clip(v) if isinstance(v, (int, float)) else json_type(v)
            raise ValueError(f"{where}'s {name} must be a positive integer (pixels), not {shown}")
        sizes.append(v)
    width, height = sizes
    cap = _max_pixels()
    if width * height > cap:
        raise ValueError(f"{where} is on a {width}x{height} photo ({width * height} pixels); at most {cap} pixels "
                         "are accepted (TAG2MASK_MAX_PIXELS)")
    return width, height


def _max_pixels() -> int:
    from explainers.imageio import DEFAULT_MAX_PIXELS

    return DEFAULT_MAX_PIXELS


def _brush_mask(value: dict, width: int, height: int, where: str, budget: list[int]) -> np.ndarray:
    """A brush region's RLE -> bool (height, width), after checking it: byte values, at most
    MAX_RLE_VALUES in the annotation (`budget` holds what is left), a header that encodes this size."""
    rle = value.get("rle")
    if not isinstance(rle, list):
        raise ValueError(f"{where}'s rle must be a list of byte values, not {json_type(rle)}")
    budget[0] -= len(rle)
    if budget[0] < 0:
        raise ValueError(f"the annotation's brush RLEs hold more than {MAX_RLE_VALUES} values in all; "
                         f"{where}'s alone holds {len(rle)}")
    if not all(type(v) is int and 0 <= v <= 255 for v in rle):
        raise ValueError(f"{where}'s rle must hold integers from 0 to 255")
    need = width * height * 4
    encoded = int.from_bytes(bytes(rle[:4]), "big") if len(rle) >= 4 else -1
    if encoded != need:
        raise ValueError(f"{where}'s rle encodes {max(encoded, 0)} values; its {width}x{height} photo needs {need}")
    try:
        return decode_rle(rle, height, width)
    except (ValueError, IndexError):
        raise ValueError(f"{where}'s rle is not a valid Label Studio brush RLE") from None


def _polygon_mask(points: list, width: int, height: int, where: str = "a polygon") -> np.ndarray:
    # a point at x% lies on pixel column x / 100 * width (the convention of backend.labelstudio.results)
    points = _items(points, f"{where}'s points")
    if len(points) > MAX_POLYGON_POINTS:
        raise ValueError(f"{where} has {len(points)} points; at most {MAX_POLYGON_POINTS} are accepted")
    xy = []
    for j, p in enumerate(points):
        if not isinstance(p, list) or len(p) < 2:
            raise ValueError(f"point {j} of {where} must be a list [x, y], not {json_type(p)}")
        xy.append((_percent(p[0], f"point {j} of {where}"), _percent(p[1], f"point {j} of {where}")))
    pts = np.array([[x / 100.0 * width, y / 100.0 * height] for x, y in xy], np.float64).reshape(-1, 2)
    mask = np.zeros((height, width), np.uint8)
    if len(pts) >= 3:
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def _rect_box(value: dict, width: int, height: int,
              where: str = "a rectangle") -> tuple[float, float, float, float] | None:
    x = _percent(value.get("x"), f"{where}'s x") / 100 * width
    y = _percent(value.get("y"), f"{where}'s y") / 100 * height
    w = _percent(value.get("width"), f"{where}'s width") / 100 * width
    h = _percent(value.get("height"), f"{where}'s height") / 100 * height
    if w <= 0 or h <= 0:
        return None
    rotation = value.get("rotation") or 0.0
    if isinstance(rotation, bool) or not isinstance(rotation, (int, float)):
        raise ValueError(f"{where}'s rotation must be a number (degrees), not {json_type(rotation)}")
    rot = math.radians(float(rotation) % 360.0)
    if rot:   # Label Studio rotates the rectangle about its top-left corner
        c, s = math.cos(rot), math.sin(rot)
        corners = [(x + dx * c - dy * s, y + dx * s + dy * c) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    else:
        x0, y0, x1, y1 = x, y, x + w, y + h
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    if x1 <= x0 or y1 <= y0:
        return None
    return (round(x0, 3), round(y0, 3), round(x1, 3), round(y1, 3))


def annotation_regions(result: Iterable[dict], config: LabelConfig | None = None,
                       size: tuple[int, int] | None = None) -> tuple[list[str], dict, dict, tuple[int, int] | None]:
    """Result items -> (tags, masks {label: bool (H, W)}, boxes {label: [box px]}, (width, height)).

    `size` = (width, height) when the items lack ``original_width``/``original_height``. A malformed
    item (not an object, a value that is not an object, labels that are not strings, a photo size
    over the pixel cap, a bad RLE or polygon, regions over the limits of the module docstring)
    raises ValueError with a sentence naming it.
    """
    tags: list[str] = []
    masks: dict[str, np.ndarray] = {}
    boxes: dict[str, list] = {}
    wh = size
    rle_budget = [MAX_RLE_VALUES]
    painted = 0                      # region pixels so far (brush and polygon regions x their photo size)
    for i, item in enumerate(_items(result, "the annotation's result")):
        where = f"result item {i}"
        item = _object(item, where)
        kind = str(item.get("type") or "").lower()
        if config is not None and item.get("to_name") != config.image_name:
            continue
        match = _label_matcher(config, item.get("from_name"))
        value = _object(item.get("value") if item.get("value") is not None else {}, f"{where}'s value")
        if kind == "choices":
            for v in _strings(value.get("choices"), f"{where}'s choices"):
                label = match(v)
                if label and label not in tags:
                    tags.append(label)
            continue
        if kind not in REGION_TYPES:
            continue
        labels = [match(v) for v in _strings(value.get(kind), f"{where}'s {kind}")]
        labels = [label for label in labels if label]
        if not labels:
            continue
        wh = _photo_size(item, where) or wh
        if wh is None:
            raise ValueError(f"a {kind} region has no original_width/original_height and no photo size was given")
        width, height = wh
        for label in labels:
            if label not in tags:
                tags.append(label)
        if kind == "rectanglelabels":
            box = _rect_box(value, width, height, where)
            if box is not None:
                for label in labels:
                    boxes.setdefault(label, []).append(box)
            continue
        if kind == "brushlabels" and (value.get("format", "rle") != "rle" or value.get("rle") is None):
            continue
        painted += width * height
        if painted > MAX_REGION_PIXELS:
            raise ValueError(f"the annotation's brush and polygon regions cover more than {MAX_REGION_PIXELS} "
                             f"pixels in all (regions x photo size; {where} is on a {width}x{height} photo)")
        if kind == "brushlabels":
            region = _brush_mask(value, width, height, where, rle_budget)
        else:
            region = _polygon_mask(value.get("points"), width, height, where)
        for label in labels:
            prev = masks.get(label)
            if prev is not None and prev.shape != region.shape:
                raise ValueError(f"regions of {label!r} disagree on the photo size: {prev.shape} vs {region.shape}")
            masks[label] = region if prev is None else (prev | region)
    return tags, masks, boxes, wh


def example_from_annotation(annotation: dict, task: dict | None = None, config: LabelConfig | None = None,
                            project=None) -> Example | None:
    """One Label Studio annotation (+ its task) -> an Example; None for a cancelled (skipped) one.
    A malformed annotation raises ValueError with a sentence (see :func:`annotation_regions`)."""
    if not isinstance(annotation, dict):
        raise ValueError(f"an annotation must be a JSON object, not {json_type(annotation)}")
    ann_id = example_id(annotation.get("id"))
    if ann_id is None:
        raise ValueError("the annotation has no id")
    if annotation.get("was_cancelled"):
        return None
    task = task if isinstance(task, dict) else {}
    data = task.get("data")
    data = _object(data, "the task's data") if data is not None else {}
    image = None
    if config is not None:
        image = data.get(config.image_key)
    elif data:
        image = data.get("image") or next((v for v in data.values() if isinstance(v, str)), None)
    if image is not None and not isinstance(image, str):
        raise ValueError(f"the task's photo (data[{clip(config.image_key if config else 'image')!r}]) must be a "
                         f"string, not {json_type(image)}")
    tags, masks, boxes, wh = annotation_regions(annotation.get("result"), config)
    project_id_ = _project(project) or _project(annotation.get("project")) or _project(task.get("project")) or ""
    when = annotation.get("updated_at") or annotation.get("created_at") or ""
    if not isinstance(when, str) or len(when) > 64:
        shown = repr(clip(when)) if isinstance(when, str) else json_type(when)
        raise ValueError(f"the annotation's updated_at/created_at must be an ISO-8601 time string, not {shown}")
    return Example(annotation_id=ann_id, project=project_id_, task_id=example_id(task) or example_id(annotation.get("task")),
                   image=image, width=wh[0] if wh else None,
                   height=wh[1] if wh else None, tags=tags, masks=masks, boxes=boxes, updated_at=when)


