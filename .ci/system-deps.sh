#!/usr/bin/env bash
# System packages the test suite needs: Debian's Chromium for the dashboard test.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x "${CHROMIUM_PATH:-}" ]; then
  exit 0
fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium (Debian) for the browser test"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  command -v chromium >/dev/null || { echo "error: chromium did not install" >&2; exit 1; }
elif [ -n "${CI:-}" ]; then
  echo "error: chromium is missing and this CI run cannot apt-get it" >&2
  exit 1
else
  echo "note: chromium not installed (needs root for apt-get); the browser test will skip"
fi
