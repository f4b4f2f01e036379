# Two commands do everything on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
ENV_FILE ?= .env
NODES ?= 20

.PHONY: run test setup venv lint check-types unit bench bench-presence bench-ws bench-commands bench-drain bench-soak bench-prune clean

# A failed `python -m venv` (Debian without python3-venv) leaves .venv/bin/python without
# pip behind: pip is the mark of a usable venv, and a broken one is made again.
$(BIN)/.installed: pyproject.toml
	@test -x $(BIN)/pip || { rm -rf $(VENV) && $(PY) -m venv $(VENV); } || { \
	  rm -rf $(VENV); \
	  echo "make: cannot create $(VENV) with $(PY): on Debian its venv module comes with python3-venv; run:" >&2; \
	  echo "  sudo apt-get update && sudo apt-get install -y python3-venv" \
	    "(for $(PY): $$($(PY) -c 'import sys; print("python3.%d-venv" % sys.version_info[1])'))" >&2; \
	  exit 1; }
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
	@# the firmware's node logic (firmware_node.py, untyped for MicroPython) against its types
	$(BIN)/python -m mypy.stubtest rnr_gateway.firmware_node

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

# memory and errors under a steady fleet: flock /tmp/rnr-test.lock make bench-soak [BENCH_ARGS="--minutes 30"]
bench-soak: setup
	$(BIN)/python -m bench.soak --env-file $(ENV_FILE) $(BENCH_ARGS)

# a retention pass over 1 000 000 old readings: flock /tmp/rnr-test.lock make bench-prune
bench-prune: setup
	$(BIN)/python -m bench.prune --env-file $(ENV_FILE) $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
