# densemap: `make demo` runs the main job, `make test` runs the whole suite (CI runs it).
# Needs only python3 (3.10+), pip and make; everything else goes into .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.densemap-installed
EXTRAS ?= convert,train,distributed,dev

.PHONY: setup test lint protos demo bench soak clean

$(STAMP): pyproject.toml setup.py constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

protos: $(STAMP)
	$(BIN)/python -m service.protogen

test: $(STAMP) lint
	$(BIN)/python -m service.protogen --check
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/python -m models.digits.demo

bench: $(STAMP)
	$(BIN)/python -m pytest -q tests/bench -s -o python_files='bench_*.py'

# A bounded soak (issue 11): DENSEMAP_SOAK_CLIENTS clients for DENSEMAP_SOAK_SECONDS per setting.
soak: $(STAMP)
	$(BIN)/python -m pytest -q tests/bench/bench_soak.py -s -o python_files='bench_*.py'

clean:
	rm -rf $(VENV) demo-out .pytest_cache
