"""Masks for a label ImageNet never had, learned from tags only (issue 5), against the ImageNet path.

For each N, the first N photos of a seeded permutation of the Weizmann train split (nested: the 25
contain the 10) are tagged "pony-photo" and a fixed set of skimage photos "other-scene"; only the
classifier head trains (:func:`explainers.training.train_heads`, no mask read, none held out). The
test split (49 horses) is then segmented by :class:`explainers.segment.Tag2Mask` with those heads:

- ImageNet CAM, tag "horse": the zero-shot pipeline (the backbone's ImageNet classifier);
- head CAM, tag "pony-photo": the CAM of the project's classifier head
  (:mod:`explainers.segment.head_cam`). The label's name plays no part, so this row is also what
  ``fusion.head_cam = "always"`` gives a project label "horse" trained on the same photos;
- head CAM, positives only: the same N horses without the negatives: every training photo carries
  the label, so the head never learns where it is absent -- what "always" risks on a project whose
  examples all carry a label ImageNet knows (why the default is "unknown").

Scores: fg IoU and mIoU pooled over all test pixels, mean per-photo fg IoU; train time = feature
extraction + classifier training from scratch on this machine (or the device given).

    TAG2MASK_THREADS=1 python benchmarks/head_cam.py
    TAG2MASK_THREADS=1 python benchmarks/head_cam.py --counts 10 --test-limit 20
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage import color, data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.horses import HORSE_DIR, load, spread, stems  # noqa: E402
from explainers.backbones import load_backbone  # noqa: E402
from explainers.device import set_cpu_threads  # noqa: E402
from explainers.heads import BackboneFeatures  # noqa: E402
from explainers.metrics import SegmentationScore  # noqa: E402
from explainers.segment import PipelineConfig, Tag2Mask  # noqa: E402
from explainers.training import FeatureCache, ProjectHeads, Sample, TrainConfig, train_heads  # noqa: E402

NEGATIVES = ("astronaut", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera", "brick",
             "text", "chelsea", "stereo_motorcycle", "coins", "clock")


def skimage_photo(name: str) -> np.ndarray:
    """An skimage.data photo as RGB uint8."""
    x = getattr(data, name)()
    x = x[0] if isinstance(x, tuple) else x
    return x if x.ndim == 3 else color.gray2rgb(x)


def score(engine: Tag2Mask, test, tag: str) -> tuple[dict, float]:
    """(SegmentationScore summary, seconds per photo) of `tag`'s masks on the test photos."""
    s, t = SegmentationScore(), time.perf_counter()
    for name, img, gt in test:
        s.add(engine.predict(img, [tag]).tags[0].mask, gt, name=name)
    return s.summary(), (time.perf_counter() - t) / len(test)


def train(backbone, samples, labels, size: int, seed: int) -> tuple[ProjectHeads, float]:
    """Classifier head on tags only, features extracted from scratch -> (heads, seconds)."""
    t = time.perf_counter()
    cache = FeatureCache(BackboneFeatures(backbone), size, True)
    result = train_heads(backbone, samples, labels, TrainConfig(size=size, seed=seed), cache=cache,
                         train_seg_head=False, validation=[])
    return ProjectHeads(backbone, result.classifier, None, result.layers, result.size), time.perf_counter() - t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="10,25,50", help="numbers of train horses tagged pony-photo")
    ap.add_argument("--positives-only", type=int, default=25,
                    help="N of the positives-only row (0 = leave the row out)")
    ap.add_argument("--test-limit", type=int, default=None, help="score on this many test photos (even spread)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--size", type=int, default=224, help="training side of the classifier head")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    set_cpu_threads()
    counts = [int(c) for c in args.counts.split(",") if c.strip()]

    backbone = load_backbone(args.backbone, args.device)
    config = PipelineConfig.preset(args.preset)
    test = [(s, *load(s)) for s in spread(stems("test"), args.test_limit)]
    order = stems("train")
    random.Random(args.seed).shuffle(order)
    negatives = [Sample(f"neg-{n}", ["other-scene"], image=skimage_photo(n)) for n in NEGATIVES]

    rows = [("ImageNet CAM, tag horse (zero-shot)", "-", *score(Tag2Mask(backbone, config), test, "horse"), 0.0)]
    for n in counts:
        positives = [Sample(s, ["pony-photo"], image=load(s)[0]) for s in order[:n]]
        heads, seconds = train(backbone, positives + negatives, ["pony-photo", "other-scene"], args.size, args.seed)
        rows.append((f"head CAM, tag pony-photo, N = {n}", f"{n} + {len(negatives)}",
                     *score(Tag2Mask(backbone, config, heads=heads), test, "pony-photo"), seconds))
    if args.positives_only:
        n = args.positives_only
        positives = [Sample(s, ["pony-photo"], image=load(s)[0]) for s in order[:n]]
        heads, seconds = train(backbone, positives, ["pony-photo"], args.size, args.seed)
        rows.append((f"head CAM, positives only, N = {n}", f"{n} + 0",
                     *score(Tag2Mask(backbone, config, heads=heads), test, "pony-photo"), seconds))

    print(f"\nHead CAM on {HORSE_DIR.name}: {len(test)} test photos, backbone {args.backbone}, preset {args.preset!r}, "
          f"head at {args.size}px, device {args.device}, {torch.get_num_threads()} CPU thread(s)\n")
    print(f"| {'path':<38} | photos (horses + others) | fg IoU | mIoU  | photo fg IoU | s/photo | train (s) |")
    print(f"|{'-' * 40}|--------------------------|--------|-------|--------------|---------|-----------|")
    for name, photos, summ, per_photo, secs in rows:
        print(f"| {name:<38} | {photos:<24} | {summ['fg_iou']:.3f}  | {summ['miou']:.3f} | "
              f"{summ['mean_photo_fg_iou']:.3f}        | {per_photo:7.2f} | {secs:9.1f} |")


if __name__ == "__main__":
    main()
