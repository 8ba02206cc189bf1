"""Guided backpropagation (Springenberg et al., 2015) and Guided Grad-CAM, without touching the
user's model.

The model is deep-copied once; in the copy every ``nn.ReLU`` / ``nn.ReLU6`` module (in-place ones
and timm's ``BatchNormAct2d.act`` included) is replaced by :class:`GuidedReLU`, whose forward is
the activation and whose backward lets through only positive gradient, and only where the
forward input was in the activation's linear range (``x > 0``; ``0 < x < 6`` for ReLU6). The
user's model keeps its modules, hooks, flags and parameters; the copy's parameters never require
gradients. Activations called functionally (``F.relu``) or of other kinds (SiLU, GELU) are not
guided (a warning is given when the model has no ReLU module at all). Gradients are taken with
``torch.autograd.grad`` w.r.t. the input, one forward pass for all K targets of a batch.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from explainers.cams.targets import normalize_targets, target_mask, target_scores


class _GuidedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, upper):
        ctx.save_for_backward(x)
        ctx.upper = upper
        return x.clamp(0, upper) if upper is not None else x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        keep = x > 0
        if ctx.upper is not None:
            keep = keep & (x < ctx.upper)
        return grad_out.clamp_min(0) * keep.to(grad_out.dtype), None


class GuidedReLU(nn.Module):
    """ReLU (``upper=None``) or ReLU6 (``upper=6``) with the guided backward rule."""

    def __init__(self, upper: float | None = None):
        super().__init__()
        self.upper = upper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedFn.apply(x, self.upper)

    def extra_repr(self) -> str:
        return f"upper={self.upper}"


def guided_copy(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with guided ReLUs, no hooks and parameters that need no gradient."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module._backward_hooks.clear()
        if hasattr(module, "_backward_pre_hooks"):
            module._backward_pre_hooks.clear()
    for p in clone.parameters():
        p.requires_grad_(False)
        p.grad = None
    if _swap_relus(clone) == 0:
        warnings.warn("guided backprop: the model has no nn.ReLU / nn.ReLU6 modules (functional or other "
                      "activations are not guided); the result is the plain input gradient", stacklevel=3)
    return clone


def _swap_relus(module: nn.Module) -> int:
    """Replace ReLU / ReLU6 children recursively; -> how many were replaced."""
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.ReLU6):
            setattr(module, name, GuidedReLU(6.0))
            count += 1
        elif isinstance(child, nn.ReLU):
            setattr(module, name, GuidedReLU(None))
            count += 1
        else:
            count += _swap_relus(child)
    return count


def _unwrap(model_or_backbone):
    from explainers.backbones import Backbone

    if isinstance(model_or_backbone, Backbone):
        return model_or_backbone.model
    return model_or_backbone


class GuidedBackprop:
    """Guided-backprop input gradients. The guided copy is made once, here: later changes to the
    user's weights are not seen (make a new instance)."""

    def __init__(self, model_or_backbone):
        self.model = _unwrap(model_or_backbone)
        self.guided = guided_copy(self.model)

    def __call__(self, x: torch.Tensor, targets=None) -> torch.Tensor:
        """(B, 3, H, W) batch -> (B, K, 3, H, W) guided gradients of each target's score."""
        if x.dim() != 4:
            raise ValueError(f"expected a batch (B, 3, H, W), got shape {tuple(x.shape)}")
        self.guided.train(self.model.training)
        with torch.enable_grad():
            inp = x.detach().requires_grad_(True)
            logits = self.guided(inp)
            tlist = normalize_targets(targets, x.shape[0], logits)
            mask = target_mask(tlist, logits.shape[1], logits.device)
            scores = target_scores(logits, mask)
            k_count = scores.shape[1]
            grads = [torch.autograd.grad(scores[:, k].sum(), inp, retain_graph=k < k_count - 1)[0]
                     for k in range(k_count)]
        return torch.stack(grads, dim=1)


def guided_gradcam(backbone_or_model, x: torch.Tensor, targets=None, layer=None) -> torch.Tensor:
    """Guided Grad-CAM: guided backprop (B, K, 3, H, W) times the Grad-CAM map of `layer` (default:
    the backbone's target layer; required for a plain module)."""
    from explainers.cams.gradcam import GradCAM

    cam = GradCAM(backbone_or_model, layer)
    result = cam.compute(x, targets)
    gb = GuidedBackprop(backbone_or_model)(x, result.targets)
    return gb * result.maps.unsqueeze(2)
