"""HTML report of ``tag2mask eval --report DIR``: the best, median and worst photos, side by side.

For each chosen photo four PNG files are written next to ``index.html``: the photo, its CAM as a
heat map over the photo, the predicted mask and the ground-truth mask as coloured overlays with
their outlines. The page lists the summary scores and one row per photo (name, fg IoU, seconds),
so a person sees at a glance where and how the masks fail (clutter, thin legs, several objects...).

    run = evaluate(engine, pairs, "horse", keep_masks=True)
    write_report(run, "report/", tag="horse", per_group=3)    # -> report/index.html, report/*.png
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

__all__ = ["pick_photos", "write_report", "overlay_mask", "overlay_heatmap"]

MAX_SIDE = 320      # the PNGs' long side, pixels


def pick_photos(photos: Sequence, per_group: int = 3) -> list[tuple[str, list]]:
    """(group name, photos) for "best", "median" and "worst" by fg IoU; a photo appears once
    (fewer photos than 3 x per_group: each goes to the first group that wants it)."""
    ranked = sorted(photos, key=lambda p: (-p.iou, p.name))
    n = len(ranked)
    k = max(1, int(per_group))
    mid = max(0, n // 2 - k // 2)
    wanted = [("best", list(range(0, min(k, n)))), ("median", list(range(mid, min(mid + k, n)))),
              ("worst", list(range(max(0, n - k), n))[::-1])]
    used: set[int] = set()
    out = []
    for name, idx in wanted:
        idx = [i for i in idx if i not in used]
        used.update(idx)
        if idx:
            out.append((name, [ranked[i] for i in idx]))
    return out


def _shrink(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    f = MAX_SIDE / max(h, w)
    if f >= 1:
        return image
    return cv2.resize(image, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)


def overlay_mask(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """RGB photo with the mask tinted in `color` (RGB) and its outline drawn."""
    m = mask.astype(bool)
    out = image.astype(np.float32).copy()
    out[m] = 0.5 * out[m] + 0.5 * np.array(color, np.float32)
    out = out.clip(0, 255).astype(np.uint8)
    contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, color, max(1, round(max(image.shape[:2]) / 300)))
    return out


def overlay_heatmap(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """RGB photo blended with a jet colour map of a [0, 1] map of the same size."""
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    return (0.5 * image.astype(np.float32) + 0.5 * heat.astype(np.float32)).clip(0, 255).astype(np.uint8)


def _save(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(_shrink(rgb), cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def write_report(run, out_dir: str | Path, tag: str, title: str = "", per_group: int = 3) -> Path:
    """Write ``out_dir/index.html`` and its PNGs for an :class:`backend.eval_cmd.EvalRun` made with
    ``keep_masks=True``; returns the page's path. Up to `per_group` photos per group (fewer when
    there are fewer than 3 x per_group photos, so that every group shows)."""
    from backend.eval_cmd import format_summary
    from explainers.imageio import load_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kept = [p for p in run.photos if p.pred is not None and p.gt is not None]
    groups = pick_photos(kept, min(per_group, max(1, len(kept) // 3)))   # few photos: one per group
    rows = []
    for group, photos in groups:
        rows.append(f'<tr><th colspan="5" class="group">{html.escape(group)}</th></tr>')
        for p in photos:
            image = load_image(p.image)
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in p.name)
            files = {"photo": image, "mask": overlay_mask(image, p.pred, (255, 40, 40)),
                     "truth": overlay_mask(image, p.gt, (40, 200, 40))}
            cam = getattr(p, "cam", None)
            files["cam"] = overlay_heatmap(image, cam) if cam is not None else image
            names = {}
            for kind in ("photo", "cam", "mask", "truth"):
                names[kind] = f"{group}-{safe}-{kind}.png"
                _save(out / names[kind], files[kind])
            cells = "".join(f'<td><img src="{html.escape(names[k])}" alt="{k} of {html.escape(p.name)}"></td>'
                            for k in ("photo", "cam", "mask", "truth"))
            rows.append(f"<tr><td>{html.escape(p.name)}<br>fg IoU {p.iou:.3f}<br>{p.seconds:.2f} s</td>{cells}</tr>")
    summary = format_summary(run.summary, title)
    errors = "".join(f"<li>{html.escape(e.error)}</li>" for e in getattr(run, "errors", []))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tag2mask eval: {html.escape(tag)}</title>
<style>body{{font-family:sans-serif}} td{{vertical-align:top;padding:4px}} img{{max-width:320px}}
th.group{{text-align:left;background:#eee;padding:6px}} pre{{background:#f6f6f6;padding:8px}}</style></head>
<body><h1>tag2mask eval: tag {html.escape(tag)!s}</h1>
<pre>{html.escape(summary)}</pre>
<p>Best, median and worst photos by foreground IoU. Columns: photo; CAM heat map (red = strong);
predicted mask (red); ground truth (green).</p>
<table><tr><th>photo</th><th>photo</th><th>CAM</th><th>predicted mask</th><th>ground truth</th></tr>
{chr(10).join(rows)}
</table>
{f"<h2>Failed photos</h2><ul>{errors}</ul>" if errors else ""}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
