"""The web process's counters for ``/metrics`` (requests, errors, predict seconds, uptime).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter

log = logging.getLogger(__name__)


class Metrics:
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
