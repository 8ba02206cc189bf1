"""``python -m backend.cli ...``: the ``tag2mask`` command line."""

import sys

from backend.cli.main import main

sys.exit(main())
