"""Learning curve: mask quality on the Weizmann test split after 0, 10, 25, 50 corrected masks.

The train split stands in for corrected annotations. For each N, the first N photos of a seeded
permutation of the train split (nested: the 25 contain the 10) train a seg head
(:func:`explainers.training.train_heads`, all N used for training, none held out) on the frozen
backbone; the test split scores it. Rows:

- N = 0: the CAM pipeline alone (:class:`explainers.segment.Tag2Mask`, tag "horse") -- what a
  project gets before any correction, and what labels without masks keep getting;
- tags only: N photos with the tag but no mask. Only the classifier head trains (it decides which
  labels a photo gets); masks still come from the CAM pipeline, so the mask scores equal N = 0;
- N masks, head alone: the seg head's probability > 0.5 at the photo's size;
- N masks, head + CRF: the seg head's (background, horse) probabilities through the pipeline's dense
  CRF (:func:`explainers.segment.crf.dense_crf`, the preset's settings, at the pipeline's working size);
- N masks, fused + CRF: ``fuse_with_cam(cam, seg_prob, weight)`` as the horse probability, then the
  same CRF -- a stand-in for the pipeline's fusion that issue 5 asks for (the CAM from the same run).

Scores: fg IoU pooled over all test pixels, mean per-photo fg IoU; train time = feature extraction +
training on this machine's CPU (or the device given), excluding the evaluation.

    TAG2MASK_THREADS=1 python benchmarks/learning_curve.py
    TAG2MASK_THREADS=1 python benchmarks/learning_curve.py --counts 0,10,25 --test-limit 20 --size 192
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explainers.backbones import load_backbone  # noqa: E402
from explainers.device import set_cpu_threads  # noqa: E402
from explainers.heads import fuse_with_cam  # noqa: E402
from explainers.imageio import load_image  # noqa: E402
from explainers.metrics import SegmentationScore  # noqa: E402
from explainers.training import FeatureCache, ProjectHeads, Sample, TrainConfig, train_heads  # noqa: E402
from explainers.heads import BackboneFeatures  # noqa: E402

HORSE_DIR = Path(os.environ.get("TAG2MASK_HORSE_DIR",
                                Path(__file__).resolve().parents[2] / "shared/data/weizmann_horse"))


def stems(split: str) -> list[str]:
    return (HORSE_DIR / f"split_{split}.txt").read_text().split()


def load(stem: str) -> tuple[np.ndarray, np.ndarray]:
    img = load_image(HORSE_DIR / "images" / f"{stem}.jpg")
    return img, np.asarray(Image.open(HORSE_DIR / "masks" / f"{stem}.png")) > 0


def spread(names: list[str], limit: int | None) -> list[str]:
    if not limit or limit >= len(names):
        return names
    step = len(names) / limit
    return [names[int(i * step)] for i in range(limit)]


def crf_mask(img: np.ndarray, fg: np.ndarray, crf_cfg, work_side: int) -> np.ndarray:
    """(H, W) foreground probability -> bool mask: dense CRF over (background, fg) at the working size."""
    import cv2

    from explainers.segment.cam_stage import working_size
    from explainers.segment.crf import dense_crf

    h, w = img.shape[:2]
    wh, ww = working_size(h, w, work_side)
    small = cv2.resize(img, (ww, wh), interpolation=cv2.INTER_AREA) if (wh, ww) != (h, w) else img
    p = cv2.resize(fg.astype(np.float32), (ww, wh), interpolation=cv2.INTER_LINEAR)
    p = np.clip(p, 1e-3, 1 - 1e-3)
    marg = dense_crf(np.ascontiguousarray(small), np.stack([1 - p, p]).astype(np.float32), crf_cfg)
    fg_full = cv2.resize(marg[1], (w, h), interpolation=cv2.INTER_LINEAR)
    return fg_full > 0.5


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="0,10,25,50", help="numbers of corrected masks (0 = CAM pipeline alone)")
    ap.add_argument("--test-limit", type=int, default=None, help="score on this many test photos (even spread)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--preset", default="balanced", help="Tag2Mask preset for the CAM rows")
    ap.add_argument("--size", type=int, default=256, help="training/inference side of the heads")
    ap.add_argument("--epochs", type=int, default=40, help="seg head epochs")
    ap.add_argument("--fuse-weight", type=float, default=0.7, help="weight of the seg head in the fused row")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    set_cpu_threads()
    counts = [int(c) for c in args.counts.split(",") if c.strip()]

    backbone = load_backbone(args.backbone, args.device)
    test = [(s, *load(s)) for s in spread(stems("test"), args.test_limit)]
    order = stems("train")
    random.Random(args.seed).shuffle(order)

    # the CAM pipeline once per test photo: masks (N = 0 row) and CAMs (fused rows)
    from explainers.segment import PipelineConfig, Tag2Mask

    engine = Tag2Mask(backbone, PipelineConfig.preset(args.preset))
    cam_score, cams, t0 = SegmentationScore(), {}, time.perf_counter()
    for s, img, gt in test:
        r = engine.predict(img, ["horse"])
        cam_score.add(r.tags[0].mask, gt, name=s)
        cams[s] = r.cams["horse"]
    cam_seconds = (time.perf_counter() - t0) / len(test)

    rows = []
    cam_sum = cam_score.summary()
    if 0 in counts:
        rows.append(("0 (CAM pipeline alone)", cam_sum, 0.0))

    for n in [c for c in counts if c > 0]:
        chosen = [(s, *load(s)) for s in order[:n]]
        cfg = TrainConfig(size=args.size, seg_epochs=args.epochs, seed=args.seed, device=args.device)
        # tags only: the classifier head trains; masks stay the CAM pipeline's
        t = time.perf_counter()
        fresh = FeatureCache(BackboneFeatures(backbone), args.size, True)   # timed from scratch
        neg = [Sample("neg-gray", [], image=np.full((240, 320, 3), 128, np.uint8))]
        train_heads(backbone, [Sample(s, ["horse"], image=img) for s, img, _ in chosen] + neg, ["horse"], cfg,
                    cache=fresh, train_seg_head=False, validation=[])
        rows.append((f"{n} tags only (classifier head; masks = CAM)", cam_sum, time.perf_counter() - t))

        samples = [Sample(s, ["horse"], masks={"horse": gt}, image=img) for s, img, gt in chosen]
        t = time.perf_counter()
        fresh = FeatureCache(BackboneFeatures(backbone), args.size, True)
        result = train_heads(backbone, samples, ["horse"], cfg, cache=fresh, train_classifier_head=False,
                             validation=[])
        seconds = time.perf_counter() - t
        heads = ProjectHeads(backbone, None, result.segmenter, result.layers, result.size)
        alone, crf, fused = SegmentationScore(), SegmentationScore(), SegmentationScore()
        for s, img, gt in test:
            p = heads.seg_probs(img)["horse"]
            alone.add(p >= 0.5, gt, name=s)
            crf.add(crf_mask(img, p, engine.config.crf, engine.config.cam.work_side), gt, name=s)
            fused.add(crf_mask(img, fuse_with_cam(cams[s], p, args.fuse_weight), engine.config.crf,
                               engine.config.cam.work_side), gt, name=s)
        rows.append((f"{n} masks, seg head alone", alone.summary(), seconds))
        rows.append((f"{n} masks, seg head + CRF", crf.summary(), seconds))
        rows.append((f"{n} masks, fused with CAM (w={args.fuse_weight}) + CRF", fused.summary(), seconds))

    print(f"\nLearning curve on {HORSE_DIR.name}: {len(test)} test photos, backbone {args.backbone}, "
          f"heads at {args.size}px, {args.epochs} epochs, CAM preset {args.preset!r}, device {args.device}, "
          f"{torch.get_num_threads()} CPU thread(s); CAM pipeline {cam_seconds:.2f} s/photo\n")
    print(f"| {'corrected examples':<46} | fg IoU | mean photo fg IoU | train time (s) |")
    print(f"|{'-' * 48}|--------|-------------------|----------------|")
    for name, summ, secs in rows:
        print(f"| {name:<46} | {summ['fg_iou']:.3f}  | {summ['mean_photo_fg_iou']:.3f}             | {secs:14.1f} |")


if __name__ == "__main__":
    main()
