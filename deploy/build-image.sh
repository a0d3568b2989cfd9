#!/usr/bin/env bash
# Build the binserve image where no container registry is reachable (what CI does; see README):
#   1. a Debian bookworm base image made with debootstrap from the host's Debian mirror, with
#      python3, python3-venv and the host's CA bundle (outbound HTTPS may go through a
#      TLS-intercepting proxy that only the host's bundle trusts);
#   2. a wheelhouse of the runtime requirements, downloaded on the host into wheels/ (pip there
#      resolves torch to the local CPU wheel that a build container cannot see);
#   3. `docker build --build-arg BASE_IMAGE=...` (the legacy builder: no BuildKit features used).
# Usage: bash deploy/build-image.sh [TAG]      (default binserve:0.3.0; PYTHON picks the pip to use)
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${1:-binserve:0.3.0}
BASE=binserve-base:bookworm
PY=${PYTHON:-.venv/bin/python}

if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d)
  echo "build-image: debootstrap bookworm from $mirror"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror" >/dev/null
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
         "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | docker import --change 'CMD ["/bin/bash"]' - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi

echo "build-image: wheelhouse in wheels/"
find wheels -name '*.whl' -delete
"$PY" -m pip download -qq --only-binary=:all: -r requirements.txt -d wheels

echo "build-image: docker build -t $TAG"
docker build --quiet --build-arg BASE_IMAGE="$BASE" -t "$TAG" . >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$TAG")
echo "build-image: $TAG is $((size / 1024 / 1024)) MiB"
