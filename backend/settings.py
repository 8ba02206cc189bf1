"""Service settings, read once from the environment (``Settings.from_env()``).

=========================  ===================  ==============================================================
variable                   default              meaning
=========================  ===================  ==============================================================
LABEL_STUDIO_URL           (none)               Label Studio base URL, for /data/upload, /data/local-files and
                                                cloud presign fetches (falls back to /setup's ``hostname``)
LABEL_STUDIO_API_KEY       (none)               token sent as ``Authorization: Token <key>`` to Label Studio
                                                (falls back to /setup's ``access_token``); never logged
MODEL_DIR                  ./model_dir          writable folder: events.jsonl (webhook training events), the
                                                training examples, the model registry, the embedded Valkey's data
                                                (``~`` is expanded)
BASIC_AUTH_USER/_PASS      (none)               when both set, every route but /health and / needs them
LOG_LEVEL                  INFO                 Python logging level
WORKERS                    1                    gunicorn worker processes (each loads its own model)
THREADS                    4                    gunicorn threads per worker (inference is serialised by a lock)
TAG2MASK_BACKBONE          efficientnet_lite0   classifier (explainers.load_backbone name)
TAG2MASK_PRESET            balanced             pipeline preset: fast | balanced | best
TAG2MASK_DEVICE            auto                 torch device ("cpu", "cuda", "cuda:1", "auto": CUDA when present)
TAG2MASK_THRESHOLD         0.2                  a config label is predicted when its tag score >= this;
                                                if none passes, the best label is used alone
TAG2MASK_MAX_TAGS          3                    at most this many classifier-chosen labels per photo
TAG2MASK_LOCAL_ROOTS       (none)               ``os.pathsep``-separated folders the backend may read
                                                /data/local-files/?d=… and plain paths from, directly
TAG2MASK_ALLOWED_HOSTS     (none)               comma-separated extra hosts (host or host:port) http(s) images
                                                may come from; ``*`` allows any. Label Studio's host always is
TAG2MASK_MAX_IMAGE_BYTES   52428800             download size cap (50 MiB), enforced while streaming
TAG2MASK_FETCH_TIMEOUT     30                   seconds per image download (connect and read)
TAG2MASK_WARMUP            1                    load the model in a background thread at start (0: on first
                                                /predict)
TAG2MASK_MODEL_VERSION     (derived)            override the model version string
TAG2MASK_MAX_PIXELS        40000000             photo pixel cap (explainers.imageio); also the canvas cap of
                                                a webhook annotation's brush/polygon regions
TAG2MASK_MAX_REQUEST_BYTES 67108864             request body cap (64 MiB; larger -> 413, chunked bodies too)
TAG2MASK_MAX_TASKS         10000                most tasks in one /predict or TASKS_CREATED (more -> 413)
REDIS_URL                  (none)               job queue server; unset: an embedded Valkey in MODEL_DIR/valkey
TAG2MASK_QUEUE             auto                 /predict through the job queue: on | off (inference in the
                                                web process) | auto (on when REDIS_URL is set)
TAG2MASK_SYNC_MAX_TASKS    4                    /predict with at most this many tasks waits for the workers;
                                                more: a batch job is enqueued and the answer is immediate
TAG2MASK_PREDICT_DEADLINE  60                   seconds /predict waits for its job (below Label Studio's 100)
TAG2MASK_PRELABEL_ON_CREATE 1                   TASKS_CREATED webhooks enqueue pre-labeling of the new tasks
TAG2MASK_BATCH_CHUNK       8                    tasks per batch job
TAG2MASK_BATCH_SIZE        8                    photos a worker sends to the engine in one call (its device
                                                batch; ``tag2mask worker --batch-size``)
TRAIN_INTERVAL             600                  seconds between retraining checks of every project
                                                (backend.training.schedule.run_training_scheduler)
TRAIN_MIN_NEW              10                   a project is retrained when at least this many of its
                                                examples changed since its last model
TAG2MASK_NAMESPACE         tag2mask             prefix of queue names and Redis keys (:func:`namespace`)
TAG2MASK_THREADS           (all cores)          torch CPU threads of a process that loads a model
TAG2MASK_RESULT_TTL        604800               seconds a cached prediction is kept (a week)
TAG2MASK_HEADS_TTL         30                   seconds a project's promoted heads are trusted before the
                                                registry is read again (a promotion is live within this)
TAG2MASK_RETRY_ATTEMPTS    4                    tries of a transient failure (photo download, Label Studio)
TAG2MASK_RETRY_DELAY       1.0                  seconds before the first retry (doubled each time, jittered)
TAG2MASK_JOB_HEARTBEAT_TTL 60                   seconds a dead worker's job stays "started" before requeue
                                                (not a number: the default)
TAG2MASK_MAINTENANCE_INTERVAL 60                seconds between a worker's RQ registry clean-ups (not a
                                                number: the default)
TAG2MASK_REDIS_WAIT        30                   seconds a worker waits for Redis to answer at start
TAG2MASK_VALKEY_PORT       (free port)          port of the embedded Valkey (when REDIS_URL is unset)
=========================  ===================  ==============================================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["Settings", "namespace"]

DEFAULT_NAMESPACE = "tag2mask"


def _bool(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _list(value: str | None, sep: str) -> list[str]:
    return [v.strip() for v in (value or "").split(sep) if v.strip()]


def _int_or(value: str | None, default: int) -> int:
    """`value` as an int; `default` when it is unset, empty or not a number."""
    try:
        return int(value) if value is not None and value.strip() else default
    except ValueError:
        return default


@dataclass
class Settings:
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    model_dir: Path = Path("model_dir")
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    workers: int = 1
    web_threads: int = 4
    backbone: str = "efficientnet_lite0"
    preset: str = "balanced"
    device: str = "auto"
    threshold: float = 0.2
    max_tags: int = 3
    local_roots: list[Path] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    max_image_bytes: int = 50 * 1024 * 1024
    fetch_timeout: float = 30.0
    warmup: bool = True
    model_version: str | None = None
    train_interval: float = 600.0
    redis_url: str | None = None
    queue: str = "auto"
    sync_max_tasks: int = 4
    predict_deadline: float = 60.0
    prelabel_on_create: bool = True
    batch_chunk: int = 8
    batch_size: int = 8
    train_min_new: int = 10
    self_train: int = 0             # >0: trainings self-train on the tags-only examples when at least this many
    max_request_bytes: int = 64 * 1024 * 1024
    max_tasks: int = 10000
    threads: int | None = None
    result_ttl: int = 7 * 24 * 3600
    heads_ttl: float = 30.0
    retry_attempts: int = 4
    retry_delay: float = 1.0
    job_heartbeat_ttl: int = 60
    maintenance_interval: int = 60
    redis_wait: float = 30.0
    valkey_port: int | None = None

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> "Settings":
        e = os.environ if env is None else env
        s = cls(
            label_studio_url=(e.get("LABEL_STUDIO_URL") or e.get("LABEL_STUDIO_HOST") or None),
            label_studio_api_key=e.get("LABEL_STUDIO_API_KEY") or None,
            model_dir=Path(e.get("MODEL_DIR") or "model_dir").expanduser(),
            basic_auth_user=e.get("BASIC_AUTH_USER") or None,
            basic_auth_pass=e.get("BASIC_AUTH_PASS") or None,
            log_level=(e.get("LOG_LEVEL") or "INFO").upper(),
            workers=int(e.get("WORKERS") or 1),
            web_threads=int(e.get("THREADS") or 4),
            backbone=e.get("TAG2MASK_BACKBONE") or "efficientnet_lite0",
            preset=e.get("TAG2MASK_PRESET") or "balanced",
            device=e.get("TAG2MASK_DEVICE") or "auto",
            threshold=float(e.get("TAG2MASK_THRESHOLD") or 0.2),
            max_tags=int(e.get("TAG2MASK_MAX_TAGS") or 3),
            local_roots=[Path(p) for p in _list(e.get("TAG2MASK_LOCAL_ROOTS"), os.pathsep)],
            allowed_hosts=[h.lower() for h in _list(e.get("TAG2MASK_ALLOWED_HOSTS"), ",")],
            max_image_bytes=int(e.get("TAG2MASK_MAX_IMAGE_BYTES") or 50 * 1024 * 1024),
            fetch_timeout=float(e.get("TAG2MASK_FETCH_TIMEOUT") or 30),
            warmup=_bool(e.get("TAG2MASK_WARMUP"), True),
            model_version=e.get("TAG2MASK_MODEL_VERSION") or None,
            train_interval=float(e.get("TRAIN_INTERVAL") or 600),
            redis_url=(e.get("REDIS_URL") or "").strip() or None,
            queue=(e.get("TAG2MASK_QUEUE") or "auto").strip().lower(),
            sync_max_tasks=int(e.get("TAG2MASK_SYNC_MAX_TASKS") or 4),
            predict_deadline=float(e.get("TAG2MASK_PREDICT_DEADLINE") or 60),
            prelabel_on_create=_bool(e.get("TAG2MASK_PRELABEL_ON_CREATE"), True),
            batch_chunk=int(e.get("TAG2MASK_BATCH_CHUNK") or 8),
            batch_size=int(e.get("TAG2MASK_BATCH_SIZE") or 8),
            train_min_new=int(e.get("TRAIN_MIN_NEW") or 10),
            self_train=int(e.get("TAG2MASK_SELF_TRAIN") or 0),
            max_request_bytes=int(e.get("TAG2MASK_MAX_REQUEST_BYTES") or 64 * 1024 * 1024),
            max_tasks=int(e.get("TAG2MASK_MAX_TASKS") or 10000),
            threads=int(e["TAG2MASK_THREADS"]) if (e.get("TAG2MASK_THREADS") or "").strip() else None,
            result_ttl=int(e.get("TAG2MASK_RESULT_TTL") or 7 * 24 * 3600),
            heads_ttl=float(e.get("TAG2MASK_HEADS_TTL") or 30),
            retry_attempts=int(e.get("TAG2MASK_RETRY_ATTEMPTS") or 4),
            retry_delay=float(e.get("TAG2MASK_RETRY_DELAY") or 1.0),
            job_heartbeat_ttl=_int_or(e.get("TAG2MASK_JOB_HEARTBEAT_TTL"), 60),
            maintenance_interval=_int_or(e.get("TAG2MASK_MAINTENANCE_INTERVAL"), 60),
            redis_wait=float(e.get("TAG2MASK_REDIS_WAIT") or 30),
            valkey_port=int(e["TAG2MASK_VALKEY_PORT"]) if (e.get("TAG2MASK_VALKEY_PORT") or "").strip() else None,
        )
        return replace(s, **overrides) if overrides else s

    @property
    def basic_auth(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @property
    def use_queue(self) -> bool:
        """/predict goes through the job queue (TAG2MASK_QUEUE=on, or auto with REDIS_URL set)."""
        if self.queue in ("on", "1", "true", "yes"):
            return True
        if self.queue in ("off", "0", "false", "no", "inline"):
            return False
        return bool(self.redis_url)

    @property
    def events_path(self) -> Path:
        return Path(self.model_dir) / "events.jsonl"


def namespace(env: dict | None = None) -> str:
    """``TAG2MASK_NAMESPACE`` (default ``tag2mask``): the prefix of queue names and of every Redis key
    (backend.storage.keys). Read at each call, so one process can be pointed at another namespace."""
    e = os.environ if env is None else env
    return (e.get("TAG2MASK_NAMESPACE") or DEFAULT_NAMESPACE).strip() or DEFAULT_NAMESPACE
