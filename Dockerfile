# ConceptGuard service image.
#
# Serving (default): docker build -t conceptguard:0.1.0 .
#   the serving set only: ONNX Runtime on the CPU, no torch, no offline packages
# + torch backend:   --build-arg EXTRAS=torch        (CONCEPTGUARD_BACKEND=torch)
# + offline job:     --build-arg EXTRAS=offline      (conceptguard build-bank ... in the image)
# CUDA variant:      docker build -t conceptguard:0.1.0-cuda \
#                      --build-arg EXTRAS=gpu .
#   onnxruntime-gpu 1.31 from PyPI is built for CUDA 13 + cuDNN 9 (their pip wheels come with
#   it); with torch too, take torch from the CUDA 13 index so both share CUDA 13:
#      --build-arg EXTRAS=gpu,torch --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
#   Run with `--gpus all` / the NVIDIA device plugin (driver >= 580) and CONCEPTGUARD_DEVICE=cuda:
#   the service then refuses to start if the session falls back to the CPU.
#
# Runtime knobs (all env): CONCEPTGUARD_WORKERS (uvicorn worker processes), CONCEPTGUARD_HOST,
# CONCEPTGUARD_HTTP_PORT, CONCEPTGUARD_LOG_LEVEL (read by the entrypoint) and every
# CONCEPTGUARD_* setting of the service (CONCEPTGUARD_BANK, _BACKEND, _DEVICE, _MAX_BATCH_SIZE,
# _MAX_WAIT_MS, _QUEUE_SIZE, _ADMIN_TOKEN, ...). See deploy/README.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: a virtual environment in /opt/venv with torch, the dependencies and the package
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

# cpu: https://download.pytorch.org/whl/cpu ; CUDA 13 (matches onnxruntime-gpu): .../whl/cu130
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
# comma-separated extras of the package: empty = the serving set; "torch" adds the torch
# backend, "offline" the offline job (with torch); "gpu" swaps onnxruntime for onnxruntime-gpu
ARG EXTRAS=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:${PATH}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
RUN python -m venv /opt/venv

# 1) torch + torchvision from the PyTorch index, only for extras that need torch (the largest
#    layer; changes only with the args). The constraints file keeps the later PyPI resolution
#    from replacing them; it is empty for the serving set.
RUN case ",${EXTRAS}," in \
      *,torch,*|*,offline,*|*,dev,*) \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" \
            "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
        && printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" \
            > /opt/torch-constraints.txt ;; \
      *) : > /opt/torch-constraints.txt ;; \
    esac

# 2) the other dependencies, resolved from pyproject.toml alone (empty stub packages), so this
#    layer stays cached while only source code changes.
COPY pyproject.toml README.md ./
RUN mkdir -p conceptguard offline service \
 && touch conceptguard/__init__.py offline/__init__.py service/__init__.py \
 && pip install --no-cache-dir --constraint /opt/torch-constraints.txt ".${EXTRAS:+[${EXTRAS}]}" \
 && case ",${EXTRAS}," in \
      *,gpu,*) \
        ort_version="$(pip show onnxruntime-gpu | sed -n 's/^Version: //p')" \
        && pip uninstall -y onnxruntime \
        && pip install --no-cache-dir --no-deps --force-reinstall "onnxruntime-gpu==${ort_version}" ;; \
      *) ;; \
    esac \
 && rm -rf build ./*.egg-info

# 3) the package itself (no dependency resolution: step 2 did it)
COPY conceptguard/ conceptguard/
COPY offline/ offline/
COPY service/ service/
RUN pip install --no-cache-dir --no-deps --force-reinstall . \
 && python -c "import conceptguard, offline.cli, service.app, service.grpc_server"

# ---------------------------------------------------------------------------------------------
# runtime: slim Python + the venv + the bank, as a non-root user
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ENV VIRTUAL_ENV=/opt/venv \
    PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    XDG_CACHE_HOME=/tmp/.cache \
    CONCEPTGUARD_BANK=/app/banks/demo \
    CONCEPTGUARD_BACKEND=onnx \
    CONCEPTGUARD_DEVICE=auto \
    CONCEPTGUARD_HOST=0.0.0.0 \
    CONCEPTGUARD_HTTP_PORT=8000 \
    CONCEPTGUARD_GRPC_PORT=8001 \
    CONCEPTGUARD_GRPC_HOST=0.0.0.0 \
    CONCEPTGUARD_WORKERS=1 \
    CONCEPTGUARD_LOG_LEVEL=info \
    PROMETHEUS_MULTIPROC_DIR=/run/conceptguard/metrics

# fixed numeric ids: Kubernetes' runAsNonRoot can only verify a numeric USER
RUN groupadd --system --gid 10001 conceptguard \
 && useradd --system --uid 10001 --gid conceptguard --home-dir /home/conceptguard \
        --create-home --shell /usr/sbin/nologin conceptguard \
 && mkdir -p "${PROMETHEUS_MULTIPROC_DIR}" \
 && chown conceptguard:conceptguard "${PROMETHEUS_MULTIPROC_DIR}"

WORKDIR /app

COPY --from=builder /opt/venv /opt/venv
COPY --chmod=0755 deploy/docker/entrypoint.sh /usr/local/bin/conceptguard-entrypoint
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/conceptguard-healthcheck
COPY pyproject.toml README.md ./
COPY configs/ configs/
COPY banks/ banks/

USER 10001:10001

# 8000: HTTP (v1, v2 REST, /metrics); 8001: Open Inference Protocol gRPC
EXPOSE 8000 8001

# no curl in slim images: a stdlib urllib probe of /v2/health/ready
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "/usr/local/bin/conceptguard-healthcheck", "ready"]

# the entrypoint empties PROMETHEUS_MULTIPROC_DIR, then runs `conceptguard serve` from the env
ENTRYPOINT ["conceptguard-entrypoint"]
CMD ["serve"]
