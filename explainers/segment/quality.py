"""Each mask's estimated quality: a guess of its fg IoU against a true mask, from what the pipeline saw.

The tag's classifier probability says whether the object is in the photo, not whether its mask is
good (a coffee cup at 0.05 can have a fine mask). Here a few cheap numbers per tag, computed from the
pipeline's own intermediate results at the working resolution (:func:`tag_features`; no extra
forward pass), go through a small model fitted on dev data (fractional logistic regression: the
estimate is ``sigmoid(coef . standardised features + intercept)``, in [0, 1];
benchmarks/fit_quality_score.py fits it and writes :data:`MODEL_PATH`; benchmarks/score_ranking.py
measures how it ranks masks). An empty mask's quality is 0.

Features (:data:`FEATURES`), per tag:

- ``rel_prob``: the tag's classifier probability over that of the photo's likeliest tag (1 for a lone
  tag); ``prob_shortfall``: how far (in log) the probability falls below 0.01 (0 above it), which a tag
  the photo lacks mostly does;
- ``conf_in``: logit of the mean CRF probability of the tag inside its mask;
- ``cam_above``: the share of the photo where the tag's CAM exceeds 0.5; ``cam_entropy``: entropy of
  the CAM as a distribution over pixels, over its maximum (1 = spread evenly); ``cam_contrast``: the
  CAM's mean inside the mask minus its mean outside;
- ``area``: the final mask's share of the photo; ``edge_touch``: the share of the photo's outer rim the
  mask covers (an object cut by the frame, or a mask leaking over the background);
  ``off_center``: the distance of the mask's centroid from the photo's centre, over the half diagonal.

These were kept, out of more candidates, by dropping one at a time while the cross-validated Spearman
correlation on the dev sets did not fall (COCO dev folds, MSRC dev, horse train); ``prob_shortfall``
was added back for tags the photo lacks (the dev sets' tags are all present: the fit also sees each dev
photo with a tag it lacks, IoU 0, at a tenth of a set's weight). Left out, as adding nothing there: the
log tag probability itself, the number of the photo's tags (it lowered the COCO figures),
the IoU of the CRF's mask with the unary argmax and with the CAM above its Otsu threshold, the CRF's
confidence along the mask's outline, the log area, the number of components, the mask's solidity and
box fill, the CAM's mean on the photo's rim; and, from the CAM stage's internals, the agreement of the
photo's and its mirror image's maps and of the maps before and after the affinity walk.

Public API::

    feats = tag_features(cam_maps, probs, results, tag_probs)   # one {feature: value} per tag
    model = default_model()            # QualityModel from MODEL_PATH, loaded once (None when absent)
    q = model.predict(feats[0])        # float in [0, 1]
    fill_quality(results, cam_maps, probs, tag_probs)   # sets each TagMask.quality (the pipeline does)
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np

from explainers.segment.types import TagMask

MODEL_PATH = Path(__file__).resolve().parents[1] / "data" / "quality_score.json"

FEATURES: tuple[str, ...] = ("rel_prob", "prob_shortfall", "conf_in", "cam_above", "cam_entropy", "cam_contrast",
                             "area", "edge_touch", "off_center")
SHORTFALL_BELOW = 0.01


def _logit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return math.log(p / (1 - p))


def _entropy(cam: np.ndarray) -> float:
    """Entropy of a non-negative map as a distribution over its pixels, over log(pixels); 1 when all zero."""
    total = float(cam.sum())
    if total <= 0:
        return 1.0
    dist = cam.ravel() / total
    nz = dist[dist > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(max(cam.size, 2)))


def _placement(mask: np.ndarray) -> tuple[float, float]:
    """(share of the rim covered, centroid's distance from the centre over the half diagonal; 1 when empty)."""
    h, w = mask.shape
    rim = np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])
    if not mask.any():
        return float(rim.mean()), 1.0
    ys, xs = np.nonzero(mask)
    off = math.hypot((xs.mean() + 0.5) / w - 0.5, (ys.mean() + 0.5) / h - 0.5) / math.hypot(0.5, 0.5)
    return float(rim.mean()), off


def tag_features(cam_maps, probs: np.ndarray, results: Sequence[TagMask],
                 tag_probs: np.ndarray) -> list[dict[str, float]]:
    """One {feature: value} (:data:`FEATURES`) per tag of `results`, in order.

    `cam_maps`: (K, h, w) CAMs in [0, 1] (a torch tensor or an array) at the working resolution;
    `probs`: (K + 1, h, w) the CRF's output probabilities there, background first; `results`: the
    tags' final masks (at the photo's size); `tag_probs`: (K,) the tags' classifier probabilities."""
    cams = cam_maps.float().cpu().numpy() if hasattr(cam_maps, "cpu") else np.asarray(cam_maps, np.float32)
    tag_probs = np.asarray(tag_probs, np.float64)
    top_p = max(float(tag_probs.max()), 1e-12) if len(results) else 1.0
    crf_label = probs.argmax(axis=0)
    out = []
    for k, tm in enumerate(results):
        cam = np.clip(cams[k], 0.0, 1.0)
        inside = crf_label == k + 1
        cam_in = float(cam[inside].mean()) if inside.any() else 0.0
        cam_out = float(cam[~inside].mean()) if (~inside).any() else 0.0
        mask = np.asarray(tm.mask)
        edge_touch, off_center = _placement(inside)
        out.append({
            "rel_prob": float(tag_probs[k]) / top_p,
            "prob_shortfall": max(0.0, math.log(SHORTFALL_BELOW) - math.log(max(float(tag_probs[k]), 1e-6))),
            "conf_in": _logit(float(probs[k + 1][inside].mean()) if inside.any() else 0.0),
            "cam_above": float((cam > 0.5).mean()),
            "cam_entropy": _entropy(cam),
            "cam_contrast": cam_in - cam_out,
            "area": float(mask.mean()) if mask.size else 0.0,
            "edge_touch": edge_touch,
            "off_center": off_center,
        })
    return out


class Estimator(Protocol):
    def predict(self, features: dict[str, float]) -> float | None: ...


@dataclass
class QualityModel:
    """sigmoid(sum_i coef_i z_i + intercept) over `features`, z_i = (x_i - mean_i) / scale_i clipped to
    [-clip, clip] (a value far outside what the fit saw counts as a fairly extreme one, no more)."""
    features: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    clip: float = 3.0

    @classmethod
    def from_dict(cls, data: dict) -> QualityModel:
        """From the json layout of :meth:`to_dict`; ValueError (a sentence) when it is not that."""
        try:
            names = tuple(str(n) for n in data["features"])
            arrays = [np.asarray(data[key], dtype=np.float64) for key in ("mean", "scale", "coef")]
            intercept = float(data["intercept"])
            clip = float(data.get("clip", 3.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"the quality model lacks or mangles a field ({exc})") from None
        if any(a.shape != (len(names),) for a in arrays) or not all(np.isfinite(a).all() for a in arrays):
            raise ValueError(f"the quality model needs {len(names)} finite values in mean, scale and coef")
        if not math.isfinite(intercept) or (arrays[1] <= 0).any() or not clip > 0:
            raise ValueError("the quality model's intercept must be finite and its scales and clip positive")
        return cls(names, *arrays, intercept, clip)

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "coef": self.coef.tolist(), "intercept": float(self.intercept), "clip": float(self.clip)}

    def vector(self, features: dict[str, float]) -> np.ndarray:
        z = (np.array([features[n] for n in self.features], dtype=np.float64) - self.mean) / self.scale
        return np.clip(z, -self.clip, self.clip)

    def predict(self, features: dict[str, float]) -> float:
        z = float(self.vector(features) @ self.coef + self.intercept)
        return float(1.0 / (1.0 + math.exp(-max(min(z, 40.0), -40.0))))


def load_model(path: str | Path = MODEL_PATH) -> QualityModel:
    """The model stored at `path`; ValueError when it names features :func:`tag_features` does not compute."""
    model = QualityModel.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
    unknown = [n for n in model.features if n not in FEATURES]
    if unknown:
        raise ValueError(f"the quality model at {path} uses features the pipeline does not compute: "
                         f"{', '.join(unknown)}")
    return model


@lru_cache(maxsize=1)
def default_model() -> QualityModel | None:
    """The model of :data:`MODEL_PATH`, loaded once; None when the file is absent (no quality then)."""
    return load_model() if MODEL_PATH.exists() else None


def fill_quality(results: Sequence[TagMask], cam_maps, probs: np.ndarray, tag_probs: np.ndarray,
                 model: Estimator | None = None) -> None:
    """Set each TagMask's ``quality``: `model` (default :func:`default_model`) on its features
    (:func:`tag_features`), 0.0 for an empty mask; left None without a model (or an estimate that is
    not a finite number: the scores then fall back to the tag probability)."""
    model = model if model is not None else default_model()
    if model is None or not results:
        return
    for tm, feats in zip(results, tag_features(cam_maps, probs, results, tag_probs)):
        q = model.predict(feats)
        if q is not None and math.isfinite(q):
            tm.quality = 0.0 if feats["area"] <= 0 else float(np.clip(q, 0.0, 1.0))
