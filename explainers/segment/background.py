"""Stage 2: per-pixel class probabilities (background + each tag) from the tags' CAMs.

The background probability comes from how strongly any tag fires at a pixel:

- ``power``:   bg = (1 - max_k cam_k) ** alpha
- ``sigmoid``: fg_k = sigmoid((cam_k - threshold) / slope), bg = prod_k (1 - fg_k) (a calibrated
  threshold: the CAM value at which a pixel is as likely object as background)
- ``auto``: the method and parameters calibrated for the backbone (:data:`CALIBRATION`)
- ``otsu``: as ``sigmoid``, with each map's threshold found by Otsu's method on its own values
  (self-calibrating: no threshold to tune per backbone), clamped to [otsu_min, otsu_max]

Each tag's foreground probability is scaled by its presence (its classifier probability relative to
the photo's likeliest tag, see :func:`presence`), so an unlikely extra tag claims little; below
``presence_gate`` it claims nothing (its mask is left empty rather than painted where its noisy CAM
happens to peak). The
foreground mass 1 - bg is then shared among the tags in proportion to their weighted CAMs, so one
tag gets everything where the others do not fire. Output: (K + 1, h, w) float32, background first,
summing to 1 per pixel, each value at least `min_prob` (the CRF takes logs).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from explainers.segment.config import BackgroundConfig

CALIBRATION = {
    "efficientnet_lite0": {"method": "otsu", "slope": 0.05},
    "mobilenet_v2": {"method": "sigmoid", "threshold": 0.6, "slope": 0.1},
}
"""What ``method="auto"`` means per backbone: chosen on 40 train-split Weizmann horses with the default
CAM settings (affinity propagation on). Other backbones get AUTO_DEFAULT (self-calibrating)."""
AUTO_DEFAULT = {"method": "otsu", "slope": 0.05}


def calibrated(cfg: BackgroundConfig, backbone_name: str) -> BackgroundConfig:
    """`cfg` with ``method="auto"`` replaced by the backbone's calibrated method and parameters."""
    if cfg.method != "auto":
        return cfg
    return replace(cfg, **CALIBRATION.get(backbone_name, AUTO_DEFAULT))


def background_score(cams: torch.Tensor, cfg: BackgroundConfig, presence: torch.Tensor | None = None) -> torch.Tensor:
    """(K, h, w) CAMs in [0, 1] -> (h, w) background probability.

    `presence` (K,) in [0, 1] scales each tag's foreground probability (1 = surely in the photo).
    """
    pres = presence[:, None, None] if presence is not None else 1.0
    if cfg.method == "power":
        return (1.0 - (cams * pres).amax(dim=0)).clamp(0, 1) ** cfg.alpha
    if cfg.method in ("sigmoid", "otsu"):
        t = cfg.threshold if cfg.method == "sigmoid" else otsu_thresholds(cams).clamp(cfg.otsu_min, cfg.otsu_max)
        if isinstance(t, torch.Tensor):
            t = t[:, None, None]
        fg = torch.sigmoid((cams - t) / max(cfg.slope, 1e-6)) * pres
        return (1.0 - fg).prod(dim=0)
    raise ValueError(f"unknown background method {cfg.method!r}; choose 'auto', 'power', 'sigmoid' or 'otsu' "
                     "('auto' is resolved by calibrated())")


def presence(tag_probs: torch.Tensor, power: float, gate: float = 0.0) -> torch.Tensor:
    """(K,) classifier probabilities -> (K,) presence weights: (p_k / max_j p_j) ** power, and 0 for a
    tag whose relative probability p_k / max_j p_j is below `gate` (it is left empty).

    Relative to the photo's likeliest tag, so a lone tag always counts fully (the person tagged it,
    even where the classifier hesitates), while a tag far less likely than another one of the photo
    gets little of it, or nothing below the gate.
    """
    rel = (tag_probs / tag_probs.max().clamp_min(1e-12)).clamp(0, 1)
    weight = rel ** power
    return torch.where(rel < gate, torch.zeros_like(weight), weight) if gate > 0 else weight


def otsu_thresholds(cams: torch.Tensor, bins: int = 64) -> torch.Tensor:
    """(K, h, w) maps in [0, 1] -> (K,) Otsu thresholds (maximal between-class variance)."""
    out = []
    centers = (torch.arange(bins, device=cams.device, dtype=torch.float32) + 0.5) / bins
    for m in cams.float():
        hist = torch.histc(m, bins=bins, min=0.0, max=1.0)
        p = hist / hist.sum().clamp_min(1)
        w0 = p.cumsum(0)
        mu = (p * centers).cumsum(0)
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * (1 - w0)).clamp_min(1e-12)
        out.append(centers[between.argmax()] + 0.5 / bins)
    return torch.stack(out)


def class_probabilities(cams: torch.Tensor, cfg: BackgroundConfig, tag_probs: torch.Tensor | None = None) -> np.ndarray:
    """(K, h, w) CAMs [+ (K,) tag probabilities] -> (K + 1, h, w) float32 probabilities on the CPU, background first."""
    with torch.no_grad():
        pres = (presence(tag_probs.to(cams.device).float(), cfg.presence_power, cfg.presence_gate)
                if tag_probs is not None else None)
        bg = background_score(cams, cfg, pres)
        weighted = cams * pres[:, None, None] if pres is not None else cams
        total = weighted.sum(dim=0, keepdim=True)
        share = torch.where(total > 0, weighted / total.clamp_min(1e-8), torch.full_like(weighted, 1.0 / cams.shape[0]))
        probs = torch.cat([bg[None], (1.0 - bg)[None] * share]).clamp_min(cfg.min_prob)
        probs = probs / probs.sum(dim=0, keepdim=True)
    return probs.float().cpu().numpy()
