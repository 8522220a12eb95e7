# densemap: `make demo` runs the main job, `make test` runs the whole suite (CI runs it).
# Needs only python3 (3.10+), pip and make; everything else goes into .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CORE_STAMP := $(VENV)/.densemap-core
STAMP := $(VENV)/.densemap-installed
# The runtime extra (pyproject.toml): onnxruntime-gpu on Linux x86_64 (it runs on the CPU
# too, with identical maps), onnxruntime elsewhere. RUNTIME=cpu chooses the CPU package.
RUNTIME ?= $(if $(filter Linux-x86_64,$(shell uname -s)-$(shell uname -m)),gpu,cpu)
EXTRAS ?= $(RUNTIME),convert,train,distributed,dev

.PHONY: setup test test-fast lint protos demo bench soak sweep image clean

# The core install and its runtime (engine, server, CLI: no torch, no Ray): what `make demo`
# needs.
$(CORE_STAMP): pyproject.toml setup.py constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "installing densemap's core into $(VENV) (about 0.5 GB, a minute or two)..."
	$(BIN)/python -m pip install --progress-bar on -c constraints.txt -e '.[$(RUNTIME)]'
	touch $(CORE_STAMP)

# Everything the tests use: the converter (torch), training, Ray Data, dev tools.
$(STAMP): $(CORE_STAMP)
	@echo "installing the extras [$(EXTRAS)] for the tests (about 2 GB more)..."
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

protos: $(STAMP)
	$(BIN)/python -m densemap.service.protogen

test: $(STAMP) lint
	$(BIN)/python -m densemap.service.protogen --check
	$(BIN)/python -m pytest -q

# The edit-run loop: every test not marked slow (slow: over ~3 s on 2 cores), under a minute.
# tests/conftest.py says which folder holds what; `make test` still runs everything.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

demo: $(CORE_STAMP)
	$(BIN)/python -m models.digits.demo

bench: $(STAMP)
	$(BIN)/python -m pytest -q tests/bench -s -o python_files='bench_*.py'

# A bounded soak: DENSEMAP_SOAK_CLIENTS clients for DENSEMAP_SOAK_SECONDS per setting.
soak: $(STAMP)
	$(BIN)/python -m pytest -q tests/bench/bench_soak.py tests/bench/bench_hostile.py -s -o python_files='bench_*.py'

# The architecture sweep: torchvision classifiers converted on both paths and
# checked cell by cell. Not part of `make test` (torchvision is no dependency; files are
# named sweep_*.py). torchvision's model code is pure Python: --no-deps keeps torch as is.
sweep: $(STAMP)
	$(BIN)/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torchvision') is None)" \
		|| $(BIN)/python -m pip install -q --no-deps torchvision==0.28.0
	$(BIN)/python -m pytest -q tests/sweep -o python_files='sweep_*.py'

# The server image and the Ray image of deploy/ (needs docker, podman or buildah; CI has
# none: tests/e2e/test_image_build.py runs this where one exists). Push them where your
# cluster pulls from, and name that registry in deploy/k8s/base/kustomization.yaml.
IMAGE ?= densemap:0.1.0
RAY_IMAGE ?= densemap-ray:0.1.0
image:
	deploy/build-image.sh $(IMAGE)
	deploy/build-image.sh $(RAY_IMAGE) cluster

clean:
	rm -rf $(VENV) demo-out .pytest_cache
