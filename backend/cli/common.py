"""What every ``tag2mask`` command shares: exit codes, the one usage error, the model, progress,
server and heads options, the engine they build, and the command line's defaults from the
environment (``$HOST``, ``$PORT``, ``$MODEL_DIR``, ``$TAG2MASK_MODEL_VERSION``; :func:`env_default` for
the other commands' options) and the environment of the processes it starts (:func:`child_environment`).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from backend.web.runner import DEFAULT_PORT

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2      # every command's exit status (README)
PRESETS = ("fast", "balanced", "best")           # explainers.segment.config.PRESETS (a test checks)


EXPLAIN_METHODS = ("activations", "filters", "cam", "gradcam", "gradcam++", "gradcampp", "scorecam",
                   "layercam", "fusion", "guided", "guided-gradcam")   # explainers.explain.EXPLAIN_METHODS


class UsageError(Exception):
    """A mistake in the command line: reported on one line, exit status 2."""


def err(message: str) -> None:
    print(f"tag2mask: error: {message}", file=sys.stderr)


# -- shared options (the one place the command line reads the environment for its defaults) -----------


def env_default(name: str, fallback: str | None = None) -> str | None:
    """``$<name>`` as an option's default (an empty value counts as unset), else `fallback`."""
    return os.environ.get(name) or fallback


def child_environment(**overrides: str) -> dict[str, str]:
    """The environment for a process the command line starts: this process's, with `overrides` set."""
    return {**os.environ, **overrides}



def host_port_options(p: argparse.ArgumentParser) -> None:
    """``--host`` (default ``$HOST`` or 0.0.0.0) and ``--port`` (default ``$PORT`` or 9090) of a server."""
    p.add_argument("--host", default=os.environ.get("HOST", "0.0.0.0"), help="default: $HOST or 0.0.0.0")
    p.add_argument("--port", type=int, default=int(os.environ.get("PORT", DEFAULT_PORT)),
                   help=f"default: $PORT or {DEFAULT_PORT}")


def model_options(p: argparse.ArgumentParser, preset: bool = True) -> None:
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


def progress_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def setup_torch(args) -> None:
    from explainers.device import set_cpu_threads

    set_cpu_threads(args.threads)


def make_engine(args):
    """A Tag2Mask for --backbone / --preset / --device (BackboneError -> usage error)."""
    from explainers.errors import BackboneError
    from explainers.segment import PipelineConfig, Tag2Mask

    setup_torch(args)
    try:
        return Tag2Mask(backbone=args.backbone, config=PipelineConfig.preset(args.preset), device=args.device)
    except BackboneError as exc:
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:   # e.g. --device cuda without a GPU
        raise UsageError(f"cannot use device {args.device!r}: {exc}") from None


def model_version(args) -> str:
    """The model version the ML backend reports for these settings (backend.serving.model), or
    $TAG2MASK_MODEL_VERSION as there."""
    from backend.serving.versions import base_model_version
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


def log_level_option(p: argparse.ArgumentParser) -> None:
    """``--log-level`` (default ``$LOG_LEVEL`` or INFO) of a long-running command."""
    p.add_argument("--log-level", default=env_default("LOG_LEVEL", "INFO"))


def start_logging(args) -> None:
    """Log at ``args.log_level``, one line per record with time, logger and level."""
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")


def add_heads_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("trained heads (offline, as the service serves a project)")
    g.add_argument("--project", metavar="P",
                   help="use project P's promoted heads from the registry in --model-dir (see `tag2mask models list`): "
                        "its labels become usable tags, its seg head refines their masks")
    g.add_argument("--model-dir", metavar="DIR",
                   help="with --project: the folder `tag2mask train --model-dir` wrote "
                        "(default: $MODEL_DIR or ./model_dir)")


def use_project_heads(args, engine) -> str:
    """Set ``--project``'s promoted heads on `engine` (backend.serving.offline) and return the model version
    to report: the service's ``<base>+p<P>.vN``, or the base version without ``--project``."""
    check_heads_args(args)
    base = model_version(args)
    project, model_dir = getattr(args, "project", None), getattr(args, "model_dir", None)
    if project is None:
        return base
    from backend.serving.offline import OfflineHeadsError, load_offline_heads
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


def check_heads_args(args) -> None:
    """Cheap checks of --project / --model-dir before the model loads (the registry is read later)."""
    project, model_dir = getattr(args, "project", None), getattr(args, "model_dir", None)
    if project is None and model_dir:
        raise UsageError("--model-dir goes with --project P (the project whose promoted heads to use)")
    if model_dir and not Path(model_dir).is_dir():
        raise UsageError(f"--model-dir {model_dir}: no such folder (give the folder that "
                         "`tag2mask train --model-dir` wrote)")


def registry_of(args):
    """The model registry of ``--model-dir`` (default ``$MODEL_DIR`` or ./model_dir)."""
    from backend.settings import Settings
    from backend.storage.registry import ModelRegistry

    model_dir = Path(args.model_dir) if args.model_dir else Settings.from_env().model_dir
    return ModelRegistry.in_model_dir(model_dir)
