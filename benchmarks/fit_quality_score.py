"""Fit the mask-quality model (explainers/segment/quality.py) on dev data; write explainers/data/quality_score.json.

Per (photo, tag) of the dev sets -- coco128_dev (tags.csv, the ImageNet-coverable classes, ignore 0),
MSRC-v2 split_dev.txt (coverable classes, ignore 255) and the Weizmann horse train split (tag "horse") --
the pipeline (``tag2mask label``'s default: efficientnet_lite0, preset balanced) segments the photo with
all its tags while a recorder takes each tag's quality features (:func:`tag_features`, computed inside
the pipeline); the true fg IoU of its mask is counted over the valid pixels. The rows are cached per set
under ``--cache`` (default /tmp/tag2mask_quality; the key covers the settings and the feature code), so a
refit does not rerun the pipeline.

The dev sets' tags are all in their photos; so that a tag the photo lacks (a wrong tag) scores low too,
each dev photo is also segmented with one tag it lacks, alone (:func:`absent_tag`; true IoU 0).

The model: fractional logistic regression (targets = fg IoU in [0, 1], cross-entropy, L2 penalty
``--l2`` on the standardised features), each set weighted equally (its rows share a weight of 1), the
absent-tag rows of all sets together ``--absent-weight`` (0.1: on the dev folds it kept the ranking of
the true tags while a photo's lacking tag scored below its best true tag in 96-99% of the photos). An
empty mask's quality is 0 and such rows are left out of the fit. Printed: Spearman correlations with
the true fg IoU on the dev sets, per region and per photo (the photo's mean true fg IoU against
``PhotoResult.quality`` and against other ways of pooling its tags' qualities: mean, min, max), COCO
cross-validated, MSRC dev and horse train in sample; the share of photos whose lacking tag scores
below their best true tag; and the coefficients.

    TAG2MASK_THREADS=1 python benchmarks/fit_quality_score.py            # collect (minutes), fit, write
    python benchmarks/fit_quality_score.py --no-write                     # fit and print only
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.multiclass_quality import PhotoSet, folds_of, load_sets, tag_counts
from explainers.segment import quality
from explainers.segment.quality import FEATURES, MODEL_PATH, QualityModel
from explainers.segment.types import PhotoResult, TagMask

DEV_SETS = ("coco", "msrc_dev", "horse_train")
ABSENT_WEIGHT = 0.1
BACKBONE, PRESET = "efficientnet_lite0", "balanced"
DEFAULT_CACHE = "/tmp/tag2mask_quality"


class Recorder:
    """A quality estimator that gives no estimate and keeps each tag's features, in call order."""

    def __init__(self):
        self.rows: list[dict[str, float]] = []

    def predict(self, features: dict[str, float]) -> None:
        self.rows.append(dict(features))


def _cache_key() -> str:
    from explainers.segment import PipelineConfig

    text = json.dumps([BACKBONE, PipelineConfig.preset(PRESET).to_dict(), FEATURES,
                       inspect.getsource(quality)], sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _engine():
    from explainers.backbones import load_backbone
    from explainers.segment import PipelineConfig, Tag2Mask

    cfg = PipelineConfig.preset(PRESET)
    cfg.keep_cams = False
    return Tag2Mask(load_backbone(BACKBONE, "cpu"), cfg)


def _photo_rows(engine, pset: PhotoSet, photo, tags: list[tuple[str, int | None]]) -> dict[str, dict]:
    """{tag: {"f": features, "iou": true fg IoU, "p": tag probability}} of one photo segmented with
    `tags` ((tag, class id in its mask), id None = a tag absent from the photo: its IoU is 0)."""
    from explainers.imageio import load_image

    engine.quality_model = recorder = Recorder()
    image = load_image(photo.image)
    result = engine.predict(image, [t for t, _ in tags])
    by_tag = {tm.tag: (tm, f) for tm, f in zip(result.tags, recorder.rows)}
    gt, valid = pset.ground_truth(photo)
    rows = {}
    for tag, v in tags:
        if tag not in by_tag:
            continue
        tm, feats = by_tag[tag]
        if v is None:
            rows[tag] = {"f": feats, "iou": 0.0, "p": tm.score}
            continue
        i, p, g = tag_counts(tm.mask, gt == v, valid)
        if p + g - i > 0:
            rows[tag] = {"f": feats, "iou": i / (p + g - i), "p": tm.score}
    return rows


def absent_tag(photo, pool: list[str]) -> str:
    """A tag of `pool` the photo lacks, drawn by its name (the same on every run)."""
    own = {t for t, _ in photo.tags}
    choices = [t for t in pool if t not in own]
    return choices[int(hashlib.sha1(photo.stem.encode()).hexdigest(), 16) % len(choices)]


def absent_pool(sets: dict[str, PhotoSet]) -> list[str]:
    """The tags absent tags are drawn from: all those of the photos of `sets` (give the dev sets)."""
    return sorted({t for pset in sets.values() for p in pset.photos for t, _ in p.tags})


def collect(sets: dict[str, PhotoSet], cache_dir: Path, absent: list[str] | None = None,
            verbose: bool = True) -> dict[str, dict[str, dict]]:
    """{set: {stem: {tag: {"f": features, "iou": true fg IoU, "p": tag probability}}}} (cached): each
    photo segmented with all its tags; given `absent` (a pool of tags: :func:`absent_pool`), instead,
    each photo segmented with one tag of the pool it lacks, alone (:func:`absent_tag`; true IoU 0)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key()
    engine = None
    out = {}
    for name, pset in sets.items():
        path = cache_dir / f"{name}{'-absent' if absent else ''}-{key}.json"
        cached = json.loads(path.read_text()) if path.exists() else {}
        todo = [p for p in pset.photos if p.stem not in cached]
        t0 = time.perf_counter()
        for n, photo in enumerate(todo):
            engine = engine or _engine()
            tags = [(absent_tag(photo, absent), None)] if absent else photo.tags
            cached[photo.stem] = _photo_rows(engine, pset, photo, tags)
            if verbose and (n + 1) % 25 == 0:
                print(f"  {path.name}: {n + 1}/{len(todo)} photos, {time.perf_counter() - t0:.0f} s",
                      file=sys.stderr, flush=True)
                path.write_text(json.dumps(cached))
        if todo:
            path.write_text(json.dumps(cached))
        out[name] = {p.stem: cached[p.stem] for p in pset.photos if cached.get(p.stem)}
    return out


# -- the model ---------------------------------------------------------------------------------------
def rows_of(records: dict[str, dict], stems=None) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, F), true fg IoU (n,)) of the non-empty masks of `stems` (default: all)."""
    xs, ys = [], []
    for stem in (records if stems is None else stems):
        for r in records[stem].values():
            if r["f"]["area"] > 0:
                xs.append([r["f"][n] for n in FEATURES])
                ys.append(r["iou"])
    return np.array(xs, dtype=np.float64).reshape(-1, len(FEATURES)), np.array(ys, dtype=np.float64)


def fit(parts: list[tuple[np.ndarray, np.ndarray]], l2: float = 1.0, features=FEATURES,
        clip: float = 3.0, weights: list[float] | None = None) -> QualityModel:
    """Fractional logistic regression of IoU on the standardised `features` (clipped to +-`clip`); each
    part weighs `weights[i]` (default 1) in all, shared by its rows."""
    cols = [FEATURES.index(n) for n in features]
    x = np.concatenate([p[0][:, cols] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    weights = weights or [1.0] * len(parts)
    w = np.concatenate([np.full(len(p[1]), wp / max(len(p[1]), 1)) for p, wp in zip(parts, weights)])
    w = w / w.sum() * len(y)
    mean, scale = x.mean(0), x.std(0)
    scale[scale < 1e-9] = 1.0
    z = np.hstack([np.clip((x - mean) / scale, -clip, clip), np.ones((len(y), 1))])
    beta = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], l2)
    penalty[-1] = 0.0
    for _ in range(100):   # Newton steps
        s = 1.0 / (1.0 + np.exp(-np.clip(z @ beta, -40, 40)))
        grad = z.T @ (w * (s - y)) + penalty * beta
        hess = (z * (w * s * (1 - s))[:, None]).T @ z + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return QualityModel(tuple(features), mean, scale, beta[:-1], float(beta[-1]), clip)


def region_quality(model: QualityModel, r: dict) -> float:
    """What the pipeline sets as TagMask.quality for a cached row (0 for an empty mask)."""
    return 0.0 if r["f"]["area"] <= 0 else model.predict(r["f"])


# -- ranking -----------------------------------------------------------------------------------------
def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); nan with fewer than 3 pairs or no spread."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3:
        return float("nan")

    def ranks(v):
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):   # ties: the mean rank
            same = v == value
            if same.sum() > 1:
                r[same] = r[same].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def photo_quality(qualities: list[float]) -> float:
    """What ``PhotoResult.quality`` makes of a photo's tag qualities."""
    empty = np.zeros((1, 1), bool)
    return PhotoResult(1, 1, [TagMask("t", empty, 0.0, quality=q) for q in qualities]).quality


AGGREGATES = {"PhotoResult": photo_quality, "mean": np.mean, "min": np.min, "max": np.max}


def ranking(records: dict[str, dict], score_of, photo_agg=photo_quality) -> dict[str, float]:
    """Spearman of `score_of(row)` with the true fg IoU: per region and per photo (aggregated with
    `photo_agg` vs the photo's mean true fg IoU). Also those of the old score (tag probability; photo:
    mean)."""
    reg_s, reg_old, reg_y, ph_s, ph_old, ph_y = [], [], [], [], [], []
    for rec in records.values():
        s = [score_of(r) for r in rec.values()]
        reg_s += s
        reg_old += [r["p"] for r in rec.values()]
        reg_y += [r["iou"] for r in rec.values()]
        ph_s.append(float(photo_agg(s)))
        ph_old.append(float(np.mean([r["p"] for r in rec.values()])))
        ph_y.append(float(np.mean([r["iou"] for r in rec.values()])))
    return {"regions": len(reg_y), "photos": len(ph_y), "region": spearman(reg_s, reg_y),
            "region_old": spearman(reg_old, reg_y), "photo": spearman(ph_s, ph_y), "photo_old": spearman(ph_old, ph_y)}


def fit_dev(data: dict[str, dict], absent: dict[str, dict], l2: float, absent_weight: float = ABSENT_WEIGHT,
            features=FEATURES, leave_out: dict[str, set] | None = None) -> QualityModel:
    """:func:`fit` on the dev sets' rows (`data`) and, at `absent_weight` in all, their absent-tag rows
    (`absent`), without the photos of `leave_out` ({set: stems})."""
    leave_out = leave_out or {}

    def kept(records, name):
        return [s for s in records if s not in leave_out.get(name, set())]
    parts = [rows_of(data[n], kept(data[n], n)) for n in data]
    weights = [1.0] * len(parts)
    negatives = [rows_of(absent[n], kept(absent[n], n)) for n in absent]
    if negatives and absent_weight > 0:
        parts.append((np.concatenate([x for x, _ in negatives]), np.concatenate([y for _, y in negatives])))
        weights.append(absent_weight)
    return fit(parts, l2, features, weights=weights)


def qualities(model: QualityModel, records: dict[str, dict], stems=None) -> dict[str, dict[str, float]]:
    """{stem: {tag: the quality `model` gives its row}} of `stems` (default: all)."""
    return {s: {t: region_quality(model, r) for t, r in records[s].items()}
            for s in (records if stems is None else stems)}


def coco_cross_validated(data: dict[str, dict], absent: dict[str, dict], k: int, l2: float,
                         absent_weight: float = ABSENT_WEIGHT, features=FEATURES
                         ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """({coco stem: {tag: quality}} of its tags, the same of its absent tag), each fold's from a model
    fitted without that fold's photos (on the other COCO folds and the other dev sets, as :func:`fit_dev`)."""
    true, lacking = {}, {}
    for held in folds_of(data["coco"], k):
        model = fit_dev(data, absent, l2, absent_weight, features, {"coco": set(held)})
        true.update(qualities(model, data["coco"], held))
        lacking.update(qualities(model, absent["coco"], [s for s in held if s in absent["coco"]]))
    return true, lacking


def lacking_below(true: dict[str, dict[str, float]], lacking: dict[str, dict[str, float]]) -> tuple[float, int]:
    """(share of the photos whose absent tag scores below their best true tag, number of photos)."""
    wins = [max(lacking[s].values()) < max(true[s].values()) for s in lacking if s in true and lacking[s]]
    return float(np.mean(wins)) if wins else float("nan"), len(wins)


def with_quality(records: dict[str, dict], qualities: dict[str, dict[str, float]]) -> dict[str, dict]:
    """`records` with each row's quality under "q" (for :func:`ranking` with ``lambda r: r["q"]``)."""
    return {s: {t: dict(r, q=qualities[s][t]) for t, r in rec.items()} for s, rec in records.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--l2", type=float, default=1.0, help="L2 penalty on the standardised coefficients")
    ap.add_argument("--absent-weight", type=float, default=ABSENT_WEIGHT,
                    help="weight of all absent-tag rows together (each set weighs 1)")
    ap.add_argument("--folds", type=int, default=5, help="COCO folds for the cross-validated figures")
    ap.add_argument("--limit", type=int, default=None, help="photos per set (an even spread; for a quick try)")
    ap.add_argument("--cache", default=os.environ.get("TAG2MASK_QUALITY_CACHE", DEFAULT_CACHE))
    ap.add_argument("--out", default=str(MODEL_PATH))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    from explainers.device import set_cpu_threads

    set_cpu_threads(None)
    sets = load_sets(list(DEV_SETS), args.limit, None)
    data = collect(sets, Path(args.cache))
    absent = collect(sets, Path(args.cache), absent_pool(sets))
    model = fit_dev(data, absent, args.l2, args.absent_weight)
    cv, cv_lacking = coco_cross_validated(data, absent, args.folds, args.l2, args.absent_weight)
    print("dev rows: " + ", ".join(f"{n} {sum(len(r) for r in data[n].values())} regions / {len(data[n])} photos"
                                    for n in DEV_SETS))
    print(f"{'set':24s}{'photo agg':>10s}{'region':>9s}{'(old)':>8s}{'photo':>9s}{'(old)':>8s}")
    for agg_name, agg in AGGREGATES.items():
        rows = {"coco (cv)": ranking(with_quality(data["coco"], cv), lambda r: r["q"], agg)}
        for n in ("msrc_dev", "horse_train"):
            rows[f"{n} (in sample)"] = ranking(data[n], lambda r: region_quality(model, r), agg)
        for n, m in rows.items():
            print(f"{n:24s}{agg_name:>10s}{m['region']:9.3f}{m['region_old']:8.3f}{m['photo']:9.3f}{m['photo_old']:8.3f}")
    print("a tag the photo lacks, alone, scores below the photo's best true tag (coco: cross-validated):")
    for n in DEV_SETS:
        pair = (cv, cv_lacking) if n == "coco" else (qualities(model, data[n]), qualities(model, absent[n]))
        share, count = lacking_below(*pair)
        print(f"  {n:12s}{share:7.1%} of {count} photos")
    print("coefficients (standardised features):")
    for n, c in sorted(zip(model.features, model.coef), key=lambda nc: -abs(nc[1])):
        print(f"  {n:16s}{c:+.3f}")
    if not args.no_write:
        doc = {"about": "Mask quality model of explainers/segment/quality.py: estimated fg IoU = sigmoid(coef . "
                        "clip((features - mean) / scale, -clip, clip) + intercept). Fitted by benchmarks/fit_quality_score.py on "
                        "dev data only: " + ", ".join(DEV_SETS) + f" ({BACKBONE}, preset {PRESET}).",
               **model.to_dict(), "l2": args.l2, "absent_weight": args.absent_weight,
               "fitted_on": {n: {"photos": len(data[n]), "regions": sum(len(r) for r in data[n].values())}
                             for n in DEV_SETS}}
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
