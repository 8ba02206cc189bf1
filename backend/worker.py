"""``python -m backend.worker [--queues ...] [--device D] [--batch-size N] [--scheduler]``: a job-queue
worker (backend.queue.worker); the compose services' command. ``tag2mask worker`` is the same."""

import sys

from backend.cli.worker import main

if __name__ == "__main__":
    sys.exit(main())
