"""``tag2mask label ... --self-train``: before labelling, self-train the project on the photos' own tags.

The photos and their tags (``--tags`` / ``--tags-csv``; no mask is read) become a training of the
project's heads in which every photo's seg-head target is its pseudo-mask from the current pipeline
(:func:`backend.training.trainer.train_and_register` with ``self_train``: the same training,
validation, registry version and promotion as the service's ``train`` job). With ``--project P`` the
version goes into ``--model-dir``'s registry (it composes: label, correct some masks, ``tag2mask
train``, label ``--self-train`` the rest); without, into a temporary one. The engine then labels with
the promoted heads.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from backend.cli.common import UsageError

__all__ = ["self_train_before_labelling"]


def self_train_before_labelling(args, engine, photos, tags, tags_map, base_version: str) -> tuple[str, object]:
    """Train, register and set the heads on `engine`; -> (the model version to report, a cleanup callable)."""
    from backend.cli.labeling import tags_for
    from backend.serving.offline import OfflineHeadsError, load_offline_heads
    from backend.settings import Settings
    from backend.storage.registry import ModelRegistry
    from backend.training.trainer import train_and_register
    from explainers.imageio import load_image
    from explainers.training import Sample

    samples = []
    for item in photos:
        photo_tags = [t for t in tags_for(item, tags, tags_map) if engine.unusable_reason(t) is None]
        if photo_tags:
            samples.append(Sample(key=str(item.path), tags=photo_tags, load=lambda p=item.path: load_image(p)))
    if len(samples) < 2:
        raise UsageError(f"--self-train: {len(samples)} photo(s) with a tag that can be segmented; it needs at least 2")
    temporary = None
    if args.project is not None:
        model_dir, project = Path(args.model_dir or Settings.from_env().model_dir), str(args.project)
    else:
        temporary = tempfile.TemporaryDirectory(prefix="tag2mask-self-train-")
        model_dir, project = Path(temporary.name), "self-train"
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="pseudo-masks", unit="photo", file=sys.stderr)

    def progress(done, total):
        if bar is not None:
            bar.n = done
            bar.refresh()
    started = time.perf_counter()

    def stage(name):
        if not args.quiet:
            if bar is not None:
                bar.close()
            print(f"self-training: {name} ({time.perf_counter() - started:.0f} s in)", file=sys.stderr, flush=True)
    try:
        report = train_and_register(samples, project, ModelRegistry.in_model_dir(model_dir), engine.backbone,
                                    self_train={}, preset=args.preset, model_dir=model_dir, progress=progress,
                                    stage=stage,
                                    trigger="cli", extra_meta={"source": "tag2mask label --self-train"})
    except ValueError as exc:
        raise UsageError(f"--self-train: cannot train: {exc}") from None
    finally:
        if bar is not None:
            bar.close()
    st = report["self_training"]
    zero = f"; kept zero-shot (too few confident photos): {', '.join(st['zero_shot'])}" if st["zero_shot"] else ""
    state = "promoted" if report["promoted"] else f"not promoted ({report['reason']})"
    print(f"self-training: project {project} {report['version']} on the pseudo-masks of {st['used']} of "
          f"{st['photos']} photo(s) ({st['seconds']:.0f} s) from the {st['from_version']} pipeline{zero}; "
          f"{state}", file=sys.stderr)
    try:
        heads = load_offline_heads(model_dir, project, engine.backbone)
    except OfflineHeadsError as exc:
        raise UsageError(f"--self-train: {exc}") from None
    engine.set_heads(heads.heads)
    version = heads.model_version(base_version.split("+")[0]) if args.project is not None else \
        f"{base_version.split('+')[0]}+self-trained"
    return version, (temporary.cleanup if temporary is not None else (lambda: None))
