"""Run the backend under gunicorn: ``serve(host, port, workers, threads)`` or ``python -m backend.serve``.

Each gunicorn worker builds its own app (``backend.web.app.create_app``) after the fork, so each
process loads the model once (no model, thread or CUDA state crosses a fork) and shares it between
its threads.

Cold start: before it listens, the master imports the modules the workers need
(:func:`import_before_fork`): the web app's (``backend.web.app.prepare_routes``, torch-free) and,
when the workers warm up a model, the pipeline's (torch; imported, never run). A worker then answers
/health, /setup and /versions within milliseconds of its fork, also while its warm-up thread loads
the model: importing torch there instead held the GIL for 0.2-0.5 s at a time (its libraries load
in one call), so requests waited that long. /health says ``"model_state": "loading"`` meanwhile; a
/predict waits for the load (a few seconds on CPU).

    python -m backend.serve --host 0.0.0.0 --port 9090 --workers 1 --threads 4

Defaults come from the environment (WORKERS, THREADS, LOG_LEVEL; see backend.settings).
"""

from __future__ import annotations

from backend.settings import Settings

__all__ = ["serve", "import_before_fork", "DEFAULT_PORT"]

DEFAULT_PORT = 9090


def serve(host: str = "0.0.0.0", port: int = DEFAULT_PORT, workers: int | None = None, threads: int | None = None,
          settings: Settings | None = None, timeout: int = 300) -> None:
    """Serve the app with gunicorn (gthread workers) until stopped; blocks."""
    from gunicorn.app.base import BaseApplication

    settings = settings or Settings.from_env()
    workers = int(workers or settings.workers)
    threads = int(threads or settings.web_threads)
    import_before_fork(settings)

    class _App(BaseApplication):
        def load_config(self):
            cfg = {
                "bind": f"{host}:{int(port)}",
                "workers": workers,
                "threads": threads,
                "worker_class": "gthread",
                "timeout": timeout,            # a /predict batch on CPU can take a while
                "graceful_timeout": 10,
                "loglevel": settings.log_level.lower(),
                "accesslog": "-" if settings.log_level.upper() == "DEBUG" else None,
                "errorlog": "-",
                "preload_app": False,
                # gunicorn >= 24 opens a control socket at a fixed path (~/.gunicorn/gunicorn.ctl):
                # several servers on one machine would fight over it, and nothing here uses it
                "control_socket_disable": True,
            }
            for key, value in cfg.items():
                if value is not None and key in self.cfg.settings:
                    self.cfg.set(key, value)

        def load(self):
            from backend.web.app import create_app

            return create_app(settings)

    _App().run()


def import_before_fork(settings: Settings) -> None:
    """Import, in the gunicorn master, what the workers would import after their fork: the modules of
    /health, /setup and /versions, and those of the model when the workers warm one up (inline mode,
    TAG2MASK_WARMUP on). Only imports: no model is built and no torch operation runs here (so no
    thread pool exists to be lost in the fork); in queue mode the web process never needs torch."""
    from backend.web.app import prepare_routes

    prepare_routes()
    if settings.warmup and not settings.use_queue:
        import explainers.segment.pipeline  # noqa: F401  (torch, cv2, the backbones' module)


