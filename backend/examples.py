"""Label Studio annotations -> training examples, and an on-disk store of them keyed by annotation id.

Public API::

    ex = example_from_annotation(annotation, task, config=None, project=None)   # -> Example | None
    store = ExampleStore(Path(MODEL_DIR) / "examples.sqlite3")
    store.upsert(ex) -> bool            # True when stored content changed (created or updated)
    store.delete(annotation_id) -> bool # True when something was removed
    store.apply_event(action, payload, config=None) -> dict   # a webhook body -> {"status", "changed", ...}
    store.get(annotation_id) -> Example | None
    store.list(project) -> list[Example]
    store.count(project) -> int
    store.projects() -> list[str]
    store.revision(project) -> int      # grows by one per change (upsert that changed / delete)
    store.changes_since(project, revision) -> int   # changes after a revision (e.g. the last model's)
    ex.to_sample(load=None) -> explainers.training.Sample

What an annotation gives (only result items on the Image named by ``config.image_name`` when a
config is given; labels are matched to the control's label values, case-insensitively):

- tags: the ``choices`` values, plus every label that has a region (brush, polygon, rectangle);
- masks: per label, the union of its brush regions (RLE decoded with
  :func:`backend.ls_results.decode_rle`) and polygons (percent points rasterised with OpenCV at
  ``original_width`` x ``original_height``), bool (H, W);
- boxes: per label, rectangles as (x0, y0, x1, y1) pixels (a rotated rectangle gives the box around
  its rotated corners), kept as box supervision, not painted into the mask.

A cancelled (skipped) annotation is no example: :meth:`ExampleStore.apply_event` deletes any stored
one. An update older than the stored one (``updated_at``) is ignored, so out-of-order webhooks cannot
bring back stale content. Writes are idempotent: the same annotation content twice is one change.

The store is a single sqlite3 file (stdlib; safe across processes on one host with WAL + a busy
timeout). Masks are stored PNG-encoded. A later step can put the same interface in front of Redis.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from backend.label_config import LabelConfig
from backend.ls_results import decode_rle

__all__ = ["Example", "ExampleStore", "example_from_annotation", "annotation_regions", "CREATED", "UPDATED",
           "DELETED", "EXAMPLE_EVENTS"]

CREATED, UPDATED, DELETED = "ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATION_DELETED"
EXAMPLE_EVENTS = frozenset({CREATED, UPDATED, DELETED, "ANNOTATIONS_CREATED", "ANNOTATIONS_DELETED"})

REGION_TYPES = ("brushlabels", "polygonlabels", "rectanglelabels")


@dataclass
class Example:
    """One annotation as a training example (masks bool (H, W); boxes (x0, y0, x1, y1) pixels)."""

    annotation_id: str
    project: str
    task_id: str | None
    image: str | None                 # the task's photo reference (URL or path), as in task["data"]
    width: int | None = None
    height: int | None = None
    tags: list[str] = field(default_factory=list)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    boxes: dict[str, list[tuple[float, float, float, float]]] = field(default_factory=dict)
    updated_at: str = ""

    def digest(self) -> str:
        """A hash of the content that training uses (tags, masks, boxes, photo)."""
        h = hashlib.sha1()
        h.update(json.dumps([self.project, self.task_id, self.image, self.width, self.height, sorted(self.tags),
                             {k: [list(b) for b in v] for k, v in sorted(self.boxes.items())}],
                            sort_keys=True, default=str).encode())
        for label in sorted(self.masks):
            m = np.ascontiguousarray(self.masks[label], dtype=bool)
            h.update(label.encode())
            h.update(str(m.shape).encode())
            h.update(np.packbits(m).tobytes())
        return h.hexdigest()

    def to_sample(self, load: Callable[[], np.ndarray] | None = None, image: np.ndarray | None = None):
        """The :class:`explainers.training.Sample` of this example (photo keyed by its reference)."""
        from explainers.training import Sample

        return Sample(key=self.annotation_id, tags=list(self.tags), masks=dict(self.masks),
                      boxes={k: [tuple(b) for b in v] for k, v in self.boxes.items()}, image=image, load=load,
                      photo_key=self.image or f"task:{self.task_id}",
                      shape=(self.height, self.width) if self.height and self.width else None)


def _id(value) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("id")
    return None if value is None else str(value)


def _label_matcher(config: LabelConfig | None, from_name: str | None) -> Callable[[str], str | None]:
    if config is None:
        return lambda v: str(v)
    try:
        control = config.control(from_name) if from_name else None
    except KeyError:
        control = None
    if control is None:
        return lambda v: None
    return control.match


def _polygon_mask(points: list, width: int, height: int) -> np.ndarray:
    # a point at x% lies on pixel column x / 100 * width (the convention of backend.ls_results)
    pts = np.array([[float(x) / 100.0 * width, float(y) / 100.0 * height] for x, y in points], np.float64)
    mask = np.zeros((height, width), np.uint8)
    if len(pts) >= 3:
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask.astype(bool)


def _rect_box(value: dict, width: int, height: int) -> tuple[float, float, float, float] | None:
    x, y = float(value.get("x", 0)) / 100 * width, float(value.get("y", 0)) / 100 * height
    w, h = float(value.get("width", 0)) / 100 * width, float(value.get("height", 0)) / 100 * height
    if w <= 0 or h <= 0:
        return None
    rot = math.radians(float(value.get("rotation") or 0.0))
    if rot:   # Label Studio rotates the rectangle about its top-left corner
        c, s = math.cos(rot), math.sin(rot)
        corners = [(x + dx * c - dy * s, y + dx * s + dy * c) for dx, dy in ((0, 0), (w, 0), (w, h), (0, h))]
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        x0, y0, x1, y1 = min(xs), min(ys), max(xs), max(ys)
    else:
        x0, y0, x1, y1 = x, y, x + w, y + h
    x0, x1 = max(0.0, x0), min(float(width), x1)
    y0, y1 = max(0.0, y0), min(float(height), y1)
    if x1 <= x0 or y1 <= y0:
        return None
    return (round(x0, 3), round(y0, 3), round(x1, 3), round(y1, 3))


def annotation_regions(result: Iterable[dict], config: LabelConfig | None = None,
                       size: tuple[int, int] | None = None) -> tuple[list[str], dict, dict, tuple[int, int] | None]:
    """Result items -> (tags, masks {label: bool (H, W)}, boxes {label: [box px]}, (width, height)).

    `size` = (width, height) when the items lack ``original_width``/``original_height``.
    """
    tags: list[str] = []
    masks: dict[str, np.ndarray] = {}
    boxes: dict[str, list] = {}
    wh = size
    for item in result or []:
        if not isinstance(item, dict):
            continue
        kind = str(item.get("type") or "").lower()
        if config is not None and item.get("to_name") != config.image_name:
            continue
        match = _label_matcher(config, item.get("from_name"))
        value = item.get("value") or {}
        if kind == "choices":
            for v in value.get("choices") or []:
                label = match(v)
                if label and label not in tags:
                    tags.append(label)
            continue
        if kind not in REGION_TYPES:
            continue
        labels = [match(v) for v in value.get(kind) or []]
        labels = [label for label in labels if label]
        if not labels:
            continue
        w, h = item.get("original_width"), item.get("original_height")
        if w and h:
            wh = (int(w), int(h))
        if wh is None:
            raise ValueError(f"a {kind} region has no original_width/original_height and no photo size was given")
        width, height = wh
        for label in labels:
            if label not in tags:
                tags.append(label)
        if kind == "rectanglelabels":
            box = _rect_box(value, width, height)
            if box is not None:
                for label in labels:
                    boxes.setdefault(label, []).append(box)
            continue
        if kind == "brushlabels":
            if value.get("format", "rle") != "rle" or value.get("rle") is None:
                continue
            region = decode_rle(value["rle"], height, width)
        else:
            region = _polygon_mask(value.get("points") or [], width, height)
        for label in labels:
            prev = masks.get(label)
            if prev is not None and prev.shape != region.shape:
                raise ValueError(f"regions of {label!r} disagree on the photo size: {prev.shape} vs {region.shape}")
            masks[label] = region if prev is None else (prev | region)
    return tags, masks, boxes, wh


def example_from_annotation(annotation: dict, task: dict | None = None, config: LabelConfig | None = None,
                            project=None) -> Example | None:
    """One Label Studio annotation (+ its task) -> an Example; None for a cancelled (skipped) one."""
    if not isinstance(annotation, dict):
        raise ValueError("an annotation must be a JSON object")
    ann_id = _id(annotation.get("id"))
    if ann_id is None:
        raise ValueError("the annotation has no id")
    if annotation.get("was_cancelled"):
        return None
    task = task if isinstance(task, dict) else {}
    data = task.get("data") or {}
    image = None
    if config is not None:
        image = data.get(config.image_key)
    elif data:
        image = data.get("image") or next((v for v in data.values() if isinstance(v, str)), None)
    tags, masks, boxes, wh = annotation_regions(annotation.get("result") or [], config)
    project_id = _id(project) or _id(annotation.get("project")) or _id(task.get("project")) or ""
    return Example(annotation_id=ann_id, project=project_id, task_id=_id(task) or _id(annotation.get("task")),
                   image=str(image) if image is not None else None, width=wh[0] if wh else None,
                   height=wh[1] if wh else None, tags=tags, masks=masks, boxes=boxes,
                   updated_at=str(annotation.get("updated_at") or annotation.get("created_at") or ""))


# -- the store ---------------------------------------------------------------------------------------
_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    annotation_id TEXT PRIMARY KEY,
    project TEXT NOT NULL,
    task_id TEXT,
    image TEXT,
    width INTEGER,
    height INTEGER,
    tags TEXT NOT NULL,
    boxes TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    digest TEXT NOT NULL,
    revision INTEGER NOT NULL,
    stored_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS examples_project ON examples(project);
CREATE TABLE IF NOT EXISTS masks (
    annotation_id TEXT NOT NULL,
    label TEXT NOT NULL,
    png BLOB NOT NULL,
    PRIMARY KEY (annotation_id, label)
);
CREATE TABLE IF NOT EXISTS changes (
    revision INTEGER PRIMARY KEY AUTOINCREMENT,
    project TEXT NOT NULL,
    annotation_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS changes_project ON changes(project, revision);
"""


def _png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.asarray(mask, bool).astype(np.uint8))
    if not ok:
        raise ValueError("could not encode a mask as PNG")
    return buf.tobytes()


def _unpng(blob: bytes) -> np.ndarray:
    m = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise ValueError("a stored mask could not be decoded")
    return m > 0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class ExampleStore:
    """Training examples on disk (sqlite3), keyed by annotation id; created/updated/deleted idempotently."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._db().executescript(_SCHEMA)

    @classmethod
    def in_model_dir(cls, model_dir) -> "ExampleStore":
        return cls(Path(model_dir) / "examples.sqlite3")

    def _db(self) -> sqlite3.Connection:
        """This thread's connection (autocommit; transactions are explicit, see _Tx)."""
        db = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "pid", None) != os.getpid():   # never reuse one across fork
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA busy_timeout=30000")
            self._local.db, self._local.pid = db, os.getpid()
        return db

    def _conn(self, write: bool = True) -> "_Tx":
        return _Tx(self._db(), write)

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- writes --------------------------------------------------------------------------------
    def upsert(self, ex: Example) -> bool:
        """Store or replace the example of `ex.annotation_id`; False when nothing changed (same content,
        or the stored one is newer by ``updated_at``)."""
        digest = ex.digest()
        with self._conn() as db:
            row = db.execute("SELECT digest, updated_at, project FROM examples WHERE annotation_id = ?",
                             (ex.annotation_id,)).fetchone()
            if row is not None:
                if row[0] == digest:
                    return False
                if ex.updated_at and row[1] and _newer(row[1], ex.updated_at):
                    return False
            kind = "updated" if row is not None else "created"
            rev = db.execute("INSERT INTO changes (project, annotation_id, kind, at) VALUES (?, ?, ?, ?)",
                             (ex.project, ex.annotation_id, kind, _now())).lastrowid
            if row is not None and row[2] != ex.project:   # moved between projects: the old one changed too
                db.execute("INSERT INTO changes (project, annotation_id, kind, at) VALUES (?, ?, 'deleted', ?)",
                           (row[2], ex.annotation_id, _now()))
            db.execute("INSERT OR REPLACE INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (ex.annotation_id, ex.project, ex.task_id, ex.image, ex.width, ex.height, json.dumps(ex.tags),
                        json.dumps({k: [list(b) for b in v] for k, v in ex.boxes.items()}), ex.updated_at, digest,
                        rev, _now()))
            db.execute("DELETE FROM masks WHERE annotation_id = ?", (ex.annotation_id,))
            db.executemany("INSERT INTO masks VALUES (?, ?, ?)",
                           [(ex.annotation_id, label, _png(m)) for label, m in ex.masks.items()])
        return True

    def delete(self, annotation_id) -> bool:
        """Remove the example of an annotation id; False when there was none."""
        aid = _id(annotation_id)
        with self._conn() as db:
            row = db.execute("SELECT project FROM examples WHERE annotation_id = ?", (aid,)).fetchone()
            if row is None:
                return False
            db.execute("INSERT INTO changes (project, annotation_id, kind, at) VALUES (?, ?, 'deleted', ?)",
                       (row[0], aid, _now()))
            db.execute("DELETE FROM examples WHERE annotation_id = ?", (aid,))
            db.execute("DELETE FROM masks WHERE annotation_id = ?", (aid,))
        return True

    def apply_event(self, action: str, payload: dict, config: LabelConfig | None = None) -> dict:
        """A Label Studio webhook body -> store changes. Returns {"status", "changed", "annotation_ids"}.

        ANNOTATION_CREATED/UPDATED: ``payload["annotation"]`` (+ ``payload["task"]``, ``payload["project"]``);
        ANNOTATION_DELETED / ANNOTATIONS_DELETED: ``payload["annotation"]`` or ``payload["annotations"]``
        (objects with an id, or ids). Other actions are ignored.
        """
        payload = payload if isinstance(payload, dict) else {}
        action = str(action or payload.get("action") or "")
        if action not in EXAMPLE_EVENTS:
            return {"status": "ignored", "changed": 0, "annotation_ids": []}
        anns = payload.get("annotations")
        if not isinstance(anns, list):
            anns = [payload.get("annotation")] if payload.get("annotation") is not None else []
        changed, ids = 0, []
        for ann in anns:
            aid = _id(ann)
            if aid is None:
                continue
            ids.append(aid)
            if action in (DELETED, "ANNOTATIONS_DELETED"):
                changed += self.delete(aid)
                continue
            ex = example_from_annotation(ann, payload.get("task") or {"id": ann.get("task")}, config,
                                         payload.get("project"))
            changed += self.delete(aid) if ex is None else self.upsert(ex)
        return {"status": "stored", "changed": int(changed), "annotation_ids": ids}

    # -- reads ---------------------------------------------------------------------------------
    def _row_to_example(self, db, row) -> Example:
        aid, project, task_id, image, width, height, tags, boxes, updated_at = row[:9]
        masks = {label: _unpng(blob) for label, blob in
                 db.execute("SELECT label, png FROM masks WHERE annotation_id = ? ORDER BY label", (aid,))}
        return Example(annotation_id=aid, project=project, task_id=task_id, image=image, width=width, height=height,
                       tags=json.loads(tags), masks=masks,
                       boxes={k: [tuple(b) for b in v] for k, v in json.loads(boxes).items()}, updated_at=updated_at)

    def get(self, annotation_id) -> Example | None:
        with self._conn(write=False) as db:
            row = db.execute("SELECT * FROM examples WHERE annotation_id = ?", (_id(annotation_id),)).fetchone()
            return self._row_to_example(db, row) if row else None

    def list(self, project) -> list[Example]:
        """A project's examples, oldest change first."""
        with self._conn(write=False) as db:
            rows = db.execute("SELECT * FROM examples WHERE project = ? ORDER BY revision", (_id(project),)).fetchall()
            return [self._row_to_example(db, r) for r in rows]

    def count(self, project) -> int:
        with self._conn(write=False) as db:
            return int(db.execute("SELECT COUNT(*) FROM examples WHERE project = ?", (_id(project),)).fetchone()[0])

    def projects(self) -> list[str]:
        with self._conn(write=False) as db:
            return [r[0] for r in db.execute("SELECT DISTINCT project FROM examples ORDER BY project")]

    def revision(self, project) -> int:
        """The latest change number of a project (0 when none); store it with a model."""
        with self._conn(write=False) as db:
            r = db.execute("SELECT MAX(revision) FROM changes WHERE project = ?", (_id(project),)).fetchone()[0]
            return int(r or 0)

    def changes_since(self, project, revision: int) -> int:
        """How many distinct examples of the project changed (created/updated/deleted) after `revision`."""
        with self._conn(write=False) as db:
            return int(db.execute("SELECT COUNT(DISTINCT annotation_id) FROM changes WHERE project = ? AND revision > ?",
                                  (_id(project), int(revision))).fetchone()[0])


def _newer(stored: str, incoming: str) -> bool:
    """True when the stored timestamp is strictly later than the incoming one (ISO-8601 strings)."""
    def parse(s: str):
        try:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
            return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
        except ValueError:
            return None
    a, b = parse(stored), parse(incoming)
    return a is not None and b is not None and a > b


class _Tx:
    """``with`` block = one transaction (IMMEDIATE for writes, which serialises writers) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection, write: bool = True):
        self.db = db
        self.write = write

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE" if self.write else "BEGIN")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
