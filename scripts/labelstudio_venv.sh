#!/usr/bin/env bash
# Install Label Studio (default 1.23.2) into its own cached virtual environment -- never the
# project's venv: Label Studio pins its own Django/SDK versions. Reused when already complete.
#
#   scripts/labelstudio_venv.sh            # last stdout line: the venv path
#   TAG2MASK_LS_VENV=/some/dir scripts/labelstudio_venv.sh
#
# Env: TAG2MASK_LS_VENV (default ~/.cache/tag2mask/ls-venv), TAG2MASK_LS_VERSION (default 1.23.2),
#      PYTHON (interpreter used to create the venv; default python3).
# A marker file ($VENV/.tag2mask-complete) is written only after a successful install, so an
# interrupted install is redone; a flock makes concurrent callers wait for one install.
set -euo pipefail
VENV="${TAG2MASK_LS_VENV:-$HOME/.cache/tag2mask/ls-venv}"
VERSION="${TAG2MASK_LS_VERSION:-1.23.2}"
PY="${PYTHON:-python3}"
MARK="$VENV/.tag2mask-complete"
# Label Studio 1.23 does not bound sentry-sdk, and sentry-sdk 3 refuses the options it passes
# ("Unknown option 'send_default_pii'"): keep it on 2.x. The marker records these pins, so a venv
# made without them is made again.
PINS="sentry-sdk<3"
RECIPE="$VERSION $PINS"

done_already() { [ -x "$VENV/bin/label-studio" ] && [ "$(cat "$MARK" 2>/dev/null)" = "$RECIPE" ]; }

if done_already; then
    echo "label-studio $VERSION already installed in $VENV" >&2
    echo "$VENV"; exit 0
fi
mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
flock 9
if done_already; then echo "$VENV"; exit 0; fi

start=$(date +%s)
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check --upgrade pip >&2
"$VENV/bin/pip" install --quiet --disable-pip-version-check "label-studio==$VERSION" $PINS >&2
echo "$RECIPE" > "$MARK"
echo "installed label-studio $VERSION in $VENV in $(( $(date +%s) - start )) s" >&2
echo "$VENV"
