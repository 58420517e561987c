#!/bin/sh
# Install OpenSSH's server for the loopback "Jetson lab" (fedcore.lab) and prepare /run/sshd.
#
# Idempotent and fast when sshd is already there. Needs root to install; without root it only
# says what is missing. Quiet: apt's chatter goes to a log, shown only when the install fails.
set -eu

SSHD=/usr/sbin/sshd

if [ -x "$SSHD" ]; then
    [ "$(id -u)" -eq 0 ] && mkdir -p /run/sshd
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-sshd: $SSHD is missing and installing it needs root:" >&2
    echo "  sudo apt-get install -y openssh-server" >&2
    exit 1
fi

log=$(mktemp /tmp/install-sshd.XXXXXX.log)
echo "install-sshd: installing openssh-server (log: $log)" >&2
if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssh-server; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    echo "install-sshd: apt-get install openssh-server failed (full log: $log)" >&2
    exit 1
fi
mkdir -p /run/sshd
"$SSHD" -V 2>&1 | head -n 1 >&2 || true
rm -f "$log"
