# Every target does its own set-up: a fresh machine needs nothing but Python 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
KAFKA2_VENV ?= .venv-kafka2
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install tools run demo test test-kafka2 test-confluent lint audit lock bench schemas stack-up stack-down clean

# The dependency set that is tested is pinned, with hashes, in requirements/ (made by `make lock`):
#   dev.txt      runtime and dev dependencies, for Python 3.11 on Linux x86_64: what `make install` installs
#   runtime.txt  the runtime subset of dev.txt (with the confluent extra), same versions: what the container
#                image installs
#   build.txt    pip and the build backend (setuptools, wheel) that install and build the project
#   kafka2.txt   kafka-python 2.3.x, installed over dev.txt by `make test-kafka2`
# pyproject.toml keeps the ranges the package supports; these files pin what CI runs. Installs check every
# file's hash and take wheels only (nothing is compiled); `pip check` then proves the set consistent with
# pyproject.toml (a dependency added there but not locked fails here: run `make lock`).
LOCKED := requirements/build.txt requirements/dev.txt
PIP_LOCKED := -m pip install --quiet --require-hashes --only-binary :all:

# $(call locked-venv,DIR,EXTRA): a virtualenv in DIR holding the locked set, then the files EXTRA (which
# replace the versions they pin), then this project (editable, built by the locked setuptools).
define locked-venv
	$(PYTHON) -m venv $(1)
	$(1)/bin/python $(PIP_LOCKED) -r requirements/build.txt
	$(1)/bin/python $(PIP_LOCKED) -r requirements/dev.txt
	$(if $(2),$(1)/bin/python $(PIP_LOCKED) --no-deps $(addprefix -r ,$(2)))
	$(1)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(1)/bin/python -m pip check
	touch $(1)/.installed
endef

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCKED)
	$(call locked-venv,$(VENV))

# Regenerate requirements/*.txt from pyproject.toml and requirements/*.in (needs PyPI). Pins that still fit
# are kept; `make lock LOCK_FLAGS=--upgrade` moves every pin to the newest release that fits,
# `LOCK_FLAGS='--upgrade-package numpy'` only that one. Then `make install test test-kafka2 lint`.
UV_COMPILE = $(BIN)/uv pip compile --quiet --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	--generate-hashes --custom-compile-command 'make lock' $(LOCK_FLAGS)
lock:
	test -x $(BIN)/uv || { $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --quiet uv; }
	$(UV_COMPILE) pyproject.toml --extra dev -o requirements/dev.txt
	$(UV_COMPILE) pyproject.toml --extra confluent -c requirements/dev.txt -o requirements/runtime.txt
	$(UV_COMPILE) requirements/build.in -c requirements/dev.txt -o requirements/build.txt
	$(UV_COMPILE) requirements/kafka2.in -o requirements/kafka2.txt

# Prometheus, promtool, Alertmanager, docker-compose and nginx (Debian packages) for the tests that run or
# check them for real. nginx is looked for in /usr/sbin too, off an unprivileged user's PATH; its package
# may start the system's nginx on port 80, which no test uses (tests/deploy/test_nginx_gateway.py runs its
# own on a free port).
tools:
	@command -v prometheus >/dev/null && command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null \
	  && command -v docker-compose >/dev/null && { command -v nginx || test -x /usr/sbin/nginx; } >/dev/null \
	  || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	       --no-install-recommends prometheus prometheus-alertmanager docker-compose nginx >/dev/null; }

run demo: install  ## the daemon end to end: embedded broker + SQLite + a sample stream
	$(BIN)/mia-detector --config examples/simulation.toml demo

# The tests run side by side in TEST_WORKERS processes (pytest-xdist), each with its own broker: most of their
# time is spent waiting on brokers, daemons and timeouts, not on a core. Every test takes free ports and a
# database of its own, so any number works; TEST_WORKERS=0 runs them in this process, one by one.
TEST_WORKERS ?= 4
SIDE_BY_SIDE = --numprocesses $(TEST_WORKERS) --dist worksteal

test: install tools  ## every test, the integration ones included (broker, PostgreSQL, Prometheus, Alertmanager)
	$(BIN)/pytest $(SIDE_BY_SIDE)

# The project supports kafka-python 2.3.x as well as the 3.0.x that dev.txt pins: the Kafka tests again, in
# a second virtualenv that has kafka-python 2.3.x.
$(KAFKA2_VENV)/.installed: pyproject.toml $(LOCKED) requirements/kafka2.txt
	$(call locked-venv,$(KAFKA2_VENV),requirements/kafka2.txt)

test-kafka2: $(KAFKA2_VENV)/.installed tools
	$(KAFKA2_VENV)/bin/python -c 'import kafka; print("kafka-python", kafka.__version__)'
	$(KAFKA2_VENV)/bin/pytest $(SIDE_BY_SIDE) -m kafka

# The Kafka tests again with the optional confluent-kafka consumer (MIA_KAFKA_CLIENT=confluent) in every
# daemon and source they start; `make test` runs them with kafka-python.
test-confluent: install tools
	MIA_TEST_KAFKA_CLIENT=confluent $(BIN)/pytest $(SIDE_BY_SIDE) -m kafka

lint: install
	$(BIN)/ruff check detector tests benchmarks deploy/gateway
	$(BIN)/ruff format --check detector tests benchmarks deploy/gateway
	$(BIN)/mypy
	$(BIN)/lint-imports
	@if reason=$$($(BIN)/python -c "$$AUDIT_PROBE_PY" '$(AUDIT_PROBE)' 2>&1); then \
	  $(MAKE) --no-print-directory audit; \
	else echo "WARNING: pip-audit did not run: $(AUDIT_PROBE): $$reason. The vulnerability service is out" \
	  "of reach (a PyPI mirror without PyPI's per-release JSON API, or no route to OSV): run 'make audit'" \
	  "where it answers."; fi

# Known vulnerabilities in every locked release (runtime.txt is a subset of dev.txt; pip-audit takes one
# file at a time, as kafka2.txt pins kafka-python again). pip-audit asks a vulnerability service about each
# pinned release: PyPI's JSON API (https://pypi.org/pypi/NAME/VERSION/json, the default) or OSV
# (`make audit AUDIT_SERVICE=osv`). --strict: a release the service cannot answer for fails the audit
# instead of being skipped (without it, a mirror that serves no per-release JSON passes everything).
# `make lint` audits when AUDIT_PROBE (a URL of the service) answers, and otherwise says so and goes on.
AUDIT_SERVICE ?= pypi
AUDIT_PROBE ?= https://pypi.org/pypi/pip/24.0/json
export AUDIT_PROBE_PY := import sys, urllib.request; \
	sys.excepthook = lambda kind, error, trace: print(error); \
	urllib.request.urlopen(sys.argv[1], timeout=15).close()
audit: install
	for locked in requirements/dev.txt requirements/build.txt requirements/kafka2.txt; do \
	  $(BIN)/pip-audit --strict --disable-pip --progress-spinner off --vulnerability-service $(AUDIT_SERVICE) \
	    -r $$locked || exit 1; \
	done

bench: install
	$(BIN)/python benchmarks/throughput.py
	$(BIN)/python benchmarks/memory.py
	$(BIN)/python benchmarks/client_state.py
	$(BIN)/python benchmarks/image_copies.py
	$(BIN)/python benchmarks/hostile.py
	$(BIN)/python benchmarks/latency.py
	$(BIN)/python benchmarks/risk_endpoint.py

schemas: install  ## regenerate schemas/*.schema.json from the pydantic models
	$(BIN)/mia-detector schemas export --out schemas

stack-up:  ## Kafka, PostgreSQL, the daemon, Prometheus, Alertmanager, Grafana on Docker (deploy/README.md)
	sh deploy/init-env.sh
	docker compose -f deploy/docker-compose.yml up -d --build

stack-down:
	docker compose -f deploy/docker-compose.yml down

clean:
	rm -rf $(VENV) $(KAFKA2_VENV) var build dist *.egg-info mia-detector.db*
