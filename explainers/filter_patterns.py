"""Filter patterns: input pictures that maximise one channel of a layer (activation maximisation).

The pictures are found by gradient ascent on the input, with regularisation that keeps them
legible rather than high-frequency noise:

- **multi-scale parameterisation**: the picture is optimised first at 1/4 of `size`, then
  upscaled to 1/2 and to full size (a third of the steps each), so coarse structure forms first;
- **sigmoid range**: pixels are ``255 * sigmoid(p)``, always valid colours;
- **jitter**: each step the picture is rolled by a random offset (up to 1/16 of its side),
  so the pattern cannot rely on exact pixel positions;
- **total variation** and a small **L2** penalty (on the picture's deviation from grey);
- **blur** of the parameters every `blur_every` steps (Gaussian, sigma 0.5 px).

Several channels are optimised together, one picture per channel in one batch. The forward pass
stops at the layer (an exception raised from the hook, which is always removed). Gradients are
taken with ``torch.autograd.grad`` w.r.t. the picture only, so the model's parameters get no
``.grad`` and their ``requires_grad`` flags are not touched. The model runs in eval mode during the
optimisation (so BatchNorm statistics are not updated); every module's training flag is restored.
"""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from explainers.hooks import get_layer

IMAGENET_MEAN_255 = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_255 = (0.229 * 255, 0.224 * 255, 0.225 * 255)


class _Stop(Exception):
    """Raised from the hook once the layer's output is known: the rest of the model is not run."""


def _layer_output(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    box: list[torch.Tensor] = []

    def hook(_m, _i, out):
        box.append(out)
        raise _Stop

    handle = module.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError("the layer was not run by the forward pass")
    return box[0]


def _blur(p: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    r = torch.arange(-1, 2, device=p.device, dtype=p.dtype)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = p.shape[1]
    p = F.conv2d(F.pad(p, (1, 1, 0, 0), mode="replicate"), k.view(1, 1, 1, 3).expand(c, 1, 1, 3), groups=c)
    return F.conv2d(F.pad(p, (0, 0, 1, 1), mode="replicate"), k.view(1, 1, 3, 1).expand(c, 1, 3, 1), groups=c)


def _tv(img: torch.Tensor) -> torch.Tensor:
    """Mean absolute neighbour difference per picture -> (N,)."""
    dx = (img[..., :, 1:] - img[..., :, :-1]).abs().mean(dim=(1, 2, 3))
    dy = (img[..., 1:, :] - img[..., :-1, :]).abs().mean(dim=(1, 2, 3))
    return dx + dy


def filter_pattern(backbone, layer: str | None = None, channels: int | Sequence[int] = 0, steps: int = 96,
                   lr: float = 0.08, size: int = 128, tv_weight: float = 0.5, l2_weight: float = 0.05,
                   blur_every: int = 4, seed: int = 0) -> np.ndarray:
    """Picture(s) maximising the mean activation of `channels` of `layer`.

    `backbone` is a :class:`~explainers.backbones.Backbone` (its preprocessing is used; `layer`
    defaults to its target layer) or a plain ``nn.Module`` (ImageNet mean/std on 0..255 input).
    `channels` an int -> one uint8 RGB picture (size, size, 3); a sequence -> (N, size, size, 3).
    Penalties are relative to the channel's activation scale: the objective is
    ``mean act / (|mean act| at start + 1) - tv_weight * TV - l2_weight * L2`` on pixels in [0, 1].
    """
    from explainers.backbones import Backbone

    if isinstance(backbone, Backbone):
        model, mean, std = backbone.model, backbone.mean, backbone.std
        layer = layer or backbone.target_layers[0]
    else:
        model, mean, std = backbone, IMAGENET_MEAN_255, IMAGENET_STD_255
        if layer is None:
            raise ValueError("layer is required for a plain nn.Module")
    module = get_layer(model, layer)
    single = isinstance(channels, (int, np.integer))
    chans = [int(channels)] if single else [int(c) for c in channels]
    if not chans:
        raise ValueError("no channels given")
    if steps < 1 or size < 8:
        raise ValueError("steps must be >= 1 and size >= 8")

    device = next(model.parameters()).device if any(True for _ in model.parameters()) else torch.device("cpu")
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    n = len(chans)
    chan_idx = torch.tensor(chans, device=device)
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        sizes = [max(8, size // 4), max(8, size // 2), size]
        param = (0.1 * torch.randn(n, 3, sizes[0], sizes[0], generator=gen, device=device))
        scale = None
        for stage, side in enumerate(sizes):
            if param.shape[-1] != side:
                param = F.interpolate(param, size=(side, side), mode="bilinear", align_corners=False)
            param = param.detach().requires_grad_(True)
            opt = torch.optim.Adam([param], lr=lr)
            stage_steps = steps // 3 + (1 if stage < steps % 3 else 0)
            for step in range(stage_steps):
                with torch.enable_grad():
                    img = torch.sigmoid(param)                                   # (N, 3, s, s) in [0, 1]
                    jit = max(1, side // 16)
                    dy, dx = rng.randint(-jit, jit), rng.randint(-jit, jit)
                    shifted = torch.roll(img, shifts=(dy, dx), dims=(2, 3))
                    if side != size:
                        shifted = F.interpolate(shifted, size=(size, size), mode="bilinear", align_corners=False)
                    out = _layer_output(model, module, (shifted * 255 - mean_t) / std_t)
                    if out.dim() != 4:
                        raise ValueError(f"layer {layer!r} gives {out.dim()}-D output, not (B, C, h, w)")
                    if chan_idx.max() >= out.shape[1]:
                        raise ValueError(f"layer {layer!r} has {out.shape[1]} channels; asked for {max(chans)}")
                    act = out[torch.arange(n, device=device), chan_idx].mean(dim=(1, 2))  # (N,)
                    if scale is None:
                        scale = act.detach().abs() + 1.0
                    objective = act / scale - tv_weight * _tv(img) - l2_weight * (img - 0.5).pow(2).mean(dim=(1, 2, 3))
                    (grad,) = torch.autograd.grad(-objective.sum(), param)
                param.grad = grad
                opt.step()
                param.grad = None
                if blur_every and (step + 1) % blur_every == 0:
                    with torch.no_grad():
                        param.copy_(_blur(param))
        with torch.no_grad():
            img = torch.sigmoid(param)
            if img.shape[-1] != size:
                img = F.interpolate(img, size=(size, size), mode="bilinear", align_corners=False)
            pics = (img * 255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    finally:
        for m, flag in modes.items():
            m.training = flag
    return pics[0] if single else pics
