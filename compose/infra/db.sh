#!/bin/sh
# PostgreSQL for compose/ha.yml's job store, as user postgres (the image's owner of
# PGDATA, so no root is needed).
#
#   db.sh          initdb into PGDATA (a volume) on first start, then run the server
#   db.sh check    pg_isready against it (the compose healthcheck)
#
# First start: a cluster whose superuser (postgres) logs in only over the local socket
# (peer), and DB_USER with DB_PASSWORD (or the contents of DB_PASSWORD_FILE) owning
# DB_NAME, allowed in from the network with scram-sha-256 only to that database. Later
# starts reuse the volume as it is: changing DB_PASSWORD then changes nothing (ALTER ROLE
# or a fresh volume). The server listens on every address of the container; compose
# publishes no port for it, so that is the project network only.
set -eu
bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
PGDATA=${PGDATA:-/var/lib/postgresql/data}
DB_NAME=${DB_NAME:-imgpipe}
DB_USER=${DB_USER:-imgpipe}

case "${1:-run}" in
  check) exec "$bindir/pg_isready" -q -h 127.0.0.1 -p 5432 -d "$DB_NAME" -U "$DB_USER" ;;
  run) ;;
  *) echo "usage: db.sh [run|check]" >&2; exit 2 ;;
esac

password=${DB_PASSWORD:-}
if [ -n "${DB_PASSWORD_FILE:-}" ]; then password=$(cat "$DB_PASSWORD_FILE"); fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  [ -n "$password" ] || { echo "db: set DB_PASSWORD or DB_PASSWORD_FILE for the first start" >&2; exit 1; }
  echo "db: first start: initdb in $PGDATA, role $DB_USER owning database $DB_NAME" >&2
  "$bindir/initdb" -D "$PGDATA" --username=postgres --auth-local=peer \
    --auth-host=scram-sha-256 --encoding=UTF8 --no-locale >/dev/null
  echo "host $DB_NAME $DB_USER all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  # Single-user mode: nothing listens while the role is made. SQL quotes doubled.
  quoted=$(printf '%s' "$password" | sed "s/'/''/g")
  printf '%s\n' "CREATE ROLE \"$DB_USER\" LOGIN PASSWORD '$quoted'" \
    "CREATE DATABASE \"$DB_NAME\" OWNER \"$DB_USER\"" \
    | "$bindir/postgres" --single -D "$PGDATA" postgres >/dev/null
fi

# Connections: 2 gateways x 2 processes, 2 ventilators, 2 sinks and a dashboard, each
# process with a pool of up to IMGPIPE_STORE_POOL_SIZE (8): 200 leaves room to grow.
exec "$bindir/postgres" -D "$PGDATA" -c listen_addresses='*' \
  -c max_connections="${DB_MAX_CONNECTIONS:-200}" -c unix_socket_directories=/run/postgresql \
  -c password_encryption=scram-sha-256
