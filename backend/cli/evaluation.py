"""Scoring for ``tag2mask eval`` (the command is backend.cli.eval): segment photos with their tags and
score the masks against ground truth.

Two kinds of ground truth, photos matched to masks by stem (``images/horse301.jpg`` <-> ``masks/horse301.png``):

- **binary masks, one tag** (``--tag horse``): a mask pixel that is not 0 is the object. Scores come from
  ``explainers.metrics.SegmentationScore``: foreground IoU and background IoU accumulated over all
  pixels, mIoU = (bg + fg) / 2, box IoU, seconds per photo (the pipeline's wall time, photo loading
  excluded) and the worst photos.
- **class-id masks** (``--classes FILE``: "id name" per line): each pixel holds a class id. A photo's
  tags are class names, from a tags file (``--tags-csv``: rows ``image,name1;name2`` or lines
  ``stem id id ...``) or from the ids present in its mask (``--tags-from-mask``); pixels whose id is
  in ``--ignore`` are left out of every count. The photo is segmented once with all its coverable tags
  together (the tags compete, as in ``tag2mask label``); the predicted mask of each tag is scored
  against the ground-truth mask of its class (``explainers.metrics.ClassScores``): fg IoU pooled over
  pixels per class, then the mean over classes, mIoU, per-class box IoU and per-photo scores (the mean
  of its tags' IoUs). A class name that the classifier cannot map (a refused or unknown tag: person,
  sky-other-merged ...) is "not coverable": left out of the photo's tags and of every mean, and
  reported with the reason and its number of photos.

With ``--project P --model-dir DIR`` the engine carries the project's promoted heads (``backend.serving.offline``,
as the service serves that project): their labels are coverable tags too (a class named like a trained
label, "face" or "Pony photo", is scored through the served pipeline), and the report names the model
version (``<base>+p<P>.vN``; ``"model_version"`` and ``"project"`` in ``--json``).

Public API::

    pairs, errors = find_pairs("images/", "masks/", split="split_test.txt", limit=10)
    run = evaluate(engine, pairs, "horse")    # -> EvalRun(summary, photos, errors)
    print(format_summary(run.summary))

    classes = read_classes("classes.txt")                       # {id: name}
    tags = read_photo_tags("tags.csv", classes)                 # {stem: [id, ...]}, or None: from the masks
    run = evaluate_classes(engine, pairs, classes, tags, ignore={255})
    print(format_class_summary(run.summary))

``EvalRun.photos`` keeps each photo's prediction, ground truth and CAM (``keep_masks=True``) for the
HTML report of ``--report DIR`` (:mod:`backend.cli.report`: best, median and worst photos; in
class mode also the classes, worst first, and the classes that are not coverable).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from backend.cli.labeling import IMAGE_EXTENSIONS, PhotoError

__all__ = ["EvalPhoto", "EvalRun", "find_pairs", "evaluate", "read_classes", "read_photo_tags", "load_label_mask",
           "evaluate_classes"]

MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff", ".gif", ".jpg", ".jpeg")


@dataclass
class EvalPhoto:
    name: str
    iou: float
    seconds: float
    image: Path
    mask: Path
    pred: np.ndarray | None = None
    gt: np.ndarray | None = None
    cam: np.ndarray | None = None
    tags: dict[str, float] | None = None
    """Class mode: fg IoU of each scored tag; `iou` is their mean, `pred`/`gt` are label maps
    (0 = none, k = the k-th tag of `tags`) and `cam` is the CAM of `cam_tag`, the photo's worst tag."""
    cam_tag: str | None = None


@dataclass
class EvalRun:
    summary: dict
    photos: list[EvalPhoto] = field(default_factory=list)
    errors: list[PhotoError] = field(default_factory=list)


def _find(folder: Path, stem: str, extensions: Sequence[str]) -> Path | None:
    for ext in extensions:
        for candidate in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def find_pairs(images_dir: str | Path, masks_dir: str | Path, split: str | Path | None = None,
               limit: int | None = None) -> tuple[list[tuple[str, Path, Path]], list[PhotoError]]:
    """(stem, photo, mask) for each photo of the split (default: every photo in `images_dir`, sorted).

    Raises FileNotFoundError for a missing folder or split file; a stem without its photo or mask
    is an error entry.
    """
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d, what in ((images_dir, "--images"), (masks_dir, "--masks")):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} {d}: no such folder")
    if split is not None:
        if not Path(split).is_file():
            raise FileNotFoundError(f"--split {split}: no such file")
        stems = list(dict.fromkeys(Path(split).read_text(encoding="utf-8").split()))
    else:
        stems = sorted({p.stem for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS})
    if limit is not None:
        stems = stems[:max(0, limit)]
    pairs, errors = [], []
    for stem in stems:
        image = _find(images_dir, stem, sorted(IMAGE_EXTENSIONS))
        mask = _find(masks_dir, stem, MASK_EXTENSIONS)
        if image is None:
            errors.append(PhotoError(stem, f"{images_dir}/{stem}.*: no such photo"))
        elif mask is None:
            errors.append(PhotoError(str(image), f"{image}: no ground-truth mask {masks_dir}/{stem}.png"))
        else:
            pairs.append((stem, image, mask))
    return pairs, errors


def load_mask(path: Path) -> np.ndarray:
    """A ground-truth mask file -> bool (H, W): any non-zero pixel (any channel) is the object."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im)
    return arr.any(axis=2) if arr.ndim == 3 else arr > 0


def _photo_and_mask(image_path: Path, mask_path: Path, load) -> tuple[np.ndarray, np.ndarray]:
    """The photo and its mask read by `load` (ValueError when their sizes differ)."""
    from explainers.imageio import load_image

    image, gt = load_image(image_path), load(mask_path)
    if gt.shape != image.shape[:2]:
        raise ValueError(f"mask {mask_path} is {gt.shape[1]}x{gt.shape[0]}, photo is {image.shape[1]}x{image.shape[0]}")
    return image, gt


def evaluate(engine, pairs: Sequence[tuple[str, Path, Path]], tag: str, progress: bool = True,
             keep_masks: bool = False, report: Callable[[str], None] | None = None) -> EvalRun:
    """Segment each photo with `tag` and score it; a failing photo is an error entry, the rest go on."""
    from tqdm import tqdm

    from explainers.errors import ExplainersError
    from explainers.metrics import SegmentationScore

    score = SegmentationScore()
    run = EvalRun(summary={})
    say = report or (lambda line: tqdm.write(line, file=sys.stderr))
    for stem, image_path, mask_path in tqdm(pairs, unit="photo", desc="eval", disable=not progress, file=sys.stderr):
        try:
            image, gt = _photo_and_mask(image_path, mask_path, load_mask)
            t0 = time.perf_counter()
            result = engine.predict(image, [tag])
            seconds = time.perf_counter() - t0
        except (ExplainersError, ValueError, OSError) as exc:
            message = str(exc) if str(image_path) in str(exc) else f"{image_path}: {exc}"
            run.errors.append(PhotoError(str(image_path), message))
            say(f"error: {message}")
            continue
        pred = result.tags[0].mask.astype(bool)
        iou = float(score.add(pred, gt, seconds=seconds, name=stem))
        cam = result.cams.get(tag) if keep_masks else None
        run.photos.append(EvalPhoto(stem, iou, seconds, image_path, mask_path,
                                    pred if keep_masks else None, gt if keep_masks else None, cam))
    run.summary = score.summary() if run.photos else {"n": 0}
    return run


# -- class-id masks ----------------------------------------------------------------------------------
def read_classes(path: str | Path) -> dict[int, str]:
    """A classes table, "id name" per line (the name may hold spaces; blank lines and "#" lines are
    skipped) -> {id: name}. Raises ValueError (with the line number) for a bad line or a repeated
    id or name."""
    classes: dict[int, str] = {}
    seen: dict[str, int] = {}
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'id name', got {line!r}")
        cid, name = int(parts[0]), " ".join(parts[1].split())
        if cid in classes:
            raise ValueError(f"{path}:{lineno}: class id {cid} is listed twice")
        if name.lower() in seen:
            raise ValueError(f"{path}:{lineno}: class name {name!r} is listed twice "
                             f"(ids {seen[name.lower()]} and {cid})")
        classes[cid] = name
        seen[name.lower()] = cid
    if not classes:
        raise ValueError(f"{path}: no classes in it (expected 'id name' lines)")
    return classes


def _class_of(token: str, classes: dict[int, str], by_name: dict[str, int]) -> int | None:
    key = " ".join(token.split()).lower()
    if key in by_name:
        return by_name[key]
    if key.isdigit() and int(key) in classes:
        return int(key)
    return None


def read_photo_tags(path: str | Path, classes: dict[int, str]) -> dict[str, list[int]]:
    """Each photo's tags -> {stem: [class id, ...]}. A line is either a CSV row ``image,tag1;tag2``
    (image = file name or stem; a first row "image,..." is a header) or, without a comma, ``stem tag
    tag ...`` separated by spaces. A tag is a class name of `classes` (any case) or its id.
    Blank lines and "#" lines are skipped. Raises ValueError (with the line number) for a tag that
    is not in the classes table or a line without tags."""
    import csv

    by_name = {name.lower(): cid for cid, name in classes.items()}
    out: dict[str, list[int]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if "," in text:
                cells = [c.strip() for c in next(csv.reader([text]))]
                if lineno == 1 and cells[0].lower() in ("image", "photo", "file", "filename", "stem"):
                    continue
                image, tokens = cells[0], [t for c in cells[1:] for t in c.split(";") if t.strip()]
            else:
                image, *tokens = text.split()
            if not image or not tokens:
                raise ValueError(f"{path}:{lineno}: expected 'image,tag1;tag2' or 'stem tag tag ...', got {text!r}")
            ids = []
            for token in tokens:
                cid = _class_of(token, classes, by_name)
                if cid is None:
                    raise ValueError(f"{path}:{lineno}: tag {token.strip()!r} of {image} is not in the classes table")
                ids.append(cid)
            stem = Path(image).stem if Path(image).suffix.lower() in IMAGE_EXTENSIONS else image
            out[stem] = list(dict.fromkeys(out.get(stem, []) + ids))
    return out


def load_label_mask(path: Path) -> np.ndarray:
    """A class-id mask file -> (H, W) integer array of ids (a palette PNG gives its indices).
    Raises ValueError for a colour (RGB) mask, whose pixels are not ids."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
            raise ValueError(f"mask {path} is a colour ({im.mode}) image; class-id masks hold one id per pixel "
                             "(8- or 16-bit grayscale or palette PNG)")
        arr = np.asarray(im)
    if arr.ndim != 2:
        raise ValueError(f"mask {path} has shape {arr.shape}; expected one id per pixel (H, W)")
    return arr.astype(np.int64, copy=False)


def _coverage(engine, classes: dict[int, str]) -> tuple[dict[int, str], dict[int, str]]:
    """({id: name} of the classes the engine can segment -- the classifier names them, or the
    project's trained heads know them -- and {id: reason} of the others)."""
    coverable, not_coverable = {}, {}
    for cid, name in classes.items():
        reason = engine.unusable_reason(name)
        if reason is None:
            coverable[cid] = name
        else:
            not_coverable[cid] = reason
    return coverable, not_coverable


def evaluate_classes(engine, pairs: Sequence[tuple[str, Path, Path]], classes: dict[int, str],
                     photo_tags: dict[str, list[int]] | None = None, ignore: Sequence[int] = (),
                     progress: bool = True, keep_masks: bool = False,
                     report: Callable[[str], None] | None = None) -> EvalRun:
    """Segment each photo with its coverable tags (from `photo_tags`, or the ids in its mask when None)
    and score each tag's mask against its class's pixels; `ignore`: ids left out of every count.
    A failing photo is an error entry, the rest go on. ``run.summary`` is
    :meth:`explainers.metrics.ClassScores.summary` plus "not_coverable" {name: {id, photos, reason}}
    and "photos_without_coverable_tags" (not-coverable tags: those of the photos that were scored or
    had no coverable tag; the photos that failed are not counted)."""
    from tqdm import tqdm

    from explainers.errors import ExplainersError
    from explainers.metrics import ClassScores

    coverable, reasons = _coverage(engine, classes)
    ignored = sorted(set(int(v) for v in ignore))
    scores = ClassScores()
    run = EvalRun(summary={})
    missed: dict[int, int] = {}     # not-coverable class id -> photos tagged with it
    bare = 0                        # photos without a coverable tag
    say = report or (lambda line: tqdm.write(line, file=sys.stderr))
    for stem, image_path, mask_path in tqdm(pairs, unit="photo", desc="eval", disable=not progress, file=sys.stderr):
        try:
            image, gt = _photo_and_mask(image_path, mask_path, load_label_mask)
            if photo_tags is None:
                ids = [int(v) for v in np.unique(gt) if int(v) not in ignored]
                unknown = [v for v in ids if v not in classes]
                if unknown:
                    raise ValueError(f"mask {mask_path} holds class ids {', '.join(map(str, unknown))} "
                                     "that the classes table does not list")
            elif stem in photo_tags:
                ids = [v for v in photo_tags[stem] if v not in ignored]
            else:
                raise ValueError(f"{image_path}: the tags file has no row for {stem}")
            lacking = [v for v in ids if v not in coverable]
            ids = [v for v in ids if v in coverable]
            if not ids:
                bare += 1
                for v in lacking:
                    missed[v] = missed.get(v, 0) + 1
                continue
            tags = [coverable[v] for v in ids]
            t0 = time.perf_counter()
            result = engine.predict(image, tags)
            seconds = time.perf_counter() - t0
        except (ExplainersError, ValueError, OSError) as exc:
            message = str(exc) if str(image_path) in str(exc) or str(mask_path) in str(exc) else f"{image_path}: {exc}"
            run.errors.append(PhotoError(str(image_path), message))
            say(f"error: {message}")
            continue
        for v in lacking:
            missed[v] = missed.get(v, 0) + 1
        valid = ~np.isin(gt, ignored) if ignored else None
        masks = {t.tag: t.mask.astype(bool) for t in result.tags}
        preds = [masks.get(tag, np.zeros(gt.shape, bool)) for tag in tags]   # a tag given no mask: empty
        ious = scores.add_photo(stem, {tag: (pred, gt == v) for tag, pred, v in zip(tags, preds, ids)},
                                valid=valid, seconds=seconds)
        photo = EvalPhoto(stem, ClassScores.photo_score(ious), seconds, image_path, mask_path, tags=ious)
        if keep_masks:
            photo.pred = np.zeros(gt.shape, np.uint8)
            photo.gt = np.zeros(gt.shape, np.uint8)
            for k, (pred, v) in enumerate(zip(preds, ids), start=1):
                photo.pred[pred] = k
                photo.gt[gt == v] = k
            photo.cam_tag = min(ious, key=ious.get)
            photo.cam = result.cams.get(photo.cam_tag)
        run.photos.append(photo)
    run.summary = scores.summary()
    run.summary["photos_without_coverable_tags"] = bare
    run.summary["not_coverable"] = {classes[v]: {"id": v, "photos": n, "reason": reasons[v]}
                                    for v, n in sorted(missed.items(), key=lambda kv: (-kv[1], classes[kv[0]]))}
    return run


def format_class_summary(summary: dict, title: str = "") -> str:
    """The human-readable report of class mode: the means, every scored class (worst first), the worst
    photos and the tags that are not coverable (with their numbers of photos)."""
    lines = [title] if title else []

    def num(v):
        return "n/a" if v is None or v != v else f"{v:.3f}"

    missing = summary.get("not_coverable", {})
    if not summary.get("n"):
        lines.append("no photo could be scored")
    else:
        bare = summary.get("photos_without_coverable_tags", 0)
        lines += [
            f"  photos            {summary['n']}" + (f"   ({bare} more without a coverable tag)" if bare else ""),
            f"  classes           {summary['n_classes']} scored, {len(missing)} not coverable",
            f"  mean fg IoU       {num(summary['mean_fg_iou'])}   per class fg IoU over its pixels, mean over classes",
            f"  mean bg IoU       {num(summary['mean_bg_iou'])}",
            f"  mean IoU          {num(summary['miou'])}   per class (bg + fg) / 2, mean over classes",
            f"  mean photo score  {num(summary['mean_photo_score'])}   photos' mean tag fg IoU, averaged",
            f"  box IoU           {num(summary['box_iou'])}   per class, mean over classes",
            f"  seconds / photo   {num(summary['seconds_per_photo'])}",
            "  per class, worst first: fg IoU, box IoU, photos",
        ]
        width = max(len(name) for name in summary["classes"])
        for name, c in sorted(summary["classes"].items(), key=lambda kv: (kv[1]["fg_iou"], kv[0])):
            lines.append(f"    {name:{width}s}  {num(c['fg_iou'])}  {num(c['box_iou'])}  {c['photos']}")
        worst = summary.get("worst") or []
        if worst:
            lines.append("  worst photos      " + ", ".join(f"{name} {v:.3f}" for name, v in worst[:5]))
    if missing:
        lines.append("  not coverable     " + ", ".join(f"{name} ({c['photos']})" for name, c in missing.items())
                     + "   (photos; reasons in --json / --report)")
    return "\n".join(lines)



def format_summary(summary: dict, title: str = "") -> str:
    """The human-readable report printed by ``tag2mask eval``."""
    lines = [title] if title else []
    if not summary.get("n"):
        return "\n".join(lines + ["no photo could be scored"])

    def num(key):
        v = summary.get(key)
        return "n/a" if v is None else f"{v:.3f}"

    lines += [
        f"  photos            {summary['n']}",
        f"  foreground IoU    {num('fg_iou')}",
        f"  background IoU    {num('bg_iou')}",
        f"  mean IoU          {num('miou')}   (bg + fg) / 2, over all pixels",
        f"  mean photo IoU    {num('mean_photo_fg_iou')}   foreground IoU averaged over photos",
        f"  box IoU           {num('box_iou')}",
        f"  seconds / photo   {num('seconds_per_photo')}",
    ]
    worst = summary.get("worst") or []
    if worst:
        lines.append("  worst photos      " + ", ".join(f"{name} {iou:.3f}" for name, iou in worst[:5]))
    return "\n".join(lines)
