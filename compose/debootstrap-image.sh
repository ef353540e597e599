#!/usr/bin/env bash
# Make a Docker image from Debian packages, with no registry: debootstrap a minimal
# Debian (--variant=minbase) with PACKAGES, drop what an image does not need, and
# `docker import` the tree as TAG. compose/base-image.sh (the Python base) and
# compose/infra-image.sh (PostgreSQL and HAProxy) both build their bases with it.
#
#   compose/debootstrap-image.sh TAG PACKAGES CMD [PATH ...]
#
# PACKAGES is debootstrap's comma-separated --include list, CMD the image's command,
# each PATH (inside the tree) emptied before the import. MIRROR (default: what
# compose/base-image.sh --print-mirror finds) and SUITE (bookworm) pick the Debian.
# Needs root. Progress goes to stderr.
set -euo pipefail

[ $# -ge 3 ] || { echo "usage: $0 TAG PACKAGES CMD [PATH ...]" >&2; exit 2; }
tag=$1 packages=$2 cmd=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-$(SUITE="$SUITE" bash "$here/base-image.sh" --print-mirror)}

say() { echo "debootstrap-image: $*" >&2; }

command -v debootstrap >/dev/null || { say "error: debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
[ "$(id -u)" = 0 ] || { say "error: building $tag with debootstrap needs root"; exit 1; }

root=$(mktemp -d "${TMPDIR:-/tmp}/imgpipe-debootstrap.XXXXXX")
trap 'rm -rf "$root"' EXIT
say "debootstrap $SUITE (minbase + $packages) from $MIRROR"
start=$(date +%s)
debootstrap --variant=minbase --include="$packages" "$SUITE" "$root" "$MIRROR" >&2
# The caller's paths, then what no image needs: package lists, caches, docs, man pages.
for path in "$@"; do
  rm -rf "${root:?}/${path#/}"/*
done
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
       "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
       "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache
tar --numeric-owner -C "$root" -c . | docker import \
  -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  -c "CMD [\"$cmd\"]" \
  -m "debootstrap $SUITE minbase + $packages" - "$tag" >&2
say "built $tag in $(( $(date +%s) - start )) s"
