"""HTML report of ``tag2mask eval --report DIR``: the best, median and worst photos, side by side.

For each chosen photo four PNG files are written next to ``index.html``: the photo, its CAM as a
heat map over the photo, the predicted mask and the ground-truth mask as coloured overlays with
their outlines (drawn by :mod:`explainers.visualize`). The page lists the summary scores and one row per photo (name, fg IoU, seconds),
so a person sees at a glance where and how the masks fail (clutter, thin legs, several objects...).

Class mode (a run of :func:`backend.cli.evaluation.evaluate_classes`): photos are ranked by their score (the
mean fg IoU of their tags); the masks are drawn one colour per tag (the same colour in prediction and
truth, named in the photo's row with each tag's IoU), the CAM is that of the photo's worst tag, and the
page adds the table of classes, worst first, and the tags that are not coverable, with the reasons.

    run = evaluate(engine, pairs, "horse", keep_masks=True)
    write_report(run, "report/", "tag 'horse'", per_group=3)    # -> report/index.html, report/*.png
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

__all__ = ["pick_photos", "write_report"]

MAX_SIDE = 320      # the PNGs' long side, pixels
PRED_COLOR, TRUTH_COLOR = (255, 40, 40), (40, 200, 40)   # tag mode: the predicted mask, the true one
TAG_COLORS = [(230, 25, 75), (60, 180, 75), (67, 99, 216), (245, 130, 49), (145, 30, 180), (66, 212, 244),
              (240, 50, 230), (191, 239, 69), (154, 99, 36), (0, 0, 117), (128, 128, 0), (128, 0, 0)]


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


def _swatch(k: int) -> str:
    r, g, b = TAG_COLORS[k % len(TAG_COLORS)]
    return f'<span style="color:#{r:02x}{g:02x}{b:02x}">&#9632;</span>'


def _class_section(summary: dict) -> str:
    """Class mode: the classes, worst first, and the tags that are not coverable."""
    rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{c['fg_iou']:.3f}</td><td>{c['box_iou']:.3f}</td>"
                   f"<td>{c['photos']}</td></tr>"
                   for name, c in sorted(summary["classes"].items(), key=lambda kv: (kv[1]["fg_iou"], kv[0])))
    missing = "".join(f"<li><b>{html.escape(name)}</b> ({c['photos']} photos): {html.escape(c['reason'])}</li>"
                      for name, c in summary.get("not_coverable", {}).items())
    return (f"<h2>Classes, worst first</h2><table class=\"classes\"><tr><th>class</th><th>fg IoU</th><th>box IoU</th>"
            f"<th>photos</th></tr>{rows}</table>"
            + (f"<h2>Tags that are not coverable (left out of every mean)</h2><ul>{missing}</ul>" if missing else ""))


def _pictures(image: np.ndarray, p) -> dict[str, np.ndarray]:
    """A photo's four pictures (:mod:`explainers.visualize`): the photo, its CAM as a heat map over
    it, the predicted and the true mask tinted and outlined over it (tag mode: red and green; class
    mode: ``TAG_COLORS`` per tag of the label maps)."""
    from explainers.visualize import heatmap_overlay, label_overlay, mask_overlay

    if getattr(p, "tags", None) is None:
        files = {name: mask_overlay(image, {name: m}, alpha=0.5, labels=False, colors={name: color})
                 for name, m, color in (("mask", p.pred, PRED_COLOR), ("truth", p.gt, TRUTH_COLOR))}
    else:
        files = {"mask": label_overlay(image, p.pred, TAG_COLORS, alpha=0.5),
                 "truth": label_overlay(image, p.gt, TAG_COLORS, alpha=0.5)}
    cam = getattr(p, "cam", None)
    return {"photo": image, **files, "cam": heatmap_overlay(image, cam, alpha=0.5) if cam is not None else image}


def _save(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(_shrink(rgb), cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def write_report(run, out_dir: str | Path, what: str, title: str = "", per_group: int = 3) -> Path:
    """Write ``out_dir/index.html`` and its PNGs for an :class:`backend.cli.evaluation.EvalRun` made with
    ``keep_masks=True``; returns the page's path. `what` heads the page ("tag 'horse'", "classes
    classes.txt"). Up to `per_group` photos per group (fewer when there are fewer than 3 x per_group
    photos, so that every group shows)."""
    from backend.cli.evaluation import format_class_summary, format_summary
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
            tags = getattr(p, "tags", None)
            files = _pictures(image, p)
            if tags is None:
                info = f"fg IoU {p.iou:.3f}"
            else:
                info = f"score {p.iou:.3f}" + "".join(f"<br>{_swatch(k)} {html.escape(t)} {v:.3f}"
                                                      for k, (t, v) in enumerate(tags.items()))
                if p.cam_tag:
                    info += f"<br>CAM: {html.escape(p.cam_tag)}"
            names = {}
            for kind in ("photo", "cam", "mask", "truth"):
                names[kind] = f"{group}-{safe}-{kind}.png"
                _save(out / names[kind], files[kind])
            cells = "".join(f'<td><img src="{html.escape(names[k])}" alt="{k} of {html.escape(p.name)}"></td>'
                            for k in ("photo", "cam", "mask", "truth"))
            rows.append(f"<tr><td>{html.escape(p.name)}<br>{info}<br>{p.seconds:.2f} s</td>{cells}</tr>")
    class_mode = "classes" in run.summary
    summary = (format_class_summary if class_mode else format_summary)(run.summary, title)
    extra = _class_section(run.summary) if class_mode and run.summary.get("n") else ""
    ranking = "score (the mean fg IoU of the photo's tags)" if class_mode else "foreground IoU"
    colours = ("predicted masks and ground truth in one colour per tag; the CAM is that of the photo's worst tag"
               if class_mode else "predicted mask (red); ground truth (green)")
    errors = "".join(f"<li>{html.escape(e.error)}</li>" for e in getattr(run, "errors", []))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>tag2mask eval: {html.escape(what)}</title>
<style>body{{font-family:sans-serif}} td{{vertical-align:top;padding:4px}} img{{max-width:320px}}
th.group{{text-align:left;background:#eee;padding:6px}} pre{{background:#f6f6f6;padding:8px}}
table.classes td{{padding:1px 8px}}</style></head>
<body><h1>tag2mask eval: {html.escape(what)}</h1>
<pre>{html.escape(summary)}</pre>
<p>Best, median and worst photos by {ranking}. Columns: photo; CAM heat map (red = strong);
{colours}.</p>
<table><tr><th>photo</th><th>photo</th><th>CAM</th><th>predicted mask</th><th>ground truth</th></tr>
{chr(10).join(rows)}
</table>
{extra}
{f"<h2>Failed photos</h2><ul>{errors}</ul>" if errors else ""}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index
