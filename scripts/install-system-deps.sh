#!/usr/bin/env bash
# System packages glomscan needs on Debian 12 / Ubuntu 22.04-24.04: python3 with venv, and the
# distribution's libvips built with OpenSlide. Runs as root, or as a user with sudo.
# Used by scripts/setup.sh (hence the README's two commands), .ci/run and the Dockerfile.
# Do NOT add pyvips-binary: it has no openslideload and shadows the system libvips.
# --browser also installs Chromium, which the browser tests drive headless (scripts/test.sh
# asks for it; the Docker image and analysis machines do not need it).
set -euo pipefail
BROWSER=0
if [ "${1:-}" = "--browser" ]; then BROWSER=1; fi
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" != "0" ]; then
    command -v sudo > /dev/null || { echo "run as root, or install sudo and give this user sudo rights" >&2; exit 2; }
    SUDO="sudo"
fi

have_python() { command -v python3 > /dev/null && python3 -c "import ensurepip, venv" 2> /dev/null; }
have_vips() { ldconfig -p 2> /dev/null | grep -q 'libvips\.so\.42' && ldconfig -p 2> /dev/null | grep -q 'libopenslide\.so'; }
# Playwright drives Chromium through its bundled node, which links (ldd) libatomic.so.1,
# libstdc++.so.6 and libgcc_s.so.1 besides libc: a minimal Debian 12 lacks libatomic1.
have_driver_libs() { ldconfig -p 2> /dev/null | grep -q 'libatomic\.so\.1' && ldconfig -p 2> /dev/null | grep -q 'libstdc++\.so\.6'; }
have_browser() {
    [ "$BROWSER" = 0 ] || { { command -v chromium > /dev/null || command -v chromium-browser > /dev/null; } && have_driver_libs; }
}

if have_python && have_vips && have_browser; then
    echo "python3 (with venv), libvips and OpenSlide$([ "$BROWSER" = 1 ] && echo ", Chromium") already installed"
    exit 0
fi
$SUDO apt-get update -qq
packages=(python3 python3-venv ca-certificates)
# Debian 12: libvips42; Ubuntu 24.04 renamed it libvips42t64 (64-bit time_t transition).
if apt-cache show libvips42t64 > /dev/null 2>&1; then
    packages+=(libvips42t64 libopenslide0t64)
else
    packages+=(libvips42 libopenslide0)
fi
# Debian 12: chromium; Ubuntu ships it as chromium-browser (a snap on 22.04 and later).
if ! have_browser; then
    if apt-cache show chromium > /dev/null 2>&1; then packages+=(chromium); else packages+=(chromium-browser); fi
    packages+=(libatomic1 libstdc++6 libgcc-s1)
fi
$SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}"
