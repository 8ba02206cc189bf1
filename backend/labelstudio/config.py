"""A Label Studio labeling config -> the controls this backend can fill for one Image.

Parsed with label-studio-sdk's ``LabelInterface``. One small class per supported control type
(the same idea as Label Studio's example backends: pick a class per control tag from the config):

============================  ==================  ===============================================
control tag                   class               result items it receives (backend.labelstudio.results)
============================  ==================  ===============================================
``<Choices>``                 ChoicesControl      one ``choices`` item per photo (the tags)
``<BrushLabels>``             BrushControl        one ``brushlabels`` item (RLE mask) per tag
``<PolygonLabels>``           PolygonControl      one ``polygonlabels`` item per polygon
``<RectangleLabels>``         RectangleControl    one ``rectanglelabels`` item per box
``<KeyPointLabels>``          KeyPointControl     none: its clicks are smart-tool prompts only
                                                  (``LabelConfig.prompt_controls``; backend.labelstudio.context)
============================  ==================  ===============================================

Public API::

    cfg = parse_label_config(xml)            # -> LabelConfig; raises LabelConfigError
    cfg.image_name, cfg.image_key            # "image", "image" (task["data"]["image"])
    cfg.controls                             # [ChoicesControl | BrushControl | ...] bound to the Image
    cfg.region_controls, cfg.choices_controls
    cfg.labels                               # every label value, config order, de-duplicated
    cfg.tag_queries()                        # {label value: [classifier names] or None}
    control.from_name, control.to_name, control.type ("choices", "brushlabels", ...)
    control.labels                           # label values, config order
    control.predicted_values(label)          # [names] from predicted_values="a,b", or None
    control.match(tag)                       # the control's label value for an engine tag, or None
    DEFAULT_LABEL_CONFIG                     # the README config (Image "image" + 4 controls)

Label value -> classifier classes: a label is sent to the engine as a tag. By default the tag is the
label value itself (the engine's tag mapping, ``explainers.tags.resolve_tag``, turns "Horse" into
ImageNet classes). A ``predicted_values="sorrel,zebra"`` attribute on the ``<Label>``/``<Choice>``
names the classifier classes (or engine tags) explicitly; ``tag_queries()`` returns those lists so the
model can pass them to ``resolve_tag(..., extra=...)``.

Only controls whose ``toName`` is the Image object are kept; others (text, audio, unsupported control
types such as EllipseLabels, a BrushLabels whose ``toName`` names no Image) are listed in
``LabelConfig.skipped`` with the reason, and logged as a warning once per config.

Hostile configs: a config that is not a string, longer than MAX_CONFIG_CHARS (1 000 000), with a
``<!DOCTYPE>`` / ``<!ENTITY>`` declaration (entity expansion "billion laughs", external entities:
Label Studio configs never declare one) or more than MAX_CONFIG_LABELS (2000) labels is refused
with a LabelConfigError before the SDK parses it; libxml2 refuses nesting deeper than 256.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import ClassVar

from backend.untrusted import json_type

__all__ = ["DEFAULT_LABEL_CONFIG", "LabelConfigError", "Control", "ChoicesControl", "BrushControl", "PolygonControl",
           "RectangleControl", "KeyPointControl", "LabelConfig", "parse_label_config", "MAX_CONFIG_CHARS", "MAX_CONFIG_LABELS",
           "parse_label_config_cached", "CONTROL_CLASSES"]

log = logging.getLogger(__name__)

MAX_CONFIG_CHARS = 1_000_000       # real configs are a few KB; a 2000-label taxonomy is ~100 KB
MAX_CONFIG_LABELS = 2000           # twice ImageNet's classes; each label costs a tag lookup per batch
_DECLARATION = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)
_WARNED: set[str] = set()          # sha1 of configs whose skipped controls were logged
_WARNED_LOCK = threading.Lock()

DEFAULT_LABEL_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <Choices name="tag" toName="image" choice="multiple" showInline="true">
    <Choice value="Horse"/>
    <Choice value="Cat"/>
    <Choice value="Dog"/>
    <Choice value="Bird"/>
  </Choices>
  <BrushLabels name="brush" toName="image">
    <Label value="Horse" background="#e6194b"/>
    <Label value="Cat" background="#3cb44b"/>
    <Label value="Dog" background="#4363d8"/>
    <Label value="Bird" background="#f58231"/>
  </BrushLabels>
  <PolygonLabels name="polygon" toName="image" strokeWidth="2" opacity="0.3">
    <Label value="Horse" background="#e6194b"/>
    <Label value="Cat" background="#3cb44b"/>
    <Label value="Dog" background="#4363d8"/>
    <Label value="Bird" background="#f58231"/>
  </PolygonLabels>
  <RectangleLabels name="box" toName="image">
    <Label value="Horse" background="#e6194b"/>
    <Label value="Cat" background="#3cb44b"/>
    <Label value="Dog" background="#4363d8"/>
    <Label value="Bird" background="#f58231"/>
  </RectangleLabels>
</View>"""


class LabelConfigError(ValueError):
    """A labeling config this backend cannot work with; the message says why."""


@dataclass
class Control:
    """A control tag bound to the Image: its names and its labels (with their classifier mapping)."""

    type: ClassVar[str] = ""          # Label Studio result type: the control tag's name, lowercased
    is_region: ClassVar[bool] = True  # False for Choices (one item per photo, no geometry)

    from_name: str
    to_name: str
    labels: list[str]
    mapping: dict[str, list[str]] = field(default_factory=dict)   # label -> predicted_values names
    attrs: dict[str, str] = field(default_factory=dict)           # the control tag's XML attributes

    def predicted_values(self, label: str) -> list[str] | None:
        """Classifier names from the label's ``predicted_values`` attribute, or None."""
        return self.mapping.get(label)

    def match(self, tag: str) -> str | None:
        """This control's label value for an engine tag (exact, then case-insensitive), or None
        (also for a value that is not a string)."""
        if not isinstance(tag, str):
            return None
        if tag in self.labels:
            return tag
        low = tag.strip().lower()
        for label in self.labels:
            if label.lower() == low:
                return label
        return None


@dataclass
class ChoicesControl(Control):
    type: ClassVar[str] = "choices"
    is_region: ClassVar[bool] = False

    @property
    def multiple(self) -> bool:
        """choice="multiple" (checkboxes); otherwise a single choice (the best tag) is predicted."""
        return self.attrs.get("choice", "single") == "multiple"


@dataclass
class BrushControl(Control):
    type: ClassVar[str] = "brushlabels"


@dataclass
class PolygonControl(Control):
    type: ClassVar[str] = "polygonlabels"


@dataclass
class RectangleControl(Control):
    type: ClassVar[str] = "rectanglelabels"


@dataclass
class KeyPointControl(Control):
    """A KeyPointLabels control: the clicks of Label Studio's smart tools (interactive prompts); it
    receives no predicted items."""
    type: ClassVar[str] = "keypointlabels"


CONTROL_CLASSES: dict[str, type[Control]] = {
    "choices": ChoicesControl,
    "brushlabels": BrushControl,
    "polygonlabels": PolygonControl,
    "rectanglelabels": RectangleControl,
    "keypointlabels": KeyPointControl,     # prompts only (LabelConfig.prompt_controls)
}


@dataclass
class LabelConfig:
    """The parts of a labeling config this backend uses."""

    image_name: str                   # the Image tag's name (every result's to_name)
    image_key: str                    # the task data key holding the photo URL ("$image" -> "image")
    controls: list[Control]
    skipped: dict[str, str] = field(default_factory=dict)   # control name -> why it is not used
    xml: str = ""
    prompt_controls: list[Control] = field(default_factory=list)   # KeyPointLabels: smart-tool clicks only

    @property
    def region_controls(self) -> list[Control]:
        return [c for c in self.controls if c.is_region]

    @property
    def mask_controls(self) -> list[Control]:
        """The BrushLabels and PolygonLabels controls: those that take a mask (a smart tool's answer)."""
        return [c for c in self.controls if isinstance(c, (BrushControl, PolygonControl))]

    @property
    def choices_controls(self) -> list[ChoicesControl]:
        return [c for c in self.controls if isinstance(c, ChoicesControl)]

    @property
    def labels(self) -> list[str]:
        """Every label value of the used controls, in config order, without duplicates."""
        seen: dict[str, None] = {}
        for c in self.controls:
            for label in c.labels:
                seen.setdefault(label, None)
        return list(seen)

    def tag_queries(self) -> dict[str, list[str] | None]:
        """label value -> the classifier names given by ``predicted_values`` (first control that has
        them), or None where the label value itself is the engine tag."""
        out: dict[str, list[str] | None] = {label: None for label in self.labels}
        for c in self.controls:
            for label, names in c.mapping.items():
                if out.get(label) is None:
                    out[label] = names
        return out

    def control(self, name: str) -> Control:
        for c in self.controls:
            if c.from_name == name:
                return c
        raise KeyError(name)


def _split_values(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_label_config(xml: str, image_name: str | None = None) -> LabelConfig:
    """Parse a labeling config and keep the supported controls bound to one Image tag.

    `image_name` picks the Image when the config has several (default: the first Image that has a
    supported control). Raises LabelConfigError for: empty/invalid XML, no Image tag, no supported
    control (Choices, BrushLabels, PolygonLabels, RectangleLabels) bound to it, and the hostile
    configs of the module docstring. Skipped controls are logged once per config.
    """
    _refuse_hostile(xml)
    try:
        from label_studio_sdk.label_interface import LabelInterface

        li = LabelInterface(xml)
    except Exception as exc:   # the SDK raises lxml / its own syntax errors
        raise LabelConfigError(f"the labeling config is not valid XML: {exc}") from None

    images = [o for o in (li.objects or []) if (o.tag or "").lower() == "image"]
    if not images:
        raise LabelConfigError("the labeling config has no <Image> tag: this backend labels photos")
    by_name = {o.name: o for o in images}
    if image_name is not None and image_name not in by_name:
        raise LabelConfigError(f"the labeling config has no <Image name={image_name!r}>; "
                               f"it has {', '.join(sorted(by_name))}")

    per_image: dict[str, list[Control]] = {o.name: [] for o in images}
    skipped: dict[str, str] = {}
    for ct in (li.controls or []):
        targets = [n for n in (ct.to_name or []) if n in by_name]
        kind = (ct.tag or "").lower()
        if not targets:
            names = ", ".join(repr(n) for n in (ct.to_name or [])) or "nothing"
            skipped[ct.name] = f"<{ct.tag}> is not bound to an Image (its toName names {names})"
            continue
        cls = CONTROL_CLASSES.get(kind)
        if cls is None:
            skipped[ct.name] = (f"<{ct.tag}> is not supported (supported: Choices, BrushLabels, "
                                "PolygonLabels, RectangleLabels)")
            continue
        labels = list(ct.labels or [])
        if not labels:
            skipped[ct.name] = f"<{ct.tag}> has no labels"
            continue
        mapping = {}
        for value, tag in (ct.labels_attrs or {}).items():
            raw = (tag.attr or {}).get("predicted_values")
            if raw and _split_values(raw):
                mapping[value] = _split_values(raw)
        attrs = {k: str(v) for k, v in (ct.attr or {}).items()}
        per_image[targets[0]].append(cls(from_name=ct.name, to_name=targets[0], labels=labels,
                                         mapping=mapping, attrs=attrs))

    if image_name is None:
        # the first Image with a control that receives results (KeyPointLabels only prompt)
        image_name = next((n for n, cs in per_image.items() if any(not isinstance(c, KeyPointControl) for c in cs)),
                          images[0].name)
    prompts = [c for c in per_image[image_name] if isinstance(c, KeyPointControl)]
    controls = [c for c in per_image[image_name] if not isinstance(c, KeyPointControl)]
    for other, cs in per_image.items():
        for c in cs if other != image_name else []:
            skipped[c.from_name] = f"bound to another Image ({other!r})"
    if not controls:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no control tags"
        raise LabelConfigError(f"no supported control (Choices, BrushLabels, PolygonLabels, RectangleLabels) "
                               f"is bound to <Image name={image_name!r}> ({why})")
    n_labels = len({label for c in controls for label in c.labels})
    if n_labels > MAX_CONFIG_LABELS:
        raise LabelConfigError(f"the labeling config has {n_labels} labels on <Image name={image_name!r}>; at most "
                               f"{MAX_CONFIG_LABELS} are supported")
    _warn_skipped_once(xml, skipped)
    image = by_name[image_name]
    value = image.value or ""
    key = value[1:] if value.startswith("$") else value
    return LabelConfig(image_name=image_name, image_key=key, controls=controls, skipped=skipped, xml=xml,
                       prompt_controls=prompts)


def _refuse_hostile(xml) -> None:
    """LabelConfigError for a config that is not a string, empty, too long, or declares a DTD/entities."""
    if not isinstance(xml, str):
        raise LabelConfigError(f"the labeling config must be a string of XML, not {json_type(xml)}")
    if not xml.strip():
        raise LabelConfigError("the labeling config is empty")
    if len(xml) > MAX_CONFIG_CHARS:
        raise LabelConfigError(f"the labeling config is {len(xml)} characters long; at most {MAX_CONFIG_CHARS} "
                               "are accepted")
    if _DECLARATION.search(xml):
        raise LabelConfigError("the labeling config declares a <!DOCTYPE> or <!ENTITY>; Label Studio configs "
                               "never need one, and entity declarations are refused")


def _warn_skipped_once(xml: str, skipped: dict[str, str]) -> None:
    """Log the controls a config leaves unused, once per distinct config (per process)."""
    if not skipped:
        return
    key = hashlib.sha1(xml.encode("utf-8", "surrogatepass")).hexdigest()
    with _WARNED_LOCK:
        if key in _WARNED:
            return
        if len(_WARNED) >= 4096:        # many distinct configs: forget, warnings may repeat
            _WARNED.clear()
        _WARNED.add(key)
    for name, why in skipped.items():
        log.warning("labeling config: control %r gets no predictions: %s", name[:80], why[:300])


@functools.lru_cache(maxsize=64)
def parse_label_config_cached(xml: str) -> LabelConfig:
    """:func:`parse_label_config` of `xml`, remembered for the process (the 64 latest configs): the
    one cache of parsed configs that queue workers and webhooks share. Raises LabelConfigError."""
    return parse_label_config(xml)
