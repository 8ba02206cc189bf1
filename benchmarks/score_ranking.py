"""How well the prediction score ranks masks by their true quality: Spearman correlation, per set.

Label Studio sorts tasks by prediction score, so a score that ranks like the masks' true fg IoU puts
the worst pre-labels first. For each set, the new score (the estimated quality of
explainers/segment/quality.py) and the old one (the tag's classifier probability) are set beside
each other, per region (photo, tag: TagMask.quality vs that mask's fg IoU) and per photo (the
prediction's score, PhotoResult.quality: halfway between the mean and the best of its tags', vs the
photo's mean fg IoU; old: the mean tag probability).

A last column says how a wrong tag fares: the share of photos where a tag the photo lacks, given
alone (drawn as benchmarks/fit_quality_score.py draws them), scores below the photo's best true tag;
beside it the same for the tag probability.

Sets: coco128_dev (cross-validated: each of ``--folds`` folds scored by a model fitted without its
photos, on the other folds, MSRC dev and the horse train split, as benchmarks/fit_quality_score.py
fits), MSRC-v2 test, MSRC-v2 dev (in sample: the stored model was fitted on it), Weizmann horse test
and train (in sample); the others use the stored model (explainers/data/quality_score.json). Features
and true IoUs come from the same cache as the fit (``--cache``), filled on first use (``tag2mask
label``'s default engine: efficientnet_lite0, preset balanced).

    TAG2MASK_THREADS=1 python benchmarks/score_ranking.py
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fit_quality_score import (
    ABSENT_WEIGHT,
    DEFAULT_CACHE,
    DEV_SETS,
    absent_pool,
    coco_cross_validated,
    collect,
    lacking_below,
    qualities,
    ranking,
    with_quality,
)
from benchmarks.multiclass_quality import load_sets
from explainers.segment.quality import MODEL_PATH, load_model

SETS = ("coco", "msrc_test", "msrc_dev", "horse_test", "horse_train")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--model", default=str(MODEL_PATH),
                    help="the stored model (its l2 and absent_weight are used for the COCO folds)")
    ap.add_argument("--cache", default=os.environ.get("TAG2MASK_QUALITY_CACHE", DEFAULT_CACHE))
    ap.add_argument("--limit", type=int, default=None, help="photos per set (an even spread; for a quick try)")
    args = ap.parse_args(argv)

    from explainers.device import set_cpu_threads

    set_cpu_threads(None)
    model = load_model(args.model)
    stored = json.loads(Path(args.model).read_text())
    l2, absent_weight = float(stored.get("l2", 1.0)), float(stored.get("absent_weight", ABSENT_WEIGHT))
    sets = load_sets(list(SETS), args.limit, None)
    data = collect(sets, Path(args.cache))
    absent = collect(sets, Path(args.cache), absent_pool({n: sets[n] for n in DEV_SETS}))
    dev = {n: data[n] for n in DEV_SETS}
    cv, cv_lacking = coco_cross_validated(dev, {n: absent[n] for n in DEV_SETS}, args.folds, l2, absent_weight,
                                          model.features)

    print(f"Spearman rank correlation with the true fg IoU (new = estimated quality, old = tag probability; "
          f"coco: {args.folds}-fold cross-validated); lacking: share of photos where a tag the photo lacks, "
          "alone, scores below its best true tag")
    print(f"{'set':24s}{'regions':>8s}{'new':>7s}{'old':>7s}{'photos':>8s}{'new':>7s}{'old':>7s}{'lacking':>9s}"
          f"{'(old)':>7s}")
    for name in SETS:
        if name == "coco":
            label, true, lacking = "coco128_dev (cv)", cv, cv_lacking
        else:
            label = name + (" (in sample)" if name in DEV_SETS else "")
            true, lacking = qualities(model, data[name]), qualities(model, absent[name])
        m = ranking(with_quality(data[name], true), lambda r: r["q"])
        share = lacking_below(true, lacking)[0]
        probs = {s: {t: r["p"] for t, r in rec.items()} for s, rec in data[name].items()}
        old = lacking_below(probs, {s: {t: r["p"] for t, r in rec.items()} for s, rec in absent[name].items()})[0]
        print(f"{label:24s}{m['regions']:8d}{m['region']:7.3f}{m['region_old']:7.3f}"
              f"{m['photos']:8d}{m['photo']:7.3f}{m['photo_old']:7.3f}{share:9.1%}{old:7.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
