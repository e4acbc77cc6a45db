#!/bin/sh
# A Python base image for deploy/docker/Dockerfile made from Debian packages,
# for a Docker engine that cannot pull from a container registry:
#
#     deploy/docker/build-base-image.sh [TAG]        # default twistedcluster-base:bookworm
#     docker build --network host --build-arg PYTHON_IMAGE=twistedcluster-base:bookworm \
#         -f deploy/docker/Dockerfile -t twistedcluster:0.1.0 .
#
# debootstrap (minbase: Debian's python3 3.11, python3-venv and the CA
# certificates, no apt lists or package cache) into a scratch folder, this
# machine's CA bundle copied over Debian's (pip inside the build then trusts
# the package index, or the proxy in front of it, as the host does), then
# `docker import` with the environment python:3.11-slim sets.  Needs root
# (debootstrap), debootstrap, and a reachable Debian mirror.
#
# An image already tagged TAG is kept (exit 0, nothing done) unless
# REBUILD=1.  Environment: MIRROR (default http://deb.debian.org/debian),
# SUITE (bookworm), CA_BUNDLE (/etc/ssl/certs/ca-certificates.crt),
# WORKDIR (a folder for the root file system, default under TMPDIR).
# Exit status 2: something it needs is missing, nothing was done; 1: a step
# failed.
set -eu

tag=${1:-twistedcluster-base:bookworm}
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
docker=${DOCKER:-docker}

if [ "${REBUILD:-0}" != 1 ] && $docker image inspect "$tag" >/dev/null 2>&1; then
    echo "build-base-image: $tag exists (REBUILD=1 to make it again)"
    exit 0
fi
command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || {
    echo "build-base-image: debootstrap is missing (Debian: apt-get install debootstrap)" >&2
    exit 2
}
[ "$(id -u)" -eq 0 ] || { echo "build-base-image: debootstrap needs root" >&2; exit 2; }
[ -r "$bundle" ] || { echo "build-base-image: no CA bundle at $bundle" >&2; exit 2; }

work=$(mktemp -d "${WORKDIR:-${TMPDIR:-/tmp}}/twistedcluster-base.XXXXXX")
cleanup() {
    # A debootstrap that failed half-way may leave /proc or /sys mounted in
    # the new root: unmount them (deepest first), and never let rm cross
    # into another file system.
    grep -o " $work/[^ ]*" /proc/mounts 2>/dev/null | sort -r | while read -r m; do
        umount -l "$m" || true
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
rootfs=$work/rootfs

PATH=$PATH:/usr/sbin:/sbin debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates "$suite" "$rootfs" "$mirror" \
    || { echo "build-base-image: debootstrap failed" >&2; exit 1; }

cp "$bundle" "$rootfs/etc/ssl/certs/ca-certificates.crt"
# What a container image does without: the package cache and lists, logs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
    "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/debootstrap
# Nothing in the image may start services.
printf '#!/bin/sh\nexit 101\n' > "$rootfs/usr/sbin/policy-rc.d"
chmod 0755 "$rootfs/usr/sbin/policy-rc.d"

tar --numeric-owner -C "$rootfs" -c . | $docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase $suite from $mirror, python3 python3-venv ca-certificates" \
    - "$tag" \
    || { echo "build-base-image: docker import failed" >&2; exit 1; }
$docker image ls "$tag"
