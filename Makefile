# Set-up is two commands: `make run` (demo: scale-to-zero apps woken, webhooks queued), `make test`.
# Everything installs into ./.venv; nothing global except Debian's redis-server, chromium
# and valgrind (scripts/ensure-redis, -chromium, -valgrind; only when running as root).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Extra arguments for `edge run` in `make run`, e.g. make run ARGS="--log-level debug"
ARGS   ?=

export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv install install-test install-bench redis chromium valgrind lint fmt test fuzz soak run bench cost stampede clean

help:
	@echo "make run     the demo: edge :8080 (admin :9090), local control plane :9400, private"
	@echo "             redis-server under .run/ (memory:// and no queueing without it); apps asleep"
	@echo "             until woken (hello; shop queues Stripe webhooks), static on :9001; prints"
	@echo "             what to try. Ports: EDGE_PORT ADMIN_PORT CONTROL_PORT STATIC_PORT REDIS_PORT"
	@echo "make test    ruff check, ruff format --check, pytest (needs redis-server, chromium, valgrind)"
	@echo "make bench   throughput comparison -> bench/results/throughput.json"
	@echo "make cost    instructions per request under callgrind -> bench/results/hot_path_cost.json"
	@echo "make stampede  locust wake stampede + fleet wake reports -> bench/results/stampede-*/"
	@echo "make fuzz    hostile byte streams at the front, a long soak (FUZZ_EXAMPLES=5000)"
	@echo "make soak    the fault suite (tests/faults) 5 times over, then make fuzz"
	@echo "make lint    ruff check + ruff format --check"
	@echo "make fmt     ruff format + ruff check --fix"
	@echo "make venv    create .venv only"
	@echo "make clean   remove .venv and caches"

# --- virtualenv and installs -------------------------------------------------

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required, found " + sys.version.split()[0] + " (set PYTHON=...)")'
	@if ! $(PYTHON) -m venv $(VENV); then \
	    rm -rf $(VENV); \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	        echo "python3 -m venv failed; installing Debian's python3-venv"; \
	        DEBIAN_FRONTEND=noninteractive apt-get update -qq; \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv </dev/null; \
	        $(PYTHON) -m venv $(VENV); \
	    else \
	        echo "python3 -m venv failed: install the venv module (Debian: sudo apt-get install python3-venv)" >&2; \
	        exit 1; \
	    fi; \
	fi

venv: $(BIN)/python

# Each stamp is redone when pyproject.toml is newer than it (or the venv is new).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,bench]'
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-bench: $(VENV)/.installed-bench

redis:
	@bash scripts/ensure-redis

# The gallery page is tested in headless chromium (tests/browser.py).
chromium:
	@bash scripts/ensure-chromium

# bench/hot_path_cost.py counts instructions under callgrind (its smoke test too).
valgrind:
	@bash scripts/ensure-valgrind

# --- everyday targets ----------------------------------------------------------

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: install-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# -n 4 on a 2-core machine: most tests wait on processes they started (edges, apps,
# redis), so a fourth worker fills idle time: measured ~18% faster than -n 3.
test: install-test redis chromium valgrind
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q -n 4 --dist loadfile

# The property test of `make test` (120 fixed examples), as a soak with fresh examples.
fuzz: install-test
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-5000} $(BIN)/pytest -q tests/test_front_fuzz.py

# Faults again and again (SOAK_ROUNDS, default 5), then the long fuzz: bounded by rounds.
soak: install-test redis
	for round in $$(seq $${SOAK_ROUNDS:-5}); do \
	    echo "soak round $$round"; \
	    $(BIN)/pytest -q -n 3 --dist load -p no:cacheprovider tests/faults || exit 1; \
	done
	$(MAKE) fuzz

# Says so before installing: on a fresh machine the venv takes a while.
run:
	@echo "make run: starting the demo (first installing the project into $(VENV) if needed)"
	@$(MAKE) --no-print-directory install
	@bash scripts/run-local $(ARGS)

bench: install-bench
	@mkdir -p bench/results
	$(BIN)/python bench/throughput.py --json bench/results/throughput.json

# Deterministic where wall-clock figures are not: callgrind's instructions per request.
cost: install-bench valgrind
	@mkdir -p bench/results
	$(BIN)/python bench/hot_path_cost.py --json bench/results/hot_path_cost.json

# Two locust runs against a whole local stack; each writes a report folder
# (summary.json, chart.png, locust.html). Bounded: 30 s and 45 s of load.
stampede: install-test redis
	@mkdir -p bench/results
	$(BIN)/python bench/stampede_report.py --scenario stampede --users 2000 --run-time 30 \
	    --out bench/results/stampede-single
	$(BIN)/python bench/stampede_report.py --scenario fleet --apps 300 --users 2000 \
	    --max-concurrent-wakes 20 --run-time 45 --out bench/results/stampede-fleet

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
	find . -path ./.git -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
