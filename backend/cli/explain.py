"""``tag2mask explain IMAGE --method M``: one explanation method (CAM family, guided backprop,
activations, filter patterns) of a classifier's decision, saved as a PNG.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from backend.cli.common import (
    EXIT_FAILED,
    EXIT_OK,
    EXPLAIN_METHODS,
    UsageError,
    check_tags,
    err,
    make_engine,
)


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
