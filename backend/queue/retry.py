"""The retry policy: which failures are transient (network, Redis, HTTP 408/429/5xx, a photo download
that broke off) and :func:`with_retries`, jittered exponential backoff (``Settings.retry_attempts`` /
``retry_delay``: ``TAG2MASK_RETRY_ATTEMPTS``, ``TAG2MASK_RETRY_DELAY``).
"""
from __future__ import annotations

import logging
import random
import time
from typing import Any, Callable

from backend.settings import Settings

log = logging.getLogger(__name__)


class TransientError(RuntimeError):
    """A failure worth retrying (network, server overload)."""


# -- retries ------------------------------------------------------------------------------------
def is_transient(exc: BaseException) -> bool:
    """Network errors (HTTP, Redis), timeouts and HTTP 408/429/5xx are transient; the rest are not."""
    if isinstance(exc, (TransientError, ConnectionError, TimeoutError)):
        return True
    try:
        import httpx
        if isinstance(exc, (httpx.TransportError,)):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        import redis
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)):
            return True
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests
        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
        if isinstance(exc, requests.HTTPError) and exc.response is not None:
            return exc.response.status_code in (408, 429) or exc.response.status_code >= 500
    except ImportError:  # pragma: no cover
        pass
    status = getattr(exc, "status_code", None)   # label_studio_sdk.core.api_error.ApiError
    return isinstance(status, int) and (status in (408, 429) or status >= 500)


def with_retries(fn: Callable[[], Any], *, attempts: int | None = None, base_delay: float | None = None,
                 max_delay: float = 30.0, transient: Callable[[BaseException], bool] = is_transient,
                 what: str = "call") -> Any:
    """Call `fn()`; on a transient error retry up to `attempts` times in all, with jittered exponential
    backoff from `base_delay` seconds; not given: ``Settings.from_env()``'s ``retry_attempts``
    (``TAG2MASK_RETRY_ATTEMPTS``, default 4) and ``retry_delay`` (``TAG2MASK_RETRY_DELAY``, default 1)."""
    if attempts is None or base_delay is None:
        settings = Settings.from_env()
        attempts = settings.retry_attempts if attempts is None else attempts
        base_delay = settings.retry_delay if base_delay is None else base_delay
    attempts, delay = int(attempts), float(base_delay)
    for attempt in range(1, max(1, attempts) + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt >= attempts or not transient(exc):
                raise
            wait = min(max_delay, delay * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(exc).__name__, exc,
                        attempt, attempts - 1, wait)
            time.sleep(wait)
