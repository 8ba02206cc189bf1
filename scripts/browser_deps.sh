#!/usr/bin/env bash
# Make sure the headless browser used by the browser test is there: Debian's Chromium and its
# matching ChromeDriver (/usr/bin/chromium, /usr/bin/chromedriver). Safe and fast to run again.
#
#   bash scripts/browser_deps.sh       # exit 0: both are installed (installs them when missing)
#
# Installs the Debian packages `chromium` and `chromium-driver` with apt-get when they are missing
# and this runs as root with apt-get available; otherwise prints what to install and exits 1.
# Env: TAG2MASK_CHROMIUM, TAG2MASK_CHROMEDRIVER (paths checked; defaults /usr/bin/chromium and
#      /usr/bin/chromedriver).
set -euo pipefail
CHROMIUM="${TAG2MASK_CHROMIUM:-/usr/bin/chromium}"
DRIVER="${TAG2MASK_CHROMEDRIVER:-/usr/bin/chromedriver}"
PACKAGES=(chromium chromium-driver)

have_both() { [ -x "$CHROMIUM" ] && [ -x "$DRIVER" ]; }

if have_both; then
    echo "browser: $("$DRIVER" --version 2>/dev/null | head -1) and $CHROMIUM are installed" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "browser: ERROR: $CHROMIUM or $DRIVER is missing; install the Debian packages ${PACKAGES[*]}" \
         "(as root: apt-get update && apt-get install -y ${PACKAGES[*]})" >&2
    exit 1
fi

# one install at a time when several callers start together
exec 9>/tmp/tag2mask-browser-deps.lock
flock 9
if ! have_both; then
    start=$(date +%s)
    echo "browser: installing ${PACKAGES[*]} with apt-get ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq "${PACKAGES[@]}" >&2
    echo "browser: installed in $(( $(date +%s) - start )) s" >&2
fi
if ! have_both; then
    echo "browser: ERROR: apt-get finished but $CHROMIUM or $DRIVER is still missing" >&2
    exit 1
fi
echo "browser: $("$DRIVER" --version 2>/dev/null | head -1) and $CHROMIUM are installed" >&2
