#!/usr/bin/env bash
# A Docker engine for the `docker` tests (tests/compose/test_engine.py).
# Answering already: nothing to do. As root: apt-get docker.io, docker-compose (v1; v2's
# plugin is used instead where it is installed) and debootstrap (compose/base-image.sh
# builds the base with it when no registry answers), start dockerd in the background and
# wait for it. Anything that does not work fails loudly. Not root: under CI=true that is
# an error (the docker tests would fail anyway); elsewhere the docker tests skip.
set -euo pipefail
DEADLINE_S=${DOCKERD_DEADLINE_S:-60}
LOG=${DOCKERD_LOG:-/var/log/imgpipe-ci-dockerd.log}

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  if [ "${CI:-}" = true ]; then
    echo "error: no Docker engine answers and this CI run is not root: cannot install one" >&2
    exit 1
  fi
  echo "note: no Docker engine answers (needs root to install); the docker tests will skip"
  exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "error: no Docker engine and no apt-get to install one" >&2; exit 1; }

missing=()
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
{ docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; } \
  || missing+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} (Debian) for the docker tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
  echo "starting dockerd in the background (log: $LOG)"
  nohup dockerd >"$LOG" 2>&1 &
  pid=$!
  deadline=$(( $(date +%s) + DEADLINE_S ))
  until docker info >/dev/null 2>&1; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "error: dockerd exited before answering \`docker info\`:" >&2
      tail -n 30 "$LOG" >&2 || true
      exit 1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      echo "error: dockerd did not answer \`docker info\` within ${DEADLINE_S} s:" >&2
      tail -n 30 "$LOG" >&2 || true
      exit 1
    fi
    sleep 1
  done
fi
echo "docker engine: $(docker version --format '{{.Server.Version}}'), compose: $(docker compose version --short 2>/dev/null || docker-compose version --short)"
