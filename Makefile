# Every target does its own set-up: a fresh machine needs nothing but Python 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install tools run demo test lint bench schemas clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Prometheus, promtool and Alertmanager (Debian packages) for the tests that run them for real.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null \
	  || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	       --no-install-recommends prometheus prometheus-alertmanager >/dev/null; }

run demo: install  ## the daemon end to end: embedded broker + SQLite + a sample stream
	$(BIN)/mia-detector --config examples/simulation.toml demo

test: install tools  ## every test, the integration ones included (broker, PostgreSQL, Prometheus, Alertmanager)
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check detector tests benchmarks
	$(BIN)/ruff format --check detector tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/memory.py

schemas: install  ## regenerate schemas/*.schema.json from the pydantic models
	$(BIN)/mia-detector schemas export --out schemas

clean:
	rm -rf $(VENV) var build dist *.egg-info mia-detector.db*
