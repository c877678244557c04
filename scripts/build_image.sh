#!/usr/bin/env bash
# Build the trace-source container image with buildah (daemonless), on a machine without Docker and without access
# to any container registry: the base root filesystem is made with debootstrap from Debian's packages.
#
#   scripts/build_image.sh                 # -> localhost/trace-source:<version> in buildah's local storage
#   IMAGE=ghcr.io/acme/trace-source TAG=0.1.0 scripts/build_image.sh
#   IMAGE_BASE=docker.io/library/python:3.11-slim-bookworm scripts/build_image.sh   # if that can be pulled
#
# Needs root (debootstrap, and buildah's rootful storage) and the Debian packages buildah and debootstrap; run as
# root it installs them with apt-get when missing. The debootstrapped base is cached in
# ~/.cache/trace-source/image (delete that directory, or run `make image-clean`, to rebuild it).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
IMAGE=${IMAGE:-localhost/trace-source}
TAG=${TAG:-$VERSION}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CACHE=${TRACE_SOURCE_IMAGE_CACHE:-$HOME/.cache/trace-source/image}
BASE_IMAGE=localhost/trace-source-base:$SUITE
# What the base needs: Python 3.11 with venv for the build stage, git and CA certificates for the loop's workers.
BASE_PACKAGES=python3,python3-venv,git,ca-certificates

need() {
  local missing=()
  for tool in "$@"; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing ${missing[*]} from Debian's packages" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
  else
    echo "missing: ${missing[*]} (install with: apt-get install ${missing[*]})" >&2
    exit 1
  fi
}

if [ "$(id -u)" != 0 ]; then
  echo "build_image.sh needs root (debootstrap and buildah's rootful storage)" >&2
  exit 1
fi
need buildah

if [ -z "${IMAGE_BASE:-}" ]; then
  IMAGE_BASE=$BASE_IMAGE
  if ! buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
    need debootstrap
    rootfs=$CACHE/rootfs-$SUITE
    if [ ! -f "$rootfs/.complete" ]; then
      rm -rf "$rootfs"
      mkdir -p "$CACHE"
      echo "debootstrap $SUITE (minbase + $BASE_PACKAGES) into $rootfs" >&2
      debootstrap --variant=minbase --include="$BASE_PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >&2
      touch "$rootfs/.complete"
    fi
    echo "importing $rootfs as $BASE_IMAGE" >&2
    ctr=$(buildah from scratch)
    mnt=$(buildah mount "$ctr")
    # Slimmed on the way in: package caches, documentation and translations are not needed at run time.
    tar -C "$rootfs" --exclude=./.complete --exclude='./var/cache/apt/archives/*.deb' \
        --exclude='./var/lib/apt/lists/*' --exclude='./usr/share/doc/*' --exclude='./usr/share/man/*' \
        --exclude='./usr/share/info/*' --exclude='./usr/share/locale/*' --exclude='./var/log/*' \
        -cf - . | tar -C "$mnt" -xf -
    buildah umount "$ctr" >/dev/null
    buildah config --env PATH=/usr/local/bin:/usr/bin:/bin --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
    buildah commit --rm "$ctr" "$BASE_IMAGE" >&2
  fi
fi

# chroot isolation runs the RUN steps without an OCI runtime: crun/runc need cgroup setups that VMs and CI runners
# often lack ("cgroups in hybrid mode not supported"); BUILDAH_ISOLATION=oci to use the runtime instead.
ISOLATION=${BUILDAH_ISOLATION:-chroot}
echo "building $IMAGE:$TAG from $IMAGE_BASE (isolation $ISOLATION)" >&2
# The host's CA bundle (for pip behind a TLS-inspecting proxy), mounted for the build steps only.
ca_args=()
host_ca=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
if [ -f "$host_ca" ]; then
  ca_args=(--volume "$(readlink -f "$host_ca"):/run/host-ca.pem:ro" --build-arg HOST_CA=/run/host-ca.pem)
fi
buildah bud --isolation "$ISOLATION" --layers --build-arg BASE="$IMAGE_BASE" --build-arg VERSION="$VERSION" \
  "${ca_args[@]}" -t "$IMAGE:$TAG" -f Dockerfile . >&2
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$IMAGE:$TAG"
