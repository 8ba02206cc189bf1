"""Photos per second of `Tag2Mask.predict` one photo at a time vs `predict_many` batching the CAM stage.

On the Weizmann horse photos of a split (tag "horse", photos as stored), for each thread count and
mode: "loop" (`predict` per photo) and `predict_many` at each batch size. Prints photos/s, the CAM
stage's seconds per photo and its share of the time, and on CUDA the peak device memory. Each mode
first runs on some photos untimed (warm-up), then all modes run in turn `--repeat` times and the
fastest run of each is shown; timings are wall-clock, with the device synchronised before and after. It also prints how many distinct pass sizes (= how many batching groups) the
split and all photos give at the preset.

    TAG2MASK_THREADS=1 python benchmarks/batching.py --threads 1 2
    python benchmarks/batching.py --device cuda --batch 1 4 8 16
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explainers.backbones import load_backbone  # noqa: E402
from explainers.device import set_cpu_threads  # noqa: E402
from explainers.imageio import load_image  # noqa: E402
from explainers.segment import PipelineConfig, Tag2Mask  # noqa: E402
from explainers.segment.cam_stage import pass_size  # noqa: E402

HORSE_DIR = Path(os.environ.get("TAG2MASK_HORSE_DIR",
                               Path(__file__).resolve().parents[2] / "shared" / "data" / "weizmann_horse"))


def photo_size(path: Path) -> tuple[int, int]:
    """(h, w) of an upright photo, from its file header (EXIF orientations 5-8 swap the sides)."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        return (w, h) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (h, w)


def distinct_pass_sizes(sizes: list[tuple[int, int]], cfg: PipelineConfig) -> int:
    """How many distinct first-scale pass sizes (= batching groups) photos of these (h, w) give."""
    return len({pass_size(h, w, cfg.cam.scales[0], cfg.cam) for h, w in sizes})


def run_mode(engine: Tag2Mask, photos: list, batch: int | None, sync) -> tuple[float, float]:
    """(wall seconds, summed CAM seconds) of all photos: `predict` per photo (batch None) or `predict_many`."""
    tags = [["horse"]] * len(photos)
    sync()
    t = time.perf_counter()
    if batch is None:
        results = [engine.predict(img, tg) for img, tg in zip(photos, tags)]
    else:
        results = engine.predict_many(photos, tags, batch_size=batch)
    sync()
    wall = time.perf_counter() - t
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"{len(failed)} photos failed, first: {failed[0]!r}")
    return wall, sum(r.timings["cam"] for r in results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=0, help="first N photos of the split (0 = all)")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="predict_many batch sizes")
    ap.add_argument("--threads", type=int, nargs="+", default=[None],
                    help="CPU thread counts to try (default: $TAG2MASK_THREADS or all cores)")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds over all modes; the best of each is shown")
    ap.add_argument("--warmup", type=int, default=None,
                    help="photos run untimed before each mode (default: all on CUDA, 4 on the CPU)")
    args = ap.parse_args(argv)
    import torch

    stems = (HORSE_DIR / f"split_{args.split}.txt").read_text().split()
    stems = stems[: args.n] if args.n else stems
    photos = [load_image(HORSE_DIR / "images" / f"{s}.jpg") for s in stems]
    cfg = PipelineConfig.preset(args.preset)
    engine = Tag2Mask(load_backbone(args.backbone, args.device), cfg)
    cuda = engine.backbone.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warm = photos[: (len(photos) if cuda else 4) if args.warmup is None else args.warmup]
    all_sizes = [photo_size(p) for p in sorted((HORSE_DIR / "images").glob("*.jpg"))]
    split_groups = distinct_pass_sizes([img.shape[:2] for img in photos], cfg)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{len(photos)} photos of the {args.split} split ({split_groups} distinct pass sizes; all "
          f"{len(all_sizes)} photos: {distinct_pass_sizes(all_sizes, cfg)}), preset {args.preset}, "
          f"backbone {args.backbone}, device {device}")
    print(f"{'threads':>7s} {'mode':>12s} {'photos/s':>9s} {'cam s/photo':>11s} {'cam share':>9s} {'cam speed-up':>12s}"
          + (f" {'peak MiB':>9s}" if cuda else ""))
    modes = [None, *args.batch]
    for threads in args.threads:
        n_threads = set_cpu_threads(threads)
        for batch in modes:
            run_mode(engine, warm, batch, sync)
        best: dict = {}
        for _ in range(args.repeat):          # rounds over all modes: a busy machine slows them alike
            for batch in modes:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                wall, cam = run_mode(engine, photos, batch, sync)
                peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
                if batch not in best or wall < best[batch][0]:
                    best[batch] = (wall, cam, peak)
        for batch in modes:
            wall, cam, peak = best[batch]
            mode = "loop" if batch is None else f"many/{batch}"
            line = (f"{n_threads:7d} {mode:>12s} {len(photos) / wall:9.2f} {cam / len(photos):11.4f} "
                    f"{cam / wall:9.0%} {best[None][1] / cam:11.2f}x")
            print(line + (f" {peak:9.0f}" if cuda else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
