"""The Label Studio ML backend HTTP API (Flask 3): ``create_app(settings=None) -> Flask``.

Routes (JSON in, JSON out; errors are ``{"error": "..."}`` with a 4xx/5xx status, never a traceback):

=================  ======  ==================================================================================
route              method  reply
=================  ======  ==================================================================================
/health, /         GET     ``{"status": "UP", "model_class", "model_version", "model_loaded", "backbone",
                           "preset"}`` -- fast, never loads the model; open without basic auth
/setup             POST    ``{"model_version"}``; body ``{"project", "schema", "hostname", "access_token"}``;
                           400 when the schema has no usable Image control
/predict           POST    ``{"results": [one per task, in order]}``; body ``{"tasks", "label_config",
                           "project", "params"}``; a failed task's entry has "error" and no "result"
/webhook           POST    training events (ANNOTATION_CREATED/UPDATED/DELETED, START_TRAINING) are
                           appended to ``$MODEL_DIR/events.jsonl`` -> ``{"status": "recorded",
                           "training": {...}}``: annotations stored as training examples, START_TRAINING
                           queues a training (backend.training_jobs); other actions -> ``{"status": "ignored"}``
/webhook           POST    TASKS_CREATED (queue mode, TAG2MASK_PRELABEL_ON_CREATE): the new tasks are enqueued
  (TASKS_CREATED)          for pre-labeling -> ``{"status": "queued", "tasks", "jobs", "skipped"}``
/jobs/<id>         GET     a queue job: status, progress (meta done/total/failed), times, error (404 unknown)
/projects/<id>/    GET     ``{"project", "jobs", "tasks", "queued", "running", "done", "failed", "rate",
  progress                 "eta_s"}`` over the project's prediction jobs
/versions          GET     ``{"versions": [model_version]}`` (Label Studio sends GET with a JSON body;
                   POST    the project's version when the body or ``?project=`` names one, else the base)
/metrics           GET     per-process counters, JSON; Prometheus text with ``?format=prometheus`` or
                           ``Accept: text/plain``
=================  ======  ==================================================================================

Job queue (``Settings.use_queue``: TAG2MASK_QUEUE=on, or auto with REDIS_URL set): /predict is
answered by ``tag2mask worker`` processes through Redis (backend.queue_service): few tasks
(<= TAG2MASK_SYNC_MAX_TASKS) wait for their job up to TAG2MASK_PREDICT_DEADLINE s; more tasks are
enqueued as batch jobs and answered at once (unfinished tasks: entries without "result"; workers push
each prediction to Label Studio). TASKS_CREATED webhooks enqueue pre-labeling of the new tasks
(TAG2MASK_PRELABEL_ON_CREATE). Redis down: 503 ``{"error": "the job queue is unavailable: ..."}``;
/health reports ``"queue": {...}`` without blocking. TAG2MASK_QUEUE=off: inference in this process.

Basic auth (BASIC_AUTH_USER + BASIC_AUTH_PASS) guards every route but /health and /. The model is
loaded once per process (``backend.model.get_engine``), in a background thread at start unless
TAG2MASK_WARMUP=0, otherwise on the first /predict.
"""
from __future__ import annotations

import hmac
import logging
import threading
import time
from collections import Counter

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from backend.label_config import LabelConfigError, parse_label_config
from backend.model import TRAINING_EVENTS, Tag2MaskModel, engine_loaded, get_engine
from backend.redis_conn import RedisUnavailable
from backend.settings import Settings

__all__ = ["create_app"]

log = logging.getLogger("backend.server")


class _Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.predict_seconds = 0.0
        self.started = time.time()

    def inc(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def snapshot(self) -> dict:
        with self.lock:
            out = dict(self.counts)
            out["predict_seconds_total"] = round(self.predict_seconds, 3)
        out["uptime_seconds"] = round(time.time() - self.started, 1)
        return out


def _project_id(value) -> str | None:
    """Label Studio sends project as "<id>.<created unix ts>" (or an id, or a dict)."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None:
        return None
    return str(value).split(".", 1)[0]


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    logging.basicConfig(level=getattr(logging, settings.log_level, logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = Flask("tag2mask")
    app.config["TAG2MASK_SETTINGS"] = settings
    metrics = _Metrics()
    projects: dict[str, Tag2MaskModel] = {}     # project id -> model (config, hostname, token from /setup)
    projects_lock = threading.Lock()
    version = Tag2MaskModel(settings).model_version
    last_seen: dict[str, str] = {}              # hostname / access_token of the latest /setup (any project)
    app.extensions["tag2mask"] = {"metrics": metrics, "projects": projects}
    pq = None
    if settings.use_queue:
        from backend.queue_service import PredictionQueue

        pq = app.extensions["tag2mask"]["queue"] = PredictionQueue(settings)

    def model_for(project: str | None, label_config: str | None = None) -> Tag2MaskModel:
        key = project or "_"
        with projects_lock:
            m = projects.get(key)
            if m is None:
                m = projects[key] = Tag2MaskModel(settings, project_id=project)
            if label_config and m.label_config != label_config:
                m.label_config, m.parsed = label_config, None
            # a project this process has not seen /setup for (another worker got it) borrows the
            # latest Label Studio address/token; LABEL_STUDIO_URL / _API_KEY override both anyway
            m.hostname = m.hostname or last_seen.get("hostname")
            m.access_token = m.access_token or last_seen.get("access_token")
            return m

    def error(status: int, message: str):
        metrics.inc(f"http_{status}")
        resp = jsonify({"error": message})
        resp.status_code = status
        return resp

    def body() -> dict:
        data = request.get_json(silent=True, force=True)
        if data is None:
            raise _BadRequest("the request body is not valid JSON")
        if not isinstance(data, dict):
            raise _BadRequest("the request body must be a JSON object")
        return data

    @app.errorhandler(_BadRequest)
    def _bad(exc):
        return error(400, str(exc))

    @app.errorhandler(RedisUnavailable)
    def _queue_down(exc):
        return error(503, str(exc))

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        return error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _any(exc):
        log.exception("unhandled error on %s", request.path)
        return error(500, f"internal error ({type(exc).__name__})")

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

    @app.get("/")
    @app.get("/health")
    def health():
        reply = {"status": "UP", "model_class": Tag2MaskModel.__name__, "model_version": version,
                 "model_loaded": engine_loaded(settings), "backbone": settings.backbone, "preset": settings.preset}
        reply["queue"] = pq.status() if pq is not None else {"mode": "inline"}
        return jsonify(reply)

    @app.post("/setup")
    def setup():
        data = body()
        metrics.inc("setup_total")
        schema = data.get("schema") or data.get("label_config")
        project = _project_id(data.get("project"))
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

    @app.post("/predict")
    def predict():
        data = body()
        tasks = data.get("tasks")
        if not isinstance(tasks, list):
            return error(400, "the body needs \"tasks\": a list of tasks")
        project = _project_id(data.get("project"))
        if project is None and tasks and isinstance(tasks[0], dict):
            project = _project_id(tasks[0].get("project"))
        model = model_for(project, data.get("label_config"))
        try:
            model.use_label_config(None)
        except LabelConfigError as exc:
            return error(400, str(exc))
        t = time.perf_counter()
        if pq is not None:
            results = pq.predict(model, tasks, project)      # RedisUnavailable -> 503
        else:
            results = model.predict(tasks, context=(data.get("params") or {}).get("context"))
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
            return error(400, "the webhook body needs an \"action\"")
        metrics.inc(f"webhook_{action.lower()}")
        if action == "TASKS_CREATED":
            return tasks_created(data)
        if action not in TRAINING_EVENTS:
            return jsonify({"status": "ignored", "action": action})
        project = data.get("project")
        schema = project.get("label_config") if isinstance(project, dict) else None
        model = model_for(_project_id(project), schema)
        reply = model.fit(action, data)
        # issue 5: store the example / queue a training (backend.training_jobs); Redis down -> a note
        from backend.training_jobs import handle_training_event

        try:
            reply["training"] = handle_training_event(action, data, settings)
        except ValueError as exc:      # a malformed annotation (no id, sizes disagree, bad RLE)
            return error(400, f"annotation not stored: {exc}")
        return jsonify(reply)

    def tasks_created(data: dict):
        """Pre-label the new tasks through the queue (TAG2MASK_PRELABEL_ON_CREATE, queue mode only)."""
        if pq is None or not settings.prelabel_on_create:
            why = "the job queue is off" if pq is None else "TAG2MASK_PRELABEL_ON_CREATE=0"
            return jsonify({"status": "ignored", "action": "TASKS_CREATED", "reason": why})
        project = data.get("project")
        schema = project.get("label_config") if isinstance(project, dict) else None
        model = model_for(_project_id(project), schema)
        try:
            model.use_label_config(None)
        except LabelConfigError as exc:
            return error(400, str(exc))
        tasks = data.get("tasks")
        if not isinstance(tasks, list):
            return error(400, "a TASKS_CREATED webhook needs \"tasks\": a list of tasks")
        reply = pq.prelabel(model, tasks, _project_id(project))
        metrics.inc("prelabel_tasks_total", reply["tasks"])
        return jsonify({**reply, "action": "TASKS_CREATED"})

    @app.get("/jobs/<job_id>")
    def job_route(job_id: str):
        if pq is None:
            return error(404, "the job queue is off (TAG2MASK_QUEUE)")
        info = pq.job(job_id)
        if info is None:
            return error(404, f"no job {job_id!r}")
        return jsonify(info)

    @app.get("/projects/<project>/progress")
    def progress_route(project: str):
        if pq is None:
            return error(404, "the job queue is off (TAG2MASK_QUEUE)")
        return jsonify(pq.progress(project))

    @app.route("/versions", methods=["GET", "POST"])
    def versions():
        data = request.get_json(silent=True, force=True) if request.data else None
        project = _project_id(data.get("project")) if isinstance(data, dict) else None
        project = project or _project_id(request.args.get("project"))
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
            try:
                get_engine(settings)
            except Exception:  # noqa: BLE001 - reported; /predict will try again and report per task
                log.exception("model warm-up failed")
        threading.Thread(target=_warm, name="tag2mask-warmup", daemon=True).start()

    return app


class _BadRequest(Exception):
    pass


def check_label_config(xml: str) -> list[str]:
    """The control names a config would get predictions for (raises LabelConfigError)."""
    return [c.from_name for c in parse_label_config(xml).controls]
