# Two entry points that work on a fresh Linux machine with Python 3.11:
#   make demo   sets up .venv and runs `prunefleet demo`
#   make test   installs the test dependencies (make deps), sets up .venv, runs the suite
#   make test-system  the system suite (pytest -m system): minutes, root and network
PYTHON ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test deps system-deps test-system lint setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch 2.13.0 is pinned in pyproject: it is the CPU build (an open range pulls CUDA).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/prunefleet demo

# The Debian packages the tests run against (mosquitto, systemd-analyze, Chromium with
# chromedriver, promtool): installed when missing as root; otherwise it says what to install.
deps:
	sh deploy/test-deps.sh

# pytest exits 5 when it collected nothing: that must not pass. The 15 slowest tests are
# listed at the end, to keep the suite's time in view (aim: about 10 minutes on 2 cores).
test: deps setup
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -p no:cacheprovider --durations=15; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

# The system suite: tests marked `system` (left out of `make test`), e.g. the agent in a
# Debian arm64 root under qemu (tests/test_platforms.py). Needs root and network; its Debian
# packages (debootstrap, qemu-user-static, binfmt-support) come from `make system-deps`.
system-deps:
	sh deploy/test-deps.sh system

test-system: system-deps setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -m system; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .prunefleet build *.egg-info
