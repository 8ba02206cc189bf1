"""Which tags an untagged photo gets: the classifier's scores, weighed by what a project has annotated.

A project's annotations say how often each of its labels occurs: a project whose 20 corrected photos
are all "horse" should not answer "dog" for the next horse because ImageNet's softmax spreads a horse
over 120 dog breeds. :class:`TagPrior` holds those counts (how many annotated photos, how many with
each label) and moves a classifier score by the label's prior log-odds, as Bayes' rule does:

    logit(adjusted) = logit(score) + weight * log((n_label + 1) / (photos - n_label + 1))

(Laplace-smoothed frequency; a label never annotated in 20 photos gets -3.0, one annotated in all of
them +3.0, so the never-annotated one needs a classifier score above 0.95 to win). ``weight`` 1 is
Bayes' own; on the dev photos (benchmarks/tag_choice.py: MSRC-v2 dev in two halves, 258 train-split
horses after 20 annotated ones) it gains on both sets over 0 and 0.5, and 1.5 adds no more than noise.
Scores that come from a project's trained classifier head already hold the label's frequency (its
bias learns it): the prior applies to the others (:meth:`explainers.segment.Tag2Mask.choice_scores`).

:func:`choose_tags` then keeps the labels whose score passes a threshold, best first, at most
``max_tags``, and the best one when none passes.

    prior = TagPrior(photos=20, counts={"horse": 20})
    prior.adjust("dog", 0.6)        # 0.07
    choose_tags({"horse": 0.52, "dog": 0.07}, threshold=0.2, max_tags=3)   # ["horse"]
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

__all__ = ["TagPrior", "choose_tags", "count_labels"]

_EPS = 1e-6


def _logit(p: float) -> float:
    p = min(1.0 - _EPS, max(_EPS, float(p)))
    return math.log(p / (1.0 - p))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class TagPrior:
    """A project's label frequencies: ``photos`` annotated photos, ``counts[label]`` of them with the label."""

    photos: int
    counts: Mapping[str, int] = field(default_factory=dict)
    weight: float = 1.0

    def __post_init__(self):
        if self.photos < 0 or any(int(n) < 0 or int(n) > self.photos for n in self.counts.values()):
            raise ValueError(f"label counts {dict(self.counts)} do not fit {self.photos} photos")

    def log_odds(self, label: str) -> float:
        """The label's smoothed prior log-odds (0 without annotated photos)."""
        n = int(self.counts.get(label, 0))
        return math.log((n + 1) / (self.photos - n + 1))

    def adjust(self, label: str, score: float) -> float:
        """`score` (a probability) moved by ``weight`` x the label's prior log-odds."""
        return _sigmoid(_logit(score) + self.weight * self.log_odds(label))

    def to_dict(self) -> dict:
        return {"photos": int(self.photos), "counts": {str(k): int(v) for k, v in self.counts.items()},
                "weight": float(self.weight)}

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "TagPrior | None":
        if not data:
            return None
        return cls(int(data["photos"]), {str(k): int(v) for k, v in dict(data.get("counts", {})).items()},
                   float(data.get("weight", 1.0)))


def count_labels(tag_sets: Sequence[Sequence[str]], weight: float = 1.0) -> TagPrior:
    """The :class:`TagPrior` of annotated photos, one list of labels per photo (repeats count once)."""
    counts: dict[str, int] = {}
    for tags in tag_sets:
        for label in set(tags):
            counts[label] = counts.get(label, 0) + 1
    return TagPrior(len(tag_sets), dict(sorted(counts.items())), weight)


def choose_tags(scores: Mapping[str, float], threshold: float, max_tags: int) -> list[str]:
    """The labels scoring at least `threshold`, best first, at most `max_tags` (>= 1); the best one
    alone when none does (a low-scored pre-annotation still starts the annotator off, and its low
    score sorts it first for review). [] only without labels."""
    ranked = sorted(scores, key=lambda t: -scores[t])
    chosen = [t for t in ranked if scores[t] >= threshold][: max(1, int(max_tags))]
    return chosen or ranked[:1]
