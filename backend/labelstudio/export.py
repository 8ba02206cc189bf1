"""A Label Studio JSON export -> training examples (``tag2mask train --ls-export``), its photo
references resolved inside ``--images-root`` only.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

# -- Label Studio export ------------------------------------------------------------------------------
_UPLOAD_PREFIX = re.compile(r"^[0-9a-f]{8}-")


def _inside(root: Path, rel: str) -> Path | None:
    rel = rel.lstrip("/")
    if not rel or any(part == ".." for part in Path(rel).parts):
        return None
    p = (root / rel).resolve()
    return p if p.is_file() and p.is_relative_to(root) else None


def resolve_export_image(ref: str, root: Path) -> Path | None:
    """A task's image reference -> an existing file under `root` (None when not found there)."""
    if not isinstance(ref, str) or not ref.strip():
        return None
    root = Path(root).resolve()
    ref = ref.strip()
    parsed = urlparse(ref)
    candidates: list[str] = []
    if "/data/local-files" in parsed.path:
        d = parse_qs(parsed.query).get("d")
        if d:
            candidates.append(unquote(d[-1]))
    path = unquote(parsed.path)
    if "/data/upload/" in path or path.startswith(("upload/", "/upload/")):
        rel = path.split("upload/", 1)[1]
        candidates.append(rel)
    if parsed.scheme in ("s3", "gs", "azure-blob"):
        candidates.append(parsed.netloc + path)
        candidates.append(path)
    elif not path.startswith("/data/"):   # Label Studio's own routes are /data/upload/, /data/local-files/
        if parsed.scheme in ("", "file") and Path(path).is_absolute():
            try:
                rel_to_root = Path(path).resolve().relative_to(root)   # a local path inside the root itself
                candidates.append(str(rel_to_root))
            except ValueError:
                pass
        candidates.append(path)
    names = []
    for c in candidates:
        name = Path(c).name
        names.append(name)
        if _UPLOAD_PREFIX.match(name):
            names.append(_UPLOAD_PREFIX.sub("", name, count=1))
    for rel in [*candidates, *names]:
        found = _inside(root, rel)
        if found is not None:
            return found
    return None


def _latest_annotation(task: dict) -> dict | None:
    anns = [a for a in (task.get("annotations") or []) if isinstance(a, dict) and not a.get("was_cancelled")
            and a.get("result")]
    if not anns:
        return None
    anns.sort(key=lambda a: (str(a.get("updated_at") or a.get("created_at") or ""), str(a.get("id") or "")))
    return anns[-1]


def examples_from_export(tasks: list, project: str, config=None) -> tuple[list, list[tuple[str, str]]]:
    """Export tasks -> (Examples, [(task, why it was left out)])."""
    from backend.labelstudio.annotations import example_from_annotation

    examples, errors = [], []
    for task in tasks:
        if not isinstance(task, dict):
            errors.append(("?", "a task is not a JSON object"))
            continue
        tid = str(task.get("id"))
        ann = _latest_annotation(task)
        if ann is None:
            errors.append((tid, "no annotation (or only skipped/empty ones)"))
            continue
        if ann.get("id") is None:
            ann = {**ann, "id": f"task{tid}"}
        try:
            ex = example_from_annotation(ann, task, config, project)
        except ValueError as exc:
            errors.append((tid, str(exc)))
            continue
        if ex is None or not (ex.tags or ex.masks or ex.boxes):
            errors.append((tid, "the annotation has no tag, mask or box on the image"))
            continue
        examples.append(ex)
    return examples, errors
