#!/usr/bin/env bash
# Print the name of the image that runs compose/ha.yml's PostgreSQL and load balancer,
# making it if needed.
#
#   compose/infra-image.sh            (prints imgpipe-infra:bookworm)
#
# 1. INFRA_BASE (default imgpipe-infra-base:bookworm): Debian's postgresql and haproxy
#    on a minimal bookworm, made once by compose/debootstrap-image.sh from the mirror
#    compose/base-image.sh finds (DEBIAN_MIRROR, else this host's apt, else
#    deb.debian.org), as the Python base is: no registry needed,
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
  # The package's own cluster (/etc/postgresql, /var/lib/postgresql/15/main) goes: db.sh
  # makes one in the data volume on first start.
  SUITE="$SUITE" bash "$here/debootstrap-image.sh" "$INFRA_BASE" "$PACKAGES" /bin/sh \
    /etc/postgresql /var/lib/postgresql
fi
docker build -q --build-arg INFRA_BASE="$INFRA_BASE" -t "$INFRA_IMAGE" "$here/infra" >&2
echo "$INFRA_IMAGE"
