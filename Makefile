# imgpipe — every target works on a fresh machine: `install` makes .venv first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
N ?= 3
COMPOSE := docker compose -f compose/docker-compose.yml -p imgpipe
PYTEST_ARGS ?=

.PHONY: install system-deps test test-fast run bench lint scale compose-up compose-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; install Python 3.11+" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import zmq, cv2, PIL, numpy, psutil, falcon, gunicorn, streamlit, plotly, prometheus_client, rich, httpx, playwright"
	touch $@

# Debian's Chromium for the dashboard's real-browser test (root: apt-get; else say so).
system-deps:
	@bash .ci/system-deps.sh

test: install system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Unit tests only: no browser, no process stacks.
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not browser" $(PYTEST_ARGS)

run: install
	$(BIN)/imgpipe up --workers $(N)

bench: install
	$(BIN)/imgpipe bench --images 10 --json bench-report.json --html bench-report.html

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Under Docker Compose when a compose stack runs, else the local stack.
scale:
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 \
	    && [ -n "$$($(COMPOSE) ps -q 2>/dev/null)" ]; then \
	  $(COMPOSE) up -d --scale worker=$(N) --no-recreate; \
	else \
	  make --no-print-directory install && $(BIN)/imgpipe scale $(N); \
	fi

compose-up:
	$(COMPOSE) up -d --build --scale worker=$(N)

compose-down:
	$(COMPOSE) down

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
