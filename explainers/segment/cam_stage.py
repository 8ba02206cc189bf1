"""Stage 1: class activation maps of all a photo's tags, multi-scale and flipped, at a working resolution.

Every pass (one scale; the photo and its mirror image batched together, up to ``flip_max_scale``)
computes the maps of all K tags from a single forward pass (K targets, each a class set). Each pass's
maps are scaled to a max of 1 per tag, resampled to the working resolution, mirrored back when
flipped, and averaged over the scales, each tag's maps weighted per pass by (its probability in that
pass) ** ``scale_weight_power`` (:func:`combine_scales`): a small object the classifier only sees in
the 448-px pass takes its map from there, a large one seen whole from the 224-px pass. Optionally
(``affinity``) the averaged maps then take a few random-walk steps over the similarity graph of a
middle layer's features (recorded in the pass nearest ``affinity_scale``, by default the largest):
activation spreads from the most discriminative parts (a horse's head) to the cells that look alike
(the rest of the horse), which plain CAMs leave out. Everything stays on the backbone's device; the
caller moves the result. That loop over scales is :func:`multi_scale`, which the head's CAM
(:mod:`head_cam`) runs too, with its own pass.

:meth:`CAMStage.many` gives the same per photo for many photos, batching the photos that share a
pass size (photos of one aspect ratio do) into one forward/backward pass per scale.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

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


class _LayerReached(Exception):
    """Raised by a probe's forward hook once the layer of interest has run; carries its (h, w)."""


class CAMStage:
    """Callable: (photo RGB uint8, class sets) -> :class:`CAMOutput`; :meth:`many` for a batch of photos."""

    def __init__(self, backbone: Backbone, cfg: CAMConfig):
        from explainers.cams import METHODS

        if cfg.method not in METHODS:
            raise ValueError(f"unknown CAM method {cfg.method!r}; choose one of {', '.join(METHODS)}")
        if not cfg.scales:
            raise ValueError("CAMConfig.scales is empty")
        if not cfg.scale_weight_power >= 0:
            raise ValueError(f"CAMConfig.scale_weight_power must be >= 0, got {cfg.scale_weight_power!r}")
        layers = list(cfg.layers) if cfg.layers else (backbone.fusion_layers if cfg.fusion else backbone.target_layers)
        self.backbone = backbone
        self.cfg = cfg
        self.method = METHODS[cfg.method](backbone, target_layers=layers)
        self.affinity_layer = None
        if cfg.affinity:
            self.affinity_layer = cfg.affinity_layer or backbone.fusion_layers[-1]
            get_layer(backbone.model, self.affinity_layer)   # a wrong name fails here, listing the valid ones
        self._grids: dict[tuple[int, int], tuple[int, int]] = {}

    def __call__(self, image: np.ndarray, class_sets: Sequence[Sequence[int]]) -> CAMOutput:
        targets = [list(c) for c in class_sets]

        def one_pass(x: torch.Tensor, work: tuple[int, int], record: bool):
            if record:   # features of the walk's pass (unflipped photo)
                with LayerRecorder(self.backbone.model, [self.affinity_layer]) as rec:
                    res = self.method.compute(x, [targets] * x.shape[0], output_size=work, normalize=False)
                features = rec[self.affinity_layer][:1].detach()
            else:
                res = self.method.compute(x, [targets] * x.shape[0], output_size=work, normalize=False)
                features = None
            return res.maps, _tag_probs(res.logits, targets), features

        return multi_scale(self.backbone, image, self.cfg, bool(self.affinity_layer), one_pass)

    def many(self, images: Sequence[np.ndarray], class_sets_per_image: Sequence[Sequence[Sequence[int]]],
             max_batch: int = 8) -> list[CAMOutput]:
        """:meth:`__call__` for each photo (the same outputs, up to float noise), batched for the device.

        At each scale the photos are grouped by pass size (see :meth:`_groups`); each group of at most
        `max_batch` photos (twice as many rows with flips: this bounds the device memory) runs through
        one forward pass and one backward pass per target. Photos may have different numbers of tags:
        the shorter target lists are padded with a repeat of their last class set, whose maps are
        dropped. The maps are made at the target layer's own grid and resampled per photo to its
        working resolution, exactly as :meth:`__call__` does inside the CAM method.
        """
        if len(images) != len(class_sets_per_image):
            raise ValueError(f"{len(images)} photos but {len(class_sets_per_image)} class-set lists")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        targets = [[list(c) for c in sets] for sets in class_sets_per_image]
        works = [working_size(*img.shape[:2], self.cfg.work_side) for img in images]
        passes: list[list[torch.Tensor]] = [[] for _ in images]
        probs: list[list[torch.Tensor]] = [[] for _ in images]
        features: list[torch.Tensor | None] = [None] * len(images)
        walk_pass = affinity_pass(self.cfg)
        for s, scale in enumerate(self.cfg.scales):
            record = bool(self.affinity_layer) and s == walk_pass
            flip = flips(self.cfg, scale)
            for size, rows in self._groups(images, works, scale, max_batch):
                for i, maps, p, feats in self._group_pass(images, rows, size, works, targets, record, flip):
                    passes[i].append(maps)
                    probs[i].append(p)
                    if record:
                        features[i] = feats
        return [finish_maps(m, p, f, work, self.cfg) for m, p, f, work in zip(passes, probs, features, works)]

    def _groups(self, images: Sequence[np.ndarray], works: Sequence[tuple[int, int]], scale: float,
                max_batch: int) -> Iterator[tuple[tuple[int, int], list[int]]]:
        """(pass size, photo indices) of the batches at `scale`: photos of one pass size, at most
        `max_batch` each. When several layers are fused, photos must also share their working size
        (each layer's map is min-max scaled at that size inside the CAM method)."""
        fused = len(self.method.target_layers) > 1
        groups: dict[tuple, list[int]] = {}
        for i, (img, work) in enumerate(zip(images, works)):
            size = pass_size(*img.shape[:2], scale, self.cfg)
            groups.setdefault((size, work) if fused else (size,), []).append(i)
        for key, rows in groups.items():
            for start in range(0, len(rows), max_batch):
                yield key[0], rows[start:start + max_batch]

    def _group_pass(self, images: Sequence[np.ndarray], rows: list[int], size: tuple[int, int],
                    works: Sequence[tuple[int, int]], targets: list[list[list[int]]],
                    record: bool, flip: bool
                    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """One batched pass of the photos `rows` at pass `size` (with their mirror images when `flip`)
        -> per photo (index, its flip-folded
        maps (K, h, w) at its working size, its tag probabilities (K,), its affinity features
        (1, C, h', w') when `record`)."""
        n = len(rows)
        x = self.backbone.to_tensor([images[i] for i in rows], size)
        if flip:
            x = torch.cat([x, x.flip(-1)])   # rows j and j + n: photo j and its mirror image
        k_max = max(len(targets[i]) for i in rows)
        padded = [targets[i] + [targets[i][-1]] * (k_max - len(targets[i])) for i in rows]
        fused = len(self.method.target_layers) > 1
        grid = works[rows[0]] if fused else self._grid(size)
        recorder = LayerRecorder(self.backbone.model, [self.affinity_layer]) if record else nullcontext()
        with recorder as rec:
            res = self.method.compute(x, padded * (x.shape[0] // n), output_size=grid, normalize=False)
        for j, i in enumerate(rows):
            k = len(targets[i])
            maps = res.maps[j::n, :k]
            if not fused:
                maps = F.interpolate(maps, size=works[i], mode="bilinear", align_corners=False)
            feats = rec[self.affinity_layer][j:j + 1].detach().clone() if record else None
            yield i, fold_passes(maps, flip), _tag_probs(res.logits[j::n], targets[i]), feats

    def _grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the target layer's output for a pass of `size` (cached per size): a probe forward
        pass of a blank photo, stopped as soon as that layer has run."""
        if size not in self._grids:
            def stop(module, inputs, output):
                raise _LayerReached(tuple(output.shape[-2:]))

            handle = get_layer(self.backbone.model, self.method.target_layers[0]).register_forward_hook(stop)
            try:
                with torch.no_grad():
                    self.backbone.model(torch.zeros(1, 3, *size, device=self.backbone.device))
            except _LayerReached as reached:
                self._grids[size] = reached.args[0]
            finally:
                handle.remove()
            if size not in self._grids:
                raise RuntimeError(f"layer {self.method.target_layers[0]!r} did not run in a forward pass")
        return self._grids[size]


# one pass of multi_scale: (batch, working size, record the affinity features) -> (maps, tag probabilities, features)
PassFn = Callable[[torch.Tensor, tuple[int, int], bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def multi_scale(backbone: Backbone, image: np.ndarray, cfg: CAMConfig, affinity: bool, one_pass: PassFn) -> CAMOutput:
    """The passes of one photo, combined and finished: at each of ``cfg.scales`` the photo at
    :func:`pass_size` (and, where :func:`flips` says so, its mirror image, batched with it) goes through
    ``one_pass(x, work size, record)`` -> (maps (R, K, h, w) at the working size, tag probabilities
    (K,), affinity features (1, C, h', w') or None); `record` is true in :func:`affinity_pass` when
    `affinity`. The maps are folded (:func:`fold_passes`) and finished, weighted over the scales
    (:func:`finish_maps`). The CAM stage and the head's CAM (:mod:`head_cam`) both run this loop."""
    h, w = image.shape[:2]
    work = working_size(h, w, cfg.work_side)
    passes = []
    probs = []
    features = None
    walk_pass = affinity_pass(cfg)
    for i, scale in enumerate(cfg.scales):
        x = backbone.to_tensor(image, pass_size(h, w, scale, cfg))
        flip = flips(cfg, scale)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        record = affinity and i == walk_pass
        maps, p, feats = one_pass(x, work, record)
        if record:
            features = feats
        passes.append(fold_passes(maps, flip))
        probs.append(p)
    return finish_maps(passes, probs, features, work, cfg)


def flips(cfg: CAMConfig, scale: float) -> bool:
    """Whether the pass at `scale` adds the mirror image (``cfg.flip``, up to ``cfg.flip_max_scale``)."""
    return cfg.flip and (cfg.flip_max_scale is None or scale <= cfg.flip_max_scale)


def affinity_pass(cfg: CAMConfig) -> int:
    """Index of the scale whose pass records the affinity features."""
    if cfg.affinity_scale is None:
        return int(np.argmax(cfg.scales))
    return int(np.argmin([abs(s - cfg.affinity_scale) for s in cfg.scales]))


def fold_passes(maps: torch.Tensor, flip: bool) -> torch.Tensor:
    """(1 or 2, K, h, w) maps of one pass of a photo (and, when `flip`, its mirror image) -> (K, h, w):
    the mirror's maps flipped back, each map scaled to a max of 1, averaged (so a pass counts the same
    with or without its mirror)."""
    if flip:
        maps = torch.stack([maps[0], maps[1].flip(-1)])
    peak = maps.flatten(2).amax(dim=2).clamp_min(1e-8)[:, :, None, None]
    return (maps / peak).mean(dim=0)


def finish_maps(passes: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], features: torch.Tensor | None,
                work: tuple[int, int], cfg: CAMConfig) -> CAMOutput:
    """The folded maps of each pass combined over the scales (:func:`combine_scales`), scaled to a
    max of 1 per tag, propagated (with the clutter guard) when affinity features were recorded; the
    tag probabilities averaged over passes."""
    total = combine_scales(passes, probs, cfg.scale_weight_power)
    peak = total.flatten(1).amax(dim=1).clamp_min(1e-8)[:, None, None]
    maps = total / peak
    if features is not None:
        walked = propagate(maps, features, cfg.affinity_beta, cfg.affinity_steps)
        maps = guard_cover(maps, walked, cfg.cover_limit, cfg.cover_fallback)
    return CAMOutput(maps=maps, probs=torch.stack(list(probs)).mean(0), work_size=work)


def combine_scales(passes: Sequence[torch.Tensor], probs: Sequence[torch.Tensor], power: float) -> torch.Tensor:
    """The (K, h, w) folded maps of each scale -> their weighted sum: per tag, a scale weighs
    (its probability of the tag) ** `power`, normalised over the scales (0 = every scale counts alike)."""
    if len(passes) == 1 or power == 0:
        return torch.stack(list(passes)).sum(0)
    p = torch.stack(list(probs)).clamp_min(1e-8) ** power            # (S, K)
    w = p / p.sum(0, keepdim=True) * len(passes)
    return (torch.stack(list(passes)) * w[:, :, None, None]).sum(0)


@torch.no_grad()
def _tag_probs(logits: torch.Tensor, targets: list[list[int]]) -> torch.Tensor:
    """(R, N) logits of a photo's rows (it and its mirror image) -> (K,) probability mass of each
    target class set, averaged over the rows."""
    p = logits.softmax(dim=1)
    mask = torch.zeros(len(targets), p.shape[1], dtype=torch.bool, device=p.device)
    for k, cls in enumerate(targets):
        mask[k, cls] = True
    return (p[:, None, :] * mask[None]).sum(-1).mean(0)


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
