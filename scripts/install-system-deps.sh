#!/usr/bin/env bash
# System libraries glomscan needs: libvips (built with OpenSlide) from the distribution.
# Used by .ci/run, `make system-deps` and the Dockerfile, so all three install the same way.
# Do NOT add pyvips-binary: it has no openslideload and shadows the system libvips.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

if ldconfig -p | grep -q 'libvips\.so\.42' && ldconfig -p | grep -q 'libopenslide\.so'; then
    echo "libvips and OpenSlide already installed"
    exit 0
fi
$SUDO apt-get update -qq
# Debian 12: libvips42; Ubuntu 24.04 renamed it libvips42t64 (64-bit time_t transition).
if apt-cache show libvips42t64 >/dev/null 2>&1; then
    $SUDO apt-get install -y -qq --no-install-recommends libvips42t64 libopenslide0t64 || \
    $SUDO apt-get install -y -qq --no-install-recommends libvips42t64
else
    $SUDO apt-get install -y -qq --no-install-recommends libvips42 libopenslide0
fi
