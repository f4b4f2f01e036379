# Two commands do everything on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
ENV_FILE ?= .env
NODES ?= 20

.PHONY: run test setup venv lint check-types unit bench bench-presence bench-ws bench-commands bench-drain clean

$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

venv: $(BIN)/.installed

setup: venv
	deploy/setup.sh $(ENV_FILE)

run: setup
	$(BIN)/rnr-gateway --env-file $(ENV_FILE) run --simulate $(NODES)

lint: venv
	$(BIN)/ruff format --check src tests bench
	$(BIN)/ruff check src tests bench

check-types: venv
	$(BIN)/mypy

test: setup lint check-types
	$(BIN)/pytest --cov --cov-report=term -p no:cacheprovider

unit: venv
	$(BIN)/pytest tests/unit -q

# hold the machine's service lock: flock /tmp/rnr-test.lock make bench [BENCH_ARGS=--quick]
bench: setup
	$(BIN)/python -m bench.ingest --env-file $(ENV_FILE) $(BENCH_ARGS)

# the consumer alone, draining a pre-filled queue: flock /tmp/rnr-test.lock make bench-drain
bench-drain: setup
	$(BIN)/python -m bench.drain --env-file $(ENV_FILE) --repeat 2 $(BENCH_ARGS)

# in-process, no services (but a quiet machine): make bench-presence [BENCH_ARGS=--quick]
bench-presence: venv
	$(BIN)/python -m bench.presence $(BENCH_ARGS)

# hold the machine's service lock: flock /tmp/rnr-test.lock make bench-ws [BENCH_ARGS=--quick]
bench-ws: setup
	$(BIN)/python -m bench.ws_fanout --env-file $(ENV_FILE) $(BENCH_ARGS)

# hold the machine's service lock: flock /tmp/rnr-test.lock make bench-commands
bench-commands: setup
	$(BIN)/python -m bench.commands --env-file $(ENV_FILE) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
