"""The shared machinery of every CAM method.

A method differs from the others only in how one layer's map is made from its activations — most
only in how channel weights are computed (:meth:`BaseCAM.channel_weights`). Everything else is here:
hooking the layers (hooks removed after each call), one forward pass for all targets of a batch,
gradients with ``torch.autograd.grad`` on the recorded activations (never ``.backward()``, so the
model's parameters get no ``.grad``), upsampling, multi-layer fusion and normalisation, all on the
model's device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from explainers.cams.targets import normalize_targets, target_mask, target_scores
from explainers.hooks import LayerRecorder, get_layer


@dataclass
class LayerContext:
    """What a method may use to make one layer's map."""

    model: nn.Module
    layer: str
    x: torch.Tensor           # the input batch (B, 3, H, W)
    logits: torch.Tensor      # (B, N)
    mask: torch.Tensor        # (B, K, N) target classes
    scores: torch.Tensor      # (B, K) target scores


@dataclass
class CAMResult:
    maps: torch.Tensor        # (B, K, H, W), each map in [0, 1] when normalised
    logits: torch.Tensor      # (B, N), detached
    scores: torch.Tensor      # (B, K) target scores, detached
    targets: list             # targets[b][k] = class indices


class BaseCAM:
    """Base class. Subclasses set `needs_gradients` and override `channel_weights` or `layer_map`."""

    needs_gradients = True

    def __init__(self, model, target_layers: str | Sequence[str] | None = None, head: str | None = None):
        from explainers.backbones import Backbone

        if isinstance(model, Backbone):
            target_layers = target_layers or model.target_layers
            head = head or model.head
            model = model.model
        if target_layers is None:
            raise ValueError("target_layers is required when passing a plain nn.Module")
        self.model = model
        self.target_layers = [target_layers] if isinstance(target_layers, str) else list(target_layers)
        for name in self.target_layers:
            get_layer(model, name)  # a wrong name fails here, listing the valid ones
        self.head = head

    # -- what subclasses override -------------------------------------------------------------
    def channel_weights(self, activation: torch.Tensor, grads: torch.Tensor | None,
                        ctx: LayerContext) -> torch.Tensor:
        """(B, C, h, w) activation, (B, K, C, h, w) gradients -> (B, K, C) channel weights."""
        raise NotImplementedError

    def layer_map(self, activation: torch.Tensor, grads: torch.Tensor | None, ctx: LayerContext) -> torch.Tensor:
        """-> (B, K, h, w) map of one layer: ReLU of the channel-weighted sum of activations."""
        weights = self.channel_weights(activation, grads, ctx)
        return F.relu(torch.einsum("bkc,bchw->bkhw", weights, activation))

    # -- the shared pipeline --------------------------------------------------------------------
    def compute(self, x: torch.Tensor, targets=None, output_size: tuple[int, int] | None = None,
                normalize: bool = True) -> CAMResult:
        """Maps for `targets` (see :func:`normalize_targets`) of the batch `x`, one forward pass."""
        if x.dim() != 4:
            raise ValueError(f"expected a batch (B, 3, H, W), got shape {tuple(x.shape)}")
        output_size = tuple(output_size or x.shape[-2:])
        with LayerRecorder(self.model, self.target_layers) as rec, torch.set_grad_enabled(self.needs_gradients):
            inp = x.detach().requires_grad_(self.needs_gradients)
            logits = self.model(inp)
            tlist = normalize_targets(targets, x.shape[0], logits)
            mask = target_mask(tlist, logits.shape[1], logits.device)
            scores = target_scores(logits, mask)
            acts = [rec[name] for name in self.target_layers]
            grads = self._gradients(scores, acts) if self.needs_gradients else [None] * len(acts)
            acts = [a.detach() for a in acts]
        # the hooks are gone here: methods that run the model again (Score-CAM) record nothing
        fused = None
        for name, act, grad in zip(self.target_layers, acts, grads):
            ctx = LayerContext(self.model, name, x.detach(), logits.detach(), mask, scores.detach())
            with torch.no_grad():
                layer = self.layer_map(act, grad, ctx)
                layer = F.interpolate(layer, size=output_size, mode="bilinear", align_corners=False)
                if len(self.target_layers) > 1:
                    layer = minmax(layer)  # each layer counts equally in the fusion
                fused = layer if fused is None else fused + layer
        with torch.no_grad():
            maps = fused / len(self.target_layers)
            if normalize:
                maps = minmax(maps)
        return CAMResult(maps=maps, logits=logits.detach(), scores=scores.detach(), targets=tlist)

    def __call__(self, x: torch.Tensor, targets=None, output_size=None, normalize: bool = True) -> torch.Tensor:
        return self.compute(x, targets, output_size, normalize).maps

    @staticmethod
    def _gradients(scores: torch.Tensor, acts: list[torch.Tensor]) -> list[torch.Tensor]:
        """d score[:, k] / d activation for every target k, stacked -> per layer (B, K, C, h, w)."""
        k_count = scores.shape[1]
        per_k = []
        for k in range(k_count):
            per_k.append(torch.autograd.grad(scores[:, k].sum(), acts, retain_graph=k < k_count - 1))
        return [torch.stack([g[i] for g in per_k], dim=1) for i in range(len(acts))]


def minmax(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Scale each (h, w) map of a (B, K, h, w) tensor to [0, 1]."""
    flat = maps.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values
    hi = flat.max(dim=2, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(maps)
