"""``tag2mask export LS_EXPORT.json --format coco|yolo-seg|png --out DIR [--images ROOT]``: a Label Studio
JSON export (corrected annotations, or predictions) -> training datasets (backend.datasets), and the
dataset options ``tag2mask label`` shares (``--format``, ``--yolo-images``, ``--min-pixels``).

Public API::

    add_parser(sub)                           # registers ``export``
    dataset_options(p, label=True)            # --format (label: ls too), --yolo-images, --min-pixels
    dataset_formats(args, label=True)         # -> the formats asked for (UsageError for an unknown one)
    open_export(args, out, formats, categories, image_root=None) -> DatasetExport | None
    cmd_export(args) -> exit status           # 0 all tasks exported, 1 some left out, 2 usage error

Each task that cannot be exported (not an object, no annotation or prediction, a bad RLE or
polygon, a photo that is missing or of another size than its regions) is one sentence on stderr
and in ``DIR/export_errors.json``; the other tasks are exported.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from backend.cli.common import EXIT_FAILED, EXIT_OK, UsageError, progress_option
from backend.datasets import MIN_INSTANCE_PIXELS
from backend.datasets.files import IMAGE_MODES

__all__ = ["add_parser", "cmd_export", "dataset_formats", "dataset_options", "open_export"]


def dataset_options(p, label: bool = True) -> None:
    g = p.add_argument_group("training datasets (backend.datasets)")
    if label:
        what = ("output formats, repeatable or comma-separated: ls (DIR/tasks.json for Label Studio, the default, "
                "always written), coco (DIR/coco/annotations.json), yolo-seg (DIR/yolo/), png (DIR/png/ class-id "
                "masks)")
    else:
        what = "dataset formats, repeatable or comma-separated: coco, yolo-seg, png"
    g.add_argument("--format", action="append", metavar="FMT", help=what)
    g.add_argument("--yolo-images", choices=IMAGE_MODES, default="link",
                   help="how yolo-seg's images/ holds the photos: link (a hard link, else a copy; the default), "
                        "copy, or symlink (breaks when the photos move, and on Windows)")
    g.add_argument("--min-pixels", type=int, default=MIN_INSTANCE_PIXELS, metavar="N",
                   help=f"instances (connected components) of fewer pixels are specks, left out of the datasets "
                        f"(default: {MIN_INSTANCE_PIXELS}; 0 keeps all)")


def dataset_formats(args, label: bool = True) -> list[str]:
    """The dataset formats asked for with --format (``ls`` dropped: tag2mask label always writes it)."""
    from backend.datasets.formats import parse_formats

    try:
        formats = parse_formats(args.format, extra=("ls",) if label else ())
    except ValueError as exc:
        raise UsageError(f"--format: {exc}") from None
    if args.min_pixels < 0:
        raise UsageError(f"--min-pixels must be 0 or more, not {args.min_pixels}")
    return [f for f in formats if f != "ls"]


def open_export(args, out: Path, formats: list[str], categories, image_root=None):
    """The DatasetExport for `formats` under `out` (None when there are none)."""
    if not formats:
        return None
    from backend.datasets.formats import DatasetExport

    try:
        return DatasetExport(out, formats, categories, image_root=image_root, image_mode=args.yolo_images,
                             min_pixels=args.min_pixels)
    except ValueError as exc:
        raise UsageError(f"--format: {exc}") from None


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="a Label Studio JSON export -> COCO / YOLO-seg / class-id PNG datasets",
                       description="Turn a Label Studio JSON export (tasks with brush or polygon annotations, or "
                                   "predictions) into training datasets: DIR/coco/annotations.json, DIR/yolo/, "
                                   "DIR/png/. Tasks that cannot be exported are listed in DIR/export_errors.json.")
    p.add_argument("export", metavar="LS_EXPORT.json", help="Label Studio's JSON export (a list of tasks)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--images", metavar="ROOT",
                   help="the folder holding the photos: tasks' photo references are looked up under it, and COCO's "
                        "file_name is relative to it (default: references are local paths; file_name absolute)")
    p.add_argument("--labels", metavar="A,B",
                   help="the categories, in this order (ids 1, 2, ...); labels are matched case-insensitively and "
                        "other labels' regions are left out (default: every label, in order of appearance)")
    p.add_argument("--from", dest="source", default="any", choices=("any", "annotations", "predictions"),
                   help="which result of a task: its latest annotation, else its latest prediction (any, the "
                        "default), or only annotations / predictions")
    p.add_argument("--regions", default="auto", choices=("auto", "brush", "polygon"),
                   help="which regions make a label's mask: its brush regions when it has some, else its polygons "
                        "(auto, the default), or only brush / polygon regions")
    dataset_options(p, label=False)
    progress_option(p)
    p.set_defaults(func=cmd_export)


def _read_export(path: Path) -> list:
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        tasks = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:      # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UsageError(f"{path}: not a JSON file ({exc})") from None
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise UsageError(f"{path}: expected a list of tasks (Label Studio's JSON export), not a JSON value of "
                         "another kind")
    return tasks


def _categories(args, tasks: list) -> tuple[list[str], dict[str, str]]:
    """(category names in order, {lower-cased label: category})."""
    from backend.datasets.from_labelstudio import export_labels

    found = export_labels(tasks, args.source, args.regions)
    if args.labels is None:
        return found, {}
    names = list(dict.fromkeys(n.strip() for n in args.labels.split(",") if n.strip()))
    if not names:
        raise UsageError("--labels: give the category names, e.g. --labels horse,dog")
    by_lower = {n.lower(): n for n in names}
    other = [label for label in found if label.lower() not in by_lower]
    if other:
        print(f"note: regions of labels not in --labels are left out: {', '.join(repr(o) for o in other[:20])}"
              + (f" and {len(other) - 20} more" if len(other) > 20 else ""), file=sys.stderr)
    return names, by_lower


def cmd_export(args) -> int:
    from tqdm import tqdm

    from backend.cli.labeling import unique_name
    from backend.datasets.files import write_json
    from backend.datasets.from_labelstudio import read_task, task_name
    from backend.datasets.instances import Segment

    formats = dataset_formats(args, label=False)
    if not formats:
        raise UsageError("give the dataset formats with --format coco, yolo-seg and/or png")
    root = Path(args.images) if args.images else None
    if root is not None and not root.is_dir():
        raise UsageError(f"--images {root}: no such folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    tasks = _read_export(Path(args.export))
    names, by_lower = _categories(args, tasks)
    export = open_export(args, out, formats, names, image_root=root)

    errors: list[dict] = []
    taken: set[str] = set()
    for i, task in enumerate(tqdm(tasks, unit="task", desc="export", disable=args.quiet, file=sys.stderr)):
        try:
            photo = read_task(task, i, images_root=root, source=args.source, regions=args.regions)
            masks: dict[str, object] = {}
            for label, mask in photo.masks.items():
                name = by_lower.get(label.lower()) if by_lower else label
                if name is not None:
                    masks[name] = mask if name not in masks else (masks[name] | mask)
            segments = [Segment(name, mask) for name, mask in masks.items()]
            export.add(photo.image, unique_name(photo.image.stem, taken), photo.width, photo.height, segments)
        except (ValueError, OSError) as exc:
            where = task_name(task, i)
            message = str(exc) if str(exc).startswith(f"{where}: ") else f"{where}: {exc}"
            errors.append({"task": where, "error": message})
            tqdm.write(f"error: {message}", file=sys.stderr)
    lines = export.close()
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "export_errors.json", errors)
    for line in lines:
        print(line)
    summary = f"exported {len(tasks) - len(errors)} of {len(tasks)} tasks -> {out}"
    if errors:
        summary += f"; {len(errors)} left out (see {out}/export_errors.json)"
    print(summary)
    return EXIT_FAILED if errors else EXIT_OK
