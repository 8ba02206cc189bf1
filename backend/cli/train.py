"""``tag2mask train`` and ``tag2mask models``: offline training into the model registry, and its management.

    tag2mask train --ls-export EXPORT.json --images-root DIR [--project P] [--label-config FILE]
    tag2mask train --images DIR --masks DIR --tag NAME [--split FILE] [--limit N] [--negatives DIR] [--project P]
        common: [--no-promote] [--force] [--model-dir DIR] [--json] [--backbone B] [--preset P] [--device D]
                [--box-mode grabcut|box] [--self-train] [-q]
    tag2mask models list [--project P] [--json]
    tag2mask models promote PROJECT VERSION [--force]
    tag2mask models rollback PROJECT

Both ``train`` forms produce the same registry entries as the background training
(:func:`backend.training.trainer.train_and_register`: a new version with validation scores, promoted
unless its validation regresses against the current one, or ``--no-promote``), including how the
parts combine per label, chosen on the validation masks with ``--preset``'s pipeline (seg head
weight, CRF on/off; shown by ``train`` and in the ``fusion=`` column of ``models list``, e.g.
``person:1/no-crf``; "default" when fewer than 5 validation masks: the served preset's weight then
applies; 0.25 for a seg head trained on boxes only), and the heads refit on every example after
that choice (``train=``/``val=``: what the scores were validated on; ``refit=``: what the saved heads
learnt from; ``pipe=``: the served pipeline's validation fg IoU).

``--ls-export``: Label Studio's JSON export (a list of tasks with their ``annotations``). Per task the
most recent non-cancelled annotation is the example (Choices -> tags, brush RLE / polygons -> masks,
rectangles -> boxes; see :mod:`backend.labelstudio.annotations`). Photos are looked up under ``--images-root``:
``/data/local-files/?d=a/b.jpg`` -> ``DIR/a/b.jpg`` (or ``DIR/b.jpg``); ``/data/upload/3/1a2b3c4d-b.jpg``
-> ``DIR/3/1a2b3c4d-b.jpg``, ``DIR/1a2b3c4d-b.jpg`` or ``DIR/b.jpg``; any URL or path -> the same
relative path or its file name under DIR. Nothing outside DIR is read. ``--project`` defaults to the
export's project id (when all tasks agree).

``--images/--masks``: photos and same-stem masks (non-zero = the object) give one label, ``--tag``;
a mask without an object pixel and every photo under ``--negatives DIR`` are photos without the
label, from which the classifier head learns where it is absent (a label ImageNet lacks needs at
least 5 of them for the head's CAM to be served, ``fusion.head_cam`` "auto").
``--project`` defaults to the tag.

Exit status: 0 trained (promoted or not: the line says which) / command done, 1 some photos were
left out (listed) or a promotion was refused / nothing to roll back, 2 usage errors (missing files,
unknown project or version, nothing to train on). ``--model-dir`` defaults to ``$MODEL_DIR``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from backend.cli.common import EXIT_FAILED, EXIT_OK, UsageError, registry_of
from backend.cli.models import fusion_text, cmd_models
from backend.labelstudio.export import examples_from_export, resolve_export_image

__all__ = ["add_parsers", "cmd_train", "cmd_models", "examples_from_export", "resolve_export_image"]


def _export_samples(args, progress) -> tuple[list, list[tuple[str, str]], str, dict]:
    from backend.labelstudio.config import LabelConfigError, parse_label_config
    from explainers.imageio import load_image

    path = Path(args.ls_export)
    if not path.is_file():
        raise UsageError(f"--ls-export {path}: no such file")
    root = Path(args.images_root or ".")
    if not root.is_dir():
        raise UsageError(f"--images-root {root}: no such folder")
    try:
        tasks = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--ls-export {path}: not JSON ({exc})") from None
    if isinstance(tasks, dict):
        tasks = [tasks]
    if not isinstance(tasks, list):
        raise UsageError(f"--ls-export {path}: expected a list of tasks (Label Studio's JSON export)")
    config = None
    if args.label_config:
        try:
            config = parse_label_config(Path(args.label_config).read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"--label-config {args.label_config}: {exc.strerror or exc}") from None
        except LabelConfigError as exc:
            raise UsageError(f"--label-config {args.label_config}: {exc}") from None
    project = args.project
    if project is None:
        ids = {str((t.get("project") if isinstance(t, dict) else None)) for t in tasks}
        ids.discard("None")
        if len(ids) != 1:
            raise UsageError("--project is needed: the export's tasks name " +
                         (f"several projects ({', '.join(sorted(ids))})" if ids else "no project"))
        project = ids.pop()
    examples, errors = examples_from_export(tasks, project, config)
    samples = []
    for ex in examples:
        found = resolve_export_image(ex.image or "", root)
        if found is None:
            errors.append((str(ex.task_id), f"photo {ex.image!r} not found under {root}"))
            continue
        samples.append(ex.to_sample(load=progress(lambda p=found: load_image(p))))
    return samples, errors, str(project), {"source": f"ls-export:{path.name}"}


def _folder_samples(args, progress) -> tuple[list, list[tuple[str, str]], str, dict]:
    from backend.cli.evaluation import find_pairs, load_mask
    from explainers.imageio import load_image
    from explainers.training import Sample

    if not args.masks or not args.tag:
        raise UsageError("--images needs --masks DIR and --tag NAME")
    try:
        pairs, errs = find_pairs(args.images, args.masks, split=args.split, limit=args.limit)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    tag = args.tag.strip()
    samples = []
    for stem, image, mask_path in pairs:
        mask = load_mask(mask_path)
        # a mask without a pixel of the object says the photo does not show it: a negative example,
        # which the classifier head needs to learn where a label (one ImageNet lacks, say) is absent
        shows = bool(mask.any())
        samples.append(Sample(key=stem, tags=[tag] if shows else [], masks={tag: mask} if shows else {},
                              load=progress(lambda p=image: load_image(p)), photo_key=str(image)))
    for image in _negative_photos(args.negatives):
        samples.append(Sample(key=f"neg:{image.stem}", tags=[], load=progress(lambda p=image: load_image(p)),
                              photo_key=str(image)))
    meta = {"source": f"folders:{Path(args.images).name}"}
    if args.negatives:
        meta["negatives"] = f"folder:{Path(args.negatives).name}"
    return samples, [(e.path, e.error) for e in errs], args.project or tag, meta


def _negative_photos(folder: str | None) -> list[Path]:
    """The photos of --negatives (photos that do not show the tag), sorted; [] without the option."""
    from backend.cli.labeling import IMAGE_EXTENSIONS

    if not folder:
        return []
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"--negatives: {folder} is not a folder")
    return sorted(q for q in root.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)


def cmd_train(args) -> int:
    from backend.storage.registry import project_dirname

    if bool(args.ls_export) == bool(args.images):
        raise UsageError("give either --ls-export EXPORT.json --images-root DIR, or --images DIR --masks DIR --tag NAME")
    if args.negatives and not args.images:
        raise UsageError("--negatives goes with --images DIR --masks DIR --tag NAME (an export's tasks without the label are its negatives)")
    if args.project is not None:
        try:
            project_dirname(args.project)
        except ValueError as exc:
            raise UsageError(f"--project: {exc}") from None
    bar = None

    def progress(load):
        def wrapped():
            try:
                return load()
            finally:
                if bar is not None:
                    bar.update(1)
        return wrapped

    samples, errors, project, meta = (_export_samples if args.ls_export else _folder_samples)(args, progress)
    try:
        project_dirname(project)
    except ValueError as exc:
        raise UsageError(f"project: {exc} (give --project)") from None
    for where, why in errors:
        print(f"tag2mask: skipped {where}: {why}", file=sys.stderr)
    if len(samples) < 2:
        raise UsageError(f"{len(samples)} usable example(s); training needs at least 2")

    from backend.cli.common import setup_torch
    from backend.training.trainer import train_and_register
    from explainers.backbones import load_backbone
    from explainers.errors import BackboneError

    setup_torch(args)
    try:
        backbone = load_backbone(args.backbone, args.device)
    except BackboneError as exc:
        raise UsageError(str(exc)) from None
    except RuntimeError as exc:
        raise UsageError(f"cannot use device {args.device!r}: {exc}") from None
    config = {"val_fraction": args.val_fraction}
    if args.seg_epochs is not None:
        config["seg_epochs"] = args.seg_epochs
    if args.box_mode is not None:
        config["box_mode"] = args.box_mode
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=len(samples), desc="loading photos", unit="photo", file=sys.stderr)
    try:
        from explainers.errors import ExplainersError

        registry = registry_of(args)
        report = train_and_register(samples, project, registry, backbone, config=config,
                                    promote=not args.no_promote, force=args.force, trigger="cli",
                                    extra_meta={**meta, "device": str(backbone.device), "preset": args.preset},
                                    preset=args.preset, self_train={} if args.self_train else None,
                                    model_dir=registry.root.parent)
    except (ValueError, ExplainersError) as exc:
        raise UsageError(f"cannot train: {exc}") from None
    finally:
        if bar is not None:
            bar.close()
    skipped = report["counts"].get("skipped") or {}
    for key, why in skipped.items():
        print(f"tag2mask: photo of {key} left out: {why}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        v = report["validation"]
        scores = ", ".join(f"{k} {v[k]:.3f}" for k in ("map", "f1", "fg_iou") if isinstance(v.get(k), float))
        state = "promoted" if report["promoted"] else f"not promoted ({report['reason']})"
        refit = report["counts"].get("refit")
        refit = f"; refit on all {refit}" if refit else ""
        print(f"project {project}: {report['version']} trained on {report['counts']['train']} example(s), "
              f"validated on {report['counts']['val']} ({scores or 'no scores'}) in "
              f"{report['seconds'].get('total', 0):.1f} s; fusion {fusion_text(v.get('fusion'))}{refit}; "
              f"{state}; current: {report['current']}")
        if report.get("self_training"):
            st = report["self_training"]
            print(f"self-training: the seg head also learnt from the pseudo-masks of {st['used']} of {st['photos']} "
                  f"tagged photo(s) without a mask ({st['seconds']:.0f} s)"
                  + (f"; kept zero-shot: {', '.join(st['zero_shot'])}" if st["zero_shot"] else ""))
    return EXIT_FAILED if (errors or skipped) else EXIT_OK


# -- parsers ------------------------------------------------------------------------------------------
def add_parsers(sub, model_options, progress_option) -> None:
    """Add ``train`` and ``models`` to the CLI's subparsers (called by backend.cli.main.build_parser)."""
    p = sub.add_parser("train", help="train a project's heads offline (Label Studio export or photo+mask folders)",
                       description="Train a project's classifier and segmentation heads on corrected examples "
                                   "and save them as a new registry version (promoted unless validation "
                                   "regresses). Sources: a Label Studio JSON export with its photos, or "
                                   "photo + mask folders for one tag.")
    src = p.add_argument_group("from a Label Studio JSON export")
    src.add_argument("--ls-export", metavar="EXPORT.json")
    src.add_argument("--images-root", metavar="DIR", help="folder the export's photos are found under")
    src.add_argument("--label-config", metavar="FILE", help="the project's labeling config (XML), to match labels")
    src = p.add_argument_group("from photo and mask folders")
    src.add_argument("--images", metavar="DIR")
    src.add_argument("--masks", metavar="DIR")
    src.add_argument("--tag", metavar="NAME", help="the label the masks show")
    src.add_argument("--split", metavar="FILE", help="file listing the photo stems to use (default: all)")
    src.add_argument("--limit", type=int, metavar="N", help="only the first N photos")
    src.add_argument("--negatives", metavar="DIR",
                     help="photos that do not show the tag (a mask with no object pixel counts as one too): "
                          "the classifier head learns where the label is absent")
    p.add_argument("--project", metavar="P", help="registry project (default: the export's project / the tag)")
    p.add_argument("--no-promote", action="store_true", help="save the version without promoting it")
    p.add_argument("--force", action="store_true", help="promote even if validation regresses")
    p.add_argument("--val-fraction", type=float, default=0.2, help="held-out fraction for validation (0.2)")
    p.add_argument("--seg-epochs", type=int, default=None, help="segmentation head epochs (default 40)")
    p.add_argument("--self-train", action="store_true",
                   help="examples with tags and no mask (an export's Choices-only tasks) also train the seg head, "
                        "on their pseudo-masks from the project's current pipeline")
    p.add_argument("--box-mode", choices=("grabcut", "box"), default=None,
                   help="how box-only labels supervise the seg head: GrabCut pseudo-masks (default) or filled boxes")
    p.add_argument("--model-dir", metavar="DIR", help="default: $MODEL_DIR or ./model_dir")
    p.add_argument("--json", action="store_true", help="print the training report as JSON")
    model_options(p, preset=True)      # --preset: the pipeline the fusion weight is chosen with
    progress_option(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("models", help="list, promote or roll back a project's trained models")
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    msub.required = True
    q = msub.add_parser("list", help="versions with their validation scores (* = current)")
    q.add_argument("--project", metavar="P")
    q.add_argument("--json", action="store_true")
    q = msub.add_parser("promote", help="make a version current (refused if validation regresses)")
    q.add_argument("project", metavar="PROJECT")
    q.add_argument("version", metavar="VERSION")
    q.add_argument("--force", action="store_true", help="promote even if validation regresses")
    q = msub.add_parser("rollback", help="go back to the previously promoted version")
    q.add_argument("project", metavar="PROJECT")
    for q in msub.choices.values():
        q.add_argument("--model-dir", metavar="DIR", help="default: $MODEL_DIR or ./model_dir")
    p.set_defaults(func=cmd_models)
