"""``tag2mask label PATH... --tags T --out DIR [--format coco,yolo-seg,png] [--self-train]``: pre-label photos
into a Label Studio import folder (backend.cli.labeling), optionally with a project's promoted heads or
self-trained on the photos' own tags first (backend.cli.self_train), and into training datasets
(backend.datasets) from the same results.
"""
from __future__ import annotations

from pathlib import Path

from backend.cli.common import (
    UsageError,
    check_heads_args,
    check_tags,
    make_engine,
    model_version,
    registry_of,
    use_project_heads,
)
from backend.cli.export import dataset_formats, open_export


# -- label ----------------------------------------------------------------------------------------
def cmd_label(args) -> int:
    from backend.cli.labeling import collect_photos, label_photos, read_tags_csv, tags_for
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

    formats = dataset_formats(args)
    if args.self_train and args.model_dir:
        Path(args.model_dir).mkdir(parents=True, exist_ok=True)     # a first self-training makes the registry
    check_heads_args(args)
    photos, errors = collect_photos(args.paths, exclude=[out])
    engine = make_engine(args)
    version = model_version(args) if args.self_train and not _has_promoted(args) else use_project_heads(args, engine)
    check_tags(engine, tags)
    cleanup = None
    if args.self_train:
        from backend.cli.self_train import self_train_before_labelling

        version, cleanup = self_train_before_labelling(args, engine, photos, tags, tags_map, version)
    # the datasets' categories: the batch's tags that can be segmented, in order (stable class ids)
    batch_tags = dict.fromkeys(t for p in photos for t in tags_for(p, tags, tags_map))
    export = open_export(args, out, formats, [t for t in batch_tags if engine.unusable_reason(t) is None])
    try:
        summary = label_photos(photos, engine, out, tags=tags, tags_map=tags_map, errors=errors,
                               image_root_url=args.image_root_url, label_config=config,
                               model_version=version, progress=not args.quiet, writers=[export] if export else [])
    finally:
        if cleanup is not None:
            cleanup()
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
    for note in export.lines if export else []:
        print(note)
    if getattr(args, "project", None) is not None or args.self_train:
        print(f"model version {version}")
    return summary.exit_status


def _has_promoted(args) -> bool:
    """Whether --project has a promoted version (a first --self-train of a project has none yet)."""
    return args.project is not None and registry_of(args).current(str(args.project)) is not None


def _read_label_config(path: str):
    from backend.labelstudio.config import LabelConfigError, parse_label_config

    try:
        return parse_label_config(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"--label-config: {path}: {exc.strerror or exc}") from None
    except LabelConfigError as exc:
        raise UsageError(f"--label-config: {path}: {exc}") from None
