"""Batch pre-labelling (the ``tag2mask label`` command): photos + tags -> an output folder.

For every photo that works::

    OUT/<name>/<tag>.png      the tag's mask, 0/255, at the photo's original (EXIF-upright) size
    OUT/<name>/overlay.png    masks, polygons and boxes drawn over the photo

and for the whole batch::

    OUT/tasks.json            Label Studio import file: [{"data": {"image": ...}, "predictions": [...]}]
    OUT/label_config.xml      the labeling config the predictions were made for (paste it into the project)
    OUT/summary.json          per photo: name, path, tags with scores and mask files, timings, tags left out
    OUT/errors.json           per failed photo {"path", "error"}, per tag left out of a labelled photo
                              {"path", "tag", "error"}, in the order they happened (empty: all went well)

``<name>`` is the photo's file stem, made unique with ``-2``, ``-3``... when two photos share a stem.
A photo that cannot be used (missing, truncated, not an image, no tags, none of its tags usable) is
one error entry; the others go on. A tag that cannot be segmented (no classifier class: "person" in
``microwave;person;clock``) does not sink the photo's other tags: they are labelled, and the tag gets its
own error entry (the reason and a hint, :data:`UNUSABLE_TAG_HINT`), also in the prediction's
``"warnings"`` in tasks.json and the photo's ``"skipped"`` in summary.json.

Public API::

    photos, errors = collect_photos(["a.jpg", "dir/"], exclude=[out_dir])   # -> [PhotoItem], [PhotoError]
    tags_map = read_tags_csv("tags.csv")                    # rows "image,tag1;tag2" -> {key: [tags]}
    config = label_config_for(["horse", "cup"])             # -> backend.labelstudio.config.LabelConfig
    summary = label_photos(photos, engine, out_dir, tags=["horse"], tags_map=tags_map, errors=errors)
    summary.ok, summary.errors, summary.exit_status         # exit_status: 0 all done, 1 some failed
    summary.tag_errors                                      # [PhotoError(path, error, tag)]: tags left out
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence
from urllib.parse import quote

import numpy as np

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"}

__all__ = [
    "IMAGE_EXTENSIONS", "PhotoItem", "PhotoError", "PhotoRecord", "LabelSummary", "collect_photos",
    "read_tags_csv", "tags_for", "unique_name", "label_config_for", "image_url", "mask_filename", "label_photos",
    "write_json", "UNUSABLE_TAG_HINT",
]

UNUSABLE_TAG_HINT = ("Use one of the classifier's class names or a known tag instead "
                     "(explainers.tags.known_tags() lists the known tags).")


@dataclass
class PhotoItem:
    """One photo to label: where it is, its path relative to the folder it was found in, its output name."""

    path: Path
    rel: str
    name: str


@dataclass
class PhotoError:
    """A photo that failed (`tag` None), or one tag left out of a photo that was labelled."""

    path: str
    error: str
    tag: str | None = None

    def to_json(self) -> dict:
        """errors.json's entry: {"path", "error"}, or {"path", "tag", "error"} for a tag."""
        if self.tag is None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "tag": self.tag, "error": self.error}


@dataclass
class PhotoRecord:
    """What was written for one photo (summary.json)."""

    name: str
    path: str
    width: int
    height: int
    tags: list[dict]            # {"tag", "score", "quality", "mask", "area", "polygons", "boxes"}
    overlay: str
    timings: dict[str, float]
    seconds: float              # wall time of load + predict + writing
    skipped: dict[str, str] = field(default_factory=dict)   # tag left out -> why (no mask, no result)


@dataclass
class LabelSummary:
    out: Path
    records: list[PhotoRecord] = field(default_factory=list)
    errors: list[PhotoError] = field(default_factory=list)       # photos that failed
    tag_errors: list[PhotoError] = field(default_factory=list)   # tags left out of labelled photos
    seconds: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.records)

    @property
    def exit_status(self) -> int:
        """1 when a photo failed or a tag was left out, else 0."""
        return 1 if self.errors or self.tag_errors else 0


# -- inputs ---------------------------------------------------------------------------------------
def collect_photos(paths: Iterable[str | os.PathLike], exclude: Iterable[str | os.PathLike] = ()
                   ) -> tuple[list[PhotoItem], list[PhotoError]]:
    """Files and folders -> photos (folders: image files inside, recursively, sorted) and errors.

    A file named explicitly is always taken (a wrong one fails later with a clear reason); in folders
    only files with an image extension count, and nothing under an `exclude` folder (the output
    folder, so that a second run does not label the first run's masks). A path given twice is
    labelled once.
    """
    skip = [Path(e).resolve() for e in exclude]
    items: list[PhotoItem] = []
    errors: list[PhotoError] = []
    seen: set[Path] = set()
    names: set[str] = set()

    def add(path: Path, rel: str) -> None:
        key = path.resolve()
        if key in seen:
            return
        seen.add(key)
        items.append(PhotoItem(path=path, rel=rel, name=unique_name(path.stem, names)))

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                           and not any(f.resolve().is_relative_to(s) for s in skip))
            if not found:
                errors.append(PhotoError(str(p), f"{p}: no photos in this folder"))
            for f in found:
                add(f, f.relative_to(p).as_posix())
        elif p.exists():
            add(p, p.name)
        else:
            errors.append(PhotoError(str(p), f"{p}: no such file or folder"))
    return items, errors


def unique_name(stem: str, taken: set[str]) -> str:
    """`stem` (``photo`` when empty), or `stem-2`, `stem-3`... the first not in `taken` (which it is added to)."""
    stem = stem or "photo"
    name, k = stem, 2
    while name in taken:
        name, k = f"{stem}-{k}", k + 1
    taken.add(name)
    return name


def read_tags_csv(path: str | os.PathLike) -> dict[str, list[str]]:
    """A CSV of rows ``image,tag1;tag2`` -> {image: [tags]}.

    `image` is a file name, a stem or a relative path. A first row whose first cell is "image" is a
    header. Blank rows and rows starting with "#" are skipped. Raises ValueError (with the line
    number) for a row without tags.
    """
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), start=1):
            cells = [c.strip() for c in row]
            if not any(cells) or cells[0].startswith("#"):
                continue
            if lineno == 1 and cells[0].lower() in ("image", "photo", "file", "filename"):
                continue
            tags = [t.strip() for c in cells[1:] for t in c.split(";") if t.strip()]
            if not cells[0] or not tags:
                raise ValueError(f"{path}:{lineno}: expected 'image,tag1;tag2', got {','.join(row)!r}")
            out[cells[0]] = list(dict.fromkeys(out.get(cells[0], []) + tags))
    return out


def tags_for(item: PhotoItem, tags: Sequence[str], tags_map: Mapping[str, list[str]] | None) -> list[str]:
    """The photo's tags: its --tags-csv row (by relative path, file name or stem), else `tags`."""
    if tags_map:
        for key in (item.rel, item.path.name, item.path.stem, str(item.path)):
            if key in tags_map:
                return list(tags_map[key])
    return list(tags)


# -- outputs --------------------------------------------------------------------------------------
_COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


def label_config_for(tags: Sequence[str]):
    """The labeling config for a batch: the default one (Horse, Cat, Dog, Bird) when it covers every
    tag, else one of the same shape (controls ``tag``, ``brush``, ``polygon``, ``box``) whose labels
    are the batch's tags. Returns a parsed ``backend.labelstudio.config.LabelConfig`` (``.xml`` is the text)."""
    from xml.sax.saxutils import quoteattr

    from backend.labelstudio.config import DEFAULT_LABEL_CONFIG, parse_label_config

    default = parse_label_config(DEFAULT_LABEL_CONFIG)
    tags = list(dict.fromkeys(tags))
    if all(any(c.match(t) for c in default.controls) for t in tags):
        return default
    labels = list(dict.fromkeys(t[:1].upper() + t[1:] for t in tags))

    def block(tag: str, name: str, extra: str) -> str:
        item = "Choice" if tag == "Choices" else "Label"
        lines = [f'  <{tag} name="{name}" toName="image"{extra}>']
        for i, label in enumerate(labels):
            color = "" if item == "Choice" else f' background="{_COLORS[i % len(_COLORS)]}"'
            lines.append(f"    <{item} value={quoteattr(label)}{color}/>")
        lines.append(f"  </{tag}>")
        return "\n".join(lines)

    xml = "\n".join([
        "<View>",
        '  <Image name="image" value="$image" zoom="true"/>',
        block("Choices", "tag", ' choice="multiple" showInline="true"'),
        block("BrushLabels", "brush", ""),
        block("PolygonLabels", "polygon", ' strokeWidth="2" opacity="0.3"'),
        block("RectangleLabels", "box", ""),
        "</View>",
    ])
    return parse_label_config(xml)


def image_url(item: PhotoItem, root_url: str | None) -> str:
    """The task's photo reference: `root_url` + the photo's relative path (URL-quoted), or its
    absolute path when no root is given."""
    if not root_url:
        return item.path.resolve().as_posix()
    sep = "" if root_url.endswith(("/", "=")) else "/"
    return f"{root_url}{sep}{quote(item.rel)}"


def mask_filename(tag: str) -> str:
    """A safe file name for a tag's mask: ``"traffic light"`` -> ``traffic_light.png``."""
    return (re.sub(r"[^\w.-]+", "_", tag).strip("._") or "tag") + ".png"


def write_json(path: Path, obj) -> None:
    """Write JSON (indented) atomically (backend.datasets.files.write_text: a reader never sees half a file)."""
    from backend.datasets.files import write_text

    write_text(path, json.dumps(obj, indent=1, ensure_ascii=False) + "\n")


# -- the batch ------------------------------------------------------------------------------------
def label_photos(photos: Sequence[PhotoItem], engine, out_dir: str | os.PathLike, tags: Sequence[str] = (),
                 tags_map: Mapping[str, list[str]] | None = None, errors: Sequence[PhotoError] = (),
                 image_root_url: str | None = None, label_config=None, model_version: str | None = None,
                 progress: bool = True, report: Callable[[str], None] | None = None,
                 writers: Sequence = ()) -> LabelSummary:
    """Label `photos` with `engine` (an ``explainers.segment.Tag2Mask``) into `out_dir`.

    `errors` are failures found before (missing paths); they are reported and recorded too.
    `label_config` (a LabelConfig) defaults to :func:`label_config_for` the batch's tags.
    `report(line)` receives each error line (default: printed to stderr above the progress bar).
    `writers` (e.g. a backend.datasets.formats.DatasetExport) get ``add_photo(path, name, result)``
    for each labelled photo (an error there fails that photo) and ``close()`` at the end.
    """
    from tqdm import tqdm

    from backend.labelstudio.results import (
        make_prediction,
        no_usable_tag_message,
        skipped_notes,
    )
    from explainers.errors import ExplainersError
    from explainers.imageio import load_image
    from explainers.visualize import mask_overlay, save_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    summary = LabelSummary(out=out)
    bar = tqdm(total=len(photos), unit="photo", desc="label", disable=not progress, file=sys.stderr)
    say = report or (lambda line: tqdm.write(line, file=sys.stderr))
    reported: list[PhotoError] = []       # errors.json: photos and tags, in order

    def fail(path, message: str) -> None:
        summary.errors.append(PhotoError(str(path), message))
        reported.append(summary.errors[-1])
        say(f"error: {message}")

    def left_out(path, tag: str, message: str) -> None:
        summary.tag_errors.append(PhotoError(str(path), message, tag=tag))
        reported.append(summary.tag_errors[-1])
        say(f"error: {message}")

    for e in errors:
        fail(e.path, e.error)

    wanted = [tags_for(p, tags, tags_map) for p in photos]
    all_tags = list(dict.fromkeys(t for ts in wanted for t in ts))
    config = label_config if label_config is not None else label_config_for(all_tags or ["horse"])
    version = model_version or f"tag2mask-{engine.backbone.name}"
    tasks = []
    for item, photo_tags in zip(photos, wanted):
        t0 = time.perf_counter()
        try:
            if not photo_tags:
                raise ValueError(f"{item.path}: no tags for this photo (give --tags or a --tags-csv row)")
            usable, skipped = engine.split_tags(photo_tags)
            if not usable:
                raise ValueError(f"{item.path}: "
                                 + no_usable_tag_message(skipped, "the photo's tags", UNUSABLE_TAG_HINT))
            image = load_image(item.path)
            result = engine.predict(image, usable)
            result.skipped = {**skipped, **result.skipped}
            folder = out / item.name
            folder.mkdir(parents=True, exist_ok=True)
            tag_rows = []
            used = {"overlay.png"}
            for tm in result.tags:
                fname = mask_filename(tm.tag)
                stem, k = fname[:-4], 2
                while fname in used:
                    fname, k = f"{stem}-{k}.png", k + 1
                used.add(fname)
                save_png(folder / fname, np.where(tm.mask, 255, 0).astype(np.uint8))
                tag_rows.append({"tag": tm.tag, "score": round(float(tm.score), 4),
                                 "quality": None if tm.quality is None else round(float(tm.quality), 4),
                                 "mask": f"{item.name}/{fname}",
                                 "area": round(float(np.mean(tm.mask)), 4), "polygons": len(tm.polygons),
                                 "boxes": len(tm.boxes)})
            overlay = mask_overlay(image, {tm.tag: tm.mask for tm in result.tags},
                                   polygons={tm.tag: tm.polygons for tm in result.tags},
                                   boxes={tm.tag: tm.boxes for tm in result.tags})
            save_png(folder / "overlay.png", overlay)
            for w in writers:
                w.add_photo(item.path, item.name, result)
            tasks.append({"data": {config.image_key: image_url(item, image_root_url)},
                          "predictions": [make_prediction(result, config, version, hint=UNUSABLE_TAG_HINT)]})
            summary.records.append(PhotoRecord(
                name=item.name, path=str(item.path), width=result.width, height=result.height, tags=tag_rows,
                overlay=f"{item.name}/overlay.png", timings={k: round(v, 4) for k, v in result.timings.items()},
                seconds=round(time.perf_counter() - t0, 4), skipped=dict(result.skipped)))
            for tag, note in zip(result.skipped, skipped_notes(result, UNUSABLE_TAG_HINT, capital=False)):
                left_out(item.path, tag, f"{item.path}: {note}")
        except (ExplainersError, ValueError, OSError) as exc:
            fail(item.path, str(exc) if str(item.path) in str(exc) else f"{item.path}: {exc}")
        except Exception as exc:  # noqa: BLE001 - an unexpected failure of one photo must not stop the batch
            fail(item.path, f"{item.path}: {type(exc).__name__}: {exc}")
        bar.update(1)
    bar.close()

    summary.seconds = time.perf_counter() - start
    write_json(out / "tasks.json", tasks)
    write_json(out / "errors.json", [e.to_json() for e in reported])
    write_json(out / "summary.json", {"model_version": version, "seconds": round(summary.seconds, 3),
                                      "photos": [asdict(r) for r in summary.records]})
    (out / "label_config.xml").write_text(config.xml.strip() + "\n", encoding="utf-8")
    for w in writers:
        w.close()
    return summary
