"""Backbone features of training photos, computed once per photo (and its mirror image) and kept on
the device, so the epochs of :mod:`explainers.training` only run the heads (:class:`FeatureCache`)."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from explainers.heads import BackboneFeatures
from explainers.samples import Sample

__all__ = ["FeatureCache"]


class FeatureCache:
    """Backbone features per photo, computed once and kept on the device.

    ``entry = cache.get(samples)[i]``: ``{"pooled": (V, C), "maps": [(V, C_l, h_l, w_l)]}`` where V is
    1 (the photo) or 2 (photo, mirror image) with ``flip``. Keyed by ``sample.cache_key``.
    """

    def __init__(self, features: BackboneFeatures, size: int = 256, flip: bool = True, batch_size: int = 8):
        self.features = features
        self.size = int(size)
        self.flip = bool(flip)
        self.batch_size = max(1, int(batch_size))
        self._store: dict[str, dict] = {}
        self.computed = 0          # photos run through the backbone so far
        self.failed: dict[str, str] = {}   # photo key -> why it could not be loaded (skip_failed)

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, key: str) -> bool:
        return key in self._store

    def forget(self, key: str) -> None:
        self._store.pop(key, None)

    def get(self, samples: Sequence[Sample], skip_failed: bool = False,
            on_photo: Callable[[str, np.ndarray], None] | None = None) -> list[dict | None]:
        """Entries in the order of `samples`. A photo that cannot be loaded raises, or with
        `skip_failed` gives None (its reason is kept in ``self.failed[key]``). `on_photo(key, photo)`
        is called for each photo loaded here (those not cached yet), so other per-photo work (box
        pseudo-masks) needs no second load."""
        missing = list(dict.fromkeys(s.cache_key for s in samples if s.cache_key not in self._store))
        by_key = {s.cache_key: s for s in samples}
        for i in range(0, len(missing), self.batch_size):      # photos are loaded one batch at a time
            photos: dict[str, np.ndarray] = {}
            for k in missing[i:i + self.batch_size]:
                try:
                    photos[k] = by_key[k].photo()
                except Exception as exc:  # noqa: BLE001 - reported per photo
                    if not skip_failed:
                        raise
                    self.failed[k] = f"{type(exc).__name__}: {exc}"
                    continue
                if on_photo is not None:
                    on_photo(k, photos[k])
            if photos:
                self._extract(photos)
        return [self._store.get(s.cache_key) if skip_failed else self._store[s.cache_key] for s in samples]

    def _extract(self, photos: dict[str, np.ndarray]) -> None:
        """Run one batch of photos (key -> RGB) through the backbone (and their mirror images)."""
        keys = list(photos)
        x = self.features.backbone.to_tensor([photos[k] for k in keys], self.size)
        if self.flip:
            x = torch.cat([x, x.flip(-1)])
        pooled, maps = self.features(x)
        n = len(keys)
        for j, k in enumerate(keys):
            idx = [j, n + j] if self.flip else [j]
            self._store[k] = {"pooled": pooled[idx].contiguous(), "maps": [m[idx].contiguous() for m in maps]}
        self.computed += n
