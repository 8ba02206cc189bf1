"""``python -m backend.serve [--host H] [--port P] [--workers N] [--threads N]``: the web service under
gunicorn (backend.web.runner); the Docker image's command. ``tag2mask serve`` is the same."""

from backend.cli.serve import main

if __name__ == "__main__":
    main()
