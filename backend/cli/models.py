"""``tag2mask models list|promote|rollback``: the project model registry from the command line.
"""
from __future__ import annotations

import json
import sys

from backend.cli.common import EXIT_FAILED, EXIT_OK, UsageError, registry_of


# -- models -------------------------------------------------------------------------------------------
def _pseudo(stats: dict | None) -> str:
    """'14/16': the photos whose pseudo-masks trained the seg head (self-training), of those with tags only."""
    if not stats:
        return "-"
    return f"{stats.get('used', 0)}/{stats.get('photos', 0)}"


def _tag_counts(prior: dict | None) -> str:
    """'horse:20,dog:3/20': how many of the annotated photos carried each label (the tag choice's prior)."""
    if not prior:
        return "-"
    counts = ",".join(f"{k}:{v}" for k, v in sorted(prior.get("counts", {}).items(), key=lambda kv: -kv[1]))
    return f"{counts or 'none'}/{prior.get('photos', 0)}"


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _combo(entry: dict) -> str:
    """{"weight": 1.0, "crf": False} -> "1/no-crf"; the CRF on is not written: "0.7"."""
    return f"{entry['weight']:g}" + ("" if entry.get("crf", True) else "/no-crf")


def _fusion_weight(fusion: dict | None) -> str:
    """The chosen combination of a version's ``validation["fusion"]``: per label ("person:1/no-crf",
    comma-separated), else the overall weight ("0.85"), "default" when none was chosen."""
    per = (fusion or {}).get("per_label") or {}
    if per:
        return ",".join(f"{label}:{_combo(entry)}" for label, entry in per.items())
    chosen = (fusion or {}).get("chosen")
    return f"{chosen:g}" if isinstance(chosen, (int, float)) else "default"


def fusion_text(fusion: dict | None) -> str:
    """A version's fusion for humans: "person w=1, no CRF (chosen on 17 masks: served fg_iou 0.702;
    seg head alone 0.671, CAM alone 0.412)", "default (2 masks < 5)", "0.25 (seg head trained on
    boxes only)", "default" (no validation masks or no seg head)."""
    if not fusion:
        return "default"
    if fusion.get("error"):
        return "default (choice failed)"
    if fusion.get("rule"):
        return f"weight {fusion['chosen']:g} ({fusion['rule']})"
    if fusion.get("chosen") is None:
        return f"weight default ({fusion.get('n_masks', 0)} masks < {fusion.get('min_masks')})"
    per = fusion.get("per_label") or {}
    if per:
        how = "; ".join(f"{label} w={e['weight']:g}" + ("" if e.get("crf", True) else ", no CRF") +
                        ("" if e.get("basis", "own") == "own" else " (as all labels)") for label, e in per.items())
    else:
        how = f"weight {fusion['chosen']:g}"
    parts = fusion.get("parts") or {}
    scores = []
    if isinstance(fusion.get("served"), float):
        scores.append(f"served fg_iou {fusion['served']:.3f}")
    scores += [f"{name} {parts[key]:.3f}" for key, name in (("seg_head_alone", "seg head alone"),
                                                             ("cam_alone", "CAM alone")) if key in parts]
    return f"{how} (chosen on {fusion.get('n_masks')} masks" + (f": {', '.join(scores)})" if scores else ")")


def cmd_models(args) -> int:
    from backend.storage.registry import RegistryError

    reg = registry_of(args)
    try:
        if args.models_command == "list":
            projects = [args.project] if args.project else reg.projects()
            rows = {p: reg.list(p) for p in projects}
            if args.project and not rows[args.project]:
                raise UsageError(f"project {args.project}: no models in {reg.root}")
            if args.json:
                print(json.dumps(rows, indent=1, default=str))
                return EXIT_OK
            if not projects:
                print(f"no models in {reg.root}")
            for p, metas in rows.items():
                print(f"project {p}:")
                for m in metas:
                    v = m.get("validation") or {}
                    c = m.get("counts") or {}
                    promo = m.get("promotion") or {}
                    note = "" if not promo or promo.get("promoted") else f"  refused: {promo.get('reason')}"
                    print(f"  {'*' if m.get('current') else ' '} {m['version']:<5} {str(m.get('created', ''))[:19]:<19} "
                          f"labels={','.join(m.get('labels') or [])} train={c.get('train', '-')} val={c.get('val', '-')} "
                          f"refit={c.get('refit', '-')} tags={_tag_counts(m.get('tag_prior'))} "
                          f"pseudo={_pseudo(m.get('self_training'))} "
                          f"map={_fmt(v.get('map'))} f1={_fmt(v.get('f1'))} fg_iou={_fmt(v.get('fg_iou'))} "
                          f"pipe={_fmt(v.get('pipeline_fg_iou'))} "
                          f"fusion={_fusion_weight(v.get('fusion'))} parent={m.get('parent') or '-'}{note}")
            return EXIT_OK
        if args.models_command == "promote":
            if args.version not in reg.versions(args.project):
                raise UsageError(f"project {args.project}: no version {args.version} "
                             f"(have: {', '.join(reg.versions(args.project)) or 'none'})")
            p = reg.promote(args.project, args.version, force=args.force)
            print(f"project {args.project}: {args.version} " + ("promoted" if p.promoted else "not promoted") +
                  f" ({p.reason}); current: {reg.current(args.project)}")
            return EXIT_OK if p.promoted or p.reason == "already current" else EXIT_FAILED
        if args.models_command == "rollback":
            if not reg.versions(args.project):
                raise UsageError(f"project {args.project}: no models in {reg.root}")
            before = reg.current(args.project)
            try:
                now = reg.rollback(args.project)
            except RegistryError as exc:
                print(f"tag2mask: error: {exc}", file=sys.stderr)
                return EXIT_FAILED
            print(f"project {args.project}: rolled back from {before} to {now}")
            return EXIT_OK
    except ValueError as exc:   # a project name that cannot be a folder
        raise UsageError(str(exc)) from None
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    raise UsageError("choose a models command: list, promote or rollback")
