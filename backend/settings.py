"""Service settings, read once from the environment (``Settings.from_env()``).

=========================  ===================  ==============================================================
variable                   default              meaning
=========================  ===================  ==============================================================
LABEL_STUDIO_URL           (none)               Label Studio base URL, for /data/upload, /data/local-files and
                                                cloud presign fetches (falls back to /setup's ``hostname``)
LABEL_STUDIO_API_KEY       (none)               token sent as ``Authorization: Token <key>`` to Label Studio
                                                (falls back to /setup's ``access_token``); never logged
MODEL_DIR                  ./model_dir          writable folder: events.jsonl (webhook training events)
BASIC_AUTH_USER/_PASS      (none)               when both set, every route but /health and / needs them
LOG_LEVEL                  INFO                 Python logging level
WORKERS                    1                    gunicorn worker processes (each loads its own model)
THREADS                    4                    gunicorn threads per worker (inference is serialised by a lock)
TAG2MASK_BACKBONE          efficientnet_lite0   classifier (explainers.load_backbone name)
TAG2MASK_PRESET            balanced             pipeline preset: fast | balanced | best
TAG2MASK_DEVICE            cpu                  torch device ("cpu", "cuda", "auto")
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
TAG2MASK_MAX_PIXELS        40000000             photo pixel cap (explainers.imageio)
=========================  ===================  ==============================================================
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

__all__ = ["Settings"]


def _bool(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _list(value: str | None, sep: str) -> list[str]:
    return [v.strip() for v in (value or "").split(sep) if v.strip()]


@dataclass
class Settings:
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    model_dir: Path = Path("model_dir")
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    workers: int = 1
    threads: int = 4
    backbone: str = "efficientnet_lite0"
    preset: str = "balanced"
    device: str = "cpu"
    threshold: float = 0.2
    max_tags: int = 3
    local_roots: list[Path] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    max_image_bytes: int = 50 * 1024 * 1024
    fetch_timeout: float = 30.0
    warmup: bool = True
    model_version: str | None = None

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> "Settings":
        e = os.environ if env is None else env
        s = cls(
            label_studio_url=(e.get("LABEL_STUDIO_URL") or e.get("LABEL_STUDIO_HOST") or None),
            label_studio_api_key=e.get("LABEL_STUDIO_API_KEY") or None,
            model_dir=Path(e.get("MODEL_DIR") or "model_dir"),
            basic_auth_user=e.get("BASIC_AUTH_USER") or None,
            basic_auth_pass=e.get("BASIC_AUTH_PASS") or None,
            log_level=(e.get("LOG_LEVEL") or "INFO").upper(),
            workers=int(e.get("WORKERS") or 1),
            threads=int(e.get("THREADS") or 4),
            backbone=e.get("TAG2MASK_BACKBONE") or "efficientnet_lite0",
            preset=e.get("TAG2MASK_PRESET") or "balanced",
            device=e.get("TAG2MASK_DEVICE") or "cpu",
            threshold=float(e.get("TAG2MASK_THRESHOLD") or 0.2),
            max_tags=int(e.get("TAG2MASK_MAX_TAGS") or 3),
            local_roots=[Path(p) for p in _list(e.get("TAG2MASK_LOCAL_ROOTS"), os.pathsep)],
            allowed_hosts=[h.lower() for h in _list(e.get("TAG2MASK_ALLOWED_HOSTS"), ",")],
            max_image_bytes=int(e.get("TAG2MASK_MAX_IMAGE_BYTES") or 50 * 1024 * 1024),
            fetch_timeout=float(e.get("TAG2MASK_FETCH_TIMEOUT") or 30),
            warmup=_bool(e.get("TAG2MASK_WARMUP"), True),
            model_version=e.get("TAG2MASK_MODEL_VERSION") or None,
        )
        return replace(s, **overrides) if overrides else s

    @property
    def basic_auth(self) -> bool:
        return bool(self.basic_auth_user and self.basic_auth_pass)

    @property
    def events_path(self) -> Path:
        return Path(self.model_dir) / "events.jsonl"
