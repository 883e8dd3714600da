#!/usr/bin/env bash
# Start a throw-away PostgreSQL on 127.0.0.1:55432 for the many-workers sweep test; prints its URL.
# Installs Debian's postgresql when missing. Exits non-zero (and the test skips) when that is impossible.
set -euo pipefail
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1
fi
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
data=$(mktemp -d /tmp/labelling-pg.XXXX)
owner=postgres; id postgres >/dev/null 2>&1 || owner=$(id -un)
chown "$owner" "$data"
run() { if [ "$(id -u)" = 0 ] && [ "$owner" != root ]; then su "$owner" -s /bin/bash -c "$*"; else bash -c "$*"; fi; }
run "$bin/initdb -D $data -A trust -U postgres" >/dev/null
run "$bin/pg_ctl -D $data -o '-p 55432 -k /tmp -c listen_addresses=127.0.0.1' -l $data/log start -w" >/dev/null
echo "$data" > /tmp/labelling-pg.dir
echo "postgresql+psycopg2://postgres@127.0.0.1:55432/postgres"
