"""The example store: training examples (backend.labelstudio.annotations.Example) in sqlite in
``MODEL_DIR``, keyed by annotation id, with a per-project revision that counts changes
(:class:`ExampleStore`; :func:`example_store` is the process's one per folder).

    store = ExampleStore(Path(MODEL_DIR) / "examples.sqlite3")
    store.upsert(ex) -> bool            # True when stored content changed (created or updated)
    store.delete(annotation_id) -> bool # True when something was removed
    store.apply_event(action, payload, config=None) -> dict   # a webhook body -> {"status", "changed", ...}
    store.get(annotation_id) / .list(project) / .count(project) / .projects()
    store.revision(project) -> int      # grows by one per change (upsert that changed / delete)
    store.changes_since(project, revision) -> int   # changes after a revision (e.g. the last model's)

A cancelled (skipped) annotation deletes any stored example. An update older than the stored one
(``updated_at``) is ignored, so out-of-order webhooks cannot bring back stale content. Writes are
idempotent: the same annotation content twice is one change. One sqlite3 file (stdlib; safe across
processes on one host with WAL + a busy timeout); masks are stored PNG-encoded.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

from backend.labelstudio.annotations import (
    DELETED,
    EXAMPLE_EVENTS,
    Example,
    example_from_annotation,
    example_id,
)
from backend.labelstudio.config import LabelConfig
from backend.settings import Settings
from backend.untrusted import json_type

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
        aid = example_id(annotation_id)
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
        deleting = action in (DELETED, "ANNOTATIONS_DELETED")
        changed, ids = 0, []
        for ann in anns:
            if not deleting and not isinstance(ann, dict):
                raise ValueError(f"the webhook's annotation must be a JSON object, not {json_type(ann)}")
            aid = example_id(ann)
            if aid is None:
                continue
            ids.append(aid)
            if deleting:
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
            row = db.execute("SELECT * FROM examples WHERE annotation_id = ?", (example_id(annotation_id),)).fetchone()
            return self._row_to_example(db, row) if row else None

    def list(self, project) -> list[Example]:
        """A project's examples, oldest change first."""
        with self._conn(write=False) as db:
            rows = db.execute("SELECT * FROM examples WHERE project = ? ORDER BY revision", (example_id(project),)).fetchall()
            return [self._row_to_example(db, r) for r in rows]

    def count(self, project) -> int:
        with self._conn(write=False) as db:
            return int(db.execute("SELECT COUNT(*) FROM examples WHERE project = ?", (example_id(project),)).fetchone()[0])

    def projects(self) -> list[str]:
        with self._conn(write=False) as db:
            return [r[0] for r in db.execute("SELECT DISTINCT project FROM examples ORDER BY project")]

    def revision(self, project) -> int:
        """The latest change number of a project (0 when none); store it with a model."""
        with self._conn(write=False) as db:
            r = db.execute("SELECT MAX(revision) FROM changes WHERE project = ?", (example_id(project),)).fetchone()[0]
            return int(r or 0)

    def changes_since(self, project, revision: int) -> int:
        """How many distinct examples of the project changed (created/updated/deleted) after `revision`."""
        with self._conn(write=False) as db:
            return int(db.execute("SELECT COUNT(DISTINCT annotation_id) FROM changes WHERE project = ? AND revision > ?",
                                  (example_id(project), int(revision))).fetchone()[0])


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


_STORES: dict[str, ExampleStore] = {}


_STORES_LOCK = threading.Lock()


def example_store(settings: Settings) -> ExampleStore:
    """The process's ExampleStore of ``settings.model_dir`` (its sqlite connections are per thread)."""
    key = str(Path(settings.model_dir).resolve())
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None or not store.path.exists():     # first use, or the folder was replaced
            store = _STORES[key] = ExampleStore.in_model_dir(key)
        return store
