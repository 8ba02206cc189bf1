"""What a failed task's ``"error"`` says, the same in the web process and in queue workers: the sentence
about its input, or TASK_FAILED for a bug of this service (whose traceback is logged).
"""
from __future__ import annotations

import logging

from backend.labelstudio.config import LabelConfigError
from backend.labelstudio.photos import ImageFetchError
from backend.untrusted import clip

log = logging.getLogger(__name__)


MAX_REASON_CHARS = 500     # a failed task's "error" is cut here (it may quote the task's values)


TASK_FAILED = "the server failed on this task; the error was logged"


def is_input_error(exc: BaseException) -> bool:
    """Whether a task failed because of its input (a malformed task, an unreadable or refused photo, an
    unusable tag), not because of a bug of this service."""
    return isinstance(exc, (ImageFetchError, LabelConfigError, ValueError, KeyError)) \
        or type(exc).__module__.startswith("explainers")


def task_failure_reason(exc: BaseException) -> str:
    """The "error" of a task that raised `exc`, the same in the web process and in queue workers: the
    sentence about its input (cut at MAX_REASON_CHARS), or TASK_FAILED for a bug (log its traceback)."""
    return clip(str(exc), MAX_REASON_CHARS) if is_input_error(exc) else TASK_FAILED
