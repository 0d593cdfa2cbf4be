#!/usr/bin/env bash
# Install the servers the tests of several instances start for themselves: PostgreSQL
# (tests/test_postgres_store.py runs initdb, pg_ctl and postgres from Debian's
# /usr/lib/postgresql/N/bin on a loopback port of its own) and Redis (redis-server).
# Via apt-get; idempotent: installs only what is missing, starts nothing. CI runs this
# as root; elsewhere it uses sudo when it is available. Without them those tests are
# skipped, except under CI=true, where they fail.
set -euo pipefail

missing=()
if ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null && ! command -v postgres >/dev/null 2>&1; then
    missing+=(postgresql)
fi
if ! command -v redis-server >/dev/null 2>&1; then
    missing+=(redis-server)
fi

if [ "${#missing[@]}" -eq 0 ]; then
    echo "services already installed: $(compgen -G '/usr/lib/postgresql/*/bin/postgres' | tail -n 1 || command -v postgres), $(command -v redis-server)"
    exit 0
fi

bash "$(dirname "$0")/apt-install.sh" install-services "${missing[@]}"
compgen -G "/usr/lib/postgresql/*/bin/postgres" | tail -n 1
command -v redis-server
