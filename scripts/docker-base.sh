#!/usr/bin/env bash
# What an image build needs where no image registry can be reached (docs: README, Docker):
#  1. the base image pdserve-base:local, Debian bookworm from Debian's packages (debootstrap --variant=minbase):
#     Python 3.11 with venv, Mooncake's shared libraries, this host's CA certificates; `docker import`ed.
#  2. wheels/: the CPU torch wheel, which the Dockerfile installs from its build context when present (pip inside
#     a build does not see this host's pip configuration, e.g. a local folder of wheels).
# Idempotent: an existing image or wheel is kept (PDSERVE_BASE_REBUILD=1 rebuilds the image).
# Needs root and a running Docker daemon (scripts/dockerd.sh start); installs debootstrap with apt-get if missing.
# Settings: PDSERVE_DEBIAN_MIRROR (http://deb.debian.org/debian), TORCH_SPEC (torch==2.13.0),
# TORCH_INDEX_URL (https://download.pytorch.org/whl/cpu; pip's configured find-links are searched too).
set -euo pipefail

IMAGE=pdserve-base:local
SUITE=bookworm  # its python3 is 3.11, the version of the default base python:3.11-slim
MIRROR=${PDSERVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3,python3-venv,ca-certificates,libibverbs1,librdmacm1,libnuma1,libcurl4
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
WHEELS=$(cd "$(dirname "$0")/.." && pwd)/wheels

PATH_DIRS=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin  # what a pulled Debian image sets

fail() { echo "docker-base.sh: $*" >&2; exit 1; }

# Removes a root file system, unmounting first what a failed debootstrap left mounted in it (/proc, /sys).
cleanup() {
  { grep -o " $1/[^ ]*" /proc/mounts || true; } | sort -r | xargs -r -n1 umount -l
  rm -rf "$1" "$1.log"
}

base_image() {
  docker info >/dev/null 2>&1 || fail "no Docker daemon answers (start one: scripts/dockerd.sh start)"
  if [ "${PDSERVE_BASE_REBUILD:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "keeping $IMAGE"; return
  fi
  [ "$(id -u)" = 0 ] || fail "debootstrap needs root"
  if ! command -v debootstrap >/dev/null; then
    command -v apt-get >/dev/null || fail "debootstrap is missing and there is no apt-get to install it"
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null || fail "apt-get install debootstrap failed"
  fi
  local rootfs; rootfs=$(mktemp -d /var/tmp/pdserve-base.XXXXXX)
  trap "cleanup $rootfs" EXIT
  echo "debootstrap $SUITE into $rootfs"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 \
    || fail "debootstrap failed: $(tail -n 5 "$rootfs.log")"
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc "$rootfs"/usr/share/man
  # Builds on this base reach what this host reaches, also through a TLS-inspecting proxy: the image trusts
  # this host's CA bundle, and pip uses that bundle (not its own certifi copy).
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
  tar -C "$rootfs" --one-file-system -c . \
    | docker import --change "ENV PATH=$PATH_DIRS" --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
  echo "built $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
}

torch_wheel() {
  if compgen -G "$WHEELS/torch-*.whl" >/dev/null; then echo "keeping $(basename "$WHEELS"/torch-*.whl)"; return; fi
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.11 --retries 1 \
    --index-url "$TORCH_INDEX_URL" -d "$WHEELS" "$TORCH_SPEC" \
    || fail "no $TORCH_SPEC wheel from $TORCH_INDEX_URL or pip's find-links"
  echo "put $(basename "$WHEELS"/torch-*.whl) in the build context"
}

base_image
torch_wheel
