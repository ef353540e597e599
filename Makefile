# imgpipe — every target works on a fresh machine: `install` makes .venv first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
N ?= 3
PYTEST_ARGS ?=
# Docker: the compose project (tests pass their own), the base image wanted when a
# registry answers (compose/base-image.sh builds an equivalent from Debian packages when
# none does), and where the host-built wheels go (the image build needs no network).
PROJECT ?= imgpipe
PYTHON_IMAGE ?= python:3.11-slim
WHEELS := compose/wheelhouse
# Compose v2 (`docker compose`) or v1 (`docker-compose`), looked up once when first used.
COMPOSE_CLI = $(eval COMPOSE_CLI := $(shell \
  if docker compose version >/dev/null 2>&1; then echo docker compose; \
  elif command -v docker-compose >/dev/null 2>&1; then echo docker-compose; \
  else echo docker compose; fi))$(COMPOSE_CLI)
# STACK_FILE: the stack's own compose file (the ha-* targets set compose/ha.yml);
# EXTRA_COMPOSE_FILES: more files on top, e.g. compose/multihost.yml (every target takes
# them); PROFILES: compose profiles to enable (ha-* enable `dashboard` unless given).
STACK_FILE ?= compose/docker-compose.yml
EXTRA_COMPOSE_FILES ?=
# The CURVE keys every service mounts (see `keys`); every compose call is told where.
CURVE_KEYS_DIR ?= compose/keys
COMPOSE = CURVE_KEYS_DIR="$(abspath $(CURVE_KEYS_DIR))" $(COMPOSE_CLI) -f $(STACK_FILE) $(foreach f,$(EXTRA_COMPOSE_FILES),-f $(f)) \
	$(foreach p,$(PROFILES),--profile $(p)) -p $(PROJECT)

.PHONY: install system-deps test test-fast run bench lint scale compose-up compose-down \
	wheelhouse image keys infra-image ha-up ha-down clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found; install Python 3.11+" >&2; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import zmq, cv2, PIL, numpy, psutil, falcon, gunicorn, streamlit, plotly, prometheus_client, rich, httpx, playwright, psycopg, psycopg_pool"
	touch $@

# Debian's Chromium for the dashboard's real-browser test (root: apt-get; else say so).
system-deps:
	@bash .ci/system-deps.sh

test: install system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Unit tests only: no browser, no process stacks, no Docker engine.
test-fast: install
	$(BIN)/python -m pytest -m "not slow and not browser and not docker" $(PYTEST_ARGS)

run: install
	$(BIN)/imgpipe up --workers $(N)

bench: install
	$(BIN)/imgpipe bench --images 10 --json bench-report.json --html bench-report.html

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# Under Docker Compose when that compose project has containers, else the local stack.
scale:
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 \
	    && [ -n "$$($(COMPOSE) ps -q 2>/dev/null)" ]; then \
	  $(COMPOSE) up -d --scale worker=$(N) --no-recreate; \
	else \
	  make --no-print-directory install && $(BIN)/imgpipe scale $(N); \
	fi

# Every runtime dependency as a wheel (again only when pyproject.toml changes), then the
# project's own wheel from this checkout, for the Python of the base image (3.11), with
# fixed zip timestamps: the same source gives the same wheel, so its image layer is reused.
$(WHEELS)/deps/.complete: pyproject.toml | $(STAMP)
	rm -rf $(WHEELS)/deps
	$(BIN)/pip wheel --quiet --wheel-dir $(WHEELS)/deps .
	rm -f $(WHEELS)/deps/imgpipe-*.whl
	touch $@

wheelhouse: $(WHEELS)/deps/.complete
	rm -rf $(WHEELS)/app
	SOURCE_DATE_EPOCH=315532800 $(BIN)/pip wheel --quiet --no-deps --no-build-isolation \
	  --wheel-dir $(WHEELS)/app .

# The base (compose/base-image.sh): PYTHON_IMAGE if present, else imgpipe-base:bookworm if
# made before, else PYTHON_IMAGE pulled, else imgpipe-base:bookworm built from Debian.
# The wheels are for this venv's Python: the base must run the same minor version.
PYMINOR := import sys; print("%d.%d" % sys.version_info[:2])
image: wheelhouse
	base=$$(bash compose/base-image.sh $(PYTHON_IMAGE)) \
	  && have=$$($(BIN)/python -c '$(PYMINOR)') \
	  && want=$$(docker run --rm --entrypoint python3 $$base -c '$(PYMINOR)') \
	  && { [ "$$have" = "$$want" ] || { echo "error: the wheelhouse is for Python $$have," \
	       "the base $$base runs $$want: make the venv with PY=python$$want" >&2; exit 1; }; } \
	  && PYTHON_IMAGE=$$base $(COMPOSE) build

# CURVE keys for the sealed plane, made once by the image itself as its user (uid 10001),
# so the containers can read them and no other user on the host can read the secrets.
keys: image
	@if [ ! -f $(CURVE_KEYS_DIR)/server.key ]; then \
	  install -d -m 0777 $(CURVE_KEYS_DIR) \
	  && docker run --rm --user 10001:10001 -v "$(abspath $(CURVE_KEYS_DIR))":/keys \
	       imgpipe:latest keys --out /keys \
	  && chmod 0755 $(CURVE_KEYS_DIR); \
	fi

compose-up: keys
	$(COMPOSE) up -d --scale worker=$(N)

compose-down:
	$(COMPOSE) down --remove-orphans

# PostgreSQL and HAProxy for compose/ha.yml, from Debian packages (compose/infra-image.sh:
# debootstrap once, then a cached `docker build` of the entry scripts).
infra-image:
	bash compose/infra-image.sh >/dev/null

# compose/ha.yml: PostgreSQL, a load balancer, two gateways, ventilators and sinks, N
# workers; its own project (imgpipe-ha) beside the plain stack. `make ha-up N=5` again
# rescales; `make scale N=5 STACK_FILE=compose/ha.yml PROJECT=imgpipe-ha` does too.
ha-up ha-down: STACK_FILE = compose/ha.yml
ha-up ha-down: PROJECT = imgpipe-ha
ha-up ha-down: PROFILES ?= dashboard

ha-up: keys infra-image
	$(COMPOSE) up -d --scale worker=$(N)

ha-down:
	$(COMPOSE) down --remove-orphans

clean:
	rm -rf $(VENV) $(WHEELS) .pytest_cache .mypy_cache .ruff_cache *.egg-info
