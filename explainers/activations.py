"""Activation maps of a model's layers, and a grid picture of one layer's channels."""
from __future__ import annotations

import math
from typing import Iterable

import cv2
import numpy as np
import torch
from torch import nn

from explainers.hooks import LayerRecorder

POOL_TYPES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _unwrap(backbone_or_model) -> nn.Module:
    from explainers.backbones import Backbone

    return backbone_or_model.model if isinstance(backbone_or_model, Backbone) else backbone_or_model


def conv_pool_layers(model: nn.Module) -> list[str]:
    """Names of every conv and pooling layer, in definition order."""
    return [n for n, m in model.named_modules() if n and isinstance(m, (nn.Conv2d,) + POOL_TYPES)]


@torch.no_grad()
def activation_maps(backbone_or_model, x: torch.Tensor, layers: str | Iterable[str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Outputs of `layers` (default: every conv/pool layer) for `x`, from one forward pass.

    `x` is one preprocessed image (3, H, W) -> each value (C, h, w); or a batch (B, 3, H, W) ->
    each value (B, C, h, w). Tensors stay on the model's device. Layers whose output is not 4-D
    (e.g. a global pool followed by a flatten) are kept as they are.
    """
    model = _unwrap(backbone_or_model)
    single = x.dim() == 3
    batch = x.unsqueeze(0) if single else x
    names = conv_pool_layers(model) if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    with LayerRecorder(model, names) as rec:
        model(batch)
        out = {n: rec[n].detach() for n in names}
    return {n: (t[0] if single else t) for n, t in out.items()}


def activation_grid(tensor: torch.Tensor | np.ndarray, max_channels: int = 64, tile: int = 64,
                    colormap: int | None = cv2.COLORMAP_VIRIDIS, gap: int = 2) -> np.ndarray:
    """One layer's (C, h, w) channels as a uint8 grid picture.

    The `max_channels` most active channels (largest mean) are shown, most active first, each
    min-max scaled on its own and enlarged to about `tile` px (nearest neighbour, so the layer's
    resolution stays visible). With `colormap` (an OpenCV colormap) the result is RGB (H, W, 3),
    with ``colormap=None`` grey (H, W). Tiles are separated by `gap` white pixels.
    """
    t = torch.as_tensor(tensor).detach().float()
    if t.dim() == 4 and t.shape[0] == 1:
        t = t[0]
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(f"expected one layer's activations (C, h, w), got shape {tuple(t.shape)}")
    c_count, h, w = t.shape
    n = min(c_count, max(1, int(max_channels)))
    order = t.mean(dim=(1, 2)).argsort(descending=True)[:n]
    chosen = t[order].flatten(1)
    lo = chosen.min(dim=1, keepdim=True).values
    hi = chosen.max(dim=1, keepdim=True).values
    chosen = ((chosen - lo) / (hi - lo).clamp_min(1e-8)).view(n, h, w)
    tiles = (chosen * 255).round().byte().cpu().numpy()
    scale = max(1, round(tile / max(h, w)))
    th, tw = h * scale, w * scale
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (th + gap) + gap, cols * (tw + gap) + gap), 255, np.uint8)
    border = np.ones(grid.shape, bool)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = gap + r * (th + gap), gap + c * (tw + gap)
        grid[y:y + th, x:x + tw] = cv2.resize(tiles[i], (tw, th), interpolation=cv2.INTER_NEAREST)
        border[y:y + th, x:x + tw] = False
    if colormap is None:
        return grid
    colored = cv2.cvtColor(cv2.applyColorMap(grid, colormap), cv2.COLOR_BGR2RGB)
    colored[border] = 255
    return colored
