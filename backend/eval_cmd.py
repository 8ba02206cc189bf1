"""``tag2mask eval``: segment photos with one tag and score the masks against ground truth.

Photos are matched to masks by stem (``images/horse301.jpg`` <-> ``masks/horse301.png``); a mask pixel
that is not 0 is the object. Scores come from ``explainers.metrics.SegmentationScore``: foreground IoU
and background IoU accumulated over all pixels, mIoU = (bg + fg) / 2, box IoU, seconds per photo
(the pipeline's wall time, photo loading excluded) and the worst photos.

Public API::

    pairs, errors = find_pairs("images/", "masks/", split="split_test.txt", limit=10)
    run = evaluate(engine, pairs, "horse")    # -> EvalRun(summary, photos, errors)
    print(format_summary(run.summary))

``EvalRun.photos`` keeps each photo's prediction, ground truth and CAM (``keep_masks=True``) for the
HTML report of ``--report DIR`` (:mod:`backend.eval_report`: best, median and worst photos).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from backend.labeling import IMAGE_EXTENSIONS, PhotoError

__all__ = ["EvalPhoto", "EvalRun", "find_pairs", "evaluate", "format_summary", "run_eval"]

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


def evaluate(engine, pairs: Sequence[tuple[str, Path, Path]], tag: str, progress: bool = True,
             keep_masks: bool = False, report: Callable[[str], None] | None = None) -> EvalRun:
    """Segment each photo with `tag` and score it; a failing photo is an error entry, the rest go on."""
    from tqdm import tqdm

    from explainers.errors import ExplainersError
    from explainers.imageio import load_image
    from explainers.metrics import SegmentationScore

    score = SegmentationScore()
    run = EvalRun(summary={})
    say = report or (lambda line: tqdm.write(line, file=sys.stderr))
    for stem, image_path, mask_path in tqdm(pairs, unit="photo", desc="eval", disable=not progress, file=sys.stderr):
        try:
            image = load_image(image_path)
            gt = load_mask(mask_path)
            if gt.shape != image.shape[:2]:
                raise ValueError(f"mask {mask_path} is {gt.shape[1]}x{gt.shape[0]}, "
                                 f"photo is {image.shape[1]}x{image.shape[0]}")
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


def _plain(obj):
    """JSON fallback for numpy scalars and arrays."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def run_eval(args) -> int:
    """The command: parse-level checks -> usage errors (2); any failed photo -> 1."""
    from backend.cli import UsageError, check_tags, make_engine

    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    try:
        pairs, errors = find_pairs(args.images, args.masks, args.split, args.limit)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if not pairs and not errors:
        raise UsageError(f"--images {args.images}: no photos to evaluate")
    engine = make_engine(args)
    check_tags(engine, [args.tag], "--tag")
    for e in errors:
        print(f"tag2mask: error: {e.error}", file=sys.stderr)
    report_dir = getattr(args, "report", None)
    run = evaluate(engine, pairs, args.tag, progress=not args.quiet, keep_masks=bool(report_dir))
    run.errors[:0] = errors
    meta = {"tag": args.tag, "backbone": args.backbone, "preset": args.preset, "device": str(engine.backbone.device),
            "errors": [e.error for e in run.errors]}
    if args.json:
        out = dict(run.summary)
        out["worst"] = [[name, round(float(iou), 4)] for name, iou in out.get("worst", [])]
        print(json.dumps({**out, **meta}, indent=1, default=_plain))
    else:
        print(format_summary(run.summary, f"tag2mask eval: tag {args.tag!r}, {args.backbone}, preset "
                                          f"{args.preset}, {meta['device']}"))
        if run.errors:
            print(f"  failed photos     {len(run.errors)}")
    if report_dir:
        from backend.eval_report import write_report

        index = write_report(run, report_dir, args.tag, f"tag {args.tag!r}, {args.backbone}, preset {args.preset}")
        print(f"report: {index}", file=sys.stderr if args.json else sys.stdout)
    return 1 if run.errors or not run.photos else 0
