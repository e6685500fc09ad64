#!/usr/bin/env bash
# Repeats the README's two commands on a freshly bootstrapped minimal Debian 12 (debootstrap
# minbase with git, ca-certificates and sudo only), as a non-root user with sudo, from a clone of
# this repository. Not part of CI. Needs root, debootstrap (installed if missing), a Debian
# mirror and PyPI, and about 15 GB of disk. Behind an HTTPS-inspecting proxy, export PIP_CERT
# (the proxy's CA file) first: it is copied into the chroot, as the README tells users to do.
# Usage: sudo [PIP_CERT=...] bash scripts/check-stock-debian.sh [ROOT]
set -euo pipefail
ROOT=${1:-/var/tmp/glomscan-debian12}
REPO=$(cd "$(dirname "$0")/.." && pwd)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap and chroot)" >&2; exit 2; }
command -v debootstrap > /dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
if [ ! -x "$ROOT/bin/bash" ]; then
    debootstrap --variant=minbase --include=git,ca-certificates,sudo bookworm "$ROOT" "$MIRROR"
fi
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# /dev with its sub-mounts (/dev/shm: Python's multiprocessing locks need it, /dev/pts)
for fs in proc sys dev; do
    mountpoint -q "$ROOT/$fs" || { mount --rbind "/$fs" "$ROOT/$fs" && mount --make-rslave "$ROOT/$fs"; }
done
trap 'for fs in dev sys proc; do umount -R -l "$ROOT/$fs" 2> /dev/null || true; done' EXIT
chroot "$ROOT" id tester > /dev/null 2>&1 || chroot "$ROOT" useradd -m -s /bin/bash tester
echo 'tester ALL=(ALL) NOPASSWD:ALL' > "$ROOT/etc/sudoers.d/tester"
rm -rf "$ROOT/home/tester/glomscan"
git clone -q "$REPO" "$ROOT/home/tester/glomscan"
chroot "$ROOT" chown -R tester:tester /home/tester/glomscan
cert=""
if [ -n "${PIP_CERT:-}" ]; then
    cp "$PIP_CERT" "$ROOT/etc/glomscan-pip-ca.pem"
    cert="export PIP_CERT=/etc/glomscan-pip-ca.pem;"
fi
chroot "$ROOT" su - tester -c "$cert cd glomscan && bash scripts/demo.sh && bash scripts/test.sh"
echo "stock Debian 12 check passed: $(date -u +%Y-%m-%d)"
