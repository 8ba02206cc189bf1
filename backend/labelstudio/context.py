"""Label Studio's interactive context (smart tools) -> prompts: a box and/or clicks per label.

With "Interactive preannotations" on, Label Studio 1.23 asks the backend for the region an annotator
just drew with a smart tool: ``POST /api/ml/<id>/interactive-annotating {"task", "context"}`` makes it
call ``/predict`` with that one task and ``params.context = {"result": [...]}``, the serialized regions
of the group just drawn (docs/label-studio-smart-tools.md records the payloads seen)::

    {"id", "from_name", "to_name", "type": "keypointlabels", "origin": "manual",
     "original_width", "original_height", "image_rotation",
     "value": {"x": 41.2, "y": 55.0, "width": 0.6, "keypointlabels": ["Horse"], "labels": ["Horse"]},
     "is_positive": true}                                   # false: a negative click (Alt + click)
    {"id", ..., "type": "rectanglelabels",
     "value": {"x", "y", "width", "height", "rotation", "rectanglelabels": ["Horse"]}}

Coordinates are percent of the photo. :func:`parse_context` turns them into :class:`SmartPrompt` s in
percent (the photo's size is known only once it is fetched; :meth:`SmartPrompt.in_pixels` converts):

- each rectangle is one prompt (its label's box); a rotated rectangle stands for its upright bounds;
- clicks go with the rectangle of their label that holds them, else together into one click prompt
  per label (it needs a positive click: negative clicks alone have nothing to take away from);
- the label is ``value[<type>]`` (else ``value["labels"]``); it must be a label of a BrushLabels or
  PolygonLabels control of the config, which receive the answer.

Untrusted: a context that is not ``{"result": [...]}``, more than MAX_CONTEXT_REGIONS regions, a region
that is not an object, a value that is not a finite number, an unknown type or label: ValueError with a
sentence (the task's entry carries it; nothing else is affected). Coordinates are clamped to the photo.

    prompts = parse_context(context, config)   # [] when the context holds no smart-tool region
    is_interactive(context)                    # a smart tool's request (then [] prompts: an empty answer)
    prompts[0].label, prompts[0].to_json()     # JSON for a queue job; SmartPrompt.from_json(d)
    box, positive, negative = prompts[0].in_pixels(width, height)
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backend.labelstudio.config import LabelConfig
from backend.untrusted import clip, json_type

__all__ = ["MAX_CONTEXT_REGIONS", "PROMPT_TYPES", "SmartPrompt", "is_interactive", "parse_context"]

MAX_CONTEXT_REGIONS = 64          # smart-tool regions in one request (Label Studio sends a handful)
PROMPT_TYPES = ("keypointlabels", "rectanglelabels")

Pct = tuple[float, float]


@dataclass
class SmartPrompt:
    """One label's box (x, y, width, height in percent) and/or clicks ((x, y) in percent)."""

    label: str
    box: tuple[float, float, float, float] | None = None
    positive: list[Pct] = field(default_factory=list)
    negative: list[Pct] = field(default_factory=list)

    def in_pixels(self, width: int, height: int):
        """(box (x0, y0, x1, y1) or None, positive [(x, y)], negative [(x, y)]) in the photo's pixels."""
        sx, sy = width / 100.0, height / 100.0
        box = None
        if self.box is not None:
            x, y, w, h = self.box
            box = (x * sx, y * sy, (x + w) * sx, (y + h) * sy)
        return box, [(x * sx, y * sy) for x, y in self.positive], [(x * sx, y * sy) for x, y in self.negative]

    def to_json(self) -> dict:
        return {"label": self.label, "box": list(self.box) if self.box else None,
                "positive": [list(p) for p in self.positive], "negative": [list(p) for p in self.negative]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> SmartPrompt:
        """From :meth:`to_json` (a queue job's task); ValueError when it is malformed."""
        if not isinstance(data, Mapping) or not isinstance(data.get("label"), str):
            raise ValueError("a prompt must be an object with a label")
        box = data.get("box")
        return cls(label=data["label"],
                   box=tuple(_numbers(box, 4, "the prompt's box")) if box is not None else None,
                   positive=[tuple(_numbers(p, 2, "a click")) for p in _list(data.get("positive"), "clicks")],
                   negative=[tuple(_numbers(p, 2, "a click")) for p in _list(data.get("negative"), "clicks")])


def _list(value, what: str) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"the {what} must be a list, not {json_type(value)}")
    return value


def _numbers(values, n: int, what: str) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f"{what} must be {n} numbers")
    return [_finite(v, what) for v in values]


def _finite(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{what} must be a finite number, not {json_type(value)}")
    return float(value)


def _pct(value: float) -> float:
    return min(100.0, max(0.0, value))


def is_interactive(context: Any) -> bool:
    """Whether a request's ``params.context`` comes from a smart tool (``{"result": [...]}``, also when the
    list is empty: the annotator removed the regions, and the answer is then empty too). Label Studio
    sends ``null`` for plain predictions."""
    return isinstance(context, Mapping) and "result" in context


def _label_of(item: Mapping[str, Any], kind: str, config: LabelConfig, index: int) -> str:
    value = item["value"]
    names = value.get(kind) if isinstance(value.get(kind), list) else value.get("labels")
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise ValueError(f"smart-tool region {index} names no label (value.{kind} must be a list of label names)")
    name = names[0]
    targets = config.mask_controls
    for control in targets:
        label = control.match(name)
        if label is not None:
            return label
    if not targets:
        raise ValueError("the labeling config has no BrushLabels or PolygonLabels to put the smart tool's mask in")
    raise ValueError(f"label {clip(name, 80)!r} of smart-tool region {index} is not a label of the config's "
                     "BrushLabels or PolygonLabels, which receive the mask")


def _rectangle(value: Mapping[str, Any], index: int) -> tuple[float, float, float, float]:
    what = f"smart-tool region {index}'s"
    x, y = _finite(value.get("x"), f"{what} x"), _finite(value.get("y"), f"{what} y")
    w, h = _finite(value.get("width"), f"{what} width"), _finite(value.get("height"), f"{what} height")
    rotation = value.get("rotation", 0) or 0
    angle = math.radians(_finite(rotation, f"{what} rotation"))
    if w <= 0 or h <= 0:
        raise ValueError(f"smart-tool region {index} is a rectangle without area")
    if angle:
        # Label Studio rotates about the top-left corner (x, y); the upright bounds of its corners
        cos, sin = math.cos(angle), math.sin(angle)
        xs = [x + dx * cos - dy * sin for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
        ys = [y + dx * sin + dy * cos for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
        x, y, w, h = min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)
    x0, y0, x1, y1 = _pct(x), _pct(y), _pct(x + w), _pct(y + h)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"smart-tool region {index} lies outside the photo")
    return x0, y0, x1 - x0, y1 - y0


def parse_context(context: Any, config: LabelConfig) -> list[SmartPrompt]:
    """The prompts of a ``params.context`` (see the module docstring); [] for ``None`` or no regions."""
    if context is None:
        return []
    if not isinstance(context, Mapping):
        raise ValueError(f"params.context must be an object with a \"result\" list, not {json_type(context)}")
    items = context.get("result")
    if items is None:
        return []
    if not isinstance(items, list):
        raise ValueError(f"params.context.result must be a list of regions, not {json_type(items)}")
    if len(items) > MAX_CONTEXT_REGIONS:
        raise ValueError(f"params.context holds {len(items)} regions; at most {MAX_CONTEXT_REGIONS} are accepted")
    boxes: list[SmartPrompt] = []
    clicks: dict[str, SmartPrompt] = {}
    points: list[tuple[str, Pct, bool]] = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or not isinstance(item.get("value"), Mapping):
            raise ValueError(f"smart-tool region {i} must be an object with a \"value\" object")
        kind = item.get("type")
        if kind not in PROMPT_TYPES:
            raise ValueError(f"smart-tool region {i} has type {clip(str(kind), 40)!r}; a smart tool's region is "
                             "a keypointlabels click or a rectanglelabels box")
        label = _label_of(item, kind, config, i)
        value = item["value"]
        if kind == "rectanglelabels":
            boxes.append(SmartPrompt(label, box=_rectangle(value, i)))
            continue
        x = _pct(_finite(value.get("x"), f"smart-tool region {i}'s x"))
        y = _pct(_finite(value.get("y"), f"smart-tool region {i}'s y"))
        positive = item.get("is_positive", True)
        if not isinstance(positive, bool):
            raise ValueError(f"smart-tool region {i}'s is_positive must be true or false, not {json_type(positive)}")
        points.append((label, (x, y), positive))
    for label, point, positive in points:
        target = next((b for b in boxes if b.label == label and _holds(b.box, point)), None)
        if target is None:
            target = clicks.setdefault(label, SmartPrompt(label))
        (target.positive if positive else target.negative).append(point)
    for label, prompt in clicks.items():
        if not prompt.positive:
            raise ValueError(f"the clicks on {clip(label, 80)!r} are all negative: click on the object first "
                             "(a negative click takes away from the mask of the positive ones)")
    return boxes + list(clicks.values())


def _holds(box, point: Pct) -> bool:
    x, y, w, h = box
    return x <= point[0] <= x + w and y <= point[1] <= y + h
