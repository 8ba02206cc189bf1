"""PhotoResult (explainers.segment.types) + the labeling config's controls -> Label Studio result items.

Public API::

    from backend.labelstudio.config import parse_label_config, DEFAULT_LABEL_CONFIG
    from backend.labelstudio.results import photo_to_results, make_prediction, decode_rle, mask_to_rle

    cfg = parse_label_config(DEFAULT_LABEL_CONFIG)
    items = photo_to_results(photo, cfg)             # list of result dicts (all controls of cfg)
    pred = make_prediction(photo, cfg, "tag2mask-…")  # {"result": items, "score": photo quality,
                                                     #  "model_version": "tag2mask-…"[, "warnings": [...]]}
    notes = skipped_notes(photo)                     # one sentence per tag left out (photo.skipped)
    msg = no_usable_tag_message(photo_skipped)       # the error of a photo none of whose tags can be segmented
    rle = mask_to_rle(mask)                          # bool/0-1/0-255 (H, W) -> list[int] (LS brush RLE)
    mask = decode_rle(rle, h, w)                     # -> bool (H, W); inverse of mask_to_rle

Item shapes (what Label Studio 1.23 stores; coordinates in percent of the photo's width/height)::

    {"id", "from_name", "to_name", "type": "choices", "value": {"choices": ["Horse"]}, "score"}
    {"id", ..., "type": "brushlabels", "original_width", "original_height", "image_rotation": 0,
     "value": {"format": "rle", "rle": [...], "brushlabels": ["Horse"]}, "score"}
    {"id", ..., "type": "polygonlabels", ..., "value": {"points": [[x%, y%], ...], "closed": true,
     "polygonlabels": ["Horse"]}, "score"}
    {"id", ..., "type": "rectanglelabels", ..., "value": {"x", "y", "width", "height", "rotation": 0,
     "rectanglelabels": ["Horse"]}, "score"}

Which TagMask goes to which control: a TagMask's ``tag`` is matched to each control's label values
(exactly, then case-insensitively; ``tag_to_label`` can map engine tags to label values first). A
control only receives the tags among its own labels. Choices with ``choice="single"`` get only the
best-scoring tag. Empty masks produce no brush item; region ``id``s are unique (random, 10 chars).

Scores: a region's (brush, polygon, rectangle) ``"score"`` is its tag's estimated mask quality
(``TagMask.quality``, a guess of its fg IoU) and the prediction's is the photo's (``PhotoResult.quality``),
so that Label Studio, which sorts tasks by prediction score, shows the worst pre-labels first; where no
quality is set they fall back to the tag probability (regions: per shape, ``Polygon/Box.score``; the
prediction: ``PhotoResult.score``). A choices item's score stays the tag probability.

Tags left out of the photo (``PhotoResult.skipped``: no classifier class, no trained head) travel as
``"warnings"``: one sentence per tag, its reason and a hint (:data:`UNUSABLE_TAG_HINT`), next to the
"result" of the tags that were segmented. The key is there only when a tag was left out. Label Studio
1.23.2 accepts such a prediction, from ``/predict`` and in a tasks import alike, and stores its result,
score and model version; it keeps no other keys, so the warnings reach whoever reads the backend's
reply, the job's results or the backend's log, not the stored prediction.
"""

from __future__ import annotations

import functools

import uuid
from typing import Iterable, Mapping

import numpy as np

from backend.labelstudio.config import ChoicesControl, Control, LabelConfig
from explainers.segment.types import PhotoResult, TagMask

__all__ = ["photo_to_results", "make_prediction", "mask_to_rle", "decode_rle", "choices_item",
           "brush_item", "polygon_items", "rectangle_items", "new_id", "skipped_notes", "no_usable_tag_message",
           "UNUSABLE_TAG_HINT"]

UNUSABLE_TAG_HINT = ('To segment such a label, add predicted_values="class a,class b" (ImageNet class names) '
                     "to its <Choice>/<Label> in the labeling config, or annotate photos with it so that the "
                     "project's training learns it.")


def new_id() -> str:
    """A region id, unique with overwhelming probability (Label Studio uses 10-char ids)."""
    return uuid.uuid4().hex[:10]


@functools.lru_cache(maxsize=1)
def _brush():
    """label-studio-sdk's brush RLE module (``label_studio_sdk/converter/brush.py``: numpy and PIL only),
    loaded by itself: importing it through its package runs ``label_studio_sdk.converter``'s
    ``__init__``, which imports every converter and nltk (1.4 s of each command's start-up)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("label_studio_sdk")
    path = Path(next(iter(spec.submodule_search_locations))) / "converter" / "brush.py"
    module_spec = importlib.util.spec_from_file_location("_tag2mask_ls_brush", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """(H, W) mask (bool, 0/1 or 0/255) -> Label Studio brush RLE (the mask as 0/255 RGBA)."""
    mask2rle = _brush().mask2rle
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    m = np.where(mask > 0, 255, 0).astype(np.uint8)
    return [int(v) for v in mask2rle(m)]


def decode_rle(rle: Iterable[int], height: int, width: int) -> np.ndarray:
    """Label Studio brush RLE -> bool (height, width) mask (alpha channel > 127)."""
    _decode = _brush().decode_rle
    flat = _decode(list(rle))
    if flat.size != height * width * 4:
        raise ValueError(f"RLE holds {flat.size} values, expected {height}x{width}x4 = {height * width * 4}")
    return flat.reshape(height, width, 4)[:, :, 3] > 127


def _pct(v: float, size: int) -> float:
    return float(min(100.0, max(0.0, 100.0 * float(v) / float(size))))


def _region_base(control: Control, photo: PhotoResult, score: float) -> dict:
    return {
        "id": new_id(),
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": control.type,
        "original_width": int(photo.width),
        "original_height": int(photo.height),
        "image_rotation": 0,
        "score": round(float(score), 4),
    }


def _region_score(tm: TagMask, fallback: float) -> float:
    """A region's score: its tag's estimated mask quality when set, else `fallback` (a probability)."""
    return float(tm.quality) if tm.quality is not None else float(fallback)


def choices_item(control: ChoicesControl, tags: list[TagMask], label_of: Mapping[str, str]) -> dict | None:
    """One choices item for the photo's tags (single-choice: the best one); None if none matches."""
    picked = [(label_of[t.tag], t.score) for t in tags if t.tag in label_of]
    if not picked:
        return None
    picked.sort(key=lambda p: -p[1])
    if not control.multiple:
        picked = picked[:1]
    values = list(dict.fromkeys(label for label, _ in picked))
    return {
        "id": new_id(),
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": "choices",
        "value": {"choices": values},
        "score": round(float(max(s for _, s in picked)), 4),
    }


def brush_item(control: Control, photo: PhotoResult, tm: TagMask, label: str) -> dict | None:
    mask = np.asarray(tm.mask)
    if not mask.any():
        return None
    if mask.shape != (photo.height, photo.width):
        raise ValueError(f"mask of {tm.tag!r} is {mask.shape[1]}x{mask.shape[0]}, photo is {photo.width}x{photo.height}")
    item = _region_base(control, photo, _region_score(tm, tm.score))
    item["value"] = {"format": "rle", "rle": mask_to_rle(mask), "brushlabels": [label]}
    return item


def polygon_items(control: Control, photo: PhotoResult, tm: TagMask, label: str) -> list[dict]:
    out = []
    for poly in tm.polygons:
        if len(poly.points) < 3:
            continue
        item = _region_base(control, photo, _region_score(tm, poly.score))
        item["value"] = {
            "points": [[round(_pct(x, photo.width), 3), round(_pct(y, photo.height), 3)] for x, y in poly.points],
            "closed": True,
            "polygonlabels": [label],
        }
        out.append(item)
    return out


def rectangle_items(control: Control, photo: PhotoResult, tm: TagMask, label: str) -> list[dict]:
    out = []
    for box in tm.boxes:
        x0, x1 = sorted((box.x0, box.x1))
        y0, y1 = sorted((box.y0, box.y1))
        x, y = _pct(x0, photo.width), _pct(y0, photo.height)
        w, h = _pct(x1, photo.width) - x, _pct(y1, photo.height) - y
        if w <= 0 or h <= 0:
            continue
        item = _region_base(control, photo, _region_score(tm, box.score))
        item["value"] = {"x": round(x, 4), "y": round(y, 4), "width": round(w, 4), "height": round(h, 4),
                         "rotation": 0, "rectanglelabels": [label]}
        out.append(item)
    return out


_REGION_BUILDERS = {
    "brushlabels": lambda c, p, t, l: [i for i in [brush_item(c, p, t, l)] if i],
    "polygonlabels": polygon_items,
    "rectanglelabels": rectangle_items,
}


def photo_to_results(photo: PhotoResult, config: LabelConfig, tag_to_label: Mapping[str, str] | None = None,
                     controls: Iterable[Control] | None = None) -> list[dict]:
    """All result items for one photo, control by control in config order.

    `tag_to_label` maps an engine tag (TagMask.tag) to a label value when they differ; otherwise each
    control matches tags to its labels by name. `controls` restricts the output (default: all).
    """
    tag_to_label = dict(tag_to_label or {})
    results: list[dict] = []
    for control in (list(controls) if controls is not None else config.controls):
        label_of: dict[str, str] = {}
        for tm in photo.tags:
            label = control.match(tag_to_label.get(tm.tag, tm.tag))
            if label is not None:
                label_of[tm.tag] = label
        if isinstance(control, ChoicesControl):
            item = choices_item(control, photo.tags, label_of)
            if item:
                results.append(item)
            continue
        build = _REGION_BUILDERS[control.type]
        for tm in photo.tags:
            if tm.tag in label_of:
                results.extend(build(control, photo, tm, label_of[tm.tag]))
    return results


def skipped_notes(photo: PhotoResult, hint: str = UNUSABLE_TAG_HINT, capital: bool = True) -> list[str]:
    """One sentence per tag left out of `photo` (``photo.skipped``, in order): its reason, then `hint`
    (`capital`: first letter upper case, for a note that stands alone)."""
    return [f"{_sentence(reason, capital)} {hint}".strip() for reason in photo.skipped.values()]


def no_usable_tag_message(skipped: Mapping[str, str], whose: str = "the annotated tags",
                          hint: str = UNUSABLE_TAG_HINT) -> str:
    """The error of a photo none of whose tags can be segmented (`skipped`: tag -> reason): "none of
    <whose> can be segmented ('a', 'b'). <hint> Reasons: <reason>; <reason>." The tags and the hint
    come first, so that a reply cut short (a long list of reasons) still says what to do."""
    names = ", ".join(repr(t) for t in skipped)
    reasons = "; ".join(" ".join(str(r).split()) for r in skipped.values())
    why = "Reason" if len(skipped) == 1 else "Reasons"
    return f"none of {whose} can be segmented ({names}). {hint} {why}: {_sentence(reasons, capital=False)}"


def _sentence(text: str, capital: bool = True) -> str:
    text = " ".join(str(text).split())
    if capital:
        text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."


def make_prediction(photo: PhotoResult, config: LabelConfig, model_version: str,
                    tag_to_label: Mapping[str, str] | None = None, hint: str = UNUSABLE_TAG_HINT) -> dict:
    """The whole prediction for one task: ``{"result": [...], "score": s, "model_version": v}`` (s: the
    photo's estimated mask quality, else its mean tag probability), plus ``"warnings"``
    (:func:`skipped_notes`, with `hint`) when tags were left out of the photo."""
    quality = photo.quality
    pred = {
        "result": photo_to_results(photo, config, tag_to_label),
        "score": round(float(quality if quality is not None else photo.score), 4),
        "model_version": str(model_version),
    }
    notes = skipped_notes(photo, hint)
    if notes:
        pred["warnings"] = notes
    return pred
