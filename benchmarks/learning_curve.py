"""Learning curve: mask quality on the Weizmann test split after 0, 10, 25, 50 corrected photos.

The train split stands in for corrected annotations. For each N, the first N photos of a seeded
permutation of the train split (nested: the 25 contain the 10) train heads
(:func:`explainers.training.train_heads`) on the frozen backbone; the test split scores them.
Every mask row goes through the real pipeline's stages 2-5 (:class:`explainers.segment.Tag2Mask`:
background, fusion with the seg head, dense CRF, clean-up), the CAM stage run once per test photo.

Rows per N:

- ``tags only``: N photos with the tag, no region. Only the classifier head trains; masks stay the
  CAM pipeline's, so the scores equal N = 0 (what labels without masks keep getting);
- ``masks, head alone`` / ``masks, head + CRF``: all N masks train the seg head; its probability
  > 0.5, or its (background, horse) probabilities through the pipeline's dense CRF (no CAM);
- ``masks, fused w=0.7``: the pipeline with the heads at the fixed weight (the old default);
- ``masks 80/20, fused w=0.7`` / ``w=chosen``: what training in the service does: a seeded 80/20
  split (``train_heads``' own), the head trained on the 80 %, the fusion weight chosen on the
  20 %'s masks (:func:`explainers.segment.fusion_tuning.choose_fusion_weight`; fewer than
  ``MIN_MASKS`` masks -> the default 0.7), compared with 0.7 on the same head;
- ``boxes <mode>, head + CRF`` / ``fused w=0.7`` / ``fused w=0.25 (box-only default)``: the same N
  photos with boxes only (one per connected component of the ground-truth mask,
  :func:`explainers.box_masks.boxes_from_mask`), supervised as filled boxes (``box_mode="box"``) or
  GrabCut pseudo-masks (``"grabcut"``); no validation mask, so the service serves them at
  :func:`~explainers.segment.fusion_tuning.fallback_weight` (0.25, chosen on the train split).

A second table gives the test fg IoU of the all-N heads (masks, boxes) at every weight of the grid
(what an oracle would pick). Scores: fg IoU pooled over all test pixels, mean per-photo fg IoU. Train time:
feature extraction of the N photos (once per N, from scratch) + the heads' training (+ GrabCut, +
the weight choice), on this machine's CPU (or the device given), excluding the test evaluation.

    TAG2MASK_THREADS=1 python benchmarks/learning_curve.py
    TAG2MASK_THREADS=1 python benchmarks/learning_curve.py --counts 0,10,50 --test-limit 20 --size 192
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.horses import HORSE_DIR, load, spread, stems  # noqa: E402
from explainers.backbones import load_backbone  # noqa: E402
from explainers.box_masks import boxes_from_mask  # noqa: E402
from explainers.device import set_cpu_threads  # noqa: E402
from explainers.heads import BackboneFeatures  # noqa: E402
from explainers.metrics import SegmentationScore  # noqa: E402
from explainers.segment import PipelineConfig, Tag2Mask  # noqa: E402
from explainers.segment.fusion_tuning import (  # noqa: E402
    WEIGHTS, choose_fusion_weight, fallback_weight, masks_per_weight)
from explainers.training import FeatureCache, ProjectHeads, Sample, TrainConfig, train_heads  # noqa: E402

TAGS = ["horse"]


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


class Bench:
    """The test photos with their CAM outputs (computed once), and the scorers of a trained head."""

    def __init__(self, engine: Tag2Mask, test: list[tuple[str, np.ndarray, np.ndarray]]):
        self.engine, self.test = engine, test
        t0 = time.perf_counter()
        self.cams = {s: engine._cam_output(img, TAGS) for s, img, _ in test}
        self.cam_seconds = (time.perf_counter() - t0) / len(test)

    def cam_pipeline(self) -> SegmentationScore:
        """N = 0: stages 2-5 without heads."""
        score = SegmentationScore()
        for s, img, gt in self.test:
            result, _ = self.engine._from_cam(img, TAGS, self.cams[s], {}, time.perf_counter())
            score.add(result.tags[0].mask, gt, name=s)
        return score

    def head(self, heads: ProjectHeads) -> tuple[SegmentationScore, SegmentationScore]:
        """(seg head alone, seg head + CRF)."""
        alone, crf = SegmentationScore(), SegmentationScore()
        cfg = self.engine.config
        for s, img, gt in self.test:
            p = heads.seg_probs(img)["horse"]
            alone.add(p >= 0.5, gt, name=s)
            crf.add(crf_mask(img, p, cfg.crf, cfg.cam.work_side), gt, name=s)
        return alone, crf

    def fused(self, heads: ProjectHeads, weights) -> dict[float, SegmentationScore]:
        """The pipeline with `heads` at each weight."""
        scores = {float(w): SegmentationScore() for w in weights}
        for s, img, gt in self.test:
            for w, masks in masks_per_weight(self.engine, heads, img, TAGS, weights, cam=self.cams[s]).items():
                scores[w].add(masks["horse"], gt, name=s)
        return scores


def seg_heads(backbone, result) -> ProjectHeads:
    return ProjectHeads(backbone, None, result.segmenter, result.layers, result.size)


def head_seconds(result) -> float:
    """Training seconds of a run on cached features (everything but the feature extraction)."""
    return result.seconds["total"] - result.seconds["features"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="0,10,25,50", help="numbers of corrected photos (0 = CAM pipeline alone)")
    ap.add_argument("--test-limit", type=int, default=None, help="score on this many test photos (even spread)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--preset", default="balanced", help="Tag2Mask preset (CAM stage, CRF)")
    ap.add_argument("--size", type=int, default=256, help="training/inference side of the heads")
    ap.add_argument("--epochs", type=int, default=40, help="seg head epochs")
    ap.add_argument("--fixed-weight", type=float, default=0.7, help="the fixed fusion weight compared with")
    ap.add_argument("--box-modes", default="box,grabcut", help="box supervisions to compare ('' = none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    set_cpu_threads()
    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    box_modes = [m for m in args.box_modes.split(",") if m.strip()]
    fixed = float(args.fixed_weight)

    backbone = load_backbone(args.backbone, args.device)
    engine = Tag2Mask(backbone, PipelineConfig.preset(args.preset))
    bench = Bench(engine, [(s, *load(s)) for s in spread(stems("test"), args.test_limit)])
    order = stems("train")
    random.Random(args.seed).shuffle(order)

    rows: list[tuple[int, str, dict, float | None]] = []      # (N, name, summary, train seconds)
    per_weight: dict[tuple[str, int], dict[float, dict]] = {}      # (supervision, N) -> weight -> summary
    cam_sum = bench.cam_pipeline().summary()
    if 0 in counts:
        rows.append((0, "CAM pipeline alone", cam_sum, None))

    for n in [c for c in counts if c > 0]:
        chosen = [(s, *load(s)) for s in order[:n]]
        cfg = TrainConfig(size=args.size, seg_epochs=args.epochs, seed=args.seed, device=args.device)
        cache = FeatureCache(BackboneFeatures(backbone), args.size, True)
        t = time.perf_counter()
        cache.get([Sample(s, TAGS, image=img) for s, img, _ in chosen])
        feat_s = time.perf_counter() - t

        neg = Sample("neg-gray", [], image=np.full((240, 320, 3), 128, np.uint8))
        r = train_heads(backbone, [Sample(s, TAGS, image=img) for s, img, _ in chosen] + [neg], TAGS, cfg,
                        cache=cache, train_seg_head=False, validation=[])
        rows.append((n, "tags only (classifier head; masks = CAM)", cam_sum, feat_s + head_seconds(r)))

        masks = [Sample(s, TAGS, masks={"horse": gt}, image=img) for s, img, gt in chosen]
        r = train_heads(backbone, masks, TAGS, cfg, cache=cache, train_classifier_head=False, validation=[])
        heads, secs = seg_heads(backbone, r), feat_s + head_seconds(r)
        alone, crf = bench.head(heads)
        by_w = bench.fused(heads, WEIGHTS)
        per_weight[("masks", n)] = {w: sc.summary() for w, sc in by_w.items()}
        rows += [(n, "masks, seg head alone", alone.summary(), secs), (n, "masks, seg head + CRF", crf.summary(), secs),
                 (n, f"masks, fused w={fixed:g}", per_weight[("masks", n)][fixed], secs)]

        r = train_heads(backbone, masks, TAGS, cfg, cache=cache, train_classifier_head=False)
        heads = seg_heads(backbone, r)
        choice = choose_fusion_weight(engine, heads, [s for s in masks if s.key in set(r.val_keys)])
        w = choice.weight if choice.weight is not None else fixed
        secs = feat_s + head_seconds(r) + choice.seconds
        both = bench.fused(heads, sorted({fixed, w}))
        split = f"masks {r.counts['train']}/{r.counts['val']}"
        rows += [(n, f"{split}, fused w={fixed:g}", both[fixed].summary(), secs),
                 (n, f"{split}, fused w=chosen ({w:g}" + (")" if choice.weight is not None else ": too few val masks)"),
                  both[w].summary(), secs)]

        boxes = [Sample(s, TAGS, boxes={"horse": boxes_from_mask(gt)}, image=img) for s, img, gt in chosen]
        for mode in box_modes:
            r = train_heads(backbone, boxes, TAGS, replace(cfg, box_mode=mode), cache=cache,
                            train_classifier_head=False, validation=[])
            heads, secs = seg_heads(backbone, r), feat_s + head_seconds(r)
            _, crf = bench.head(heads)
            by_w = {w: sc.summary() for w, sc in bench.fused(heads, WEIGHTS).items()}
            per_weight[(f"boxes ({mode})", n)] = by_w
            served = fallback_weight(r.counts)
            rows += [(n, f"boxes ({mode}), seg head + CRF", crf.summary(), secs),
                     (n, f"boxes ({mode}), fused w={fixed:g}", by_w[fixed], secs),
                     (n, f"boxes ({mode}), fused w={served:g} (box-only default)", by_w[served], secs)]
        print(f"N = {n} done", file=sys.stderr, flush=True)

    print(f"\nLearning curve on {HORSE_DIR.name}: {len(bench.test)} test photos, backbone {args.backbone}, "
          f"heads at {args.size}px, {args.epochs} epochs, preset {args.preset!r}, device {args.device}, "
          f"{torch.get_num_threads()} CPU thread(s); CAM stage {bench.cam_seconds:.2f} s/photo\n")
    print(f"| {'N':>3} | {'supervision':<52} | fg IoU | mean photo fg IoU | train time (s) |")
    print(f"|----|{'-' * 54}|--------|-------------------|----------------|")
    for n, name, summ, secs in rows:
        t = "-" if secs is None else f"{secs:.1f}"
        print(f"| {n:>3} | {name:<52} | {summ['fg_iou']:.3f}  | {summ['mean_photo_fg_iou']:.3f}"
              f"             | {t:>14} |")
    if per_weight:
        print("\nTest fg IoU of the heads trained on all N at each fusion weight (the pipeline, CRF included):\n")
        print("| supervision | N | " + " | ".join(f"w={w:g}" for w in WEIGHTS) + " |")
        print("|---|---|" + "|".join("------" for _ in WEIGHTS) + "|")
        for (name, n), scores in sorted(per_weight.items()):
            print(f"| {name} | {n} | " + " | ".join(f"{scores[float(w)]['fg_iou']:.3f}" for w in WEIGHTS) + " |")


if __name__ == "__main__":
    main()
