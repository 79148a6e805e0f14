# Civic: `make run` runs the platform, `make test` runs the tests. Both set up what is missing.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(abspath $(VENV)/bin)
BUF := node_modules/.bin/buf
PROTOS := $(shell find proto -name '*.proto')
export PATH := $(BIN):$(PATH)

.PHONY: run stop down status test lint check-protos proto-baseline bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[local,dev]"
	# Generated protobuf modules live in gen/ (never committed); put them on the path.
	echo "$(abspath gen)" > $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/civic-gen.pth
	touch $@

gen/.stamp: $(PROTOS) $(VENV)/.installed
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I proto --python_out=gen --grpc_python_out=gen \
		--mypy_out=quiet:gen --mypy_grpc_out=quiet:gen $(PROTOS)
	touch $@

$(BUF): package.json
	npm install --no-audit --no-fund --silent
	touch $@

setup: $(VENV)/.installed gen/.stamp

run: setup
	$(PY) -m services.platform run

# Before the first `make run` there is nothing to stop or show: said, and not an error.
stop down: setup
	$(PY) -m services.platform stop
	@if [ -d .civic/dev ]; then $(PY) -m infra.local down --env dev; \
	else echo "the local servers were never started (make run starts them)"; fi

status: setup
	@if [ -d .civic/dev ]; then $(PY) -m infra.local status --env dev; \
	else echo "the local servers were never started (make run starts them)"; fi

lint: setup $(BUF)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services infra tests bench
	$(BUF) lint proto

# Published messages change only compatibly: compare with the committed baseline image.
check-protos: $(BUF)
	$(BUF) breaking proto --against proto/baseline.binpb

# Run when a compatible change to the protos is released: it becomes the new baseline.
proto-baseline: $(BUF) check-protos
	$(BUF) build proto --exclude-source-info -o proto/baseline.binpb

test: setup lint check-protos
	$(PY) -m pytest -q

bench: setup
	@set -e; for script in bench/*.py; do echo "== $$script"; $(PY) -m bench.$$(basename $$script .py); done

clean:
	rm -rf gen .pytest_cache .mypy_cache .ruff_cache
