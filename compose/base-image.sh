#!/usr/bin/env bash
# Print the name of a Python base image the Dockerfile can build on, making one if needed.
#
#   compose/base-image.sh [PYTHON_IMAGE]        (default python:3.11-slim)
#   compose/base-image.sh --print-mirror        (the Debian mirror it would use)
#
# 1. PYTHON_IMAGE is already in the engine: use it. Else LOCAL_BASE (below), when an
#    earlier run made it. Else `docker pull` PYTHON_IMAGE.
# 2. No registry: build the same thing from Debian packages, once, and keep it as
#    LOCAL_BASE (default imgpipe-base:bookworm; `docker rmi` it to try the pull again):
#    debootstrap a minimal bookworm (--variant=minbase) with python3 (3.11 in Debian 12,
#    as requires-python wants),
#    python3-venv, ca-certificates and the shared libraries the wheels link outside
#    themselves (libstdc++6, libgcc-s1, zlib1g), then `docker import` the tree
#    (compose/debootstrap-image.sh, which compose/infra-image.sh uses too).
#    debootstrap needs root and a Debian mirror: DEBIAN_MIRROR, else the one this host's
#    apt uses (APT_DIR, default /etc/apt), else http://deb.debian.org/debian.
#
# Only the image name goes to stdout (the Makefile passes it as --build-arg); progress
# goes to stderr. IMGPIPE_LOCAL_BASE=1 skips the pull and always uses the local base.
set -euo pipefail

APT_DIR=${APT_DIR:-/etc/apt}
PRINT_MIRROR=0
if [ "${1:-}" = --print-mirror ]; then PRINT_MIRROR=1; shift; fi
PYTHON_IMAGE=${1:-${PYTHON_IMAGE:-python:3.11-slim}}
LOCAL_BASE=${LOCAL_BASE:-imgpipe-base:bookworm}
SUITE=${SUITE:-bookworm}
PACKAGES=python3,python3-venv,python-is-python3,ca-certificates,libstdc++6,libgcc-s1,zlib1g

say() { echo "base-image: $*" >&2; }

# The mirror this host's apt uses for Debian (deb822 .sources or one-line .list files).
host_mirror() {
  local f
  for f in "$APT_DIR"/sources.list.d/*.sources; do
    [ -r "$f" ] || continue
    awk 'BEGIN{RS=""} /Suites:[^\n]*[ \t]'"$SUITE"'([ \t\n]|$)/ && /URIs:/ {
           match($0, /URIs:[ \t]*[^ \t\n]+/); u = substr($0, RSTART, RLENGTH);
           sub(/URIs:[ \t]*/, "", u); if (u !~ /security/) { print u; exit } }' "$f"
  done
  for f in "$APT_DIR"/sources.list "$APT_DIR"/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    awk '$1 == "deb" { i = 2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
           if ($(i+1) == "'"$SUITE"'") { print $i; exit } }' "$f"
  done
}
MIRROR=${DEBIAN_MIRROR:-$(host_mirror | head -n1)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if [ "$PRINT_MIRROR" = 1 ]; then echo "$MIRROR"; exit 0; fi

if docker image inspect "$PYTHON_IMAGE" >/dev/null 2>&1; then
  echo "$PYTHON_IMAGE"; exit 0
fi
# Made by an earlier run because the pull failed: `docker rmi` it to try the pull again.
if docker image inspect "$LOCAL_BASE" >/dev/null 2>&1; then
  echo "$LOCAL_BASE"; exit 0
fi
if [ "${IMGPIPE_LOCAL_BASE:-0}" != 1 ]; then
  say "pulling $PYTHON_IMAGE"
  if timeout "${PULL_TIMEOUT_S:-60}" docker pull -q "$PYTHON_IMAGE" >&2; then
    echo "$PYTHON_IMAGE"; exit 0
  fi
  say "cannot pull $PYTHON_IMAGE (no registry?): building a base from Debian packages"
fi

MIRROR="$MIRROR" SUITE="$SUITE" \
  bash "$(dirname "$0")/debootstrap-image.sh" "$LOCAL_BASE" "$PACKAGES" python3
echo "$LOCAL_BASE"
