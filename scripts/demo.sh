#!/usr/bin/env bash
# One command on a fresh machine: set up (idempotent), then pre-label the bundled demo photos.
#
#   bash scripts/demo.sh                 # writes ./demo-out (index.html, masks, overlays, tasks.json)
#   bash scripts/demo.sh --out /tmp/d    # extra arguments go to `tag2mask demo`
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/tag2mask demo "$@"
