"""Validation scores of trained heads: AP per label, mAP / F1@threshold / accuracy over tags
(:func:`tag_metrics`), foreground IoU pooled per label over masks (:func:`fg_iou_scores`).

Torch-free: numpy arrays in, plain floats out.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["average_precision", "tag_metrics", "fg_iou_scores"]


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """AP of one label: mean precision at the rank of each positive (NaN without positives)."""
    scores, targets = np.asarray(scores, dtype=np.float64), np.asarray(targets).astype(bool)
    if not targets.any():
        return math.nan
    order = np.argsort(-scores, kind="stable")
    hits = targets[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def tag_metrics(probs: np.ndarray, targets: np.ndarray, threshold: float = 0.5) -> dict:
    """mAP over labels that have a positive, micro F1 at `threshold`, accuracy of the decisions."""
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets).astype(bool)
    aps = [average_precision(probs[:, k], targets[:, k]) for k in range(targets.shape[1])]
    aps = [a for a in aps if not math.isnan(a)]
    pred = probs >= threshold
    tp, fp, fn = int((pred & targets).sum()), int((pred & ~targets).sum()), int((~pred & targets).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else 1.0
    return {"map": float(np.mean(aps)) if aps else math.nan, "f1": float(f1),
            "accuracy": float((pred == targets).mean()) if targets.size else math.nan}


def fg_iou_scores(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]]) -> dict:
    """(label, predicted bool mask, true bool mask) triples -> pooled fg IoU per label and their mean."""
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    for label, pred, gt in pairs:
        pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
        inter[label] = inter.get(label, 0) + int((pred & gt).sum())
        union[label] = union.get(label, 0) + int((pred | gt).sum())
    per = {label: (inter[label] / union[label] if union[label] else 1.0) for label in inter}
    return {"fg_iou": float(np.mean(list(per.values()))) if per else math.nan, "per_label": per}
