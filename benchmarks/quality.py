"""Mask quality of tag2mask next to a plain Grad-CAM anchor, on the Weizmann horse photos.

Both run on the same photos with the same backbone, in one process:

- anchor: pytorch-grad-cam's ``GradCAM`` at 224 x 224 on the backbone's CAM layer, for the tag's
  class set (log-sum-exp of its logits), upsampled to the photo and cut at the best fixed
  threshold, chosen on the train photos used (``--train``);
- tag2mask: :class:`explainers.segment.Tag2Mask` with a preset and the ablation switches given.

Prints fg IoU (pooled over pixels), mIoU (fg/bg), mean per-photo fg IoU, box IoU and s/photo.

    TAG2MASK_THREADS=1 python benchmarks/quality.py --split test --preset balanced
    TAG2MASK_THREADS=1 python benchmarks/quality.py --split train --limit 40 --no-crf

Self-training (``--self-train SOURCE``, :mod:`explainers.self_training`): a seg head is trained on the
pipeline's own pseudo-masks of the SOURCE photos (no ground-truth mask is read for it) and fused with
the CAMs; rows for the fused pipeline (one per ``--fusion-weights``) and for the head alone are
printed under the plain pipeline's. SOURCE: ``split`` = the photos being scored (transductive),
``train`` = the train split's photos (``--st-limit`` of them), ``all`` = all photos of both splits.

    TAG2MASK_THREADS=1 python benchmarks/quality.py --split test --self-train train
    TAG2MASK_THREADS=1 python benchmarks/quality.py --split train --limit 60 --self-train train --st-set band=0.04
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explainers.backbones import load_backbone  # noqa: E402
from explainers.device import set_cpu_threads  # noqa: E402
from explainers.hooks import get_layer  # noqa: E402
from explainers.imageio import load_image  # noqa: E402
from explainers.metrics import SegmentationScore  # noqa: E402
from explainers.segment import PipelineConfig, Tag2Mask  # noqa: E402
from explainers.self_training import SelfTrainConfig, self_train  # noqa: E402
from explainers.tags import resolve_tag  # noqa: E402

HORSE_DIR = Path(os.environ.get("TAG2MASK_HORSE_DIR",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "weizmann_horse"))


def stems(split: str, limit: int | None) -> list[str]:
    if split == "all":
        names = [*stems("train", None), *stems("test", None)]
    else:
        names = (HORSE_DIR / f"split_{split}.txt").read_text().split()
    if limit and limit < len(names):
        step = len(names) / limit                   # an even spread over the split, deterministic
        names = [names[int(i * step)] for i in range(limit)]
    return names


def load(stem: str) -> tuple[np.ndarray, np.ndarray]:
    img = load_image(HORSE_DIR / "images" / f"{stem}.jpg")
    gt = np.asarray(Image.open(HORSE_DIR / "masks" / f"{stem}.png")) > 0
    return img, gt


class ClassSetTarget:
    """pytorch-grad-cam target: log-sum-exp of the logits of a class set."""

    def __init__(self, indices):
        self.indices = list(indices)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output[..., self.indices].logsumexp(-1)


class Anchor:
    """pytorch-grad-cam GradCAM at 224 x 224, map upsampled to the photo."""

    def __init__(self, backbone, classes):
        from pytorch_grad_cam import GradCAM

        self.backbone = backbone
        self.cam = GradCAM(backbone.model, [get_layer(backbone.model, backbone.target_layers[0])])
        self.target = ClassSetTarget(classes)

    def __call__(self, img: np.ndarray) -> np.ndarray:
        x = self.backbone.to_tensor(img, 224).requires_grad_(True)   # the backbone's weights are frozen
        cam = self.cam(x, [self.target])[0]
        return cv2.resize(cam.astype(np.float32), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)


def best_threshold(cams: list[np.ndarray], gts: list[np.ndarray]) -> float:
    best, best_t = -1.0, 0.5
    for t in np.arange(0.05, 0.96, 0.05):
        inter = sum(int(((c >= t) & g).sum()) for c, g in zip(cams, gts))
        union = sum(int(((c >= t) | g).sum()) for c, g in zip(cams, gts))
        if inter / union > best:
            best, best_t = inter / union, float(t)
    return best_t


def build_config(args) -> PipelineConfig:
    cfg = PipelineConfig.preset(args.preset)
    changes = {}
    if args.no_crf:
        changes["crf.enabled"] = False
    if args.no_flip:
        changes["cam.flip"] = False
    if args.scales:
        changes["cam.scales"] = tuple(float(s) for s in args.scales.split(","))
    if args.layers == "fusion":
        changes["cam.fusion"] = True
    elif args.layers:
        changes["cam.layers"] = tuple(args.layers.split(","))
    if args.method:
        changes["cam.method"] = args.method
    if args.work_side is not None:
        changes["cam.work_side"] = args.work_side
    if args.no_postprocess:
        changes.update({"postprocess.min_island": 0.0, "postprocess.min_area": 0.0, "postprocess.fill_holes": False,
                        "postprocess.smooth": 0})
    for item in args.set or []:
        key, value = item.split("=", 1)
        changes[key] = parse_value(getattr_path(cfg, key), value)
    return cfg.replace(**changes)


def parse_value(current, text: str):
    """A --set value, typed like the setting it replaces."""
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if isinstance(current, tuple):
        return tuple(float(v) for v in text.split(","))
    if current is None:
        if text.lower() == "none":
            return None
        try:
            return float(text)
        except ValueError:
            return text
    return type(current)(text)


def self_train_config(items) -> SelfTrainConfig:
    """SelfTrainConfig with --st-set changes, e.g. band=0.04, rounds=2, train.seg_epochs=20."""
    cfg = SelfTrainConfig()
    for item in items or []:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        obj = cfg
        for part in parents:
            obj = getattr(obj, part)
        if not hasattr(obj, last):
            raise SystemExit(f"no self-training setting {key!r}")
        setattr(obj, last, parse_value(getattr(obj, last), value))
    return cfg


def score_engine(engine, names, tag, stage_totals=None):
    score = SegmentationScore()
    for stem in names:
        img, gt = load(stem)
        t = time.perf_counter()
        res = engine.predict(img, [tag])
        score.add(res.tags[0].mask, gt, time.perf_counter() - t, stem)
        if stage_totals is not None:
            for k, v in res.timings.items():
                stage_totals[k] = stage_totals.get(k, 0.0) + v
    return score


def getattr_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test", choices=["train", "test", "all"])
    ap.add_argument("--limit", type=int, default=None, help="photos of the split (an even spread)")
    ap.add_argument("--train", type=int, default=40, help="train photos for the anchor's threshold")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--tag", default="horse")
    ap.add_argument("--no-anchor", action="store_true")
    ap.add_argument("--no-crf", action="store_true")
    ap.add_argument("--no-flip", action="store_true")
    ap.add_argument("--no-postprocess", action="store_true")
    ap.add_argument("--scales", help="e.g. 0.75,1,1.5,2")
    ap.add_argument("--layers", help="'fusion' (the backbone's fusion layers) or comma-separated layer names")
    ap.add_argument("--method", help="gradcam or cam")
    ap.add_argument("--work-side", type=int, default=None,
                    help="long side of the CRF working resolution (0 = original)")
    ap.add_argument("--set", action="append", help="any setting, e.g. --set crf.bilateral_srgb=10")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--self-train", choices=["split", "train", "all"],
                    help="self-train a seg head on these photos' pseudo-masks and fuse it (see above)")
    ap.add_argument("--st-limit", type=int, default=None, help="self-train on this many photos of the source")
    ap.add_argument("--st-set", action="append", help="self-training setting, e.g. --st-set rounds=2")
    ap.add_argument("--fusion-weights", default=None,
                    help="comma-separated fusion.seg_weight values, one row each (default: the config's)")
    args = ap.parse_args(argv)

    set_cpu_threads(args.threads)
    backbone = load_backbone(args.backbone, "cpu")
    classes = resolve_tag(args.tag, backbone.categories).indices
    cfg = build_config(args)
    t2m = Tag2Mask(backbone, cfg)
    rows = {}

    if not args.no_anchor:
        anchor = Anchor(backbone, classes)
        train = [load(s) for s in stems("train", args.train)]
        threshold = best_threshold([anchor(img) for img, _ in train], [gt for _, gt in train])
        score = SegmentationScore()
        for stem in stems(args.split, args.limit):
            img, gt = load(stem)
            t = time.perf_counter()
            mask = anchor(img) >= threshold
            score.add(mask, gt, time.perf_counter() - t, stem)
        rows[f"pytorch-grad-cam GradCAM 224, thr {threshold:.2f}"] = score.summary()

    stage_totals: dict[str, float] = {}
    names = stems(args.split, args.limit)
    score = score_engine(t2m, names, args.tag, stage_totals)
    rows[f"tag2mask {args.preset}"] = score.summary()

    if args.self_train:
        source = names if args.self_train == "split" else stems(args.self_train, args.st_limit)
        if args.self_train == "split" and args.st_limit:
            source = source[:args.st_limit]
        st_cfg = self_train_config(args.st_set)
        print("self-training config:", st_cfg)
        t = time.perf_counter()
        paths = [HORSE_DIR / "images" / f"{s}.jpg" for s in source]
        result = self_train(t2m, paths, [[args.tag]] * len(paths), st_cfg, keys=source,
                            progress=lambda line: print(line, flush=True))
        st_seconds = time.perf_counter() - t
        print(f"self-training on {len(source)} photos ({args.self_train}): {st_seconds:.1f} s, "
              f"{st_seconds / len(source):.3f} s/photo; rounds: {result.rounds}")
        head_score = SegmentationScore()
        for stem in names:
            img, gt = load(stem)
            t = time.perf_counter()
            prob = result.heads.seg_probs(img, [args.tag])[args.tag]
            head_score.add(prob >= 0.5, gt, time.perf_counter() - t, stem)
        rows[f"self-trained seg head alone ({args.self_train})"] = head_score.summary()
        weights = ([float(w) for w in args.fusion_weights.split(",")] if args.fusion_weights
                   else [cfg.fusion.seg_weight])
        for w in weights:
            fused = Tag2Mask(backbone, cfg.replace(**{"fusion.seg_weight": w}), heads=result.heads)
            rows[f"tag2mask {args.preset} + self-train w={w:g}"] = score_engine(fused, names, args.tag).summary()

    print(f"split={args.split} photos={score.n} backbone={args.backbone} tag={args.tag} classes={len(classes)} "
          f"threads={torch.get_num_threads()}")
    print("config:", {k: v for k, v in cfg.to_dict().items() if k in ("cam", "background", "fusion", "crf")})
    print(f"{'method':50s} {'fgIoU':>6s} {'mIoU':>6s} {'photoIoU':>8s} {'boxIoU':>6s} {'s/photo':>7s}")
    for name, s in rows.items():
        print(f"{name:50s} {s['fg_iou']:6.3f} {s['miou']:6.3f} {s['mean_photo_fg_iou']:8.3f} {s['box_iou']:6.3f} "
              f"{s['seconds_per_photo']:7.3f}")
    n = max(score.n, 1)
    print("tag2mask stages s/photo:", {k: round(v / n, 4) for k, v in stage_totals.items()})
    print("tag2mask worst:", [(name, round(v, 2)) for name, v in rows[f"tag2mask {args.preset}"]["worst"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
