#!/bin/sh
# Install PostgreSQL's server for `fedmnist stack` (flows/stack): initdb and pg_ctl, which Debian
# puts in /usr/lib/postgresql/<version>/bin. The stack runs its own cluster under
# $FEDMNIST_HOME/stack, so the cluster the package creates and starts is stopped and left off.
#
# Idempotent and fast when initdb is already there. Needs root to install; without root it only
# says what is missing. Quiet: apt's chatter goes to a log, shown only when the install fails.
set -eu

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-postgres: PostgreSQL's initdb is missing and installing it needs root:" >&2
    echo "  sudo apt-get install -y postgresql" >&2
    exit 1
fi

log=$(mktemp /tmp/install-postgres.XXXXXX.log)
echo "install-postgres: installing postgresql (log: $log)" >&2
# policy-rc.d: no service starts during the install (there may be no init system to start it)
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
fi
status=0
{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends postgresql; } >"$log" 2>&1 || status=$?
[ "$made_policy" -eq 1 ] && rm -f "$policy"
if [ "$status" -ne 0 ]; then
    tail -n 30 "$log" >&2
    echo "install-postgres: apt-get install postgresql failed (full log: $log)" >&2
    exit 1
fi
ls -d /usr/lib/postgresql/*/bin >&2
rm -f "$log"
