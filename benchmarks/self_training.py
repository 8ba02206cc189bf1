"""Self-training in the product, tags only (no mask read): the served pipeline before and after.

A project is self-trained as ``tag2mask label --self-train`` and the ``train`` job with
``self_train`` do it (:func:`backend.training.trainer.train_and_register`: pseudo-masks of the
tagged photos from the zero-shot pipeline, the seg head trained on their confident parts, the
classifier head on the tags, refit, a registry version), then loaded as ``tag2mask label
--model-dir --project`` loads it, and the photos are segmented with their tags and scored as
``tag2mask eval`` scores (fg IoU pooled over pixels per class, mean over classes;
benchmarks/multiclass_quality.py's sets and scoring).

Runs (``--runs``), each "trained on -> scored on":

- ``coco``: coco128_dev's 86 photos with an ImageNet-coverable tag, trained on all of them, scored on
  them (the bootstrapping use: the photos to label are the tagged ones); and in ``--folds`` folds
  (trained on the other folds, scored on the held-out one) to see what carries over;
- ``msrc``: MSRC-v2 dev -> test (objects ImageNet can name), and test -> test;
- ``horse``: Weizmann train split -> test split, and test -> test;
- ``novel``: labels ImageNet lacks, from tags alone: MSRC-v2 dev -> test with every tag (grass, sky,
  road, water, tree, building, face, body scored per label), and coco128_dev's person in folds.

    TAG2MASK_THREADS=2 python benchmarks/self_training.py --runs horse,msrc,coco --threads 2
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.multiclass_quality import PhotoSet, folds_of, load_sets, tag_counts  # noqa: E402
from explainers.device import set_cpu_threads  # noqa: E402
from explainers.imageio import load_image  # noqa: E402


NOVEL_MSRC = ("grass", "sky", "road", "water", "tree", "building", "face", "body")
SPLITS = {"horse": ("horse_train", "horse_test", "Weizmann horses, test split"),
          "msrc": ("msrc_dev", "msrc_test", "MSRC-v2 test objects")}   # run -> (trained on, scored on, title)


def score(engine, pset: PhotoSet, stems=None) -> float:
    """Mean over classes of the fg IoU pooled over the photos (`stems`: a subset)."""
    per_class = class_scores(engine, pset, stems)
    return float(np.mean(list(per_class.values())))


def class_scores(engine, pset: PhotoSet, stems=None) -> dict[str, float]:
    """Per class: the fg IoU pooled over the photos (`stems`: a subset)."""
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    for photo in pset.photos:
        if stems is not None and photo.stem not in stems:
            continue
        gt, valid = pset.ground_truth(photo)
        result = engine.predict(load_image(photo.image), [t for t, _ in photo.tags])
        masks = {t.tag: t.mask for t in result.tags}
        for tag, v in photo.tags:
            i, p, g = tag_counts(masks.get(tag, np.zeros(gt.shape, bool)), gt == v, valid)
            inter[tag] = inter.get(tag, 0) + i
            union[tag] = union.get(tag, 0) + p + g - i
    return {t: inter[t] / union[t] if union[t] else 0.0 for t in inter}


def self_train(engine, pset: PhotoSet, stems, model_dir: Path, project: str, options: dict | None = None,
               enabled: bool = True) -> tuple[object, dict, float]:
    """Self-train a project on the photos `stems` of `pset` (tags only); (heads, report, seconds).
    ``enabled=False``: train it on the same tags without self-training (the classifier head alone)."""
    from backend.serving.offline import load_offline_heads
    from backend.storage.registry import ModelRegistry
    from backend.training.trainer import train_and_register
    from explainers.training import Sample

    samples = [Sample(f"{pset.name}-{p.stem}", [t for t, _ in p.tags], load=lambda p=p: load_image(p.image))
               for p in pset.photos if p.stem in stems]
    t = time.perf_counter()
    report = train_and_register(samples, project, ModelRegistry.in_model_dir(model_dir), engine.backbone,
                                self_train=dict(options or {}) if enabled else None, force=True, trigger="benchmark",
                                model_dir=model_dir)
    seconds = time.perf_counter() - t
    return load_offline_heads(model_dir, project, engine.backbone).heads, report, seconds


def novel_labels(run_heads, sets, folds: int) -> None:
    """Labels ImageNet lacks, learnt from tags alone: MSRC-v2 dev -> test with every tag (stuff, face and
    body included), and coco128_dev's person in `folds` folds (all tags; trained on the other folds);
    each self-trained and, beside it, trained on the same tags without self-training (the classifier
    head's CAM alone, what a tags-only project serves)."""
    dev, test = sets["msrc_dev_all"], sets["msrc_test_all"]
    for enabled, name in ((False, "tags, classifier head alone"), (True, "self-trained")):
        after, report, seconds = run_heads(dev, [p.stem for p in dev.photos], test, enabled=enabled)
        st = report.get("self_training") or {}
        used = f"; pseudo-masks used {st['used']} of {st['photos']}" if st else ""
        print(f"MSRC-v2 dev -> test, every tag, {name} ({len(dev.photos)} photos trained on in {seconds:.0f} s"
              f"{used}): " + ", ".join(f"{t} {after[t]:.3f}" for t in NOVEL_MSRC if t in after), flush=True)
    coco = sets["coco_all"]
    stems = [p.stem for p in coco.photos]
    for enabled, name in ((False, "tags, classifier head alone"), (True, "self-trained")):
        held = []
        for fold in folds_of(stems, max(2, folds)):
            scores, _, seconds = run_heads(coco, [s for s in stems if s not in fold], coco, set(fold), enabled=enabled)
            held.append(scores.get("person", float("nan")))
            print(f"  coco fold: person {held[-1]:.3f} ({seconds:.0f} s)", file=sys.stderr, flush=True)
        print(f"coco128_dev person, {len(held)} folds, every tag, trained on the other folds, {name}: "
              f"{np.mean(held):.3f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="horse,msrc,coco")
    ap.add_argument("--folds", type=int, default=2, help="COCO folds (0: in-sample only)")
    ap.add_argument("--limit", type=int, default=None, help="photos per set (an even spread)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    threads = set_cpu_threads(args.threads)
    from explainers.segment import PipelineConfig, Tag2Mask

    engine = Tag2Mask("efficientnet_lite0", PipelineConfig.preset("balanced"), device="cpu")
    runs = args.runs.split(",")
    need = {"horse": ["horse_train", "horse_test"], "msrc": ["msrc_dev", "msrc_test"], "coco": ["coco"],
            "novel": ["msrc_dev_all", "msrc_test_all", "coco_all"]}
    sets = load_sets([n for r in runs for n in need[r]], args.limit, None)
    rows = []

    def run_heads(train_set, train_stems, test_set, test_stems=None, enabled=True):
        """Self-train on `train_stems`, score per class on `test_set` -> (per-class fg IoU, report, seconds);
        ``enabled=False``: trained on the same tags without self-training."""
        with tempfile.TemporaryDirectory() as tmp:
            heads, report, seconds = self_train(engine, train_set, set(train_stems), Path(tmp), "p", enabled=enabled)
            engine.set_heads(heads)
            after = class_scores(engine, test_set, test_stems)
            engine.set_heads(None)
        return after, report, seconds

    def run(name, train_set, train_stems, test_set, test_stems=None):
        per_class, report, seconds = run_heads(train_set, train_stems, test_set, test_stems)
        after = float(np.mean(list(per_class.values())))
        st = report["self_training"]
        rows.append((name, after, seconds, st))
        print(f"  {name}: {after:.3f} ({len(train_stems)} photos self-trained on in {seconds:.0f} s; pseudo-masks "
              f"used {st['used']} of {st['photos']}, zero-shot labels {len(st['zero_shot'])})", file=sys.stderr,
              flush=True)
        return after

    print(f"threads {threads}; balanced preset; fg IoU pooled per class, mean over classes")
    for r in runs:
        if r in SPLITS:
            dev_name, test_name, title = SPLITS[r]
            dev, test = sets[dev_name], sets[test_name]
            base = score(engine, test)
            a = run(f"{dev_name} -> {test_name}", dev, [p.stem for p in dev.photos], test)
            b = run(f"{test_name} -> {test_name}", test, [p.stem for p in test.photos], test)
            print(f"{title} ({len(test.photos)} photos): zero-shot {base:.3f}; self-trained on {dev_name} "
                  f"{a:.3f}, on the test photos themselves {b:.3f}")
        elif r == "coco":
            coco = sets["coco"]
            stems = [p.stem for p in coco.photos]
            base = score(engine, coco)
            b = run("coco all -> all", coco, stems, coco)
            line = f"coco128_dev ({len(stems)} photos): zero-shot {base:.3f}; self-trained on them {b:.3f}"
            if args.folds > 1:
                held = []
                for k, fold in enumerate(folds_of(stems, args.folds)):
                    rest = [s for s in stems if s not in fold]
                    held.append(run(f"coco fold {k + 1}: others -> fold", coco, rest, coco, set(fold)))
                base_folds = [score(engine, coco, set(f)) for f in folds_of(stems, args.folds)]
                line += (f"; {args.folds} folds, trained on the others: {np.mean(held):.3f} "
                         f"(zero-shot on the same folds {np.mean(base_folds):.3f})")
            print(line)
        elif r == "novel":
            novel_labels(run_heads, sets, args.folds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
