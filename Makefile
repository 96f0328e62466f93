# Every target does its own set-up: a fresh machine needs nothing but Python 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install tools run demo test lint bench schemas stack-up stack-down clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Prometheus, promtool, Alertmanager and docker-compose (Debian packages) for the tests that run or check
# them for real.
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null \
	  && command -v docker-compose >/dev/null \
	  || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	       --no-install-recommends prometheus prometheus-alertmanager docker-compose >/dev/null; }

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

stack-up:  ## Kafka, PostgreSQL, the daemon, Prometheus, Alertmanager, Grafana on Docker (deploy/README.md)
	sh deploy/init-env.sh
	docker compose -f deploy/docker-compose.yml up -d --build

stack-down:
	docker compose -f deploy/docker-compose.yml down

clean:
	rm -rf $(VENV) var build dist *.egg-info mia-detector.db*
