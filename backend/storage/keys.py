"""Every name this service gives a thing in Redis, in one place.

All of them start with the namespace (``TAG2MASK_NAMESPACE``, default ``tag2mask``), so deployments
sharing one Redis stay apart. RQ's own keys (``rq:job:<id>``, queues ``<namespace>:<priority>``) are
RQ's; the job ids we choose and our own keys are built here:

=====================================  ======================================================================
key                                    what it holds
=====================================  ======================================================================
``<ns>:project:<p>:jobs``              set of the predict job ids enqueued for project p
``<ns>:push-late:<job>``               flag: /predict stopped waiting for the job, which then pushes itself
``<ns>:push-owner:<task>:<version>``   the job that pushes (or pushed) that task's prediction of that version
``<ns>:result:<digest>``               a cached prediction (backend.storage.result_cache)
``<ns>:train-lock:<p>``                held while a training of project p runs
``<ns>:train:<p>:job``                 the id of project p's latest training job
``<ns>:train-scheduler``               leader lease of the retraining loop
``<ns>:models:<p>``                    hash: project p's promoted checkpoints (backend.storage.model_mirror)
=====================================  ======================================================================
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from backend.settings import namespace

__all__ = ["namespace", "safe_name", "digest", "project_jobs_key", "push_late_key", "push_owner_key",
           "train_lock_key", "latest_train_job_key", "train_scheduler_key", "models_key"]


def safe_name(value) -> str:
    """`value` as a Redis-safe and file-safe name part: letters, digits, ``_.-``, at most 60 characters."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", str(value))[:60]


def digest(*parts: Any) -> str:
    """SHA-1 of the JSON of `parts` (keys sorted): stable ids and cache keys."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(text.encode()).hexdigest()


def project_jobs_key(project: Any) -> str:
    """Redis set of the ids of the predict jobs enqueued for `project`."""
    return f"{namespace()}:project:{project}:jobs"


def push_late_key(job_id: str) -> str:
    """Redis flag set by the web server when ``/predict`` stopped waiting for a (no-push) job: the job
    then writes its predictions to Label Studio itself, so none is lost."""
    return f"{namespace()}:push-late:{job_id}"


def push_owner_key(task_id: Any, model_version: str) -> str:
    """Redis key naming the job that will push (or has pushed) this task's prediction of this model
    version to Label Studio. While it exists the web server answers ``/predict`` for the task without
    a result: Label Studio stores what ``/predict`` answers, and that copy plus the worker's push would
    be two predictions. The worker deletes it when the task fails, so a later ``/predict`` answers."""
    return f"{namespace()}:push-owner:{task_id}:{model_version}"


def train_lock_key(project) -> str:
    """Held while a training of `project` runs (one at a time per project)."""
    return f"{namespace()}:train-lock:{safe_name(project)}"


def latest_train_job_key(project) -> str:
    """The id of `project`'s latest training job (to coalesce a second one)."""
    return f"{namespace()}:train:{safe_name(project)}:job"


def train_scheduler_key() -> str:
    """The retraining loop's leader lease (one active loop per namespace)."""
    return f"{namespace()}:train-scheduler"


def models_key(project) -> str:
    """Hash of `project`'s promoted checkpoints mirrored into Redis."""
    return f"{namespace()}:models:{safe_name(project)}"
