# binserve image: Gunicorn serving the default MiniLM (inside the image, no network needed).
#   CPU (default):  docker build -t binserve .
#   CUDA:           docker build --build-arg TORCH_VARIANT=cu126 -t binserve:cuda .
#                   (torch's CUDA wheels bring the CUDA libraries; the host needs the NVIDIA driver
#                   and container toolkit: docker run --gpus all ...)
#   Run:            docker run -p 8000:8000 binserve

FROM python:3.11-slim-bookworm AS build
ARG TORCH_VARIANT=cpu
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements.txt /tmp/requirements.txt
# torch first, from the index of the wanted build; then the runtime part of requirements.txt
# (everything above its "# --- dev" line), whose torch==2.13.0 pin the installed wheel satisfies.
RUN pip install --no-cache-dir "torch==2.13.0" --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
    && sed '/^# --- dev/,$d' /tmp/requirements.txt > /tmp/runtime.txt \
    && pip install --no-cache-dir -r /tmp/runtime.txt

FROM python:3.11-slim-bookworm
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    BINSERVE_HOST=0.0.0.0 \
    BINSERVE_PORT=8000 \
    BINSERVE_MODEL_REPOSITORY=/models
RUN useradd --create-home --uid 10001 binserve \
    && mkdir -p /models \
    && chown binserve /models
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY *.py ./
COPY models/ ./models/
USER 10001
EXPOSE 8000
VOLUME ["/models"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "server:app"]
