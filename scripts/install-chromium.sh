#!/bin/sh
# Install Debian's Chromium and its matching chromedriver for the browser checks of the MLflow and
# Prefect UIs (tests/ui). The tests drive the system browser through chromedriver (Selenium) and
# never download a browser of their own.
#
# Idempotent and fast when both are there. Needs root to install; without root it only says what
# is missing. Quiet: apt's chatter goes to a log, shown only when the install fails.
set -eu

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-chromium: chromium or chromedriver is missing and installing them needs root:" >&2
    echo "  sudo apt-get install -y chromium chromium-driver" >&2
    exit 1
fi

log=$(mktemp /tmp/install-chromium.XXXXXX.log)
echo "install-chromium: installing chromium and chromium-driver (log: $log)" >&2
if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "install-chromium: apt-get install chromium chromium-driver failed (full log: $log)" >&2
    exit 1
fi
chromium --version 2>/dev/null | head -n 1 >&2 || true
rm -f "$log"
