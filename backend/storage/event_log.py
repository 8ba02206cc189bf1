"""``$MODEL_DIR/events.jsonl``: an append-only audit trail of the training webhooks received (one JSON
object a line, safe across processes; parts larger than MAX_EVENT_PART_CHARS are replaced by a note).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from datetime import datetime, timezone
from typing import Any

from backend.untrusted import json_type

log = logging.getLogger(__name__)


MAX_EVENT_PART_CHARS = 100_000   # an events.jsonl record keeps a task / an annotation up to this JSON size


def _bounded(value, limit: int):
    """`value` when its JSON has at most `limit` characters, else a note saying what was left out."""
    n = len(json.dumps(value, ensure_ascii=False, default=str))
    return value if n <= limit else {"omitted": f"{json_type(value)} of {n} characters (over {limit})"}


def event_record(action: str, data, model_version: str) -> dict:
    """The events.jsonl record of one training webhook: when, what, which project and model version,
    the task's id and data and the annotation (each bounded by MAX_EVENT_PART_CHARS)."""
    project = data.get("project") if isinstance(data, dict) else None
    task = data.get("task") if isinstance(data, dict) else None
    record: dict[str, Any] = {
        "received_at": datetime.now(timezone.utc).isoformat(),
        "action": action,
        "project": project.get("id") if isinstance(project, dict) else project,
        "model_version": model_version,
    }
    if isinstance(task, dict):
        record["task"] = _bounded({"id": task.get("id"), "data": task.get("data")}, MAX_EVENT_PART_CHARS)
    if isinstance(data, dict) and isinstance(data.get("annotation"), dict):
        record["annotation"] = _bounded(data["annotation"], MAX_EVENT_PART_CHARS)
    record["project"] = _bounded(record["project"], 200)
    return record


class EventLog:
    """Append-only JSONL file of training events (one JSON object per line; safe across processes)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        self._lock = threading.Lock()

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line)
            finally:
                os.close(fd)

    def read(self) -> list[dict]:
        try:
            with open(self.path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []
