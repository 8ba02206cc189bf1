"""Label Studio's training webhooks -> the example store and the train queue (:func:`handle_training_event`).

ANNOTATION_CREATED / _UPDATED (one annotation and its task), ANNOTATIONS_CREATED (an import: lists),
ANNOTATIONS_DELETED (what Label Studio sends on deletion; ANNOTATION_DELETED too) store, replace or
remove examples, parsed with the project's labeling config when the payload carries it.
START_TRAINING enqueues a training at once (backend.training.schedule.enqueue_training). Redis being
down never loses an example: the reply carries a note and the periodic check trains later. Nothing
here loads a model.
"""
from __future__ import annotations

import logging

from backend.labelstudio.annotations import DELETED, EXAMPLE_EVENTS, TRAINING_EVENTS  # noqa: F401  (re-exported)
from backend.labelstudio.config import LabelConfigError, parse_label_config_cached
from backend.settings import Settings
from backend.storage.connection import current_connection
from backend.storage.examples import ExampleStore, example_store
from backend.training.schedule import enqueue_training
from backend.untrusted import project_id

log = logging.getLogger(__name__)




START_TRAINING = "START_TRAINING"


def parse_config_cached(xml: str):
    """The parsed labeling config of `xml` (None when it is unusable: labels are then taken verbatim)."""
    try:
        return parse_label_config_cached(xml)
    except LabelConfigError as exc:
        log.warning("webhook labeling config unusable (%s); storing labels as sent", exc)
        return None


def _project_of(payload: dict) -> str | None:
    """The webhook's project id (its ``project``, else its annotation's), checked like every project id
    (backend.untrusted.project_id: BadInput for one that is not an id)."""
    p = payload.get("project")
    if p is None and isinstance(payload.get("annotation"), dict):
        p = payload["annotation"].get("project")
    return project_id(p, "the webhook's project")


def handle_training_event(action: str, payload: dict, settings: Settings | None = None,
                          connection=None) -> dict:
    """A Label Studio training webhook -> the example store / the train queue.

    Annotation events: ANNOTATION_CREATED / ANNOTATION_UPDATED (one ``annotation`` + its ``task``),
    ANNOTATIONS_CREATED (import: lists under ``annotation`` and ``task``), ANNOTATIONS_DELETED
    (``annotations``: ids; what Label Studio sends on deletion) and ANNOTATION_DELETED.

    Returns a JSON-able reply: ``{"status": "stored", "changed", "annotation_ids", "project",
    "revision"}`` for annotation events, ``{"status": "queued" | "coalesced", "job_id", ...}`` for
    START_TRAINING, ``{"status": "ignored"}`` otherwise; ``"note"`` explains a training that could not
    be enqueued now (Redis down: the periodic check will). `connection` defaults to
    :func:`backend.storage.connection.get_connection` (only START_TRAINING needs it).
    """
    settings = settings or Settings.from_env()
    payload = payload if isinstance(payload, dict) else {}
    project = _project_of(payload)
    if action in EXAMPLE_EVENTS:
        config = None
        proj = payload.get("project")
        if isinstance(proj, dict) and proj.get("label_config"):
            config = parse_config_cached(str(proj["label_config"]))
        store = example_store(settings)
        if action == "ANNOTATIONS_CREATED" and isinstance(payload.get("annotation"), list):
            out = _apply_bulk_created(store, payload, config)
        else:
            out = store.apply_event(action, payload, config)
        if project is None and out["annotation_ids"] and action != DELETED:
            ex = store.get(out["annotation_ids"][0])
            project = ex.project if ex else None
        out["project"] = project
        if project is not None:
            out["revision"] = store.revision(project)
        return out
    if action == START_TRAINING:
        if project is None:
            return {"status": "ignored", "reason": "START_TRAINING without a project"}
        n = example_store(settings).count(project)
        if n < 2:
            return {"status": "ignored", "project": project,
                    "reason": f"project {project} has {n} stored example(s); training needs at least 2"}
        try:
            conn = connection if connection is not None else \
                current_connection(start_embedded=False, url=getattr(settings, "redis_url", None))
            return enqueue_training(conn, project, settings, trigger="manual")
        except Exception as exc:   # noqa: BLE001 - Redis down or refused: answer, the tick retries
            log.warning("START_TRAINING for project %s not enqueued: %s", project, exc)
            return {"status": "deferred", "project": project,
                    "note": f"training could not be queued now ({type(exc).__name__}: {exc}); the periodic "
                            "check trains the project once enough examples changed"}
    return {"status": "ignored", "action": action}


def _apply_bulk_created(store: ExampleStore, payload: dict, config) -> dict:
    """Label Studio's ANNOTATIONS_CREATED (import): ``{"annotation": [...], "task": [...]}`` -> one
    ANNOTATION_CREATED per annotation, each with its own task."""
    tasks = payload.get("task")
    tasks = tasks if isinstance(tasks, list) else [tasks] if isinstance(tasks, dict) else []
    by_id = {str(t.get("id")): t for t in tasks if isinstance(t, dict)}
    changed, ids = 0, []
    for ann in payload.get("annotation") or []:
        if not isinstance(ann, dict):
            continue
        tid = ann.get("task")
        tid = tid.get("id") if isinstance(tid, dict) else tid
        one = {"annotation": ann, "task": by_id.get(str(tid), {"id": tid}), "project": payload.get("project")}
        r = store.apply_event("ANNOTATION_CREATED", one, config)
        changed += r["changed"]
        ids += r["annotation_ids"]
    return {"status": "stored", "changed": changed, "annotation_ids": ids}
