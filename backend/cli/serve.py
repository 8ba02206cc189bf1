"""``python -m backend.serve`` (the Docker image's command): the web service under gunicorn, options
from the command line, defaults from ``$HOST`` / ``$PORT``. ``tag2mask serve`` does the same."""

from __future__ import annotations

import argparse

from backend.cli.common import host_port_options
from backend.web.runner import serve


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m backend.serve", description="Serve the tag2mask ML backend.")
    host_port_options(p)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    serve(a.host, a.port, a.workers, a.threads)
