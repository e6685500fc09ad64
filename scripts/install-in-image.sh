#!/bin/sh
# One install step of the Dockerfile's targets (run by `RUN --mount=type=secret,id=pip_ca
# --mount=type=bind,target=/tmp/context`): glomscan from the build context into the image's venv,
# then the image's own checks. The context is mounted for that step only, so no source copy or
# build folder stays in the image.
#
#   sh /tmp/context/scripts/install-in-image.sh [--no-torch] PIP_ARGUMENTS...
#
# PIP_ARGUMENTS name the package as "/tmp/src[EXTRAS]". --no-torch: an analysis image, whose
# build fails if torch got in. Behind an HTTPS-inspecting proxy pip takes its CA from the build
# secret pip_ca (never stored in the image).
set -eu
no_torch=0
if [ "${1:-}" = --no-torch ]; then no_torch=1; shift; fi
if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi
mkdir /tmp/src
cp -r /tmp/context/pyproject.toml /tmp/context/README.md /tmp/context/glomscan /tmp/src/
pip install "$@"
if [ "$no_torch" = 1 ]; then
    python -c "import importlib.util as u, sys; sys.exit('torch must not be in the analysis image' if u.find_spec('torch') else 0)"
fi
python -c "import pyvips; assert pyvips.type_find('VipsForeignLoad', 'openslideload'), 'libvips lacks OpenSlide'"
rm -rf /tmp/src
glomscan --version
