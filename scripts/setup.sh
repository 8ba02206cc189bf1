#!/usr/bin/env bash
# One-time setup on a fresh machine with python3 (>= 3.10) and pip; safe and fast to run again.
#
#   bash scripts/setup.sh
#
# 1. creates the virtual environment .venv in the repository (if absent or broken),
# 2. installs torch 2.14.1 + torchvision 0.29.1 (skipped when those versions are there),
# 3. installs this project in editable mode with its test extras (skipped when pyproject.toml has
#    not changed since the last successful install),
# 4. puts the MobileNetV2 weights into torch's hub cache (scripts/fetch_weights.sh).
# Env: PYTHON (interpreter that creates the venv; default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
START=$(date +%s)
PY_BOOT="${PYTHON:-python3}"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"

step() { echo "setup: $*"; }
# pip, quiet; drops only the notes about configured index folders that are absent on this machine
pip_q() { "${PIP[@]}" "$@" --quiet 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

# 1. virtual environment
if ! "$PY" -c 'import sys' >/dev/null 2>&1; then
    "$PY_BOOT" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' 2>/dev/null || {
        echo "setup: ERROR: $PY_BOOT must be Python 3.10 or newer" >&2; exit 2; }
    step "creating virtual environment .venv ($("$PY_BOOT" --version 2>&1))"
    rm -rf "$VENV"
    "$PY_BOOT" -m venv "$VENV"
    pip_q install --upgrade pip
else
    step "virtual environment .venv is there ($("$PY" --version 2>&1))"
fi

# 2. torch and torchvision first, pinned
have_torch() {
    "$PY" - "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'EOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
ok = version("torch").split("+")[0] == sys.argv[1] and version("torchvision").split("+")[0] == sys.argv[2]
sys.exit(0 if ok else 1)
EOF
}
if have_torch; then
    step "torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION already installed"
else
    step "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION (large; a few minutes) ..."
    pip_q install "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

# 3. the project, editable, with test extras
STAMP="$VENV/.tag2mask-installed"
WANT="$("$PY" -c 'import hashlib, sys; print(hashlib.sha256(open("pyproject.toml", "rb").read()).hexdigest(), sys.argv[1])' "$ROOT")"
if [ "$(cat "$STAMP" 2>/dev/null)" = "$WANT" ] && [ -x "$VENV/bin/tag2mask" ] \
        && "$PY" -c 'import importlib.util as u, sys; sys.exit(not (u.find_spec("explainers") and u.find_spec("backend.cli")))' >/dev/null 2>&1; then
    step "tag2mask already installed (editable, with test extras)"
else
    step "installing tag2mask (editable) and its dependencies ..."
    rm -f "$STAMP"
    pip_q install -e ".[test]"
    echo "$WANT" > "$STAMP"
fi

# 4. weights that torchvision would otherwise download at run time
PYTHON="$PY" bash scripts/fetch_weights.sh | sed 's/^/setup: /'

step "done in $(( $(date +%s) - START )) s; try: .venv/bin/tag2mask demo"
