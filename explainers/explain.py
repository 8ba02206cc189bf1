"""One entry point for every explanation picture (used by ``tag2mask explain``)."""
from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np
import torch

from explainers.activations import activation_grid, activation_maps
from explainers.cams import METHODS
from explainers.cams.gradcam import GradCAM
from explainers.cams.targets import normalize_targets
from explainers.filter_patterns import filter_pattern
from explainers.guided import GuidedBackprop, guided_gradcam
from explainers.visualize import gradient_image, heatmap_overlay, montage, put_label

CAM_METHODS = ["cam", "gradcam", "gradcam++", "gradcampp", "scorecam", "layercam"]
EXPLAIN_METHODS = ["activations", "filters", *CAM_METHODS, "fusion", "guided", "guided-gradcam"]


def _single_image_targets(targets):
    """Targets of one photo -> the batch form of :func:`normalize_targets` (batch of 1).

    None: top-1 class. An int: that class. A tuple / set / range of ints: one class set. A list:
    several targets, each an int or a class set (one picture each).
    """
    if targets is None:
        return None
    if isinstance(targets, torch.Tensor):
        targets = targets.tolist()
    if isinstance(targets, (int, np.integer)):
        return [[[int(targets)]]]
    if isinstance(targets, (tuple, set, frozenset, range)):
        return [[[int(t) for t in sorted(targets)]]]
    items = list(targets)
    if not items:
        raise ValueError("targets is empty")
    return [[[int(t)] if isinstance(t, (int, np.integer)) else [int(i) for i in sorted(t)] for t in items]]


def _caption(backbone, classes: Sequence[int]) -> str:
    names = [backbone.categories[c] for c in classes]
    return names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}"


def _as_layers(layer) -> list[str] | None:
    if layer is None:
        return None
    return [layer] if isinstance(layer, str) else list(layer)


def explain(backbone, image_rgb: np.ndarray, method: str, layer: str | Sequence[str] | None = None,
            targets=None, *, size: int | None = None, alpha: float = 0.5, steps: int = 96,
            channels: Sequence[int] | None = None, n_channels: int = 8, max_channels: int | None = None,
            batch_size: int = 32) -> np.ndarray:
    """An explanation picture (uint8 RGB) of `image_rgb` by `backbone` (a loaded Backbone).

    method: one of :data:`EXPLAIN_METHODS`:
      - ``activations``: channel grid of `layer` (default: the backbone's target layer; a list
        gives one grid per layer);
      - ``filters``: filter patterns (`steps` of gradient ascent) of `channels` of `layer`, by
        default the `n_channels` channels this photo activates most;
      - ``cam``, ``gradcam``, ``gradcam++``/``gradcampp``, ``scorecam``, ``layercam``: heatmap over
        the photo for each target (`layer`: one layer or a list fused; default the target layer;
        Score-CAM takes `batch_size` and `max_channels`);
      - ``fusion``: Grad-CAM fused over ``backbone.fusion_layers`` (or `layer` if a list);
      - ``guided``: guided-backprop input gradient; ``guided-gradcam``: times the Grad-CAM map.
    targets: None (top-1 class), an int, a tuple/set of ints (one class set) or a list of such
    targets (one panel each, side by side, captioned with the class name).
    The photo is classified at `size` (default the backbone's input size, square); maps are shown
    at the photo's own resolution.
    """
    key = method.lower().strip()
    if key not in EXPLAIN_METHODS:
        raise ValueError(f"unknown explanation method {method!r}; valid: {', '.join(EXPLAIN_METHODS)}")
    img = np.asarray(image_rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 photo (H, W, 3), got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    side = size or backbone.input_size
    x = backbone.to_tensor(img, side)
    layers = _as_layers(layer)

    if key == "activations":
        names = layers or backbone.target_layers[:1]
        acts = activation_maps(backbone, x[0], names)
        grids = []
        for name in names:
            grid = activation_grid(acts[name], max_channels=max_channels or 64)
            grids.append(put_label(grid.copy(), name, (0, 0)))
        return montage(grids)

    if key == "filters":
        name = layers[0] if layers else backbone.target_layers[0]
        if channels is None:
            act = activation_maps(backbone, x[0], [name])[name]
            channels = act.mean(dim=(1, 2)).topk(min(n_channels, act.shape[0])).indices.tolist()
        channels = [int(c) for c in channels]
        pics = filter_pattern(backbone, name, channels, steps=steps, size=128)
        tiles = [put_label(p.copy(), f"{name}:{c}", (0, 0)) for p, c in zip(pics, channels)]
        cols = math.ceil(math.sqrt(len(tiles)))
        rows = [montage(tiles[i:i + cols]) for i in range(0, len(tiles), cols)]
        width = max(r.shape[1] for r in rows)
        rows = [np.concatenate([r, np.full((r.shape[0], width - r.shape[1], 3), 255, np.uint8)], axis=1)
                for r in rows]
        gap = np.full((4, width, 3), 255, np.uint8)
        out = rows[0]
        for r in rows[1:]:
            out = np.concatenate([out, gap, r])
        return out

    batch_targets = _single_image_targets(targets)
    if key in ("guided", "guided-gradcam"):
        if batch_targets is None:
            with torch.no_grad():
                batch_targets = normalize_targets(None, 1, backbone.model(x))
        if key == "guided":
            grads = GuidedBackprop(backbone)(x, batch_targets)[0]
        else:
            grads = guided_gradcam(backbone, x, batch_targets, layers)[0]
        panels = []
        for k, classes in enumerate(batch_targets[0]):
            pic = cv2.resize(gradient_image(grads[k]), (w, h), interpolation=cv2.INTER_LINEAR)
            panels.append(put_label(pic, _caption(backbone, classes), (0, 0)))
        return montage(panels)

    if key == "fusion":
        explainer = GradCAM(backbone, layers if layers and len(layers) > 1 else backbone.fusion_layers)
    elif key == "scorecam":
        explainer = METHODS[key](backbone, layers, batch_size=batch_size, max_channels=max_channels)
    else:
        explainer = METHODS[key](backbone, layers)
    result = explainer.compute(x, batch_targets)
    panels = []
    for k, classes in enumerate(result.targets[0]):
        cam = result.maps[0, k].detach().cpu().numpy()
        pic = heatmap_overlay(img, cam, alpha)
        panels.append(put_label(pic, _caption(backbone, classes), (0, 0)))
    return montage(panels)
