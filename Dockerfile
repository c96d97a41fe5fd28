# syntax=docker/dockerfile:1
# ggserve image: a build stage compiles llama-cpp-python into wheels (deploy/build-wheels.sh), a
# runtime stage installs them with no compiler. Models are mounted at /models, never baked in.
#
#   docker build -t ggserve:cuda .                          # NVIDIA GPUs (CUDA 12.8)
#   docker build --build-arg VARIANT=cpu -t ggserve:cpu .   # CPU only (portable AVX2 build)
#
# VARIANT: cuda | cpu. CUDA_ARCHITECTURES (cuda only): the GPU generations compiled in, as
# CMake's compute capabilities: 75 Turing (T4), 80 Ampere (A100), 86 Ampere (A10, RTX 30),
# 89 Ada (L4, L40S, RTX 40), 90 Hopper (H100, H200), 120 Blackwell (RTX 50, RTX PRO 6000).
# Naming only yours (e.g. "90") makes the build several times faster.
#
# llama.cpp is built with its RPC backend (GGML_RPC, deploy/build-wheels.sh), and the image
# carries its worker, /opt/ggserve/bin/ggml-rpc-server, for models split across machines
# (README "Across machines"; the worker has no authentication: private networks only).
ARG VARIANT=cuda

FROM nvidia/cuda:12.8.1-devel-ubuntu24.04 AS builder-cuda
FROM ubuntu:24.04 AS builder-cpu
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS runtime-cuda
FROM ubuntu:24.04 AS runtime-cpu

# The base images are the tagged stages above (hadolint cannot see through the variable).
# hadolint ignore=DL3006
FROM builder-${VARIANT} AS builder
ARG VARIANT
ARG CUDA_ARCHITECTURES="75;80;86;89;90;120"
# Every tool is pinned to the upstream version Ubuntu 24.04 ships (security updates only).
# ca-certificates is not: it is the trust store, and its version moves with each CA update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3=3.12.* python3-venv=3.12.* python3-dev=3.12.* \
        build-essential=12.10* cmake=3.28.* ninja-build=1.11.* git=1:2.43.* ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, in their own layer: compiling llama.cpp (CUDA: tens of minutes) is redone
# only when pyproject.toml changes, not with every change to the code.
COPY pyproject.toml ./
COPY deploy/build-wheels.sh deploy/build-rpc-server.sh deploy/
RUN deploy/build-wheels.sh "$VARIANT" /wheels deps
COPY README.md ./
COPY server/ server/
RUN deploy/build-wheels.sh "$VARIANT" /wheels app

# hadolint ignore=DL3006
FROM runtime-${VARIANT} AS runtime
# libgomp1: llama.cpp's CPU backend (in both variants) uses OpenMP.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3=3.12.* python3-venv=3.12.* libgomp1=14* \
    && rm -rf /var/lib/apt/lists/*
# The wheels are bind-mounted, not copied: they never become a layer of the image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=deploy/install-runtime.sh,target=/usr/local/bin/install-runtime.sh \
    install-runtime.sh /wheels /opt/ggserve
COPY templates/ /etc/ggserve/templates/
COPY models.yaml /etc/ggserve/models.yaml
RUN groupadd --system --gid 10001 ggserve \
    && useradd --no-log-init --system --uid 10001 --gid 10001 --no-create-home \
        --shell /usr/sbin/nologin ggserve
USER 10001:10001
# The repository's models.yaml is the full catalogue; its default (smollm2) lives in a Python
# package this image does not carry: mount a registry over /etc/ggserve/models.yaml (example:
# deploy/models.yaml) or set GGSERVE_DEFAULT_MODEL to an entry whose GGUF is under /models.
# Repo entries resolve to /models/<org>--<repo>/<file>.
ENV GGSERVE_HOST=0.0.0.0 \
    GGSERVE_MODELS_FILE=/etc/ggserve/models.yaml \
    GGSERVE_TEMPLATES_DIR=/etc/ggserve/templates \
    GGSERVE_MODELS_DIR=/models \
    GGSERVE_LOG_FORMAT=json \
    GGSERVE_DRAIN_S=5 \
    PYTHONDONTWRITEBYTECODE=1
VOLUME /models
EXPOSE 8000
# /health answers once the default model is loaded: a large model needs the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["/opt/ggserve/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('GGSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["/opt/ggserve/bin/ggserve"]
