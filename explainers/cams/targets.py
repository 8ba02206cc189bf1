"""Targets of an explanation: a class index, or a set of classes scored together.

A set (e.g. the 118 dog breeds for the tag "dog") is scored by the log-sum-exp of its logits, so its
gradient is the softmax-weighted mix of its members' gradients: the likeliest members dominate.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

Target = Union[int, Sequence[int]]


def normalize_targets(targets, batch_size: int, logits: torch.Tensor | None = None) -> list[list[list[int]]]:
    """-> targets[b][k] = list of class indices.

    Accepts None (each image's top-1 class, needs `logits`), one target per image
    (``[3, 5]`` or ``[[1, 2], [7]]`` where each item is an int or a class set), or K targets per
    image (``[[3, [4, 5]], [8, 9]]``). Every image must have the same number K of targets.
    """
    if targets is None:
        if logits is None:
            raise ValueError("targets=None needs logits to pick the top class")
        return [[[int(i)]] for i in logits.argmax(dim=1).tolist()]
    if isinstance(targets, torch.Tensor):
        targets = targets.tolist()
    if isinstance(targets, int):
        targets = [targets] * batch_size
    targets = list(targets)
    if len(targets) != batch_size:
        raise ValueError(f"got {len(targets)} target entries for a batch of {batch_size}")
    out = []
    for entry in targets:
        if isinstance(entry, int):
            out.append([[entry]])
        elif all(isinstance(t, int) for t in entry) and not isinstance(entry, list):
            out.append([list(entry)])          # a tuple/set of ints: one class set
        else:
            out.append([[t] if isinstance(t, int) else [int(i) for i in t] for t in entry])
    ks = {len(e) for e in out}
    if len(ks) != 1 or 0 in ks:
        raise ValueError(f"every image needs the same, non-zero number of targets; got {sorted(ks)}")
    return out


def target_mask(targets: list[list[list[int]]], num_classes: int, device) -> torch.Tensor:
    """Boolean (B, K, num_classes) mask of each target's classes."""
    b, k = len(targets), len(targets[0])
    mask = torch.zeros(b, k, num_classes, dtype=torch.bool)
    for i, entry in enumerate(targets):
        for j, classes in enumerate(entry):
            if not classes:
                raise ValueError("a target class set is empty")
            bad = [c for c in classes if not 0 <= c < num_classes]
            if bad:
                raise ValueError(f"class index {bad[0]} out of range 0..{num_classes - 1}")
            mask[i, j, classes] = True
    return mask.to(device)


def target_scores(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N) logits, (B, K, N) mask -> (B, K) scores: the logit, or log-sum-exp over a class set."""
    expanded = logits.unsqueeze(1).expand(-1, mask.shape[1], -1)
    return expanded.masked_fill(~mask, float("-inf")).logsumexp(dim=-1)
