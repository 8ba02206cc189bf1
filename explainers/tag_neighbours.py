"""A project's annotated photos as evidence for an untagged photo's tags: its nearest annotated photo.

A label the project's classifier head cannot score (it was never trained against photos without it,
e.g. every annotated photo says "horse") is chosen by ImageNet's score and the project's label
frequency alone (:class:`explainers.tag_choice.TagPrior`). Where ImageNet is wrong the same way on
the project's own photos (it calls many Weizmann horses Great Danes, "horse" below 0.005), the
frequency is not enough. The annotated photos say more: an untagged photo that looks like one of
them most likely carries its labels.

:class:`TagNeighbours` keeps the annotated photos' pooled backbone features (unit length) and their
labels. An untagged photo is *near* when its cosine similarity to its nearest annotated photo is at
least the smallest such similarity among the annotated photos themselves (each to its nearest other:
the nearest-neighbour data description, no parameter to fit). A near photo's scores of the given
labels move half-way to its neighbour's: ``(score + [label in neighbour's tags]) / 2``; a photo that
is not near keeps its scores.

On the first 20 Weizmann train horses (their features from the training's cache, 256 x 256, as
stored; the cut 0.55), with the untagged photos' features as served: the test horses ImageNet calls
dogs are 0.56-0.60 from their nearest annotated horse, MSRC-v2's dogs at most 0.52, and 0.5 % of
MSRC's photos without a horse pass the cut.

    nb = TagNeighbours.build(features, [["horse"], ["horse"], ...])
    nb.blend({"horse": 0.09, "dog": 0.30}, feature, ["horse", "dog"])   # near: {"horse": 0.55, "dog": 0.15}
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

__all__ = ["TagNeighbours", "MAX_PHOTOS"]

MAX_PHOTOS = 2000    # at most this many annotated photos are kept (an even spread): 5 MB at float16


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-9)


class TagNeighbours:
    """Annotated photos' unit features (N, C) and labels; ``cut``: the nearest-neighbour similarity a
    photo needs to be near them (None with fewer than two photos: nothing is near)."""

    def __init__(self, features: torch.Tensor, tags: Sequence[Sequence[str]], cut: float | None):
        if features.ndim != 2 or features.shape[0] != len(tags):
            raise ValueError(f"{tuple(features.shape)} features for {len(tags)} photos' tags")
        self.features = _unit(features)
        self.tags = [sorted({str(t) for t in ts}) for ts in tags]
        self.cut = None if cut is None else float(cut)

    @classmethod
    def build(cls, features: torch.Tensor, tags: Sequence[Sequence[str]]) -> "TagNeighbours | None":
        """From the annotated photos' pooled features (N, C) and labels (photos without a label are
        left out); None without any photo. The cut: min over photos of the similarity to the nearest other."""
        keep = [i for i, ts in enumerate(tags) if ts]
        if len(keep) > MAX_PHOTOS:
            keep = [keep[int(i)] for i in np.linspace(0, len(keep) - 1, MAX_PHOTOS).round()]
        if not keep:
            return None
        f = _unit(torch.as_tensor(features)[keep].detach().cpu())
        cut = None
        if len(keep) >= 2:
            sims = f @ f.T
            sims.fill_diagonal_(-2.0)
            cut = float(sims.max(dim=1).values.min())
        return cls(f, [tags[i] for i in keep], cut)

    def nearest(self, feature: torch.Tensor) -> tuple[float, list[str]]:
        """(cosine similarity to the nearest annotated photo, that photo's labels)."""
        sims = self.features @ _unit(torch.as_tensor(feature).detach().cpu().reshape(-1))
        k = int(torch.argmax(sims))
        return float(sims[k]), list(self.tags[k])

    def blend(self, scores: Mapping[str, float], feature: torch.Tensor, labels: Sequence[str]) -> dict[str, float]:
        """`scores` with those of `labels` moved half-way to the nearest annotated photo's (1 for a label
        it carries, 0 for one it lacks) when the photo is near; else `scores` unchanged."""
        out = dict(scores)
        if self.cut is None or not labels:
            return out
        sim, tags = self.nearest(feature)
        if sim < self.cut:
            return out
        for label in labels:
            if label in out:
                out[label] = 0.5 * (out[label] + (1.0 if label in tags else 0.0))
        return out

    def to_dict(self) -> dict:
        """Plain types + a float16 tensor (``torch.load(weights_only=True)``-safe)."""
        return {"features": self.features.half().contiguous(), "tags": [list(t) for t in self.tags], "cut": self.cut}

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "TagNeighbours | None":
        if not data:
            return None
        return cls(torch.as_tensor(data["features"]).float(), list(data["tags"]), data.get("cut"))
