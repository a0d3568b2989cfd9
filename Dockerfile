# binserve image: Gunicorn serving the default MiniLM (inside the image, no network needed).
#   CPU (default):  docker build -t binserve:0.3.0 .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu126 -t binserve:0.3.0-cuda .
#                   (torch's CUDA wheels bring the CUDA libraries; the host needs the NVIDIA driver
#                   and container toolkit: docker run --gpus all ...)
#   Offline:        bash deploy/build-image.sh   (a base image made with debootstrap, and wheels
#                   downloaded on the host into wheels/: what CI does where no registry is reachable)
#   Run:            docker run --read-only --tmpfs /tmp -p 8000:8000 binserve:0.3.0
#
# BASE_IMAGE is any Debian bookworm image with python3 and python3-venv; both stages use it, so the
# virtualenv copied into the runtime stage finds the same interpreter.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# wheels/ holds a wheelhouse when building offline (deploy/build-image.sh fills it); it may be empty.
COPY requirements.txt wheels/ /tmp/build/
SHELL ["/bin/sh", "-eu", "-c"]
# requirements.txt is the runtime alone (tests and linters are in requirements-dev.txt). torch comes from the
# wheelhouse when there is one, else from the PyTorch index of the wanted build (cpu, cu126, ...).
RUN python3 -m venv /opt/venv \
    && if ls /tmp/build/*.whl >/dev/null 2>&1; then \
         /opt/venv/bin/pip install --no-index --find-links /tmp/build -r /tmp/build/requirements.txt; \
       else \
         /opt/venv/bin/pip install "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
         && /opt/venv/bin/pip install -r /tmp/build/requirements.txt; \
       fi \
    && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
    && rm -rf /tmp/build

FROM ${BASE_IMAGE}
# The image has no C++ compiler, which torch.compile's Inductor needs: trying it would only delay every load.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/tmp/huggingface \
    BINSERVE_HOST=0.0.0.0 \
    BINSERVE_PORT=8000 \
    BINSERVE_MODEL_REPOSITORY=/models \
    BINSERVE_TORCH_COMPILE=false \
    PROMETHEUS_MULTIPROC_DIR=/tmp/metrics
RUN useradd --create-home --uid 10001 binserve \
    && mkdir -p /models /status \
    && chown binserve /models /status
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY *.py ./
COPY models/ ./models/
COPY binserve/ ./binserve/
USER 10001
EXPOSE 8000 9000
VOLUME ["/models", "/status"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "server:app"]
