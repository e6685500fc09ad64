# glomscan GPU image: NVIDIA's PyTorch container (CUDA, cuDNN, PyTorch, TensorRT 10) plus libvips
# with OpenSlide and the glomscan package. No model weights are downloaded at build or run time.
#
#   docker build -t glomscan .
#   docker run --gpus all -v /slides:/slides:ro -v /results:/results -v glomscan-engines:/engines \
#       glomscan analyze /slides --out /results
#
# nvcr.io/nvidia/pytorch:25.01-py3 = Ubuntu 24.04, Python 3.12, CUDA 12.8, PyTorch 2.6, TensorRT 10.7.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    GLOMSCAN_ENGINE_DIR=/engines

# Same installer as .ci/run (through scripts/test.sh): distribution libvips built with OpenSlide.
COPY scripts/install-system-deps.sh /tmp/install-system-deps.sh
RUN bash /tmp/install-system-deps.sh && rm -rf /var/lib/apt/lists/* /tmp/install-system-deps.sh

WORKDIR /opt/glomscan
COPY pyproject.toml README.md ./
COPY glomscan ./glomscan
# Keep the container's own torch, torchvision and TensorRT builds: pin pip to what is installed.
RUN python -m pip list --format=freeze | grep -iE '^(torch|torchvision|tensorrt[a-z_-]*)==' > /tmp/keep.txt \
 && python -m pip install --no-cache-dir -c /tmp/keep.txt ".[analysis,train]" \
 && python -c "import pyvips; assert pyvips.type_find('VipsForeignLoad', 'openslideload'), 'libvips lacks OpenSlide'" \
 && glomscan --version

# Non-root user; engines are cached on a volume so they are built once per GPU type.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin glomscan \
 && mkdir -p /engines /results \
 && chown glomscan:glomscan /engines /results
USER glomscan
VOLUME ["/engines"]
WORKDIR /results

ENTRYPOINT ["glomscan"]
CMD ["--help"]
