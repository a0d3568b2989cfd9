# The two set-up commands of README.md: `make serve` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 0
IMAGE ?= binserve:0.3.0

.PHONY: install serve test bench-protocol bench-serve bench-plan bench-policy bench-ab bench-fanout bench-generate bench-soak bench-images gpu-check gpu-check-prepare lint load image docker-test replicas-test

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@# A CUDA torch from the registry would pull multi-GB nvidia-* wheels; the pin must give the CPU wheel.
	@if $(PY) -m pip list 2>/dev/null | grep -i '^nvidia-'; then echo "nvidia-* packages were installed: torch did not resolve to the CPU wheel" >&2; exit 1; fi
	touch $@

install: $(VENV)/.installed

serve: install
	$(PY) server.py --host $(HOST) --port $(PORT) --workers $(WORKERS)

test: install
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check .
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/kubernetes-validate --strict --quiet deployment.yaml

bench-protocol: install
	$(PY) -m bench.protocol

bench-serve: install
	$(PY) -m bench.serve_bench

bench-plan: install
	$(PY) -m bench.plan_bench

bench-policy: install
	$(PY) -m bench.policy_bench

# Two server configurations interleaved: make bench-ab AB_ARGS="--b env.GOMP_SPINCOUNT=300000"
bench-ab: install
	$(PY) -m bench.ab_bench $(AB_ARGS)

bench-fanout: install
	$(PY) -m bench.fanout_bench

bench-generate: install
	$(PY) -m bench.generate_bench

# Worker RSS over a 100k-request soak of one server (bench/soak_bench.py)
bench-soak: install
	$(PY) -m bench.soak_bench --requests 100000

# The raw vision model vs binserve with 640x480 JPEGs (binary and base64 JSON), decode cost (bench/image_bench.py)
bench-images: install
	$(PY) -m bench.image_bench

# The GPU check (bench/gpu_check.sh): prepare here (wheels and MiniLM's small files into .gpu-carry/),
# then run `bash bench/gpu_check.sh` on the GPU machine with .gpu-carry beside it; GPU_CHECK_ARGS=--cpu-dry-run
# runs every step on the CPU (make test does).
gpu-check-prepare: install
	PYTHON=$(PY) bash bench/gpu_check.sh --prepare

gpu-check: install
	PYTHON=$(PY) bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

# Locust against a running server (make serve in another terminal); add LOCUST_ARGS=--headless ...
load: install
	$(VENV)/bin/locust -f locustfile.py --host http://$(HOST):$(PORT) $(LOCUST_ARGS)

# The container image, built without a registry (debootstrap base + host wheelhouse; see README).
image: install
	PYTHON=$(PY) bash deploy/build-image.sh $(IMAGE)

# Build the image, then run it as users do: tests/container (needs a running Docker daemon).
docker-test: image
	BINSERVE_IMAGE=$(IMAGE) $(PY) -m pytest -p no:cacheprovider tests/container

# Three replicas of the image behind HAProxy under load: rolling restart, SIGKILL, reload
# (tests/replicas; needs Docker and Debian's haproxy).
replicas-test: image
	BINSERVE_IMAGE=$(IMAGE) $(PY) -m pytest -p no:cacheprovider -s tests/replicas
