"""Mask quality on several sets side by side: COCO dev (k folds), MSRC-v2 dev/test, Weizmann horses.

Every method runs on the same photos in one process; a naive baseline runs with them:
pytorch-grad-cam's ``GradCAM`` at 224 x 224 on the backbone's CAM layer, one map per tag (log-sum-exp of
the logits of its class set), upsampled to the photo and cut at a fixed threshold (each tag on its own,
masks may overlap). Its threshold is chosen on dev data: horse train for the horse sets, MSRC dev for
MSRC test, the other folds for each COCO fold.

Scoring is that of ``tag2mask eval``: a photo is segmented once with all its coverable tags; per class,
fg IoU pooled over the pixels of the photos tagged with it (ignored ids left out), then the mean over
classes (one class for the horses).

Sets (``--sets``): ``coco`` (coco128_dev, tags.csv, ignore 0), ``msrc_dev`` / ``msrc_test`` (ignore 255),
``horse_train`` / ``horse_test`` / ``horse_all`` (binary masks, tag "horse").

COCO folds (``--folds K``): the photos, sorted by name, go round-robin into K folds. Each method's
column is its pooled score over all COCO photos (it has no setting fitted on COCO) with the spread of
the per-fold scores; the "chosen on dev" rows pick, per fold, the candidate (method x confidence gate)
that scores best on the other K - 1 folds and score it on the held-out fold; the held-out pixels of all
folds are pooled ("any tag2mask method": the choice is among all pipeline methods run, and gates). The confidence gate ``gate=g`` leaves a tag's mask empty when its classifier
probability is below g times that of the photo's likeliest tag (a lone tag is never gated; computed
from the recorded scores, no second run).

Results are cached per method (its resolved settings) and photo under ``--cache`` (default
/tmp/tag2mask_mcq), so adding a method re-runs only that method. Method specs: a name of :data:`METHODS`, or ``NAME=BACKBONE/PRESET``
with optional ``/key=value,key=value`` setting changes, e.g. ``lite2=efficientnet_lite2/balanced`` or
``s12=efficientnet_lite0/balanced/cam.scales=1;2``; ``lite0+lite1`` backbones = ``cam.ensemble``.

    TAG2MASK_THREADS=1 python benchmarks/multiclass_quality.py --limit 20 --methods baseline,balanced
    python benchmarks/multiclass_quality.py --folds 5 --threads 2 --per-class
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backend.cli.evaluation import find_pairs, load_label_mask, load_mask, read_classes, read_photo_tags   # noqa: E402
from benchmarks.horses import HORSE_DIR, spread  # noqa: E402
from explainers.device import set_cpu_threads  # noqa: E402
from explainers.imageio import load_image  # noqa: E402

DATA = HORSE_DIR.parent
COCO, MSRC = DATA / "coco128_dev", DATA / "msrc_v2"

METHODS: dict[str, str] = {
    "baseline": "baseline",
    "fast": "efficientnet_lite0/fast",
    "balanced": "efficientnet_lite0/balanced",
    "best": "efficientnet_lite0/best",
    "lite1": "efficientnet_lite1/balanced",
    "lite2": "efficientnet_lite2/balanced",
    "mobilenet_v2": "mobilenet_v2/balanced",
}
BASELINE_THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
GATES = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


# -- sets --------------------------------------------------------------------------------------------
@dataclass
class Photo:
    stem: str
    image: Path
    mask: Path
    tags: list[tuple[str, int]]      # (tag, class id in the mask); binary masks: id 1 = the object


@dataclass
class PhotoSet:
    name: str
    photos: list[Photo]
    ignore: tuple[int, ...] = ()
    binary: bool = False

    def ground_truth(self, photo: Photo) -> tuple[np.ndarray, np.ndarray | None]:
        """(class-id mask, valid pixels or None)."""
        if self.binary:
            return load_mask(photo.mask).astype(np.int64), None
        gt = load_label_mask(photo.mask)
        return gt, (~np.isin(gt, self.ignore) if self.ignore else None)


def _coverable(name: str) -> bool:
    from explainers.backbones import imagenet_categories
    from explainers.errors import UnknownTagError
    from explainers.tags import resolve_tag

    try:
        resolve_tag(name, imagenet_categories())
    except UnknownTagError:
        return False
    return True


def class_set(name: str, folder: Path, tags_file: str, ignore: tuple[int, ...], split: str | None,
              limit: int | None, coverable_only: bool = True) -> PhotoSet:
    """The photos of `folder` with their tags: those ImageNet can name (`coverable_only`), or all of them."""
    classes = read_classes(folder / "classes.txt")
    tags = read_photo_tags(folder / tags_file, classes)
    pairs, _ = find_pairs(folder / "images", folder / "masks", folder / split if split else None)
    photos = []
    for stem, image, mask in pairs:
        ids = [v for v in tags.get(stem, []) if v not in ignore and (not coverable_only or _coverable(classes[v]))]
        if ids:
            photos.append(Photo(stem, image, mask, [(classes[v], v) for v in ids]))
    return PhotoSet(name, [photos[i] for i in _spread_index(len(photos), limit)], ignore)


def horse_set(name: str, splits: list[str], limit: int | None) -> PhotoSet:
    stems = [s for sp in splits for s in (HORSE_DIR / f"split_{sp}.txt").read_text().split()]
    stems = spread(stems, limit)
    return PhotoSet(name, [Photo(s, HORSE_DIR / "images" / f"{s}.jpg", HORSE_DIR / "masks" / f"{s}.png",
                                 [("horse", 1)]) for s in stems], binary=True)


def _spread_index(n: int, limit: int | None) -> list[int]:
    if not limit or limit >= n:
        return list(range(n))
    return [int(i * n / limit) for i in range(limit)]


def load_sets(names: list[str], limit: int | None, dev_limit: int | None) -> dict[str, PhotoSet]:
    makers: dict[str, Callable[[], PhotoSet]] = {
        "coco": lambda: class_set("coco", COCO, "tags.csv", (0,), None, limit),
        "msrc_dev": lambda: class_set("msrc_dev", MSRC, "tags.txt", (255,), "split_dev.txt", dev_limit or limit),
        "msrc_test": lambda: class_set("msrc_test", MSRC, "tags.txt", (255,), "split_test.txt", limit),
        "msrc_dev_all": lambda: class_set("msrc_dev_all", MSRC, "tags.txt", (255,), "split_dev.txt", dev_limit or limit,
                                          coverable_only=False),
        "msrc_test_all": lambda: class_set("msrc_test_all", MSRC, "tags.txt", (255,), "split_test.txt", limit,
                                           coverable_only=False),
        "coco_all": lambda: class_set("coco_all", COCO, "tags.csv", (0,), None, limit, coverable_only=False),
        "horse_train": lambda: horse_set("horse_train", ["train"], dev_limit or limit),
        "horse_test": lambda: horse_set("horse_test", ["test"], limit),
        "horse_all": lambda: horse_set("horse_all", ["train", "test"], limit),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        raise SystemExit(f"unknown set(s) {', '.join(unknown)}; choose from {', '.join(makers)}")
    return {n: makers[n]() for n in names}


# -- methods -----------------------------------------------------------------------------------------
def parse_method(spec: str) -> tuple[str, str]:
    """'NAME' (of METHODS) or 'NAME=BACKBONE/PRESET[/key=value,...]' -> (name, definition)."""
    if "=" in spec.split("/")[0]:
        name, definition = spec.split("=", 1)
        return name, definition
    if spec not in METHODS:
        raise SystemExit(f"unknown method {spec!r}; give one of {', '.join(METHODS)} or NAME=BACKBONE/PRESET[/k=v,...]")
    return spec, METHODS[spec]


def _value(current, text: str):
    if text.lower() == "none":
        return None
    if isinstance(current, bool):
        return text.lower() in ("1", "true", "yes")
    if isinstance(current, tuple) or ";" in text:
        items = [v for v in text.split(";") if v]
        try:
            return tuple(float(v) for v in items)
        except ValueError:
            return tuple(items)
    if current is None:
        try:
            return float(text)
        except ValueError:
            return text
    return type(current)(text)


def method_config(definition: str):
    """'BACKBONE/PRESET[/k=v,...]' -> (backbone name, the resolved PipelineConfig)."""
    from explainers.segment import PipelineConfig

    backbone_name, preset, *rest = definition.split("/")
    cfg = PipelineConfig.preset(preset)
    changes = {}
    for item in (rest[0].split(",") if rest and rest[0] else []):
        key, text = item.split("=", 1)
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        changes[key] = _value(obj, text)
    cfg = cfg.replace(**changes)
    cfg.keep_cams = False
    return backbone_name, cfg


def build_segmenter(definition: str, backbones: dict):
    """A definition -> callable(photo RGB, tags) -> ({tag: bool mask}, {tag: score}). BACKBONE may be
    'a+b+c': backbone a with b and c as ``cam.ensemble``."""
    from explainers.backbones import load_backbone
    from explainers.segment import Tag2Mask

    backbone_name, cfg = method_config(definition)
    first, *more = backbone_name.split("+")
    if more:
        cfg = cfg.replace(**{"cam.ensemble": tuple(more)})
    if first not in backbones:
        backbones[first] = load_backbone(first, "cpu")
    engine = Tag2Mask(backbones[first], cfg)

    def run(image, tags):
        result = engine.predict(image, tags)
        return {t.tag: t.mask.astype(bool) for t in result.tags}, {t.tag: float(t.score) for t in result.tags}
    return run


class Baseline:
    """pytorch-grad-cam GradCAM at 224 x 224, one map per tag, upsampled; masks at several thresholds."""

    def __init__(self, backbone):
        from pytorch_grad_cam import GradCAM

        from explainers.hooks import get_layer
        from explainers.tags import resolve_tag

        self.backbone = backbone
        self.cam = GradCAM(backbone.model, [get_layer(backbone.model, backbone.target_layers[0])])
        self.resolve = lambda tag: list(resolve_tag(tag, backbone.categories).indices)

    def maps(self, image: np.ndarray, tags: list[str]) -> dict[str, np.ndarray]:
        from benchmarks.quality import ClassSetTarget

        x = self.backbone.to_tensor(image, 224).requires_grad_(True)
        out = {}
        for tag in tags:
            cam = self.cam(x, [ClassSetTarget(self.resolve(tag))])[0]
            out[tag] = cv2.resize(cam.astype(np.float32), (image.shape[1], image.shape[0]),
                                  interpolation=cv2.INTER_LINEAR)
        return out


# -- running and caching -----------------------------------------------------------------------------
def tag_counts(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None) -> tuple[int, int, int]:
    """(intersection, predicted area, ground-truth area) over the valid pixels."""
    if valid is not None:
        pred, gt = pred & valid, gt & valid
    return int((pred & gt).sum()), int(pred.sum()), int(gt.sum())


def run_method(name: str, definition: str, sets: dict[str, PhotoSet], cache_dir: Path, backbones: dict,
               verbose: bool = True) -> dict[str, dict[str, dict]]:
    """{variant name: {set: {stem: {"s": seconds, "tags": {tag: [inter, pred, gt, score]}}}}}: the baseline
    gives one variant per threshold, a pipeline one (its name)."""
    resolved = definition if definition == "baseline" else json.dumps(
        [definition, method_config(definition)[1].to_dict()], sort_keys=True)
    key = hashlib.sha1(resolved.encode()).hexdigest()[:10]     # a preset that changes re-runs
    out: dict[str, dict[str, dict]] = {}
    segment = baseline = None
    for set_name, pset in sets.items():
        path = cache_dir / f"{name}-{key}-{set_name}.json"
        cached = json.loads(path.read_text()) if path.exists() else {}
        todo = [p for p in pset.photos if p.stem not in cached]
        t_set = time.perf_counter()
        for photo in todo:
            image = load_image(photo.image)
            gt, valid = pset.ground_truth(photo)
            tags = [t for t, _ in photo.tags]
            rec = {}
            if definition == "baseline":
                if baseline is None:
                    from explainers.backbones import load_backbone

                    if "efficientnet_lite0" not in backbones:
                        backbones["efficientnet_lite0"] = load_backbone("efficientnet_lite0", "cpu")
                    baseline = Baseline(backbones["efficientnet_lite0"])
                t = time.perf_counter()
                maps = baseline.maps(image, tags)
                seconds = time.perf_counter() - t
                for thr in BASELINE_THRESHOLDS:
                    rec[f"{thr:g}"] = {"s": seconds, "tags": {
                        tag: [*tag_counts(maps[tag] >= thr, gt == v, valid), 1.0] for tag, v in photo.tags}}
            else:
                if segment is None:
                    segment = build_segmenter(definition, backbones)
                t = time.perf_counter()
                masks, scores = segment(image, tags)
                seconds = time.perf_counter() - t
                empty = np.zeros(gt.shape, bool)
                rec[""] = {"s": seconds, "tags": {
                    tag: [*tag_counts(masks.get(tag, empty), gt == v, valid), scores.get(tag, 0.0)]
                    for tag, v in photo.tags}}
            cached[photo.stem] = rec
        if todo:
            path.write_text(json.dumps(cached))
            if verbose:
                print(f"  {name} on {set_name}: {len(todo)} photos in {time.perf_counter() - t_set:.0f} s",
                      file=sys.stderr, flush=True)
        for stem_rec in ((p.stem, cached[p.stem]) for p in pset.photos):
            stem, rec = stem_rec
            for variant, r in rec.items():
                vname = name if not variant else f"{name}@{variant}"
                out.setdefault(vname, {}).setdefault(set_name, {})[stem] = r
    return out


# -- scoring -----------------------------------------------------------------------------------------
def gated(tags: dict[str, list], gate: float) -> dict[str, tuple[int, int, int]]:
    """{tag: (intersection, predicted area, gt area)} of one photo, a tag's mask counted as empty when its
    score is below `gate` times the photo's highest tag score (relative: a lone tag is never gated)."""
    top = max((rec[3] for rec in tags.values()), default=0.0)
    return {tag: (0, 0, g) if score < gate * top else (i, p, g) for tag, (i, p, g, score) in tags.items()}


def class_ious(records: dict[str, dict], stems, gate: float = 0.0) -> dict[str, float]:
    """Per class fg IoU pooled over `stems` (a gated tag counts as an empty mask, see :func:`gated`)."""
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    for stem in stems:
        for tag, (i, p, g) in gated(records[stem]["tags"], gate).items():
            inter[tag] = inter.get(tag, 0) + i
            union[tag] = union.get(tag, 0) + p + g - i
    return {t: inter[t] / union[t] if union[t] else 0.0 for t in inter}


def mean_iou(records, stems, gate: float = 0.0) -> float:
    ious = class_ious(records, stems, gate)
    return float(np.mean(list(ious.values()))) if ious else float("nan")


def seconds(records, stems) -> float:
    return float(np.mean([records[s]["s"] for s in stems]))


def folds_of(stems: list[str], k: int) -> list[list[str]]:
    ordered = sorted(stems)
    return [ordered[i::k] for i in range(k)]


def cross_validated(candidates: dict[str, tuple[dict, float]], stems: list[str], k: int
                    ) -> tuple[float, list[str], dict[str, float]]:
    """Per fold: the candidate (records, gate) best on the other folds, scored on the held-out fold.
    -> (mean fg IoU over the held-out pixels of all folds pooled, the choice per fold, per-class IoU)."""
    folds = folds_of(stems, k)
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    chosen = []
    for f, held in enumerate(folds):
        rest = [s for g, fold in enumerate(folds) if g != f for s in fold]
        best = max(candidates, key=lambda c: mean_iou(candidates[c][0], rest, candidates[c][1]))
        chosen.append(best)
        records, gate = candidates[best]
        for stem in held:
            for tag, (i, p, g) in gated(records[stem]["tags"], gate).items():
                inter[tag] = inter.get(tag, 0) + i
                union[tag] = union.get(tag, 0) + p + g - i
    per_class = {t: inter[t] / union[t] if union[t] else 0.0 for t in inter}
    return float(np.mean(list(per_class.values()))), chosen, per_class


def dev_choice(candidates: dict[str, tuple[dict, float]], dev_records_of: Callable[[str], dict | None],
               dev_stems: list[str]) -> str | None:
    scored = {c: mean_iou(dev_records_of(c), dev_stems, candidates[c][1]) for c in candidates
              if dev_records_of(c) is not None}
    return max(scored, key=scored.get) if scored else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="coco,msrc_dev,msrc_test,horse_train,horse_test")
    ap.add_argument("--methods", default="baseline,balanced", help="comma-separated method specs (see above)")
    ap.add_argument("--method", action="append", default=[], help="one more method spec (may repeat)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--limit", type=int, default=None, help="photos per set (an even spread)")
    ap.add_argument("--dev-limit", type=int, default=None, help="photos of msrc_dev and horse_train (default --limit)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--gates", default=",".join(f"{g:g}" for g in GATES),
                    help="confidence gates the dev choice may pick from (0 = none)")
    ap.add_argument("--per-class", action="store_true", help="per-class COCO IoUs of every method")
    ap.add_argument("--cache", default=os.environ.get("TAG2MASK_MCQ_CACHE", "/tmp/tag2mask_mcq"))
    args = ap.parse_args(argv)

    threads = set_cpu_threads(args.threads)
    sets = load_sets(args.sets.split(","), args.limit, args.dev_limit)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    specs = [parse_method(s) for s in args.methods.split(",") if s] + [parse_method(s) for s in args.method]
    backbones: dict = {}
    results: dict[str, dict[str, dict]] = {}
    for name, definition in specs:
        print(f"running {name} = {definition}", file=sys.stderr, flush=True)
        results.update(run_method(name, definition, sets, cache, backbones))
    gates = [float(g) for g in args.gates.split(",")]

    print("photos: " + ", ".join(f"{n} {len(s.photos)}" for n, s in sets.items()) + f"; threads {threads}; "
          f"coco folds {args.folds}")
    cols = list(sets)
    header = f"{'method':34s}" + "".join(f"{c:>13s}" for c in cols) + f"{'s/photo':>9s}"
    print(header)
    for variant, per_set in results.items():
        cells = []
        for c in cols:
            recs = per_set.get(c)
            stems = [p.stem for p in sets[c].photos]
            if recs is None:
                cells.append(f"{'-':>13s}")
            elif c == "coco" and args.folds > 1:
                per_fold = [mean_iou(recs, f) for f in folds_of(stems, args.folds)]
                cells.append(f"{mean_iou(recs, stems):.3f}±{np.std(per_fold):.2f}".rjust(13))
            else:
                cells.append(f"{mean_iou(recs, stems):13.3f}")
        first = cols[0]
        sec = seconds(per_set[first], [p.stem for p in sets[first].photos]) if first in per_set else float("nan")
        print(f"{variant:34s}" + "".join(cells) + f"{sec:9.3f}")

    # chosen on dev: baseline threshold and the gate of each pipeline method
    def candidates_of(prefix_filter) -> dict[str, tuple[str, float]]:
        out = {}
        for variant in results:
            if not prefix_filter(variant):
                continue
            if "@" in variant:
                out[variant] = (variant, 0.0)
            else:
                for g in gates:
                    out[f"{variant}{' gate=' + format(g, 'g') if g else ''}"] = (variant, g)
        return out

    groups = {"baseline (threshold chosen on dev)": lambda v: v.startswith("baseline@")}
    pipeline_names = [name for name, _ in specs if name != "baseline"]
    for name in pipeline_names:
        groups[f"{name} (gate chosen on dev)"] = lambda v, n=name: v == n
    if len(pipeline_names) > 1:
        groups["any tag2mask method (on dev)"] = lambda v: v in pipeline_names
    dev_of = {"msrc_test": "msrc_dev", "horse_test": "horse_train", "horse_all": "horse_train"}
    print("\nchosen on dev (COCO: per fold on the other folds; MSRC test on MSRC dev; horses on horse train):")
    print(f"{'method':34s}" + "".join(f"{c:>13s}" for c in cols if c in ("coco", *dev_of)))
    chosen_per_class = {}
    for label, filt in groups.items():
        cands = candidates_of(filt)
        cells = []
        for c in cols:
            if c not in ("coco", *dev_of):
                continue
            stems = [p.stem for p in sets[c].photos]
            if c == "coco":
                cand = {k: (results[v]["coco"], g) for k, (v, g) in cands.items() if "coco" in results[v]}
                if not cand:
                    cells.append(f"{'-':>13s}")
                    continue
                score, chosen, per_class = cross_validated(cand, stems, args.folds)
                chosen_per_class[label] = per_class
                cells.append(f"{score:13.3f}")
                print(f"  {label} coco folds chose: {', '.join(chosen)}", file=sys.stderr)
            else:
                dev = dev_of[c]
                if dev not in sets:
                    cells.append(f"{'-':>13s}")
                    continue
                cand = {k: (results[v].get(c), g) for k, (v, g) in cands.items() if c in results[v]}
                pick = dev_choice(cand, lambda k: results[cands[k][0]].get(dev),
                                  [p.stem for p in sets[dev].photos])
                if pick is None:
                    cells.append(f"{'-':>13s}")
                    continue
                recs, g = cand[pick]
                cells.append(f"{mean_iou(recs, stems, g):.3f}".rjust(13))
                print(f"  {label} {c}: chose {pick} on {dev}", file=sys.stderr)
        print(f"{label:34s}" + "".join(cells))

    if args.per_class and "coco" in sets:
        stems = [p.stem for p in sets["coco"].photos]
        rows = {v: class_ious(per_set["coco"], stems) for v, per_set in results.items() if "coco" in per_set}
        rows.update({f"cv: {k}": v for k, v in chosen_per_class.items()})
        names = sorted({c for r in rows.values() for c in r})
        print("\nCOCO per class (fg IoU pooled over all photos; cv rows: held-out folds):")
        print(f"{'class':16s}" + "".join(f"{v[:11]:>12s}" for v in rows))
        for cls in names:
            print(f"{cls[:16]:16s}" + "".join(f"{r.get(cls, float('nan')):12.3f}" for r in rows.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
