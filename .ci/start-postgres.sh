#!/usr/bin/env bash
# Start a throw-away PostgreSQL on 127.0.0.1:55432 for the many-workers sweep test; prints its URL.
# Installs Debian's postgresql when missing. Exits non-zero with the reason on stderr when that is impossible
# (.ci/run then fails under CI=true, and the test skips otherwise). `bash /tmp/labelling-pg.stop` stops it.
set -euo pipefail
port=55432
fail() { echo "start-postgres: $*" >&2; exit 1; }
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 \
    || fail "postgresql is not installed and apt-get could not install it"
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
data=$(mktemp -d /tmp/labelling-pg.XXXX)
owner=postgres; id postgres >/dev/null 2>&1 || owner=$(id -un)
chown "$owner" "$data"
run() { if [ "$(id -u)" = 0 ] && [ "$owner" != root ]; then su "$owner" -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
run "$bin/initdb -D $data -A trust -U postgres" >/dev/null 2>"$data.initdb.err" \
  || { cat "$data.initdb.err" >&2; fail "initdb failed as user $owner (it refuses to run as root)"; }
run "$bin/pg_ctl -D $data -o '-p $port -k /tmp -c listen_addresses=127.0.0.1' -l $data/log start -w" >/dev/null \
  || { cat "$data/log" >&2 || true; fail "the server did not start on port $port (log above)"; }
echo "$data" > /tmp/labelling-pg.dir
{ declare -f run; echo "owner=$owner; run '$bin/pg_ctl -D $data stop -m fast'"; } > /tmp/labelling-pg.stop
echo "postgresql+psycopg2://postgres@127.0.0.1:$port/postgres"
