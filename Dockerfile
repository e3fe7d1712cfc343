# ConvLens: one image for the API and the training worker (different commands, see docker-compose.yml).
#
#   docker build -t convlens .                                   # CPU build of torch (smaller)
#   docker build --build-arg TORCH_VARIANT=cuda -t convlens .    # CUDA build of torch: runs on GPU and CPU
#
#   docker run -p 8000:8000 convlens                             # the API (+ a local worker: no broker set)
#   docker run --gpus all --no-healthcheck -e CONVLENS_BROKER_URL=redis://host:6379/0 convlens convlens worker
#                                                                # a worker (its health is not the API's)
#
# Build arguments:
#   BASE_IMAGE            a Debian-based Python 3.11 image (default python:3.11-slim)
#   TORCH_VARIANT         cpu (default) or cuda. cuda: PyPI's torch wheel, which brings its CUDA runtime as
#                         nvidia-* wheels (several GB); the host needs only the NVIDIA driver and container
#                         toolkit. cpu: the +cpu wheel from TORCH_CPU_INDEX_URL.
#   TORCH_VERSION, TORCHVISION_VERSION   keep them equal to pyproject.toml's pins (`pip check` enforces it)
#   TORCH_CPU_INDEX_URL   where the +cpu wheels come from (empty: use the pip settings below as they are)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_FIND_LINKS, PIP_TRUSTED_HOST
#                         optional: a mirror or local wheel server for the build stage only; they are not
#                         present in the final image.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------
# deps: a virtual environment in /opt/venv with torch and the other dependencies (not the project: code-only
# changes then rebuild neither this stage nor the multi-GB layer the runtime copies from it)
FROM ${BASE_IMAGE} AS deps

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_TRUSTED_HOST

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv && pip install -q --upgrade pip 'setuptools>=68'

# torch first, in its own layer: it is most of the image and changes least often.
RUN set -eu; \
    case "$TORCH_VARIANT" in \
      cpu)  pip install ${TORCH_CPU_INDEX_URL:+--index-url "$TORCH_CPU_INDEX_URL"} \
              "torch==${TORCH_VERSION}+cpu" "torchvision==${TORCHVISION_VERSION}" ;; \
      cuda) pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" ;; \
      *)    echo "TORCH_VARIANT must be cpu or cuda, not '$TORCH_VARIANT'" >&2; exit 1 ;; \
    esac

# The other dependencies, read from pyproject.toml (rebuilt only when pyproject.toml changes).
COPY pyproject.toml /src/
RUN python -c "import tomllib; deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/requirements.txt', 'w').write('\\n'.join(d for d in deps if not d.startswith(('torch=', 'torchvision='))))" \
 && pip install -r /tmp/requirements.txt

# ---------------------------------------------------------------------------------------------------------
# wheel: the project as a wheel, built offline with the venv's setuptools
FROM deps AS wheel
COPY pyproject.toml README.md /src/
COPY models /src/models
COPY service /src/service
COPY worker /src/worker
COPY jobqueue /src/jobqueue
COPY convlens /src/convlens
RUN pip wheel --no-deps --no-build-isolation --no-index --wheel-dir /wheels /src

# ---------------------------------------------------------------------------------------------------------
# runtime: the base image, the virtual environment, a non-root user; no source tree, compilers or pip caches
FROM ${BASE_IMAGE} AS runtime

ARG TORCH_VARIANT=cpu

# The run store and the datasets are volumes in docker-compose.yml; new named volumes take this ownership.
RUN groupadd --gid 10001 convlens \
 && useradd --uid 10001 --gid convlens --home-dir /home/convlens --create-home \
      --shell /usr/sbin/nologin convlens \
 && mkdir -p /var/lib/convlens /data \
 && chown convlens:convlens /var/lib/convlens /data

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CONVLENS_HOME=/var/lib/convlens \
    CONVLENS_DATA_DIR=/data \
    CONVLENS_HOST=0.0.0.0 \
    CONVLENS_PORT=8000 \
    CONVLENS_HEALTHCHECK_PATH=/health \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
# The project (offline: its dependencies are all present), then a consistency check of the whole environment.
RUN pip install --no-deps --no-index /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && pip check \
 && python -c "import models, service, worker, jobqueue, convlens, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

LABEL org.opencontainers.image.title="convlens" \
      org.opencontainers.image.description="ConvLens API and training worker (ResNet18 on CIFAR)" \
      io.convlens.torch-variant="${TORCH_VARIANT}"

USER convlens
WORKDIR /home/convlens
EXPOSE 8000

# Liveness of the API: /health (answers without a model). Set CONVLENS_HEALTHCHECK_PATH=/ready where a model
# is always present, to mean "can serve predictions". Worker containers override this (docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s%s' % (os.environ.get('CONVLENS_PORT', '8000'), os.environ.get('CONVLENS_HEALTHCHECK_PATH', '/health')), timeout=4)"]

# The API (`convlens serve`: uvicorn on $CONVLENS_HOST:$CONVLENS_PORT). With no CONVLENS_BROKER_URL it also
# runs a local worker on the embedded file queue, so a single `docker run` is a complete install.
CMD ["convlens", "serve"]
