#!/usr/bin/env bash
# Set up (idempotent, see scripts/setup.sh), then run the whole test suite, including the Label Studio
# end-to-end test (its harness installs Label Studio into its own cached venv).
#
#   bash scripts/test.sh                 # all tests
#   bash scripts/test.sh tests/test_cli.py -x    # extra arguments go to pytest
#
# Exits with pytest's status; "no tests collected" (pytest's 5) counts as a failure too.
set -uo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh || { echo "test: setup failed" >&2; exit 1; }
# Chromium + ChromeDriver (Debian packages) for the browser check of a Label Studio task page
bash scripts/browser_deps.sh || { echo "test: browser dependencies missing (see above)" >&2; exit 1; }

export TAG2MASK_THREADS="${TAG2MASK_THREADS:-2}"
echo "test: pytest (TAG2MASK_THREADS=$TAG2MASK_THREADS) $*"
.venv/bin/python -m pytest -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "test: FAILED: pytest collected no tests" >&2
fi
exit "$rc"
