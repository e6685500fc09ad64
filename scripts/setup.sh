#!/usr/bin/env bash
# Everything glomscan needs, on a stock Debian 12 / Ubuntu machine (root, or a user with sudo):
# system packages (scripts/install-system-deps.sh), then a virtual environment in .venv with
# glomscan and its Python packages. Downloads about 3 GB and needs about 7 GB of disk (the venv
# measures 6.2 GB): PyPI's torch for Linux is the CUDA build with its CUDA libraries. Safe to rerun: the venv is rebuilt only when pyproject.toml
# changed. Behind an HTTPS-inspecting proxy, point pip at the proxy's CA certificate first:
#   export PIP_CERT=/path/to/proxy-ca.pem   (and HTTPS_PROXY=http://proxy:port if needed)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# torch is pinned in the same pip command as segmentation-models-pytorch, so pip never pulls a
# second (multi-GB) torch build.
TORCH="torch==2.14.1 torchvision==0.29.1"
export PIP_DISABLE_PIP_VERSION_CHECK=1

bash scripts/install-system-deps.sh
stamp="$VENV/.installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
if [ "$free_kb" -lt $((7 * 1024 * 1024)) ]; then
    echo "warning: $((free_kb / 1024 / 1024)) GiB free here; the environment needs about 7 GiB" >&2
fi
echo "creating $VENV (downloads about 3 GB: torch with its CUDA libraries; a few minutes)"
"$PYTHON" -m venv "$VENV"
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q $TORCH -e ".[analysis,train,test]"
"$VENV/bin/python" -c "import pyvips; assert pyvips.type_find('VipsForeignLoad', 'openslideload') != 0, 'libvips without OpenSlide'"
echo "$want" > "$stamp"
