"""The Label Studio ML backend HTTP API (Flask 3): ``create_app(settings=None) -> Flask``.

Routes (JSON in, JSON out; errors are ``{"error": "..."}`` with a 4xx/5xx status, never a traceback):

=================  ======  ==================================================================================
route              method  reply
=================  ======  ==================================================================================
/health, /         GET     ``{"status": "UP", "model_class", "model_version", "model_loaded", "model_state",
                           "backbone", "preset"}`` -- fast, never loads the model; open without basic auth.
                           model_state: "loading", "loaded", "failed" (+ "model_error"), "lazy"
                           (TAG2MASK_WARMUP=0) or "workers" (queue mode)
/setup             POST    ``{"model_version"}``; body ``{"project", "schema", "hostname", "access_token"}``;
                           400 when the schema has no usable Image control
/predict           POST    ``{"results": [one per task, in order]}``; body ``{"tasks", "label_config",
                           "project", "params"}``; a failed task's entry has "error" and no "result";
                           ``params.context`` with smart-tool regions: the mask of each drawn box or
                           click (backend.serving.interactive; queue mode: an ``interactive`` job)
/webhook           POST    training events (ANNOTATION_CREATED/UPDATED/DELETED, START_TRAINING) are
                           appended to ``$MODEL_DIR/events.jsonl`` -> ``{"status": "recorded",
                           "training": {...}}``: annotations stored as training examples, START_TRAINING
                           queues a training (backend.training.schedule); other actions -> ``{"status": "ignored"}``
/webhook           POST    TASKS_CREATED (queue mode, TAG2MASK_PRELABEL_ON_CREATE): the new tasks are enqueued
  (TASKS_CREATED)          for pre-labeling -> ``{"status": "queued", "tasks", "jobs", "skipped"}`` (+ "errors":
                           the first malformed tasks' index and sentence)
/jobs/<id>         GET     a queue job: status, progress (meta done/total/failed), times, error (404 unknown)
/projects/<id>/    GET     ``{"project", "jobs", "tasks", "queued", "running", "done", "failed", "rate",
  progress                 "eta_s"}`` over the project's prediction jobs
/versions          GET     ``{"versions": [model_version]}`` (Label Studio sends GET with a JSON body;
                   POST    the project's version when the body or ``?project=`` names one, else the base)
/metrics           GET     per-process counters, JSON; Prometheus text with ``?format=prometheus`` or
                           ``Accept: text/plain``
=================  ======  ==================================================================================

Job queue (``Settings.use_queue``: TAG2MASK_QUEUE=on, or auto with REDIS_URL set): /predict is
answered by ``tag2mask worker`` processes through Redis (backend.queue.prediction_queue): few tasks
(<= TAG2MASK_SYNC_MAX_TASKS) wait for their job up to TAG2MASK_PREDICT_DEADLINE s; more tasks are
enqueued as batch jobs and answered at once (unfinished tasks: entries without "result"; workers push
each prediction to Label Studio). TASKS_CREATED webhooks enqueue pre-labeling of the new tasks
(TAG2MASK_PRELABEL_ON_CREATE). Redis down: 503 ``{"error": "the job queue is unavailable: ..."}``;
/health reports ``"queue": {...}`` without blocking. TAG2MASK_QUEUE=off: inference in this process
(:meth:`backend.serving.model.Tag2MaskModel.predict`), through the predict function the workers run
(backend.serving.predict.predict_chunk): the same photo fetch (not retried here: Label Studio's 100 s;
workers retry), the same per-task errors, and the result cache when REDIS_URL is set (none without it,
and no connection; a Redis that does not answer is skipped).

Untrusted input: a body must be a JSON object (any Content-Type) of at most
TAG2MASK_MAX_REQUEST_BYTES (64 MiB; chunked bodies too; larger -> 413), nesting at most 64 levels,
without NaN/Infinity (backend.untrusted) -> else 400 with a sentence. /predict and TASKS_CREATED take
at most TAG2MASK_MAX_TASKS tasks (413). Project ids must be ids (``"<id>.<ts>"``, digits, "_", "-";
they name files and Redis keys), ``label_config`` / ``params`` must be a string / an object (400). A
malformed task (not an object, data or annotations of the wrong type, a bad id) fails alone, with a
sentence in its entry (backend.serving.model); a malformed webhook annotation is refused with 400
(backend.labelstudio.annotations) and not appended to events.jsonl. At most MAX_PROJECTS (256) projects are kept in
memory, the least recently used dropped first. Every echoed value is cut short (errors at 1000 characters); webhook actions not
Label Studio's share one ``webhook_unknown`` counter. A bug answers 500 "the server failed on this
request; the error was logged" (a task's entry: "... on this task ...") and logs the traceback.

Basic auth (BASIC_AUTH_USER + BASIC_AUTH_PASS) guards every route but /health and /. The model is
loaded once per process (``backend.serving.engine.get_engine``), in a background thread at start unless
TAG2MASK_WARMUP=0, otherwise on the first /predict.

Cold start: nothing /health, /setup or /versions run imports torch (a project's version is read from
the registry's files), and what they import is imported before the warm-up starts
(:func:`prepare_routes`), so they answer in milliseconds from the moment the server listens, also
while the model loads (Label Studio gives /health 1 s, /setup 3 s; the warm-up pauses garbage
collection, whose full passes over torch's objects held the GIL for 0.1-0.35 s each). A /predict sent
while the model loads waits for the load (a few seconds on CPU), then answers as usual.
"""

from __future__ import annotations

import gc
import hmac
import logging
import threading
import time
from collections import OrderedDict

from flask import Flask, Response, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from backend.labelstudio.annotations import TRAINING_EVENTS
from backend.labelstudio.config import (
    DEFAULT_LABEL_CONFIG,
    LabelConfigError,
    parse_label_config,
)
from backend.serving.engine import engine_loaded, get_engine, warm_smart_tools
from backend.serving.model import Tag2MaskModel
from backend.settings import Settings
from backend.storage.connection import RedisUnavailable
from backend.untrusted import BadInput, clip, json_type, parse_json_body, project_id
from backend.web.metrics import Metrics

__all__ = ["create_app", "prepare_routes"]

log = logging.getLogger("backend.web.app")

MAX_ERROR_CHARS = 1000      # an error reply is cut here (it may quote the request)
MAX_PROJECTS = 256          # projects kept in memory (config, hostname, token); the least recently used go
# Label Studio's webhook actions (each gets a /metrics counter; any other action counts as
# webhook_unknown, so a sender cannot create counters)
WEBHOOK_ACTIONS = TRAINING_EVENTS | frozenset({
    "TASKS_CREATED", "TASKS_DELETED", "PROJECT_CREATED", "PROJECT_UPDATED", "PROJECT_DELETED",
    "LABEL_LINK_CREATED", "LABEL_LINK_UPDATED", "LABEL_LINK_DELETED", "REVIEW_CREATED", "REVIEW_UPDATED",
    "REVIEWS_DELETED"})


class _StrictJSON(DefaultJSONProvider):
    """Flask's JSON, but request bodies are read by :func:`backend.untrusted.parse_json_body` (bounded
    nesting, no NaN): ``request.get_json(silent=True)`` then gives None for a hostile body."""

    def loads(self, s, **kwargs):
        return parse_json_body(s.encode("utf-8", "surrogatepass") if isinstance(s, str) else bytes(s))


def prepare_routes() -> None:
    """Import (and run once) what /setup and /versions would otherwise import on their first call: the
    labeling-config parser (Label Studio's SDK, ~0.3 s) and /webhook's handler (backend.training.webhook:
    the example store, the training queue; a project's version, read from the registry, comes with the
    model module). All torch-free. ``create_app`` calls it before the model's warm-up thread
    starts and ``backend.serve`` in the gunicorn master before it listens, so no request waits on an
    import: one racing the warm-up's torch import for the GIL took 1.5 s, against Label Studio's 3 s
    budget for /setup (1 s for /health)."""
    import backend.training.webhook  # noqa: F401  (/webhook: the example store, the training queue)

    parse_label_config(DEFAULT_LABEL_CONFIG)


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    logging.basicConfig(level=getattr(logging, settings.log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask("tag2mask")
    app.config["TAG2MASK_SETTINGS"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes    # 413 past it, chunked bodies too
    app.json = _StrictJSON(app)
    metrics = Metrics()
    projects: OrderedDict[str, Tag2MaskModel] = OrderedDict()   # project id -> model (config, hostname,
    # token from /setup), least recently used first: at most MAX_PROJECTS
    projects_lock = threading.Lock()
    prepare_routes()                            # before the warm-up thread starts importing torch
    version = Tag2MaskModel(settings).model_version
    warmup = {"state": "lazy", "error": None}   # see model_state()
    last_seen: dict[str, str] = {}              # hostname / access_token of the latest /setup (any project)
    app.extensions["tag2mask"] = {"metrics": metrics, "projects": projects}
    pq = None
    if settings.use_queue:
        from backend.queue.prediction_queue import PredictionQueue

        pq = app.extensions["tag2mask"]["queue"] = PredictionQueue(settings)

    def model_for(project: str | None, label_config: str | None = None) -> Tag2MaskModel:
        key = project or "_"
        with projects_lock:
            m = projects.get(key)
            if m is None:
                m = projects[key] = Tag2MaskModel(settings, project_id=project)
                while len(projects) > MAX_PROJECTS:
                    projects.popitem(last=False)
            projects.move_to_end(key)
            if label_config and m.label_config != label_config:
                m.label_config, m.parsed = label_config, None
            # a project this process has not seen /setup for (another worker got it) borrows the
            # latest Label Studio address/token; LABEL_STUDIO_URL / _API_KEY override both anyway
            m.hostname = m.hostname or last_seen.get("hostname")
            m.access_token = m.access_token or last_seen.get("access_token")
            return m

    def error(status: int, message: str):
        metrics.inc(f"http_{status}")
        resp = jsonify({"error": clip(message, MAX_ERROR_CHARS)})
        resp.status_code = status
        return resp

    def body() -> dict:
        """The request's JSON object, whatever its Content-Type says. 400 (BadInput) when it is not
        one (see backend.untrusted.parse_json_body); 413 past TAG2MASK_MAX_REQUEST_BYTES."""
        raw = request.get_data(cache=True)
        if request.content_length is None and len(raw) >= settings.max_request_bytes:
            raise RequestEntityTooLarge()      # a chunked body is cut at the limit by werkzeug, not refused
        data = parse_json_body(raw)
        if not isinstance(data, dict):
            raise _BadRequest(f"the request body must be a JSON object, not {json_type(data)}")
        return data

    @app.errorhandler(_BadRequest)
    @app.errorhandler(BadInput)
    def _bad(exc):
        return error(400, str(exc))

    @app.errorhandler(RecursionError)
    def _too_deep(exc):       # a value nested too deeply for some reader (bodies are bounded before)
        log.warning("request on %s nested too deeply: %s", request.path, exc)
        return error(400, "the request nests too deeply to be read")

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc):
        return error(413, f"the request body is larger than {settings.max_request_bytes} bytes "
                          "(TAG2MASK_MAX_REQUEST_BYTES); send fewer tasks per request")

    @app.errorhandler(RedisUnavailable)
    def _queue_down(exc):
        return error(503, str(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        return error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _any(exc):
        log.exception("unhandled error on %s", request.path)
        return error(500, "the server failed on this request; the error was logged")

    @app.before_request
    def _auth():
        metrics.inc("requests_total")
        if not settings.basic_auth or request.path in ("/", "/health"):
            return None
        auth = request.authorization
        ok = auth is not None and auth.type == "basic" and \
            hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode()) and \
            hmac.compare_digest((auth.password or "").encode(), settings.basic_auth_pass.encode())
        if not ok:
            resp = error(401, "authentication required")
            resp.headers["WWW-Authenticate"] = 'Basic realm="tag2mask"'
            return resp
        return None

    def model_state() -> str:
        """"loaded"; "loading" (the warm-up thread is loading it: a /predict waits for it); "failed" (the
        warm-up failed: a /predict tries again); "lazy" (TAG2MASK_WARMUP=0: the first /predict loads it);
        "workers" (queue mode: the workers hold the model, this process never loads it)."""
        if engine_loaded(settings):
            return "loaded"
        return "workers" if pq is not None else warmup["state"]

    @app.get("/")
    @app.get("/health")
    def health():
        reply = {"status": "UP", "model_class": Tag2MaskModel.__name__, "model_version": version,
                 "model_loaded": engine_loaded(settings), "model_state": model_state(),
                 "backbone": settings.backbone, "preset": settings.preset}
        if warmup["error"] and not reply["model_loaded"]:
            reply["model_error"] = warmup["error"]
        reply["queue"] = pq.status() if pq is not None else {"mode": "inline"}
        return jsonify(reply)

    @app.post("/setup")
    def setup():
        data = body()
        metrics.inc("setup_total")
        schema = data.get("schema") or data.get("label_config")
        project = project_id(data.get("project"))
        model = model_for(project, schema)
        if data.get("hostname"):
            model.hostname = last_seen["hostname"] = str(data["hostname"])
        if data.get("access_token"):
            model.access_token = last_seen["access_token"] = str(data["access_token"])
        if schema:
            try:
                model.setup()
            except LabelConfigError as exc:
                return error(400, str(exc))
        return jsonify({"model_version": model.model_version})

    def checked_tasks(tasks, what: str = "the body needs \"tasks\": a list of tasks"):
        """400 unless a list; 413 past TAG2MASK_MAX_TASKS (a BadInput / an error reply)."""
        if not isinstance(tasks, list):
            return error(400, what + (f", not {json_type(tasks)}" if tasks is not None else ""))
        if len(tasks) > settings.max_tasks:
            return error(413, f"the request has {len(tasks)} tasks; at most {settings.max_tasks} are accepted "
                              "at once (TAG2MASK_MAX_TASKS): select fewer tasks")
        return None

    def label_config_of(value, what: str = "label_config") -> str | None:
        if value is not None and not isinstance(value, str):
            raise BadInput(f"{what} must be the labeling config as a string of XML, not {json_type(value)}")
        return value or None

    # the inline /predict's result cache: only when REDIS_URL is set (the client connects at first use)
    inline_cache = None
    if pq is None and settings.redis_url:
        from backend.storage.connection import get_connection
        from backend.storage.result_cache import ResultCache

        inline_cache = ResultCache(get_connection(settings.redis_url, start_embedded=False, socket_timeout=2,
                                                  socket_connect_timeout=1), ttl=settings.result_ttl, best_effort=True)

    @app.post("/predict")
    def predict():
        data = body()
        tasks = data.get("tasks")
        refused = checked_tasks(tasks)
        if refused is not None:
            return refused
        params = data.get("params")
        if params is not None and not isinstance(params, dict):
            return error(400, f"params must be a JSON object (Label Studio sends {{\"context\": ...}}), "
                              f"not {json_type(params)}")
        project = project_id(data.get("project"))
        if project is None and tasks and isinstance(tasks[0], dict):
            project = project_id(tasks[0].get("project"), "the first task's project")
        model = model_for(project, label_config_of(data.get("label_config")))
        try:
            model.use_label_config(None)
        except LabelConfigError as exc:
            return error(400, str(exc))
        t = time.perf_counter()
        if pq is not None:
            results = pq.predict(model, tasks, project, context=(params or {}).get("context"))   # Redis down: 503
        else:
            results = model.predict(tasks, context=(params or {}).get("context"), cache=inline_cache)
        with metrics.lock:
            metrics.predict_seconds += time.perf_counter() - t
        metrics.inc("predict_requests_total")
        metrics.inc("predict_tasks_total", len(tasks))
        metrics.inc("predict_tasks_failed", sum(1 for r in results if "result" not in r))
        return jsonify({"results": results})

    @app.post("/webhook")
    def webhook():
        data = body()
        action = data.get("action")
        if not isinstance(action, str) or not action:
            return error(400, "the webhook body needs an \"action\" (a string such as ANNOTATION_CREATED)")
        # one counter per Label Studio action, one for all others: senders cannot mint counters
        metrics.inc(f"webhook_{action.lower()}" if action in WEBHOOK_ACTIONS else "webhook_unknown")
        if action == "TASKS_CREATED":
            return tasks_created(data)
        if action not in TRAINING_EVENTS:
            return jsonify({"status": "ignored", "action": clip(action, 64)})
        project = data.get("project")
        schema = label_config_of(project.get("label_config") if isinstance(project, dict) else None,
                                 "the project's label_config")
        pid = project_id(project)
        annotation = data.get("annotation")
        if pid is None and isinstance(annotation, dict):    # where backend.training.schedule looks next
            project_id(annotation.get("project"), "the annotation's project")
        model = model_for(pid, schema)
        # issue 5: store the example / queue a training (backend.training.schedule); Redis down -> a note
        from backend.training.webhook import handle_training_event

        try:
            training = handle_training_event(action, data, settings)
        except ValueError as exc:      # a malformed annotation (see backend.labelstudio.annotations): not recorded either
            return error(400, f"annotation not stored: {clip(str(exc), 400)}")
        reply = model.fit(action, data)     # events.jsonl: only events the example store accepted
        reply["training"] = training
        return jsonify(reply)

    def tasks_created(data: dict):
        """Pre-label the new tasks through the queue (TAG2MASK_PRELABEL_ON_CREATE, queue mode only)."""
        if pq is None or not settings.prelabel_on_create:
            why = "the job queue is off" if pq is None else "TAG2MASK_PRELABEL_ON_CREATE=0"
            return jsonify({"status": "ignored", "action": "TASKS_CREATED", "reason": why})
        project = data.get("project")
        schema = label_config_of(project.get("label_config") if isinstance(project, dict) else None,
                                 "the project's label_config")
        model = model_for(project_id(project), schema)
        try:
            model.use_label_config(None)
        except LabelConfigError as exc:
            return error(400, str(exc))
        tasks = data.get("tasks")
        refused = checked_tasks(tasks, "a TASKS_CREATED webhook needs \"tasks\": a list of tasks")
        if refused is not None:
            return refused
        reply = pq.prelabel(model, tasks, project_id(project))
        metrics.inc("prelabel_tasks_total", reply["tasks"])
        return jsonify({**reply, "action": "TASKS_CREATED"})

    @app.get("/jobs/<job_id>")
    def job_route(job_id: str):
        if pq is None:
            return error(404, "the job queue is off (TAG2MASK_QUEUE)")
        info = pq.job(job_id)
        if info is None:
            return error(404, f"no job {clip(job_id)!r}")
        return jsonify(info)

    @app.get("/projects/<project>/progress")
    def progress_route(project: str):
        if pq is None:
            return error(404, "the job queue is off (TAG2MASK_QUEUE)")
        return jsonify(pq.progress(project_id(project)))      # an id names Redis keys: checked (400)

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        data = request.get_json(silent=True, force=True) if request.data else None
        project = project_id(data.get("project")) if isinstance(data, dict) else None
        project = project or project_id(request.args.get("project"))
        if project is None:
            return jsonify({"versions": [version]})
        return jsonify({"versions": [model_for(project).model_version]})

    @app.get("/metrics")
    def metrics_route():
        snap = metrics.snapshot()
        snap["model_loaded"] = int(engine_loaded(settings))
        want_text = request.args.get("format") == "prometheus" or \
            (request.accept_mimetypes.best == "text/plain")
        if not want_text:
            return jsonify(snap)
        lines = []
        for name, value in sorted(snap.items()):
            metric = "tag2mask_" + "".join(ch if ch.isalnum() else "_" for ch in name)
            lines.append(f"# TYPE {metric} {'counter' if name.endswith(('_total', 's_failed')) or name.startswith(('http_', 'webhook_')) else 'gauge'}")
            lines.append(f"{metric} {value}")
        return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")

    if settings.warmup and pq is None:     # queue mode: the workers hold the model
        def _warm():
            # no garbage collection while torch & co. import: a full collection over their objects holds
            # the GIL for 0.1-0.35 s each time (requests wait; measured 6 such pauses per load); then they
            # are frozen out of later collections, which stay short
            collecting = gc.isenabled()
            gc.disable()
            try:
                get_engine(settings)
                warm_smart_tools(settings)
                gc.freeze()
            except Exception as exc:  # noqa: BLE001 - reported; /predict will try again and report per task
                log.exception("model warm-up failed")
                warmup.update(state="failed", error=f"the model did not load: {exc}")
            finally:
                if collecting:
                    gc.enable()
        warmup["state"] = "loading"
        threading.Thread(target=_warm, name="tag2mask-warmup", daemon=True).start()

    return app


class _BadRequest(Exception):
    pass


def check_label_config(xml: str) -> list[str]:
    """The control names a config would get predictions for (raises LabelConfigError)."""
    return [c.from_name for c in parse_label_config(xml).controls]
