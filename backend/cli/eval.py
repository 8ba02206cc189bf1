"""``tag2mask eval``: the command (options, summaries printed or as JSON, the ``--report`` page); the
scoring itself is backend.cli.evaluation.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from backend.cli.evaluation import (
    evaluate,
    evaluate_classes,
    find_pairs,
    format_class_summary,
    format_summary,
    read_classes,
    read_photo_tags,
)


def _plain(obj):
    """JSON fallback for numpy scalars and arrays."""
    return obj.tolist() if hasattr(obj, "tolist") else str(obj)


def _ignore_values(text: str | None) -> list[int]:
    from backend.cli.common import UsageError

    values = []
    for item in (text or "").replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        if not item.lstrip("-").isdigit():
            raise UsageError(f"--ignore: {item!r} is not a class id (give whole numbers, e.g. --ignore 255 or 0,255)")
        values.append(int(item))
    return values


def _check_mode(args) -> None:
    """Binary mode needs --tag; class mode needs --classes and one source of tags."""
    from backend.cli.common import UsageError

    classes, tag = getattr(args, "classes", None), getattr(args, "tag", None)
    if classes and tag:
        raise UsageError("give either --tag (binary masks) or --classes (class-id masks), not both")
    if not classes and not tag:
        raise UsageError("give --tag T for binary masks (non-zero = the object), "
                         "or --classes FILE with --tags-csv FILE or --tags-from-mask for class-id masks")
    tags_csv, from_mask = getattr(args, "tags_csv", None), getattr(args, "tags_from_mask", False)
    if classes:
        if bool(tags_csv) == bool(from_mask):
            raise UsageError("with --classes, give the photos' tags with --tags-csv FILE or --tags-from-mask "
                             "(one of them)")
    elif tags_csv or from_mask or getattr(args, "ignore", None):
        raise UsageError("--tags-csv, --tags-from-mask and --ignore go with --classes (class-id masks)")


def run_eval(args) -> int:
    """The command: parse-level checks -> usage errors (2); any failed photo -> 1."""
    from backend.cli.common import (
        UsageError,
        check_heads_args,
        check_tags,
        make_engine,
        use_project_heads,
    )

    _check_mode(args)
    check_heads_args(args)
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    classes = photo_tags = None
    ignore = _ignore_values(getattr(args, "ignore", None))
    if args.classes:
        try:
            classes = read_classes(args.classes)
            if args.tags_csv:
                photo_tags = read_photo_tags(args.tags_csv, classes)
        except FileNotFoundError as exc:
            raise UsageError(f"{exc.filename}: no such file") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsageError(str(exc)) from None
    try:
        pairs, errors = find_pairs(args.images, args.masks, args.split, args.limit)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    if not pairs and not errors:
        raise UsageError(f"--images {args.images}: no photos to evaluate")
    engine = make_engine(args)
    version = use_project_heads(args, engine)
    if classes is None:
        check_tags(engine, [args.tag], "--tag")
    for e in errors:
        print(f"tag2mask: error: {e.error}", file=sys.stderr)
    report_dir = getattr(args, "report", None)
    if classes is None:
        run = evaluate(engine, pairs, args.tag, progress=not args.quiet, keep_masks=bool(report_dir))
        what = f"tag {args.tag!r}"
    else:
        run = evaluate_classes(engine, pairs, classes, photo_tags, ignore, progress=not args.quiet,
                               keep_masks=bool(report_dir))
        what = f"classes {Path(args.classes).name}" + (f", ignoring {','.join(map(str, ignore))}" if ignore else "")
    run.errors[:0] = errors
    project = getattr(args, "project", None)
    meta = {"backbone": args.backbone, "preset": args.preset, "device": str(engine.backbone.device),
            "model_version": version, "project": project, "errors": [e.error for e in run.errors]}
    meta = {"tag": args.tag, **meta} if classes is None else \
        {"classes_file": str(args.classes), "tags": str(args.tags_csv) if args.tags_csv else "from the masks",
         "ignore": ignore, **meta}
    title = f"tag2mask eval: {what}, {args.backbone}, preset {args.preset}, {meta['device']}"
    if project is not None:
        title += f", project {project}'s trained heads ({version})"
    if args.json:
        out = dict(run.summary)
        for key in ("worst", "worst_classes"):
            if key in out:
                out[key] = [[name, round(float(v), 4)] for name, v in out[key]]
        if classes is not None:
            out["photos"] = [{"name": p.name, "score": round(p.iou, 4), "seconds": round(p.seconds, 3),
                              "tags": {t: round(v, 4) for t, v in p.tags.items()}} for p in run.photos]
        print(json.dumps({**out, **meta}, indent=1, default=_plain))
    else:
        print(format_summary(run.summary, title) if classes is None else format_class_summary(run.summary, title))
        if run.errors:
            print(f"  failed photos     {len(run.errors)}")
    if report_dir:
        from backend.cli.report import write_report

        heads = f", model {version}" if project is not None else ""
        index = write_report(run, report_dir, what, f"{what}, {args.backbone}, preset {args.preset}{heads}")
        print(f"report: {index}", file=sys.stderr if args.json else sys.stdout)
    return 1 if run.errors or not run.photos else 0
