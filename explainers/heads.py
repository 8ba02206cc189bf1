"""Small trainable heads on a frozen backbone, for a project's own labels.

- :class:`BackboneFeatures` runs the frozen backbone once and returns what the heads read: the pooled
  feature vector (global average of the backbone's GAP layer, i.e. what its ImageNet classifier sees)
  and feature maps at 2-3 scales (strides 8, 16, 32 for the registered backbones).
- :class:`ClassifierHead`: multi-label logits (one sigmoid per label) from the pooled features. The
  labels are the project's own strings, so labels ImageNet lacks ("pony-photo") work.
- :class:`SegHead`: a light decoder (1x1 projections per scale, fused at the finest scale, two 3x3
  convs, 1x1 to one logit per label), output at the finest feature stride, upsampled on request.

Each head's ``state_dict()`` holds only its own parameters (never the backbone's); ``head.spec()``
is a plain dict (str/int/float/list) from which ``Head.from_spec(spec)`` rebuilds the module, so a
checkpoint ``{"spec": ..., "state": ...}`` loads with ``torch.load(weights_only=True)``.

Usage::

    feats = BackboneFeatures(backbone)                  # layers chosen per backbone
    pooled, maps = feats(backbone.to_tensor(photo, 256))
    clf = ClassifierHead(feats.pooled_channels, ["pony-photo", "kitchen"])
    probs = clf(pooled).sigmoid()                        # (B, K)
    seg = SegHead(feats.channels, ["horse"])
    logits = seg(maps, size=(h, w))                      # (B, K, h, w)
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from explainers.backbones import Backbone
from explainers.hooks import LayerRecorder

__all__ = ["SEG_LAYERS", "BackboneFeatures", "ClassifierHead", "SegHead", "seg_layers_for"]

SEG_LAYERS: dict[str, list[str]] = {
    # finest first: stride 8, 16, 32
    "efficientnet_lite0": ["blocks.2", "blocks.4", "bn2"],
    "mobilenet_v2": ["features.6", "features.13", "features.18"],
}


def seg_layers_for(backbone: Backbone) -> list[str]:
    """Feature layers for the seg head, finest first: the registered ones, else the fusion layers."""
    return list(SEG_LAYERS.get(backbone.name) or reversed(backbone.fusion_layers))


class BackboneFeatures:
    """Frozen-backbone features for the heads: ``(pooled (B, C), [maps (B, C_i, h_i, w_i)], finest first)``.

    Not an nn.Module on purpose: it owns no parameters and is never saved with a head. The pooled
    vector is the spatial mean of ``backbone.target_layers[0]`` (the layer before global pooling).
    """

    def __init__(self, backbone: Backbone, layers: Sequence[str] | None = None):
        self.backbone = backbone
        self.layers = list(layers) if layers is not None else seg_layers_for(backbone)
        self.pooled_layer = backbone.target_layers[0]
        self._channels: list[int] | None = None
        self._pooled_channels: int | None = None

    def _record(self) -> list[str]:
        return list(dict.fromkeys([*self.layers, self.pooled_layer]))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """A normalised batch (from ``backbone.to_tensor``) -> pooled features and feature maps."""
        with LayerRecorder(self.backbone.model, self._record()) as rec:
            self.backbone.model(x)
        maps = [rec[name].detach() for name in self.layers]
        pooled = rec[self.pooled_layer].detach().float().mean(dim=(2, 3))
        return pooled, maps

    def _probe(self) -> None:
        dev = next(self.backbone.model.parameters()).device
        pooled, maps = self(torch.zeros(1, 3, 64, 64, device=dev))
        self._pooled_channels = int(pooled.shape[1])
        self._channels = [int(m.shape[1]) for m in maps]

    @property
    def channels(self) -> list[int]:
        """Channels of each feature map, finest first."""
        if self._channels is None:
            self._probe()
        return list(self._channels)

    @property
    def pooled_channels(self) -> int:
        if self._pooled_channels is None:
            self._probe()
        return int(self._pooled_channels)


def _check_labels(labels: Sequence[str]) -> list[str]:
    labels = [str(label) for label in labels]
    if not labels:
        raise ValueError("a head needs at least one label")
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {labels}")
    return labels


class ClassifierHead(nn.Module):
    """Multi-label classifier on pooled backbone features: ``logits = W (x - mean) / std + b``.

    ``mean``/``std`` are buffers (saved in the state_dict) set from the training features by
    :meth:`set_normalization` (per-channel mean, one global scale), so the linear layer trains well
    with few photos.
    """

    def __init__(self, in_features: int, labels: Sequence[str], dropout: float = 0.0,
                 negatives: Sequence[int] | None = None, cam_weights: bool = False):
        super().__init__()
        self.labels = _check_labels(labels)
        # training photos WITHOUT each label (None: unknown, e.g. an older checkpoint): a label the head
        # never saw absent was never taught where it is not, see :meth:`knows_absence`
        self.negatives = None if negatives is None else [int(n) for n in negatives]
        if self.negatives is not None and len(self.negatives) != len(self.labels):
            raise ValueError(f"{len(self.negatives)} negative counts for {len(self.labels)} labels")
        self.in_features = int(in_features)
        self.dropout_p = float(dropout)
        self.register_buffer("mean", torch.zeros(self.in_features))
        self.register_buffer("std", torch.ones(self.in_features))
        self.dropout = nn.Dropout(self.dropout_p)
        self.linear = nn.Linear(self.in_features, len(self.labels))
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        # directions of its class activation maps when they were fitted apart from the (calibrated)
        # probabilities' weights (explainers.head_training.train_classifier); None: the same weights
        self.register_buffer("cam_weight", torch.zeros(len(self.labels), self.in_features) if cam_weights else None)

    def map_weight(self) -> torch.Tensor:
        """(K, C) the channel weights of the label maps (:mod:`explainers.segment.head_cam`)."""
        return self.cam_weight if self.cam_weight is not None else self.linear.weight

    @torch.no_grad()
    def set_normalization(self, features: torch.Tensor) -> None:
        """Centre inputs on the per-channel mean of these (N, C) training features and divide by one
        global scale (their RMS spread). A per-channel std would blow up channels that happen to be
        nearly constant in a handful of photos and then dominate on new ones."""
        f = features.float()
        mean = f.mean(0)
        scale = (f - mean).pow(2).mean().sqrt().clamp_min(1e-3) if len(f) > 1 else f.abs().mean().clamp_min(1e-3)
        self.mean.copy_(mean.to(self.mean.device))
        self.std.fill_(float(scale))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = (pooled.float() - self.mean) / self.std
        return self.linear(self.dropout(x))

    @torch.no_grad()
    def predict_proba(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled features -> (B, K) probabilities (eval mode)."""
        was = self.training
        self.eval()
        try:
            return self(pooled).sigmoid()
        finally:
            self.train(was)

    def knows_absence(self, label: str, min_negatives: int) -> bool:
        """Whether the head was trained on at least `min_negatives` photos without `label` (False when
        the counts are unknown). Only then does its score (and its CAM) say where the label is not."""
        if self.negatives is None or label not in self.labels:
            return False
        return self.negatives[self.labels.index(label)] >= min_negatives

    def spec(self) -> dict:
        spec = {"kind": "classifier", "in_features": self.in_features, "labels": list(self.labels),
                "dropout": self.dropout_p}
        if self.negatives is not None:
            spec["negatives"] = list(self.negatives)
        if self.cam_weight is not None:
            spec["cam_weights"] = True
        return spec

    @classmethod
    def from_spec(cls, spec: dict) -> "ClassifierHead":
        return cls(int(spec["in_features"]), list(spec["labels"]), float(spec.get("dropout", 0.0)),
                   spec.get("negatives"), bool(spec.get("cam_weights", False)))


class SegHead(nn.Module):
    """Light decoder: per-scale 1x1 projections, upsampled to the finest scale and summed, then
    two 3x3 conv + GroupNorm + ReLU blocks and a 1x1 conv to one logit per label.

    ``forward(maps, size=None)``: maps finest first (as from :class:`BackboneFeatures`), output
    (B, K, h, w) at the finest map's size or bilinearly resized to ``size``.
    """

    def __init__(self, in_channels: Sequence[int], labels: Sequence[str], hidden: int = 64, dropout: float = 0.1):
        super().__init__()
        self.labels = _check_labels(labels)
        self.in_channels = [int(c) for c in in_channels]
        if not 1 <= len(self.in_channels) <= 4:
            raise ValueError(f"SegHead takes 1-4 feature maps, got {len(self.in_channels)}")
        self.hidden = int(hidden)
        self.dropout_p = float(dropout)
        self.project = nn.ModuleList(nn.Conv2d(c, self.hidden, 1) for c in self.in_channels)
        groups = 8 if self.hidden % 8 == 0 else 1
        self.fuse = nn.Sequential(
            nn.Conv2d(self.hidden, self.hidden, 3, padding=1, bias=False), nn.GroupNorm(groups, self.hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(self.hidden, self.hidden, 3, padding=1, bias=False), nn.GroupNorm(groups, self.hidden),
            nn.ReLU(inplace=True),
            nn.Dropout2d(self.dropout_p),
        )
        self.classify = nn.Conv2d(self.hidden, len(self.labels), 1)

    def forward(self, maps: Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        if len(maps) != len(self.project):
            raise ValueError(f"SegHead expects {len(self.project)} feature maps, got {len(maps)}")
        target = maps[0].shape[-2:]
        fused = None
        for proj, m in zip(self.project, maps):
            y = proj(m.float())
            if y.shape[-2:] != target:
                y = F.interpolate(y, size=target, mode="bilinear", align_corners=False)
            fused = y if fused is None else fused + y
        logits = self.classify(self.fuse(fused))
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
        return logits

    @torch.no_grad()
    def predict_proba(self, maps: Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, K, h, w) probabilities in eval mode."""
        was = self.training
        self.eval()
        try:
            return self(maps, size).sigmoid()
        finally:
            self.train(was)

    def spec(self) -> dict:
        return {"kind": "seg", "in_channels": list(self.in_channels), "labels": list(self.labels),
                "hidden": self.hidden, "dropout": self.dropout_p}

    @classmethod
    def from_spec(cls, spec: dict) -> "SegHead":
        return cls(list(spec["in_channels"]), list(spec["labels"]), int(spec.get("hidden", 64)),
                   float(spec.get("dropout", 0.1)))
