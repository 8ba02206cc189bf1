"""What is inside a box and unlike what is around it: a class-agnostic foreground probability from a CNN's
features, for boxes of objects the classifier cannot name or names poorly.

The crop (the box and a margin of context around it) goes once through the backbone; the outputs of a
few layers, from mid-level to the last, are resized to a common grid (stride 4 of the crop's pass),
L2-normalised per layer and stacked. The context outside the box is background for sure: its features
are clustered (k-means, ``background_clusters``). Inside the box, the pixels least like any background
cluster (the ``foreground_quantile`` fraction) are clustered too (``foreground_clusters``). A pixel in
the box is foreground when it is more similar (cosine) to its nearest foreground cluster than to its
nearest background one; the probability is a logistic of that margin (``temperature``).

    p = box_foreground(backbone, crop_rgb, (bx0, by0, bx1, by1))     # float32 (h, w) of the crop, 0 outside the box
    mask = crf_refine(crop_rgb, p, (bx0, by0, bx1, by1), CRFConfig(bilateral_compat=5.0))   # bool (h, w)

The settings below are the defaults; :mod:`explainers.segment.interactive` passes its own (a 448-px pass
and 8 foreground clusters next to a CAM, 8 clusters alone: chosen on the dev objects, README's table).
The features' grid is coarse (stride 4 of the pass); :func:`crf_refine` snaps the outline to the
photo's edges with the dense CRF (explainers.segment.crf) at 320 px, background for sure outside the box.

On the dev sets (benchmarks/interactive_masks.py) it beats GrabCut's colour models on cluttered COCO
objects and loses to the class prior on single large animals; :mod:`explainers.segment.interactive`
chooses between them per box.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from explainers.hooks import LayerRecorder
from explainers.segment.config import CRFConfig
from explainers.segment.crf import dense_crf

__all__ = ["FeatureConfig", "box_foreground", "crf_refine", "feature_layers"]

_EFFICIENTNET_LAYERS = ("blocks.2", "blocks.4", "bn2")


@dataclass
class FeatureConfig:
    pass_side: int = 320                 # long side of the crop's forward pass
    background_clusters: int = 16
    foreground_clusters: int = 4
    foreground_quantile: float = 0.3     # inside the box: this fraction least like the background seeds the object
    temperature: float = 10.0


def feature_layers(backbone) -> list[str]:
    """Mid-level to last layers of `backbone`: blocks 2 and 4 and the head's last layer of an
    EfficientNet, else the backbone's ``fusion_layers``."""
    names = {n for n, _ in backbone.model.named_modules()}
    if all(n in names for n in _EFFICIENTNET_LAYERS):
        return list(_EFFICIENTNET_LAYERS)
    return list(backbone.fusion_layers)


def _features(backbone, crop: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    h, w = crop.shape[:2]
    s = cfg.pass_side / max(h, w)
    size = (max(32, int(round(h * s / 32)) * 32), max(32, int(round(w * s / 32)) * 32))
    x = backbone.to_tensor(crop, size)
    layers = feature_layers(backbone)
    with torch.inference_mode(), LayerRecorder(backbone.model, layers) as rec:
        backbone.model(x)
        grid = (size[0] // 4, size[1] // 4)
        parts = []
        for name in layers:
            f = torch.nn.functional.interpolate(rec[name].float(), size=grid, mode="bilinear", align_corners=False)[0]
            parts.append(f / (f.norm(dim=0, keepdim=True) + 1e-6))
        feats = torch.cat(parts, 0)
        feats = feats / (feats.norm(dim=0, keepdim=True) + 1e-6)
    return feats.cpu().numpy()


def _centres(samples: np.ndarray, k: int) -> np.ndarray:
    k = max(1, min(k, len(samples)))
    crit = (cv2.TERM_CRITERIA_EPS + cv2.TERM_CRITERIA_MAX_ITER, 10, 1e-3)
    cv2.setRNGSeed(0)
    _, _, centres = cv2.kmeans(np.ascontiguousarray(samples, np.float32), k, None, crit, 1, cv2.KMEANS_PP_CENTERS)
    return centres


def box_foreground(backbone, crop: np.ndarray, box: tuple[int, int, int, int],
                   cfg: FeatureConfig | None = None) -> np.ndarray | None:
    """Foreground probability (float32, the crop's size, 0 outside `box`) of the object in `box`
    ((x0, y0, x1, y1) in the crop's pixels), or None when the crop leaves too little context outside
    the box to learn the background from."""
    cfg = cfg or FeatureConfig()
    h, w = crop.shape[:2]
    feats = _features(backbone, np.ascontiguousarray(crop), cfg)
    c, fh, fw = feats.shape
    inside = np.zeros((fh, fw), bool)
    sy, sx = fh / h, fw / w
    inside[int(box[1] * sy):max(int(box[1] * sy) + 1, int(np.ceil(box[3] * sy))),
           int(box[0] * sx):max(int(box[0] * sx) + 1, int(np.ceil(box[2] * sx)))] = True
    x = feats.reshape(c, -1).T
    outside = x[~inside.ravel()]
    if len(outside) < cfg.background_clusters or inside.sum() < cfg.foreground_clusters:
        return None
    near_bg = (x @ _centres(outside, cfg.background_clusters).T).max(1)
    within = x[inside.ravel()]
    sim = near_bg[inside.ravel()]
    seeds = within[sim <= np.quantile(sim, cfg.foreground_quantile)]
    near_fg = (x @ _centres(seeds, cfg.foreground_clusters).T).max(1)
    p = 1.0 / (1.0 + np.exp(-(near_fg - near_bg) * cfg.temperature))
    p = (p.reshape(fh, fw) * inside).astype(np.float32)
    return cv2.resize(p, (w, h), interpolation=cv2.INTER_LINEAR)


def working_view(crop: np.ndarray, box: tuple[int, int, int, int], work_side: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the crop with its long side at `work_side` px (never enlarged), the box's pixels at that size,
    the box's pixels at the crop's size): what :func:`crf_refine` and the colour touch-up
    (:func:`explainers.segment.interactive.colour_touch_up`) work on."""
    h, w = crop.shape[:2]
    s = min(1.0, work_side / max(h, w))
    sh, sw = max(1, round(h * s)), max(1, round(w * s))
    small = cv2.resize(np.ascontiguousarray(crop), (sw, sh), interpolation=cv2.INTER_AREA) if s < 1 else crop
    inside = np.zeros((h, w), bool)
    inside[box[1]:box[3], box[0]:box[2]] = True
    small_inside = cv2.resize(inside.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST).astype(bool)
    return small, small_inside, inside


def crf_refine(crop: np.ndarray, p: np.ndarray, box: tuple[int, int, int, int], cfg: CRFConfig,
               work_side: int = 320) -> np.ndarray:
    """Bool (h, w) mask of the crop: the dense CRF over foreground `p` (clipped to [0.02, 0.98]) and its
    complement at `work_side` px, nothing outside `box`."""
    h, w = p.shape
    small, small_inside, inside = working_view(crop, box, work_side)
    sh, sw = small_inside.shape
    q = cv2.resize(np.clip(p, 0.02, 0.98).astype(np.float32), (sw, sh), interpolation=cv2.INTER_LINEAR)
    q[~small_inside] = 0.001
    out = dense_crf(np.ascontiguousarray(small), np.stack([1.0 - q, q]), cfg)
    mask = cv2.resize((out[1] >= 0.5).astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask & inside
