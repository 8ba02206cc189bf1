"""Stage 1: class activation maps of all a photo's tags, multi-scale and flipped, at a working resolution.

Every pass (one scale; the photo and its mirror image batched together) computes the maps of all K
tags from a single forward pass (K targets, each a class set). Each pass's maps are scaled to a max
of 1 per tag, so that every scale counts equally, resampled to the working resolution, mirrored back
when flipped, and averaged. Optionally (``affinity``) the averaged maps then take a few random-walk
steps over the similarity graph of a middle layer's features (recorded in the largest pass):
activation spreads from the most discriminative parts (a horse's head) to the cells that look alike
(the rest of the horse), which plain CAMs leave out. Everything stays on the backbone's device; the
caller moves the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from explainers.backbones import Backbone
from explainers.cams.base import minmax
from explainers.hooks import LayerRecorder, get_layer
from explainers.segment.config import CAMConfig


@dataclass
class CAMOutput:
    maps: torch.Tensor          # (K, h, w) in [0, 1] at the working resolution, on the device
    probs: torch.Tensor         # (K,) probability mass of each tag's class set, mean over passes
    work_size: tuple[int, int]  # (h, w) of the working resolution


def working_size(height: int, width: int, work_side: int | None) -> tuple[int, int]:
    """(h, w) with the long side at most `work_side` (the original size when smaller or None)."""
    long_side = max(height, width)
    if not work_side or long_side <= work_side:
        return height, width
    f = work_side / long_side
    return max(1, round(height * f)), max(1, round(width * f))


def pass_size(height: int, width: int, scale: float, cfg: CAMConfig) -> tuple[int, int]:
    """Input size of one pass: short side = scale * base_size, aspect kept, long side capped, multiples of 32."""
    short_side = scale * cfg.base_size
    f = short_side / min(height, width)
    long_cap = cfg.max_side * max(scale, 1.0)
    if max(height, width) * f > long_cap:
        f = long_cap / max(height, width)

    def r32(v: float) -> int:
        return max(32, int(round(v / 32.0)) * 32)

    return r32(height * f), r32(width * f)


class CAMStage:
    """Callable: (photo RGB uint8, class sets) -> :class:`CAMOutput`."""

    def __init__(self, backbone: Backbone, cfg: CAMConfig):
        from explainers.cams import METHODS

        if cfg.method not in METHODS:
            raise ValueError(f"unknown CAM method {cfg.method!r}; choose one of {', '.join(METHODS)}")
        if not cfg.scales:
            raise ValueError("CAMConfig.scales is empty")
        layers = list(cfg.layers) if cfg.layers else (backbone.fusion_layers if cfg.fusion else backbone.target_layers)
        self.backbone = backbone
        self.cfg = cfg
        self.method = METHODS[cfg.method](backbone, target_layers=layers)
        self.affinity_layer = None
        if cfg.affinity:
            self.affinity_layer = cfg.affinity_layer or backbone.fusion_layers[-1]
            get_layer(backbone.model, self.affinity_layer)   # a wrong name fails here, listing the valid ones

    def __call__(self, image: np.ndarray, class_sets: Sequence[Sequence[int]]) -> CAMOutput:
        h, w = image.shape[:2]
        work = working_size(h, w, self.cfg.work_side)
        targets = [list(c) for c in class_sets]
        total = None
        probs = []
        features = None
        largest = int(np.argmax(self.cfg.scales))
        for i, scale in enumerate(self.cfg.scales):
            x = self.backbone.to_tensor(image, pass_size(h, w, scale, self.cfg))
            if self.cfg.flip:
                x = torch.cat([x, x.flip(-1)])
            if self.affinity_layer and i == largest:   # features of the largest pass (unflipped photo)
                with LayerRecorder(self.backbone.model, [self.affinity_layer]) as rec:
                    res = self.method.compute(x, [targets] * x.shape[0], output_size=work, normalize=False)
                features = rec[self.affinity_layer][:1].detach()
            else:
                res = self.method.compute(x, [targets] * x.shape[0], output_size=work, normalize=False)
            maps = res.maps
            if self.cfg.flip:
                maps = torch.stack([maps[0], maps[1].flip(-1)])
            peak = maps.flatten(2).amax(dim=2).clamp_min(1e-8)[:, :, None, None]
            maps = (maps / peak).sum(dim=0)
            total = maps if total is None else total + maps
            with torch.no_grad():
                p = res.logits.softmax(dim=1)
                mask = torch.zeros(len(targets), p.shape[1], dtype=torch.bool, device=p.device)
                for k, cls in enumerate(targets):
                    mask[k, cls] = True
                probs.append((p[:, None, :] * mask[None]).sum(-1).mean(0))
        peak = total.flatten(1).amax(dim=1).clamp_min(1e-8)[:, None, None]
        maps = total / peak
        if features is not None:
            walked = propagate(maps, features, self.cfg.affinity_beta, self.cfg.affinity_steps)
            maps = guard_cover(maps, walked, self.cfg.cover_limit, self.cfg.cover_fallback)
        return CAMOutput(maps=maps, probs=torch.stack(probs).mean(0), work_size=work)


@torch.no_grad()
def guard_cover(raw: torch.Tensor, walked: torch.Tensor, limit: float, fallback: str = "product") -> torch.Tensor:
    """Per map: keep the propagated map unless its Otsu foreground covers more than `limit` of the
    photo (the walk spread over a cluttered scene); then use the raw CAM ("raw") or the geometric
    mean of both ("product": the walk restricted to where the CAM itself fires)."""
    if limit >= 1.0:
        return walked
    if fallback not in ("raw", "product"):
        raise ValueError(f"unknown cover_fallback {fallback!r}; choose 'raw' or 'product'")
    from explainers.segment.background import otsu_thresholds

    t = otsu_thresholds(walked)
    cover = (walked > t[:, None, None]).float().flatten(1).mean(1)
    alt = raw if fallback == "raw" else minmax((raw.clamp_min(0) * walked.clamp_min(0)).sqrt()[None])[0]
    return torch.where((cover > limit)[:, None, None], alt, walked)


@torch.no_grad()
def propagate(maps: torch.Tensor, features: torch.Tensor, beta: float, steps: int) -> torch.Tensor:
    """Random walk of (K, H, W) maps over the feature grid of (1, C, h, w) features.

    Affinity between grid cells = relu(cosine similarity of their features) ** beta; at each step
    every cell takes the affinity-weighted mean of all cells' values, so activation spreads to cells
    that look like the ones already active (the rest of the object). The maps are average-pooled to
    the grid first; the result is upsampled and min-max scaled to [0, 1] per map (the walk lifts the
    floor everywhere).
    """
    k, big_h, big_w = maps.shape
    _, c, h, w = features.shape
    f = F.normalize(features[0].flatten(1).float(), dim=0)             # (C, n)
    aff = (f.t() @ f).clamp_min(0) ** beta                            # (n, n)
    trans = aff / aff.sum(dim=0, keepdim=True)                        # column j: weights of cell j's mean
    small = F.adaptive_avg_pool2d(maps[None], (h, w))[0].flatten(1)   # (K, n)
    for _ in range(steps):
        small = small @ trans
    out = F.interpolate(small.view(1, k, h, w), size=(big_h, big_w), mode="bilinear", align_corners=False)
    return minmax(out)[0]
