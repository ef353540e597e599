#!/usr/bin/env bash
# System packages the test suite needs: Debian's Chromium for the dashboard test, and
# Debian's PostgreSQL server binaries for the job store's second backend (the tests
# start their own server from them in a temp dir: tests/conftest.py, bench/pgserver.py).
set -euo pipefail

have_chromium() { command -v chromium >/dev/null 2>&1 || [ -x "${CHROMIUM_PATH:-}" ]; }
have_postgres() { compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; }

missing=()
have_chromium || missing+=(chromium fonts-dejavu-core)
have_postgres || missing+=(postgresql)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} (Debian) for the tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Without a service manager the package's own cluster is not started; with one it
  # listens on 5432, which the tests never use (their server is on a socket of its own).
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  have_chromium || { echo "error: chromium did not install" >&2; exit 1; }
  have_postgres || { echo "error: postgresql did not install (no /usr/lib/postgresql/*/bin/pg_ctl)" >&2; exit 1; }
elif [ -n "${CI:-}" ]; then
  echo "error: ${missing[*]} missing and this CI run cannot apt-get them" >&2
  exit 1
else
  echo "note: ${missing[*]} not installed (needs root for apt-get); the browser test" \
       "and the PostgreSQL tests will skip, saying why"
fi
