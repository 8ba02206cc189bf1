"""Stage 3: fully connected CRF (Krähenbühl & Koltun, 2011) over background + all tags jointly.

Gaussian (smoothness) and bilateral (appearance) pairwise terms. Kernel widths are given in pixels of
a 320-pixel-long photo and scaled with the photo actually used, so a setting means the same at any
working resolution. Without the CRF (``enabled=False``) the unary probabilities pass through.
:func:`crf_by_tag` runs it for some tags only (the per-label choice made on validation).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from explainers.segment.config import CRFConfig

REFERENCE_SIDE = 320.0


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: CRFConfig) -> np.ndarray:
    """(h, w, 3) uint8 photo and (L, h, w) probabilities at the same size -> (L, h, w) float32 marginals."""
    if not cfg.enabled:
        return probs
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    labels, h, w = probs.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"photo {image.shape[:2]} and probabilities {(h, w)} differ in size")
    p = probs
    if cfg.unary_power != 1.0:
        p = p ** cfg.unary_power
        p = p / p.sum(axis=0, keepdims=True)
    f = max(h, w) / REFERENCE_SIDE
    d = dcrf.DenseCRF2D(w, h, labels)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(p.astype(np.float32))))
    d.addPairwiseGaussian(sxy=cfg.gauss_sxy * f, compat=cfg.gauss_compat)
    d.addPairwiseBilateral(sxy=cfg.bilateral_sxy * f, srgb=cfg.bilateral_srgb,
                           rgbim=np.array(image, dtype=np.uint8, order="C"), compat=cfg.bilateral_compat)
    q = d.inference(cfg.iterations)
    return np.asarray(q, dtype=np.float32).reshape(labels, h, w)


def crf_by_tag(image: np.ndarray, unary: np.ndarray, use_crf: Sequence[bool], cfg: CRFConfig) -> np.ndarray:
    """Stage 3 with the dense CRF on for some tags only (`use_crf`: per tag, in the order of the
    unary's classes after the background). All on: :func:`dense_crf`; all off: the unary as it is;
    mixed: the tags without the CRF keep their unary probabilities, the background and the other
    tags share the rest in the CRF's proportions."""
    if all(use_crf):
        return dense_crf(image, unary, cfg)
    if not any(use_crf):
        return unary
    probs = dense_crf(image, unary, cfg)
    off = [k + 1 for k, on in enumerate(use_crf) if not on]
    on = [c for c in range(unary.shape[0]) if c not in off]
    out = np.empty_like(probs)
    out[off] = unary[off]
    rest = np.clip(1.0 - unary[off].sum(axis=0), 0.0, 1.0)
    out[on] = rest * probs[on] / np.maximum(probs[on].sum(axis=0), 1e-8)
    return out
