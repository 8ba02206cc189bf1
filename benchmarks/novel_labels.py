"""Learning curve over labels ImageNet lacks, through the served path: 0, 10, 25, 50 corrected photos.

Labels and data (read-only, shared data folder):

- MSRC-v2 ``face body grass sky road tree building water``: trained on ``split_dev``, scored on
  ``split_test``; a label's mask is its class id's pixels, void (255) is left out of the score;
- coco128_dev ``person``: the photos with a person, in ``--folds`` folds (trained on the other folds,
  scored on the held-out one, pooled over the folds); unlabeled (0) pixels are left out of the score;
- Weizmann ``horse`` (a label ImageNet knows; the horse curve of ``benchmarks/learning_curve.py``
  beside the others): trained on its train split, scored on its test split (photos via
  :mod:`benchmarks.horses`).

For each label and N, a project is trained as ``tag2mask train`` trains it
(:func:`backend.training.trainer.train_and_register`: its validation split, its fusion choice, its
promotion) on the first N photos of a seeded permutation of the photos holding the label (nested:
the 25 contain the 10; all of them when there are fewer than N, said in the note), each with its
corrected mask, plus negatives: ``--negatives`` x N (at least 5) photos of the same source without
the label (MSRC/COCO photos; for horses, MSRC photos), tagged without it, so the project has photos
where the label is absent. The promoted heads are then loaded
as ``tag2mask label --model-dir DIR --project P`` loads them (:func:`backend.serving.offline.load_offline_heads`,
``engine.set_heads``) and every test photo holding the label is segmented with the tag
(``engine.predict``) and scored: fg IoU pooled over the pixels of all test photos.

Columns: ``served`` the served pipeline's fg IoU (N = 0: the engine without heads; "-" when the
classifier cannot name the label); ``head`` the seg head alone (probability > 0.5) on the same
photos, the pipeline's best part; ``train s`` the wall time of the training call (features, heads,
fusion choice, registry); ``fusion`` the fusion weight the version carries ("default": the preset's).

Resolution (issue 13, item 3): ``ceiling`` is the fg IoU of the ground truth itself after a round trip
through the seg head's output grid (the photo squashed to ``size`` x ``size``, the finest feature
stride; area-downsampled, bilinear back, > 0.5): what a perfect seg head could score at its
resolution. ``parts`` is the mean number of connected regions of the label per test photo (several
instances, thin pieces).

    TAG2MASK_THREADS=1 python benchmarks/novel_labels.py --labels face,sky --sizes 10,25 --limit 15
    TAG2MASK_THREADS=1 python benchmarks/novel_labels.py              # every label, 0,10,25,50
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.horses import HORSE_DIR, spread  # noqa: E402
from benchmarks.horses import load as load_horse  # noqa: E402
from benchmarks.horses import stems as horse_stems  # noqa: E402

DATA = HORSE_DIR.parent
MSRC_DIR, COCO_DIR = DATA / "msrc_v2", DATA / "coco128_dev"
MSRC_LABELS = ("face", "body", "grass", "sky", "road", "tree", "building", "water")
LABELS = (*MSRC_LABELS, "person", "horse")


@dataclass
class Photo:
    """A photo that holds the label (or not: a negative): loaders of the photo and its masks."""

    key: str
    load: Callable[[], np.ndarray]
    truth: Callable[[], tuple[np.ndarray, np.ndarray | None]] | None = None   # (label mask, valid pixels)


@dataclass
class Task:
    """One label's data: the fold(s) of (train positives, test positives), and the negatives."""

    label: str
    source: str
    folds: list[tuple[list[Photo], list[Photo]]]
    negatives: list[Photo]
    notes: list[str] = field(default_factory=list)


# -- data -------------------------------------------------------------------------------------------
def _load_rgb(path: Path) -> Callable[[], np.ndarray]:
    from explainers.imageio import load_image

    return lambda: load_image(path)


def _class_truth(path: Path, class_id: int, void: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    def truth():
        from PIL import Image

        ids = np.asarray(Image.open(path))
        return ids == class_id, ids != void
    return truth


def _classes(folder: Path) -> dict[str, int]:
    rows = (line.split(None, 1) for line in (folder / "classes.txt").read_text().splitlines() if line.strip())
    return {name.strip(): int(cid) for cid, name in rows}


def _msrc_tags() -> dict[str, set[int]]:
    return {stem: {int(v) for v in ids} for stem, *ids in
            (line.split() for line in (MSRC_DIR / "tags.txt").read_text().splitlines() if line.strip())}


def _msrc_photo(stem: str, class_id: int | None) -> Photo:
    truth = _class_truth(MSRC_DIR / "masks" / f"{stem}.png", class_id, 255) if class_id is not None else None
    return Photo(stem, _load_rgb(MSRC_DIR / "images" / f"{stem}.png"), truth)


def _msrc_negatives(class_id: int) -> list[Photo]:
    tags = _msrc_tags()
    dev = (MSRC_DIR / "split_dev.txt").read_text().split()
    return [_msrc_photo(s, None) for s in dev if class_id not in tags.get(s, set())]


def msrc_task(label: str, limit: int | None) -> Task:
    cid = _classes(MSRC_DIR)[label]
    tags = _msrc_tags()
    dev, test = ((MSRC_DIR / f"split_{k}.txt").read_text().split() for k in ("dev", "test"))
    train = [_msrc_photo(s, cid) for s in dev if cid in tags.get(s, set())]
    scored = [_msrc_photo(s, cid) for s in spread([s for s in test if cid in tags.get(s, set())], limit)]
    return Task(label, "msrc_v2", [(train, scored)], _msrc_negatives(cid))


def coco_task(label: str, limit: int | None, folds: int) -> Task:
    import csv

    cid = _classes(COCO_DIR)[label]
    rows = [r for r in csv.reader((COCO_DIR / "tags.csv").open()) if r and r[0] != "image"]
    has = {Path(r[0]).stem: label in r[1].split(";") for r in rows}

    def photo(stem: str, with_truth: bool) -> Photo:
        truth = _class_truth(COCO_DIR / "masks" / f"{stem}.png", cid, 0) if with_truth else None
        return Photo(stem, _load_rgb(COCO_DIR / "images" / f"{stem}.jpg"), truth)

    pos = sorted(s for s, v in has.items() if v)
    split = [[s for i, s in enumerate(pos) if i % folds == f] for f in range(folds)]
    per_fold = None if limit is None else max(1, limit // folds)
    out = [([photo(s, True) for g, part in enumerate(split) if g != f for s in part],
            [photo(s, True) for s in spread(split[f], per_fold)]) for f in range(folds)]
    negatives = [photo(s, False) for s, v in sorted(has.items()) if not v]
    return Task(label, f"coco128_dev ({folds} folds)", out, negatives)


def horse_task(limit: int | None) -> Task:
    def photo(stem: str) -> Photo:
        return Photo(stem, lambda: load_horse(stem)[0], lambda: (load_horse(stem)[1], None))

    train = [photo(s) for s in horse_stems("train")]
    test = [photo(s) for s in spread(horse_stems("test"), limit)]
    msrc_horse = _classes(MSRC_DIR)["horse"]
    return Task("horse", "weizmann_horse (negatives: MSRC)", [(train, test)], _msrc_negatives(msrc_horse))


def make_task(label: str, limit: int | None, folds: int) -> Task:
    if label in MSRC_LABELS:
        return msrc_task(label, limit)
    if label == "person":
        return coco_task(label, limit, folds)
    if label == "horse":
        return horse_task(limit)
    raise SystemExit(f"unknown label {label!r}; choose from {', '.join(LABELS)}")


# -- one project ------------------------------------------------------------------------------------
def resolution_grid(backbone, size: int) -> tuple[int, int]:
    """The seg head's output grid for a photo squashed to size x size (its finest feature map)."""
    from explainers.heads import BackboneFeatures

    _, maps = BackboneFeatures(backbone)(backbone.to_tensor(np.zeros((size, size, 3), np.uint8), size))
    return tuple(int(v) for v in maps[0].shape[-2:])


def ceiling_mask(gt: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """`gt` after a round trip through `grid` (area down, bilinear up, > 0.5)."""
    import cv2

    h, w = gt.shape
    small = cv2.resize(gt.astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR) > 0.5


def parts(gt: np.ndarray) -> int:
    import cv2

    return int(cv2.connectedComponents(gt.astype(np.uint8), connectivity=8)[0] - 1)


def train_project(backbone, label: str, positives: list[Photo], negatives: list[Photo], model_dir: Path,
                  project: str, preset: str, config: dict | None = None) -> dict:
    """``tag2mask train``'s training on these photos (loaded beforehand: the time is the training's)."""
    from backend.storage.registry import ModelRegistry
    from backend.training.trainer import train_and_register
    from explainers.training import Sample

    samples = [Sample(f"p-{p.key}", [label], masks={label: p.truth()[0]}, image=p.load()) for p in positives]
    samples += [Sample(f"n-{p.key}", [], image=p.load()) for p in negatives]
    t = time.perf_counter()
    report = train_and_register(samples, project, ModelRegistry.in_model_dir(model_dir), backbone, labels=[label],
                                trigger="benchmark", preset=preset, config=config)
    report["wall_seconds"] = time.perf_counter() - t
    return report


def score(engine, label: str, test: list[Photo], heads=None) -> dict:
    """fg IoU pooled over the test photos' pixels: the served pipeline, and the seg head alone."""
    from explainers.metrics import SegmentationScore

    served, alone = SegmentationScore(), SegmentationScore()
    for p in test:
        img = p.load()
        gt, valid = p.truth()
        result = engine.predict(img, [label])
        masks = {t.tag: t.mask for t in result.tags}
        served.add(masks.get(label, np.zeros(gt.shape, bool)), gt, name=p.key, valid=valid)
        if heads is not None and getattr(heads, "segmenter", None) is not None:
            alone.add(heads.seg_probs(img, [label])[label] >= 0.5, gt, name=p.key, valid=valid)
    out = {"served": served.summary(worst=0)["fg_iou"] if served.n else None}
    out["head"] = alone.summary(worst=0)["fg_iou"] if alone.n else None
    return out


def run_label(task: Task, sizes: list[int], backbone, engine, negatives: float, seed: int, preset: str,
              grid: tuple[int, int], config: dict | None = None) -> list[dict]:
    from backend.serving.offline import load_offline_heads
    from explainers.metrics import SegmentationScore

    rows = []
    tests = [t for _, test in task.folds for t in test]
    ceiling, n_parts = SegmentationScore(), []
    for p in tests:
        gt, valid = p.truth()
        ceiling.add(ceiling_mask(gt, grid), gt, name=p.key, valid=valid)
        n_parts.append(parts(gt))
    shape = {"ceiling": ceiling.summary(worst=0)["fg_iou"], "parts": float(np.mean(n_parts)), "test": len(tests)}
    rng = random.Random(seed)
    neg_order = list(task.negatives)
    rng.shuffle(neg_order)
    orders = []
    for train, _ in task.folds:
        order = list(train)
        random.Random(seed).shuffle(order)
        orders.append(order)
    for n in sizes:
        row = {"label": task.label, "source": task.source, "n": n, **shape}
        if n == 0:
            engine.set_heads(None)
            reason = engine.unusable_reason(task.label)
            if reason is None:
                sums = [score(engine, task.label, test) for _, test in task.folds]
                row.update(_pool(task, sums, "served"))
            else:
                row.update(served=None, note="the classifier cannot name it")
            row["head"] = None
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            continue
        used = min([n, *(len(order) for order in orders)])
        if used < n:
            row["note"] = f"all {used} training photos with the label (fewer than {n})"
        k_neg = max(5, int(round(negatives * used)))
        row["negatives"] = k_neg
        results, secs, fusion, counts, stages = [], [], [], [], []
        for f, ((_, test), order) in enumerate(zip(task.folds, orders)):
            with tempfile.TemporaryDirectory(prefix="novel-") as tmp:
                project = f"bench-{task.label}-{f}"
                report = train_project(backbone, task.label, order[:used], neg_order[:k_neg], Path(tmp), project,
                                       preset, config)
                secs.append(report["wall_seconds"])
                stages.append(report.get("seconds") or {})
                fusion.append(report.get("fusion_weight"))
                counts.append(f"{report['counts']['train']}/{report['counts']['val']}")
                heads = load_offline_heads(tmp, project, backbone)
                engine.set_heads(heads.heads)
                results.append(score(engine, task.label, test, heads.heads))
                engine.set_heads(None)
        row.update(_pool(task, results, "served"), head=_pool(task, results, "head")["head"],
                   train_seconds=float(np.mean(secs)), fusion=fusion, split=counts,
                   stage_seconds={k: round(float(np.mean([st.get(k, 0.0) for st in stages])), 1)
                                  for k in STAGES if any(k in st for st in stages)})
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows


# where a training's time goes (TrainResult.seconds): features, the two heads, validation, the fusion
# choice on the validation photos, the refit on every example
STAGES = ("features", "box_masks", "classifier", "segmenter", "validation", "fusion_tuning", "refit")


def _stages(r: dict) -> str:
    st = r.get("stage_seconds") or {}
    return " / ".join(f"{k} {v:.0f}" for k, v in st.items()) or "-"


def _pool(task: Task, results: list[dict], key: str) -> dict:
    """One number over the folds: their mean (a single fold: its score)."""
    vals = [r[key] for r in results if r.get(key) is not None]
    return {key: float(np.mean(vals)) if vals else None}


# -- the table --------------------------------------------------------------------------------------
def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def format_table(rows: list[dict]) -> str:
    lines = ["| label | source | N | neg | served fg IoU | seg head alone | train s | fusion | train/val "
             "| test photos | ceiling @ head grid | parts/photo | train s by stage | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fusion = ", ".join("default" if w is None else f"{w:g}" for w in r.get("fusion") or []) or "-"
        secs = r.get("train_seconds")
        lines.append(f"| {r['label']} | {r['source']} | {r['n']} | {r.get('negatives', '-')} | {_num(r.get('served'))} "
                     f"| {_num(r.get('head'))} | {'-' if secs is None else f'{secs:.1f}'} | {fusion} "
                     f"| {', '.join(r.get('split') or []) or '-'} | {r['test']} | {_num(r['ceiling'])} "
                     f"| {r['parts']:.1f} | {_stages(r)} | {r.get('note', '')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default=",".join(LABELS), help=f"comma-separated, from: {', '.join(LABELS)}")
    ap.add_argument("--sizes", default="0,10,25,50", help="numbers of corrected photos (0: no trained heads)")
    ap.add_argument("--limit", type=int, default=None, help="score on this many test photos per label (even spread)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: $TAG2MASK_THREADS, else all)")
    ap.add_argument("--negatives", type=float, default=0.5, help="photos without the label, x N (at least 5)")
    ap.add_argument("--folds", type=int, default=2, help="folds of the COCO person photos")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    ap.add_argument("--train-config", metavar="JSON", default=None,
                    help='TrainConfig fields for every training, e.g. \'{"size": 320}\'')
    args = ap.parse_args(argv)

    import torch

    from explainers.backbones import load_backbone
    from explainers.device import set_cpu_threads
    from explainers.segment import PipelineConfig, Tag2Mask
    from explainers.training import TrainConfig

    threads = set_cpu_threads(args.threads)
    labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    backbone = load_backbone(args.backbone, args.device)
    engine = Tag2Mask(backbone, PipelineConfig.preset(args.preset))
    train_config = json.loads(args.train_config) if args.train_config else None
    size = TrainConfig(**(train_config or {})).size
    grid = resolution_grid(backbone, size)
    rows = []
    t0 = time.perf_counter()
    for label in labels:
        rows += run_label(make_task(label, args.limit, args.folds), sizes, backbone, engine, args.negatives,
                          args.seed, args.preset, grid, train_config)
    print(f"\nLabels ImageNet lacks (and horse), served path, backbone {args.backbone}, preset {args.preset}, "
          f"{args.device}, {threads} thread(s) (torch {torch.get_num_threads()}); seg head grid {grid[0]}x{grid[1]} "
          f"at {size}px{'; training ' + json.dumps(train_config) if train_config else ''}; "
          f"{time.perf_counter() - t0:.0f} s in all\n")
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
