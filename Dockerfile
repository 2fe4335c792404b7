# syntax=docker/dockerfile:1
#
# adsa-serve: LlamaGen image generation over HTTP with an ADSA sparse KV cache.
#
#   docker build -t adsa-serve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v /srv/llamagen:/models:ro \
#     -e ADSA_GPT_MODEL=GPT-XL -e ADSA_IMAGE_SIZE=384 \
#     -e ADSA_GPT_CKPT=/models/c2i_XL_384.pt -e ADSA_VQ_CKPT=/models/vq_ds16_c2i.pt adsa-serve:0.1.0
#
# Without ADSA_GPT_CKPT the server runs the small embedded demo model. Weights are never baked
# into the image: mount them at /models (read-only is fine). Every setting is an ADSA_* variable
# or a flag after the image name (see `docker run --rm adsa-serve:0.1.0 --help`).
#
# torch comes from PyPI: on Linux x86_64 the default wheel is the CUDA build and carries its own
# CUDA runtime (nvidia-* wheels), so the base is a plain Python image; the host needs only the
# NVIDIA driver and the NVIDIA Container Toolkit (`--gpus` / compose `capabilities: [gpu]`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with torch and the package (server extra) -----------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# compilers for any dependency that ships no wheel; they stay in this stage
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: several GB that change far less often than the source
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY adsa_core ./adsa_core
COPY server ./server
COPY loadtest ./loadtest
# EXTRAS=server,text adds the caption encoder for text-to-image checkpoints
ARG EXTRAS=server
# hadolint ignore=DL3013
RUN pip install ".[${EXTRAS}]" \
 && adsa-serve --help > /dev/null

# ---- runtime: the venv, a non-root user, no build toolchain -----------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

# Triton (behind torch.compile and the ADSA attention kernels) compiles a small launcher stub with
# the system C compiler the first time a kernel runs, and fails with "Failed to find C compiler"
# without one. So the runtime keeps gcc and the libc headers only: no make, no g++, no
# build-essential (Python.h ships with the python base image).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 adsa \
 && useradd --system --uid 10001 --gid adsa --create-home --home-dir /home/adsa --shell /usr/sbin/nologin adsa \
 && mkdir -p /models /cache \
 && chown adsa:adsa /models /cache

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    ADSA_HOST=0.0.0.0 \
    ADSA_PORT=8000 \
    ADSA_DEVICE=auto

# Weights: mount a directory here and point the server at the files, e.g.
#   ADSA_GPT_CKPT=/models/c2i_XL_384.pt  ADSA_VQ_CKPT=/models/vq_ds16_c2i.pt
VOLUME ["/models"]

USER 10001:10001
WORKDIR /home/adsa
EXPOSE 8000

# Liveness only (the process answers HTTP); readiness (weights loaded, warm) is /readyz, which
# compose and Kubernetes probe themselves. Long start period: loading and warming up take minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('ADSA_PORT', '8000'), timeout=4)"]

# SIGTERM drains: /readyz turns 503, in-flight requests finish (ADSA_DRAIN_TIMEOUT_S), then exit 0
STOPSIGNAL SIGTERM
ENTRYPOINT ["adsa-serve"]
