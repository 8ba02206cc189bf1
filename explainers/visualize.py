"""Pictures of explanations: heatmap overlays, mask/polygon/box overlays, label-map overlays,
gradient images, montages, PNG files."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Mapping, Sequence

import cv2
import numpy as np
import torch


def _to_numpy(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _check_rgb(rgb) -> np.ndarray:
    rgb = _to_numpy(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB picture (H, W, 3), got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        rgb = np.clip(rgb, 0, 255).astype(np.uint8)
    return rgb


def heatmap(cam, size: tuple[int, int] | None = None, colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """(h, w) float map in [0, 1] -> uint8 RGB colour picture, resized to `size` = (H, W) if given."""
    cam = _to_numpy(cam).astype(np.float32)
    if cam.ndim != 2:
        raise ValueError(f"expected one (H, W) map, got shape {cam.shape}")
    if size is not None and cam.shape != tuple(size):
        cam = cv2.resize(cam, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    cam8 = (np.clip(np.nan_to_num(cam), 0, 1) * 255).round().astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(cam8, colormap), cv2.COLOR_BGR2RGB)


def heatmap_overlay(rgb, cam, alpha: float = 0.5, colormap: int = cv2.COLORMAP_JET) -> np.ndarray:
    """Blend a (H, W) map in [0, 1] (resized to the photo if needed) over an RGB photo -> uint8 RGB."""
    rgb = _check_rgb(rgb)
    if not 0 <= alpha <= 1:
        raise ValueError("alpha must be in [0, 1]")
    color = heatmap(cam, rgb.shape[:2], colormap)
    return cv2.addWeighted(color, alpha, rgb, 1 - alpha, 0)


def distinct_colors(n: int) -> list[tuple[int, int, int]]:
    """`n` well separated, saturated RGB colours (golden-ratio hue steps)."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.85, 1.0)
        out.append((int(r * 255), int(g * 255), int(b * 255)))
    return out


def _points(poly) -> np.ndarray:
    pts = getattr(poly, "points", poly)
    return np.round(np.asarray(pts, np.float64)).astype(np.int32).reshape(-1, 1, 2)


def _box(box) -> tuple[int, int, int, int]:
    if hasattr(box, "x0"):
        return int(round(box.x0)), int(round(box.y0)), int(round(box.x1)), int(round(box.y1))
    x0, y0, x1, y1 = box[:4]
    return int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))


def _by_name(items, names: list[str]) -> dict:
    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    if len(names) == 1:
        return {names[0]: items}
    raise ValueError("with several masks, give polygons/boxes as a dict name -> list")


def mask_overlay(rgb, masks: Mapping[str, np.ndarray], polygons=None, boxes=None, alpha: float = 0.45,
                 labels: bool = True, colors: Mapping[str, tuple[int, int, int]] | None = None) -> np.ndarray:
    """Masks, polygons and boxes drawn over a photo -> uint8 RGB.

    `masks` maps a name to a bool (H, W) mask: filled with a distinct colour per name and
    outlined by its contours. `polygons` / `boxes` map the same names to lists of polygons (objects
    with ``.points`` or sequences of (x, y) pixels) and boxes (objects with x0, y0, x1, y1 or
    tuples), drawn as lines in the name's colour. Names are written at each mask's top left.
    `colors` (name -> RGB) fixes the colours of some names; the others get distinct ones.
    """
    rgb = _check_rgb(rgb)
    names = list(masks)
    polys = _by_name(polygons, names)
    bxs = _by_name(boxes, names)
    for extra in list(polys) + list(bxs):
        if extra not in names:
            names.append(extra)
    colors = {**dict(zip(names, distinct_colors(len(names)))), **dict(colors or {})}
    out = rgb.astype(np.float32)
    h, w = rgb.shape[:2]
    for name, mask in masks.items():
        m = _to_numpy(mask).astype(bool)
        if m.shape != (h, w):
            raise ValueError(f"mask {name!r} has shape {m.shape}, the photo is {(h, w)}")
        out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colors[name], np.float32)
    out = out.round().astype(np.uint8)
    thick = max(1, round(max(h, w) / 300))
    for name, mask in masks.items():
        m = _to_numpy(mask).astype(np.uint8)
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colors[name], thick)
    for name, plist in polys.items():
        for poly in plist:
            pts = _points(poly)
            if len(pts) >= 2:
                cv2.polylines(out, [pts], True, (255, 255, 255), thick + 2)
                cv2.polylines(out, [pts], True, colors[name], thick)
    for name, blist in bxs.items():
        for box in blist:
            x0, y0, x1, y1 = _box(box)
            cv2.rectangle(out, (x0, y0), (x1, y1), colors[name], thick + 1)
    if labels:
        for name, mask in masks.items():
            ys, xs = np.nonzero(_to_numpy(mask))
            if len(xs):
                put_label(out, name, (int(xs.min()), int(ys.min())), colors[name])
    return out


def label_overlay(rgb, labels, palette: Sequence[tuple[int, int, int]] | None = None,
                  alpha: float = 0.45) -> np.ndarray:
    """An (H, W) integer label map drawn over a photo -> uint8 RGB: each label k > 0 filled and
    outlined (:func:`mask_overlay`, no names written) in ``palette[(k - 1) % len(palette)]``
    (default: :func:`distinct_colors` of the largest label); label 0 is left as it is."""
    lab = _to_numpy(labels)
    ks = [int(k) for k in np.unique(lab) if k > 0]
    palette = list(palette) if palette else distinct_colors(max(ks, default=0))
    masks = {str(k): lab == k for k in ks}
    colors = {str(k): tuple(palette[(k - 1) % len(palette)]) for k in ks}
    return mask_overlay(rgb, masks, alpha=alpha, labels=False, colors=colors)


def put_label(img: np.ndarray, text: str, org: tuple[int, int], color=(255, 255, 255)) -> np.ndarray:
    """Write `text` in place with a dark background box at `org` (top left), kept inside the picture."""
    h, w = img.shape[:2]
    scale = max(0.4, min(h, w) / 600)
    thick = max(1, round(scale * 1.5))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x = int(np.clip(org[0], 0, max(0, w - tw - 4)))
    y = int(np.clip(org[1], 0, max(0, h - th - base - 4)))
    cv2.rectangle(img, (x, y), (x + tw + 4, y + th + base + 4), (0, 0, 0), -1)
    cv2.putText(img, text, (x + 2, y + th + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thick, cv2.LINE_AA)
    return img


def gradient_image(grad, percentile: float = 99.5) -> np.ndarray:
    """(3, H, W) input gradient -> uint8 RGB (H, W, 3): 0 is mid grey, +-the `percentile` of
    |grad| maps to 255 / 0."""
    g = _to_numpy(grad).astype(np.float32)
    if g.ndim != 3 or g.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) gradient, got shape {g.shape}")
    lim = float(np.percentile(np.abs(g), percentile))
    g = g / lim if lim > 0 else g
    img = np.clip(0.5 + 0.5 * g, 0, 1).transpose(1, 2, 0)
    return (img * 255).round().astype(np.uint8)


def montage(pictures: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """RGB pictures side by side (each padded to the tallest) with white gaps."""
    pics = [p if p.ndim == 3 else np.repeat(p[..., None], 3, axis=2) for p in pictures]
    h = max(p.shape[0] for p in pics)
    parts = []
    for i, p in enumerate(pics):
        if p.shape[0] < h:
            p = np.concatenate([p, np.full((h - p.shape[0],) + p.shape[1:], 255, np.uint8)])
        if i:
            parts.append(np.full((h, gap, 3), 255, np.uint8))
        parts.append(p)
    return np.concatenate(parts, axis=1)


def save_png(path: str | Path, rgb) -> Path:
    """Write an RGB (H, W, 3) or grey (H, W) uint8 picture as PNG; parent folders are created."""
    img = _to_numpy(rgb)
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 picture, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    elif img.ndim != 2:
        raise ValueError(f"expected (H, W, 3) or (H, W), got shape {img.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")
    return path
