"""Smart-tool masks: a box drawn around an object, or one click on it -> the mask (explainers.segment.interactive).

Objects:

- ``horse_train`` / ``horse_test``: each Weizmann horse, its ground-truth mask's box grown by 5 % (2.5 % of
  its width and height on each side), tag "horse";
- ``coco``: coco128_dev's thing objects, approximated as connected components (at least 1 % of the photo)
  of each thing class's mask (touching instances of a class form one object: the set has class-id
  masks, no instances), tag = the class name (classes ImageNet cannot name get the geometry alone);
  the box grown by 5 % as above;
- ``msrc_dev`` / ``msrc_test``: MSRC-v2's 16 object classes (face and body included), components as for
  COCO, in the split's photos; its void pixels (255) are left out of the scores.

The click is the object pixel farthest from its outline (where an annotator clicks "on" it). Scores:
fg IoU of the answer against the object's mask, mean over objects, and pooled over pixels; p50 / p90
seconds per answer (the engine's part, photo already decoded). A variant changes the prompt settings
(``--set key=value``, :class:`explainers.segment.interactive.PromptConfig`; a tuple's items joined by
"+") or ``--no-prior``.

    TAG2MASK_THREADS=2 python benchmarks/interactive_masks.py --sets horse_test,coco --modes box,click
    TAG2MASK_THREADS=1 python benchmarks/interactive_masks.py --sets horse_train --limit 60 --set prior_low=0.3
    ... --set cam_ensemble=          # a tuple setting: names joined by "+", empty for none
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from horses import HORSE_DIR, spread

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO = Path(os.environ.get("TAG2MASK_COCO_DIR", DATA / "coco128_dev"))
MSRC = Path(os.environ.get("TAG2MASK_MSRC_DIR", DATA / "msrc_v2"))
MSRC_STUFF = {"building", "grass", "tree", "sky", "mountain", "water", "road"}


@dataclass
class Obj:
    photo: Path
    mask: np.ndarray        # bool, the object
    tag: str
    name: str
    valid: np.ndarray | None = None     # pixels that count (None: all)


def grown_box(mask: np.ndarray, grow: float = 0.05) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    dx, dy = grow * (x1 - x0) / 2, grow * (y1 - y0) / 2
    h, w = mask.shape
    return max(0.0, x0 - dx), max(0.0, y0 - dy), min(float(w), x1 + dx), min(float(h), y1 + dy)


def click_point(mask: np.ndarray) -> tuple[float, float]:
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(dist.argmax()), dist.shape)
    return float(x), float(y)


def horse_objects(split: str, limit: int | None) -> list[Obj]:
    from PIL import Image

    names = spread((HORSE_DIR / f"split_{split}.txt").read_text().split(), limit)
    return [Obj(HORSE_DIR / "images" / f"{s}.jpg", np.asarray(Image.open(HORSE_DIR / "masks" / f"{s}.png")) > 0,
                "horse", s) for s in names]


def coco_objects(limit: int | None, min_area: float = 0.01) -> list[Obj]:
    from PIL import Image

    classes = {}
    for line in (COCO / "classes.txt").read_text().splitlines():
        if line.strip():
            k, name = line.split(None, 1)
            classes[int(k)] = name.strip()
    out = []
    for mask_path in sorted((COCO / "masks").glob("*.png")):
        gt = np.asarray(Image.open(mask_path))
        for cid in np.unique(gt):
            name = classes.get(int(cid), "")
            if cid == 0 or not name or int(cid) > 90 or name.endswith("-merged"):   # thing classes only
                continue
            n, comp, stats, _ = cv2.connectedComponentsWithStats((gt == cid).astype(np.uint8), connectivity=8)
            for i in range(1, n):
                if stats[i, cv2.CC_STAT_AREA] >= min_area * gt.size:
                    out.append(Obj(COCO / "images" / f"{mask_path.stem}.jpg", comp == i, name,
                                   f"{mask_path.stem}:{name}:{i}"))
    return spread(out, limit)


def msrc_objects(split: str, limit: int | None, min_area: float = 0.01) -> list[Obj]:
    from PIL import Image

    classes = dict(line.split(None, 1) for line in (MSRC / "classes.txt").read_text().splitlines() if line.strip())
    out = []
    for stem in (MSRC / f"split_{split}.txt").read_text().split():
        gt = np.asarray(Image.open(MSRC / "masks" / f"{stem}.png"))
        valid = gt != 255
        for cid in np.unique(gt[valid]):
            name = classes.get(str(int(cid)), "").strip()
            if not name or name in MSRC_STUFF:
                continue
            n, comp, stats, _ = cv2.connectedComponentsWithStats((gt == cid).astype(np.uint8), connectivity=8)
            for i in range(1, n):
                if stats[i, cv2.CC_STAT_AREA] >= min_area * gt.size:
                    out.append(Obj(MSRC / "images" / f"{stem}.png", comp == i, name, f"{stem}:{name}:{i}", valid))
    return spread(out, limit)


def run(objects: list[Obj], segmenter, mode: str) -> dict:
    from explainers.imageio import load_image
    from explainers.metrics import iou
    from explainers.segment.interactive import Prompt

    ious, inter, union, secs, with_prior = [], 0, 0, [], []
    cache: dict[Path, np.ndarray] = {}
    for o in objects:
        image = cache.get(o.photo)
        if image is None:
            cache.clear()
            image = cache[o.photo] = load_image(o.photo)
        prompt = Prompt(box=grown_box(o.mask)) if mode == "box" else Prompt(positive=(click_point(o.mask),))
        t = time.perf_counter()
        tag = o.tag if segmenter.engine is not None and segmenter.engine.can_segment(o.tag) else None
        pred = segmenter(image, prompt, tag).mask
        secs.append(time.perf_counter() - t)
        if o.valid is not None:
            pred = pred & o.valid
        ious.append(iou(pred, o.mask))
        with_prior.append(tag is not None)
        inter += int(np.logical_and(pred, o.mask).sum())
        union += int(np.logical_or(pred, o.mask).sum())
    ious_a, prior_a = np.array(ious), np.array(with_prior, bool)
    return {"n": len(objects), "mean": float(np.mean(ious)), "n_prior": int(prior_a.sum()),
            "prior": float(ious_a[prior_a].mean()) if prior_a.any() else float("nan"),
            "geometry": float(ious_a[~prior_a].mean()) if (~prior_a).any() else float("nan"), "pooled": inter / max(1, union),
            "p50": float(np.median(secs)), "p90": float(np.percentile(secs, 90))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", default="horse_test,coco")
    ap.add_argument("--modes", default="box,click")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--no-prior", action="store_true", help="geometry only (no class evidence)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a PromptConfig field")
    args = ap.parse_args(argv)

    import torch

    from explainers.segment import PipelineConfig, Tag2Mask
    from explainers.segment.interactive import PromptConfig, PromptSegmenter

    torch.set_num_threads(int(os.environ.get("TAG2MASK_THREADS", "2")))
    cfg = PromptConfig()
    for item in args.set:
        key, value = item.split("=", 1)
        default = getattr(cfg, key)
        cfg = replace(cfg, **{key: tuple(v for v in value.split("+") if v) if isinstance(default, tuple)
                              else type(default)(value)})
    engine = None if args.no_prior else Tag2Mask(args.backbone, PipelineConfig.preset(args.preset))
    segmenter = PromptSegmenter(engine, cfg)
    makers = {"horse_train": lambda: horse_objects("train", args.limit),
              "horse_test": lambda: horse_objects("test", args.limit),
              "coco": lambda: coco_objects(args.limit),
              "msrc_dev": lambda: msrc_objects("dev", args.limit),
              "msrc_test": lambda: msrc_objects("test", args.limit)}
    print(f"prior: {'off' if engine is None else args.backbone + '/' + args.preset}; settings: {cfg}")
    print(f"{'set':12s} {'mode':6s} {'objects':>7s} {'mean fg IoU':>11s} {'pooled':>7s} {'p50 s':>6s} {'p90 s':>6s}  (with class evidence | geometry only)")
    for name in args.sets.split(","):
        objects = makers[name]()
        for mode in args.modes.split(","):
            r = run(objects, segmenter, mode)
            print(f"{name:12s} {mode:6s} {r['n']:7d} {r['mean']:11.3f} {r['pooled']:7.3f} {r['p50']:6.3f} "
                  f"{r['p90']:6.3f}  ({r['n_prior']}: {r['prior']:.3f} | {r['n'] - r['n_prior']}: {r['geometry']:.3f})",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
