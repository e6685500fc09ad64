# syntax=docker/dockerfile:1
# glomscan images, all on Debian 12 slim with the distribution's libvips (built with OpenSlide):
#
#   gpu    (the default target) GPU analysis without torch: TensorRT and ONNX Runtime's CUDA
#          provider, CUDA 12 user-space libraries from NVIDIA's wheels on PyPI, the driver from
#          the host (NVIDIA container toolkit). TensorRT's libraries come from pypi.nvidia.com;
#          --build-arg WITH_TENSORRT=0 leaves TensorRT out (ONNX Runtime CUDA only).
#   cpu    analysis on CPUs: OpenVINO and ONNX Runtime, no CUDA, no torch.
#   train  torch with CUDA and segmentation-models-pytorch, for `glomscan train`.
#
#   docker build -t glomscan .                      (or --target cpu / --target train)
#   docker run --gpus all -v /slides:/slides:ro -v /results:/results -v glomscan-engines:/engines \
#       glomscan analyze /slides --out /results
#
# No model weights are downloaded at build or run time: the shipped model is in the package.
# Behind an HTTPS-inspecting proxy, give pip its CA as a build secret (never stored in the image):
#   docker build --secret id=pip_ca,src=/path/to/proxy-ca.pem ...
# The package is installed from the build context mounted for that step only, by
# scripts/install-in-image.sh (the same steps and checks for every target), so no source copy or
# build folder stays in the image.
# scripts/check-images.sh builds and checks these (docker, else buildah; docs/backends.md).
ARG DEBIAN_IMAGE=debian:12-slim

FROM ${DEBIAN_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    GLOMSCAN_ENGINE_DIR=/engines \
    VIRTUAL_ENV=/opt/glomscan/venv \
    PATH=/opt/glomscan/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Same installer as .ci/run and the README's commands: python3 with venv, libvips with OpenSlide.
COPY scripts/install-system-deps.sh /tmp/install-system-deps.sh
RUN bash /tmp/install-system-deps.sh && apt-get clean && rm -rf /var/lib/apt/lists/* /tmp/install-system-deps.sh \
 && python3 -m venv "$VIRTUAL_ENV" \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin glomscan \
 && mkdir -p /engines /results && chown glomscan:glomscan /engines /results
# Engines (ONNX exports, OpenVINO caches, TensorRT engines) on a volume: built once per GPU type.
VOLUME ["/engines"]
WORKDIR /results
HEALTHCHECK CMD ["glomscan", "--version"]
ENTRYPOINT ["glomscan"]
CMD ["--help"]

FROM base AS cpu
RUN --mount=type=secret,id=pip_ca --mount=type=bind,target=/tmp/context \
    sh /tmp/context/scripts/install-in-image.sh --no-torch "/tmp/src[analysis]"
USER glomscan

FROM base AS train
# torch, torchvision and segmentation-models-pytorch in one pip command, so pip never pulls a
# second torch build (PyPI's Linux torch 2.14 wheels carry CUDA 13: NVIDIA driver 580 or newer).
RUN --mount=type=secret,id=pip_ca --mount=type=bind,target=/tmp/context \
    sh /tmp/context/scripts/install-in-image.sh \
        torch==2.14.1 torchvision==0.29.1 "segmentation-models-pytorch>=0.3.3" "/tmp/src[analysis,train]"
USER glomscan

FROM base AS gpu
ARG WITH_TENSORRT=1
ARG TENSORRT_INDEX=https://pypi.nvidia.com
RUN --mount=type=secret,id=pip_ca --mount=type=bind,target=/tmp/context \
    if [ "$WITH_TENSORRT" = 1 ]; then \
        sh /tmp/context/scripts/install-in-image.sh --no-torch --extra-index-url "$TENSORRT_INDEX" "/tmp/src[gpu]"; \
    else \
        sh /tmp/context/scripts/install-in-image.sh --no-torch "/tmp/src[cuda]"; \
    fi
USER glomscan
