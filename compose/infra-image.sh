#!/usr/bin/env bash
# Print the name of the image that runs compose/ha.yml's PostgreSQL and load balancer,
# making it if needed.
#
#   compose/infra-image.sh            (prints imgpipe-infra:bookworm)
#
# 1. INFRA_BASE (default imgpipe-infra-base:bookworm): Debian's postgresql and haproxy
#    on a minimal bookworm, made once with debootstrap --variant=minbase from the mirror
#    compose/base-image.sh finds (DEBIAN_MIRROR, else this host's apt, else
#    deb.debian.org) and `docker import`ed, as the Python base is: no registry needed,
#    and no network from inside a container. Reused when present (`docker rmi` it to
#    make it again, e.g. for Debian's security updates).
# 2. INFRA_IMAGE (default imgpipe-infra:bookworm): compose/infra/Dockerfile on top, which
#    adds the two entry scripts (compose/infra/db.sh, lb.sh); a `docker build` that the
#    engine's cache makes instant when they did not change.
#
# Only the image name goes to stdout; progress goes to stderr. Needs root for
# debootstrap the first time.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
INFRA_BASE=${INFRA_BASE:-imgpipe-infra-base:bookworm}
INFRA_IMAGE=${INFRA_IMAGE:-imgpipe-infra:bookworm}
SUITE=${SUITE:-bookworm}
# postgresql pulls in its client (psql, pg_isready); haproxy is the load balancer.
PACKAGES=postgresql,haproxy

say() { echo "infra-image: $*" >&2; }

if ! docker image inspect "$INFRA_BASE" >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { say "error: debootstrap is not installed (apt-get install debootstrap)"; exit 1; }
  [ "$(id -u)" = 0 ] || { say "error: building $INFRA_BASE with debootstrap needs root"; exit 1; }
  mirror=$(SUITE="$SUITE" bash "$here/base-image.sh" --print-mirror)
  root=$(mktemp -d "${TMPDIR:-/tmp}/imgpipe-infra.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  say "debootstrap $SUITE (minbase + $PACKAGES) from $mirror"
  start=$(date +%s)
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" >&2
  # The package's own cluster (/etc/postgresql, /var/lib/postgresql/15/main) goes: db.sh
  # makes one in the data volume on first start. Then what an image does not need.
  rm -rf "$root"/etc/postgresql/* "$root"/var/lib/postgresql/* \
         "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
         "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
         "$root"/var/log/* "$root"/tmp/* "$root"/root/.cache
  tar --numeric-owner -C "$root" -c . | docker import \
    -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["/bin/sh"]' \
    -m "debootstrap $SUITE minbase + $PACKAGES" - "$INFRA_BASE" >&2
  say "built $INFRA_BASE in $(( $(date +%s) - start )) s"
fi
docker build -q --build-arg INFRA_BASE="$INFRA_BASE" -t "$INFRA_IMAGE" "$here/infra" >&2
echo "$INFRA_IMAGE"
