"""The ML backend model, shaped like Label Studio's ``LabelStudioMLBase`` (setup / predict / fit).

Public API::

    model = Tag2MaskModel(settings=None, project_id=None, label_config=None, hostname=None,
                          access_token=None, fetcher=None, version=None)
    model.setup()                          # parses label_config (LabelConfigError if unusable)
    model.model_version                    # str: base_model_version(settings) + "+p<project>.vN" when the
                                           # project has promoted trained heads; what /setup returns
    model.predict(tasks, context=None, cache=None, **kw) -> list[dict]   # one prediction per task, in order
    model.fit(event, data, **kw) -> dict                     # records training events (events.jsonl, bounded)

The engine is backend.serving.engine's, versions backend.serving.versions', heads
backend.serving.heads', a task's photo and human tags backend.labelstudio.tasks', a failed task's
sentence backend.serving.failures'.

:class:`Tag2MaskModel` is a :class:`backend.serving.project_model.ProjectModel` (how each photo's tags
are chosen, the project's trained heads, one engine call for several photos: see that module) that
also knows Label Studio's address and token (from /setup) and its photo fetcher (its settings' rules).

``predict`` is the web process's inline ``/predict`` (TAG2MASK_QUEUE=off), and goes through the
predict function queue workers run, :func:`backend.serving.predict.predict_chunk`: each task is turned
into the predict function's task by :func:`backend.labelstudio.tasks.job_task` (as the job queue does),
then the tasks go in chunks of ``settings.batch_size`` (one engine call per chunk), with this model's
fetcher (network trouble retried, ``retry_attempts``), hostname/access_token, project heads and
version (:attr:`model_version`, read once per call), and `cache` (a ResultCache, or None: no cache).

A task that fails (image unreadable, not allowed, no usable tag, malformed: not an object, data or
annotations of the wrong JSON type, an unusable id) becomes
``{"model_version": v, "score": 0.0, "error": "<reason>"}`` -- no "result", so Label Studio skips it --
and the batch goes on. The reason is a sentence about the task's input, cut at MAX_REASON_CHARS; a
photo download that kept failing gives its last message; a failure that is a bug of this service
reads TASK_FAILED ("the server failed on this task; the error was logged") and its traceback goes to
the log (:func:`backend.serving.predict.task_error`, the sentence queue workers give too).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from backend.labelstudio.annotations import TRAINING_EVENTS
from backend.labelstudio.photos import ImageFetcher
from backend.labelstudio.tasks import job_task, with_prompts
from backend.queue.retry import TransientError
from backend.serving.failures import is_input_error
from backend.serving.interactive import request_prompts
from backend.serving.predict import predict_chunk, task_error
from backend.serving.project_model import ProjectModel
from backend.settings import Settings
from backend.storage.event_log import EventLog, event_record
from backend.untrusted import clip

__all__ = ["Tag2MaskModel"]

log = logging.getLogger(__name__)


class Tag2MaskModel(ProjectModel):
    """Tags -> masks/polygons/boxes for a Label Studio project (one instance per project/config)."""

    def __init__(self, settings: Settings | None = None, project_id: str | None = None,
                 label_config: str | None = None, hostname: str | None = None, access_token: str | None = None,
                 fetcher: ImageFetcher | None = None, version: str | None = None):
        super().__init__(settings, project_id=project_id, label_config=label_config, version=version)
        self.hostname = hostname
        self.access_token = access_token
        # the web process answers within Label Studio's /predict budget (100 s): a photo that failed is
        # not fetched again here (queue workers retry with backoff, TAG2MASK_RETRY_ATTEMPTS)
        self.fetcher = fetcher or ImageFetcher(replace(self.settings, retry_attempts=1))

    # -- predict ---------------------------------------------------------------------------------
    def predict(self, tasks: list, context: dict | None = None, *, cache=None, **kwargs) -> list[dict]:
        """One prediction dict per task, in order, through :func:`backend.serving.predict.predict_chunk`
        (see the module docstring); a failed task gets an entry without "result". ``label_config`` in
        `kwargs` replaces the model's labeling config; `cache`: a ResultCache or None. `context`:
        Label Studio's ``params.context``; smart-tool regions in it make the answer interactive (the
        mask of each drawn box or click, backend.serving.interactive; never cached)."""
        config = self.use_label_config(kwargs.get("label_config"))
        version = self.model_version
        out: list[dict | None] = [None] * len(tasks)
        todo: list[tuple[int, dict]] = []
        prompts, answer = request_prompts(context, config, version, len(tasks))
        if answer is not None:      # a malformed context, or a smart tool's regions removed
            return answer
        for i, task in enumerate(tasks):
            try:
                todo.append((i, with_prompts(job_task(task, config), prompts)))
            except Exception as exc:  # noqa: BLE001 - one bad task never sinks the batch
                out[i] = self._failed(task, exc, version)
        creds = {"url": self.hostname, "token": self.access_token}
        size = max(1, self.settings.batch_size)
        for start in range(0, len(todo), size):
            chunk = todo[start:start + size]
            outcomes = predict_chunk([jt for _, jt in chunk], label_config=self.label_config, model_version=version,
                                     cache=cache, label_studio=creds, project=self.project_id, model=self,
                                     fetcher=self.fetcher)
            for (i, jt), outcome in zip(chunk, outcomes):
                out[i] = outcome.prediction if outcome.error is None else self._failed(jt, outcome.error, version)
        return out

    @staticmethod
    def _failed(task, exc: BaseException, version: str) -> dict:
        """The entry of a task that raised `exc` (its reason: :func:`backend.serving.predict.task_error`),
        logged: a warning for the task's input or network trouble, the traceback for a bug."""
        tid = task.get("id") if isinstance(task, dict) else None
        tid = repr(clip(tid)) if isinstance(tid, str) else clip(tid)      # short, one line
        reason = task_error(exc)
        if is_input_error(exc) or isinstance(exc, TransientError):
            log.warning("task %s failed: %s", tid, reason)
        else:                                                              # a bug: logged, not echoed
            log.error("task %s failed", tid, exc_info=exc)
        return {"model_version": version, "score": 0.0, "error": reason}

    # -- fit -------------------------------------------------------------------------------------
    def fit(self, event: str, data: dict, **kwargs) -> dict:
        """Append a training event to ``events.jsonl`` (an audit trail; the examples themselves are in
        the example store). The server calls it only once the example store accepted the event. The
        task and the annotation are kept when their JSON has at most MAX_EVENT_PART_CHARS characters;
        a larger one is replaced by ``{"omitted": "<what> of <n> characters ..."}``."""
        if event not in TRAINING_EVENTS:
            return {"status": "ignored", "action": event}
        EventLog(self.settings.events_path).append(event_record(event, data, self.model_version))
        return {"status": "recorded", "action": event}
