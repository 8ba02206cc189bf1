"""``tag2mask demo``: pre-label three real photos bundled with scikit-image, offline.

    chelsea              -> cat
    coffee               -> cup
    stereo_motorcycle[0] -> motorcycle (the left image of the stereo pair)

Writes OUT/photos/<name>.png (the inputs), everything ``tag2mask label`` writes (masks, overlays,
tasks.json, label_config.xml, summary.json, errors.json) and OUT/index.html: one row per photo with
the photo, its overlay, the tags with scores and mask areas, and the timings.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["DEMO_PHOTOS", "demo_photos", "write_index", "overlay_strip", "run_demo"]


def _motorcycle_left() -> np.ndarray:
    from skimage import data

    return data.stereo_motorcycle()[0]


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from skimage import data

        return getattr(data, name)()
    return load


DEMO_PHOTOS: list[tuple[str, str, Callable[[], np.ndarray]]] = [
    ("chelsea", "cat", _skimage("chelsea")),
    ("coffee", "cup", _skimage("coffee")),
    ("motorcycle", "motorcycle", _motorcycle_left),
]


def demo_photos(folder: Path) -> dict[str, list[str]]:
    """Write the demo photos as PNG into `folder`; returns {file name: [tag]} (a --tags-csv map)."""
    from explainers.visualize import save_png

    tags = {}
    for name, tag, load in DEMO_PHOTOS:
        save_png(folder / f"{name}.png", np.ascontiguousarray(load()[:, :, :3]))
        tags[f"{name}.png"] = [tag]
    return tags


def _quality(row: dict, label: str) -> str:
    """`label` + the tag's estimated mask quality (summary.json's "quality"), or "" when unknown."""
    q = row.get("quality")
    return "" if q is None else f"{label}{q:.2f}"


def write_index(out: Path, summary, photos_dir: str = "photos", title: str = "tag2mask demo") -> Path:
    """OUT/index.html: photo | overlay | tags (probability, estimated mask quality, mask area) | timings,
    with relative links."""
    esc = html.escape
    rows = []
    for rec in summary.records:
        photo = f"{photos_dir}/{Path(rec.path).name}"
        tags = "".join(f"<li><b>{esc(t['tag'])}</b> probability {t['score']:.2f}{_quality(t, ', mask quality ')}, "
                       f"mask {100 * t['area']:.1f}% of the "
                       f"photo, {t['polygons']} polygon(s), {t['boxes']} box(es) "
                       f"(<a href='{esc(t['mask'])}'>mask</a>)</li>" for t in rec.tags)
        stages = ", ".join(f"{esc(k)} {v:.2f}" for k, v in rec.timings.items() if k != "total")
        total = rec.timings.get("total", rec.seconds)
        rows.append(
            "<tr>"
            f"<td><a href='{esc(photo)}'><img src='{esc(photo)}' alt='{esc(rec.name)}'></a><br>{esc(rec.name)} "
            f"({rec.width}&times;{rec.height})</td>"
            f"<td><a href='{esc(rec.overlay)}'><img src='{esc(rec.overlay)}' alt='overlay'></a></td>"
            f"<td><ul>{tags}</ul></td>"
            f"<td>{total:.2f} s<br><small>{stages}</small><br><small>with file writing: {rec.seconds:.2f} s</small></td>"
            "</tr>")
    errors = "".join(f"<li>{esc(e.error)}</li>" for e in summary.errors)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: .5em; vertical-align: top; text-align: left; }}
img {{ max-width: 360px; max-height: 300px; }}
</style></head><body>
<h1>{esc(title)}</h1>
<p>Image-level tags turned into masks, polygons and boxes. Files: <a href="tasks.json">tasks.json</a>
(Label Studio import), <a href="label_config.xml">label_config.xml</a>, <a href="summary.json">summary.json</a>.
Total {summary.seconds:.1f} s for {summary.ok} photo(s).</p>
<table><tr><th>photo</th><th>overlay</th><th>tags</th><th>seconds</th></tr>
{chr(10).join(rows)}
</table>
{f"<h2>Errors</h2><ul>{errors}</ul>" if errors else ""}
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def overlay_strip(paths, height: int = 220) -> np.ndarray:
    """Pictures side by side at one height (the README picture)."""
    import cv2
    from PIL import Image

    from explainers.visualize import montage

    pics = []
    for path in paths:
        pic = np.asarray(Image.open(path).convert("RGB"))
        pics.append(cv2.resize(pic, (round(pic.shape[1] * height / pic.shape[0]), height), interpolation=cv2.INTER_AREA))
    return montage(pics)


def run_demo(args) -> int:
    """The command: photos -> OUT, label them, write index.html; exit 0 when all three worked."""
    from backend.cli.common import make_engine, model_version
    from backend.cli.labeling import collect_photos, label_photos

    out = Path(args.out)
    photos_dir = out / "photos"
    start = time.perf_counter()
    tags_map = demo_photos(photos_dir)
    engine = make_engine(args)
    photos, errors = collect_photos(sorted(photos_dir / name for name in tags_map))
    summary = label_photos(photos, engine, out, tags_map=tags_map, errors=errors,
                           model_version=model_version(args), progress=not args.quiet)
    index = write_index(out, summary)
    if getattr(args, "strip", None):
        from PIL import Image

        strip = overlay_strip([out / rec.overlay for rec in summary.records])
        Path(args.strip).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(strip).quantize(colors=256, dither=Image.Dither.FLOYDSTEINBERG).save(args.strip, optimize=True)
    for rec in summary.records:
        tags = ", ".join(f"{t['tag']} p {t['score']:.2f}{_quality(t, ' q ')}" for t in rec.tags)
        print(f"  {rec.name:12s} {tags:26s} {rec.timings.get('total', rec.seconds):.2f} s -> {rec.overlay}")
    print(f"demo: {summary.ok} photos pre-labelled in {time.perf_counter() - start:.1f} s; open {index}")
    return summary.exit_status
