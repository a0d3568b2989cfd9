# The two set-up commands of README.md: `make serve` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000
WORKERS ?= 0
IMAGE ?= binserve:0.3.0
# the examples server's admin token (it listens on HOST, 127.0.0.1 by default; set your own elsewhere)
ADMIN_TOKEN ?= s3cret

.PHONY: install install-dev openvino-genai serve examples serve-examples test bench-protocol bench-serve bench-core bench-plan bench-policy bench-ab bench-fanout bench-generate bench-backends bench-soak bench-images bench-classify gpu-check gpu-check-prepare lint load image docker-test replicas-test

# The server's runtime (requirements.txt), then, for the tests, load tests and linters, requirements-dev.txt.
# pip prints what it collects and installs; a fresh machine takes a few minutes (torch is the largest).
$(VENV)/.installed: requirements.txt pyproject.toml
	@echo "== binserve: installing the server's requirements (requirements.txt) into $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar off -r requirements.txt
	@# this checkout itself, editable (`pip install -e .`): the `binserve` and `encoder-server` commands
	$(PY) -m pip install --progress-bar off --no-deps --no-build-isolation -e .
	@# A CUDA torch from the registry would pull multi-GB nvidia-* wheels; the pin must give the CPU wheel.
	@if $(PY) -m pip list 2>/dev/null | grep -i '^nvidia-'; then echo "nvidia-* packages were installed: torch did not resolve to the CPU wheel (README: Set up)" >&2; exit 1; fi
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed $(VENV)/.installed-openvino requirements-dev.txt
	@echo "== binserve: installing the test, load-test and lint tools (requirements-dev.txt) into $(VENV)"
	$(PY) -m pip install --progress-bar off -r requirements-dev.txt
	touch $@

# OpenVINO GenAI for generation on the CPU (README: Generation backends): the engine into .venv, and the
# environment that exports models for it (.venv-ovexport: optimum-intel pins its own transformers).
OVEXPORT := .venv-ovexport
$(VENV)/.installed-openvino: $(VENV)/.installed requirements-openvino.txt requirements-ovexport.txt
	@echo "== binserve: installing OpenVINO GenAI (requirements-openvino.txt) and its export environment ($(OVEXPORT))"
	$(PY) -m pip install --progress-bar off -r requirements-openvino.txt
	test -x $(OVEXPORT)/bin/python || $(PYTHON) -m venv $(OVEXPORT)
	$(OVEXPORT)/bin/python -m pip install --quiet --upgrade pip
	$(OVEXPORT)/bin/python -m pip install --progress-bar off -r requirements-ovexport.txt
	@# optimum-intel pulls a torchvision built for another torch; nothing of the export needs it, and it breaks `import transformers`
	$(OVEXPORT)/bin/python -m pip uninstall --yes --quiet torchvision
	@if $(OVEXPORT)/bin/python -m pip list 2>/dev/null | grep -i '^nvidia-'; then echo "nvidia-* packages in $(OVEXPORT): torch did not resolve to the CPU wheel" >&2; exit 1; fi
	touch $@

install: $(VENV)/.installed

openvino-genai: $(VENV)/.installed-openvino

install-dev: $(VENV)/.installed-dev

serve: install
	$(PY) server.py --host $(HOST) --port $(PORT) --workers $(WORKERS) $(ARGS)

# Every example model the README calls (models/examples/), then a server of all of them: MiniLM (the
# default), topics, toxicity, lm, pets; /update_model with ADMIN_TOKEN, path imports from ./incoming.
examples: install
	$(PY) -m models.examples

serve-examples: examples
	$(PY) server.py --host $(HOST) --port $(PORT) --workers $(WORKERS) --models "$$($(PY) -m models.examples --spec)" \
		--admin-token $(ADMIN_TOKEN) --import-root incoming $(ARGS)

test: install-dev
	$(PY) -m pytest

lint: install-dev
	$(PY) -m ruff check .
	$(VENV)/bin/hadolint Dockerfile
	$(VENV)/bin/kubernetes-validate --strict --quiet deployment.yaml

bench-protocol: install-dev
	$(PY) -m bench.protocol

bench-serve: install-dev
	$(PY) -m bench.serve_bench

# binserve's own cost per request, stage by stage, against its budgets, in one process (bench/core_bench.py)
bench-core: install-dev
	$(PY) -m bench.core_bench

bench-plan: install-dev
	$(PY) -m bench.plan_bench

bench-policy: install-dev
	$(PY) -m bench.policy_bench

# Two server configurations interleaved: make bench-ab AB_ARGS="--b env.GOMP_SPINCOUNT=300000"
bench-ab: install-dev
	$(PY) -m bench.ab_bench $(AB_ARGS)

# Document 000's capability batching against its traditional execution (bench/classify_bench.py)
bench-classify: install-dev
	$(PY) -m bench.classify_bench

bench-fanout: install-dev
	$(PY) -m bench.fanout_bench

bench-generate: install-dev
	$(PY) -m bench.generate_bench

# generation backends like for like (EOS on, token ids counted): transformers generate, the loop, OpenVINO GenAI
bench-backends: install-dev
	$(PY) -m bench.backends_bench $(ARGS)

# Worker RSS and PSS over a 100k-request soak of one server (bench/soak_bench.py); ARGS="--varied ..." sends
# 1-16 texts of 25-250 tokens a request instead of one short text
bench-soak: install-dev
	$(PY) -m bench.soak_bench --requests 100000 $(ARGS)

# The raw vision model vs binserve with 640x480 JPEGs (binary and base64 JSON), decode cost (bench/image_bench.py)
bench-images: install-dev
	$(PY) -m bench.image_bench

# The GPU check (bench/gpu_check.sh): prepare here (wheels and MiniLM's small files into .gpu-carry/),
# then run `bash bench/gpu_check.sh` on the GPU machine with .gpu-carry beside it; GPU_CHECK_ARGS=--cpu-dry-run
# runs every step on the CPU (make test does).
gpu-check-prepare: install-dev
	PYTHON=$(PY) bash bench/gpu_check.sh --prepare

gpu-check: install-dev
	PYTHON=$(PY) bash bench/gpu_check.sh $(GPU_CHECK_ARGS)

# Locust against a running server (make serve in another terminal); add LOCUST_ARGS=--headless ...
load: install-dev
	@echo "== locust against http://$(HOST):$(PORT) (make load HOST=... PORT=... for another server)"
	$(VENV)/bin/locust -f locustfile.py --host http://$(HOST):$(PORT) $(LOCUST_ARGS)

# The container image, built without a registry (debootstrap base + host wheelhouse; see README).
image: install-dev
	PYTHON=$(PY) bash deploy/build-image.sh $(IMAGE)

# Build the image, then run it as users do: tests/container (needs a running Docker daemon).
docker-test: image
	BINSERVE_IMAGE=$(IMAGE) $(PY) -m pytest -p no:cacheprovider tests/container

# Three replicas of the image behind HAProxy under load: rolling restart, SIGKILL, reload
# (tests/replicas; needs Docker and Debian's haproxy).
replicas-test: image
	BINSERVE_IMAGE=$(IMAGE) $(PY) -m pytest -p no:cacheprovider -s tests/replicas
