"""Time of each stage of tag2mask per photo, and peak memory, on N shared Weizmann horse photos.

Stages: load (file -> RGB, EXIF-upright), CAM, background, seg-head fusion, CRF, post-processing, geometry (all from
``PhotoResult.timings``) and the Label Studio brush RLE of the mask (``mask2rle``, which only this
benchmark imports: the library never does). Peak memory: Python allocations (tracemalloc, numpy
included) and the process's max resident set size.

    TAG2MASK_THREADS=1 python benchmarks/stages.py --n 20 --preset fast

With ``--self-train N`` a segmentation head is first self-trained on the pseudo-masks of N train-split
photos (explainers.self_training, no ground truth read) and each preset is timed with it fused.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explainers.backbones import load_backbone  # noqa: E402
from explainers.device import set_cpu_threads  # noqa: E402
from explainers.imageio import load_image  # noqa: E402
from explainers.segment import PipelineConfig, Tag2Mask  # noqa: E402

HORSE_DIR = Path(os.environ.get("TAG2MASK_HORSE_DIR",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "weizmann_horse"))
STAGES = ["load", "cam", "background", "fusion", "crf", "postprocess", "geometry", "rle", "total"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--split", default="test")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--preset", action="append", help="repeatable; default: fast, balanced, best")
    ap.add_argument("--resize", type=int, default=800, help="resize photos to this long side (0 = as stored)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--self-train", type=int, default=0, metavar="N",
                    help="self-train a seg head on N train photos first and time the fused pipeline")
    args = ap.parse_args(argv)
    from label_studio_sdk.converter.brush import mask2rle

    set_cpu_threads(args.threads)
    import cv2
    import torch

    stems = (HORSE_DIR / f"split_{args.split}.txt").read_text().split()[: args.n]
    backbone = load_backbone(args.backbone, "cpu")
    print(f"{len(stems)} photos of the {args.split} split, long side {args.resize or 'as stored'}, "
          f"backbone {args.backbone}, {torch.get_num_threads()} thread(s); seconds per photo (p50 / p90)")
    print(f"{'preset':14s} " + " ".join(f"{s:>13s}" for s in STAGES) + f" {'peak py MiB':>11s} {'maxrss MiB':>10s}")
    heads = _self_trained_heads(backbone, args.self_train) if args.self_train else None
    for preset in args.preset or ["fast", "balanced", "best"]:
        t2m = Tag2Mask(backbone, PipelineConfig.preset(preset), heads=heads)
        t2m.predict(np.zeros((224, 224, 3), np.uint8) + 127, ["horse"])     # warm-up
        times = {s: [] for s in STAGES}
        tracemalloc.start()
        for stem in stems:
            t = time.perf_counter()
            img = load_image(HORSE_DIR / "images" / f"{stem}.jpg")
            if args.resize:
                f = args.resize / max(img.shape[:2])
                img = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)),
                                 interpolation=cv2.INTER_LINEAR)
            times["load"].append(time.perf_counter() - t)
            res = t2m.predict(img, ["horse"])
            for s in ("cam", "background", "fusion", "crf", "postprocess", "geometry"):
                times[s].append(res.timings.get(s, 0.0))
            t = time.perf_counter()
            mask2rle(res.tags[0].mask.astype(np.uint8) * 255)
            times["rle"].append(time.perf_counter() - t)
            times["total"].append(times["load"][-1] + res.timings["total"] + times["rle"][-1])
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cells = " ".join(f"{np.percentile(times[s], 50):6.3f}/{np.percentile(times[s], 90):6.3f}" for s in STAGES)
        name = preset + ("+self" if heads is not None else "")
        print(f"{name:14s} {cells} {peak / 2**20:11.1f} {rss:10.0f}")
    return 0


def _self_trained_heads(backbone, n: int):
    """A seg head self-trained on the pseudo-masks of `n` train photos (timed, printed)."""
    from explainers.self_training import self_train

    stems = (HORSE_DIR / "split_train.txt").read_text().split()
    stems = stems[:: max(1, len(stems) // n)][:n]
    photos = [load_image(HORSE_DIR / "images" / f"{s}.jpg") for s in stems]
    t = time.perf_counter()
    result = self_train(Tag2Mask(backbone, PipelineConfig.preset("balanced")), photos, [["horse"]] * len(photos))
    print(f"self-training on {len(photos)} train photos (pseudo-masks only): {time.perf_counter() - t:.1f} s")
    return result.heads


if __name__ == "__main__":
    raise SystemExit(main())
