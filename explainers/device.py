"""Device choice: CUDA when present, CPU otherwise; CPU thread count set deliberately."""
from __future__ import annotations

import os

import torch


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`None` or "auto" picks cuda:0 when available, else cpu."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def set_cpu_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads: `n`, else $TAG2MASK_THREADS, else the number of usable cores."""
    if n is None:
        env = os.environ.get("TAG2MASK_THREADS")
        n = int(env) if env else len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    n = max(1, int(n))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
