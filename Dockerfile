# syntax=docker/dockerfile:1
# The mia-detector daemon as a container image.
#
#   docker build -t mia-detector .                       # or: docker compose -f deploy/docker-compose.yml build
#   docker run --rm -e MIA_KAFKA_BOOTSTRAP_SERVERS=kafka:9092 -e MIA_DATABASE_URL=postgresql://... mia-detector
#
# Stage 1 installs the pinned dependency set into a virtual environment, then the project's wheel; stage 2
# copies only that environment onto a fresh slim image and runs it as an unprivileged user. The versions are
# the ones CI tests: requirements/runtime.txt and build.txt (`make lock`), every file checked against its
# hash. Wheels only: every dependency ships manylinux wheels for CPython 3.11 (numpy, scikit-learn,
# psycopg[binary], crc32c, ...), so no compiler is needed in either stage.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
# The dependencies first, in a layer of their own that is rebuilt only when the lock changes. The locked pip
# and build backend live in /opt/build, which the image leaves behind: /opt/mia-detector gets no pip (nor
# the old setuptools a venv brings) and holds exactly runtime.txt and the project.
COPY requirements/build.txt requirements/runtime.txt requirements/
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --only-binary :all: -r requirements/build.txt \
 && python -m venv --without-pip /opt/mia-detector \
 && /opt/build/bin/pip --python /opt/mia-detector/bin/python install --require-hashes --only-binary :all: \
        -r requirements/runtime.txt
# Only what the wheel is built from (see .dockerignore): pyproject.toml names README.md as its readme.
COPY pyproject.toml README.md ./
COPY detector/ detector/
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
 && /opt/build/bin/pip --python /opt/mia-detector/bin/python install --no-deps /wheels/mia_detector-*.whl \
 && /opt/build/bin/pip --python /opt/mia-detector/bin/python check \
 && /opt/mia-detector/bin/mia-detector --help >/dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="mia-detector" \
      org.opencontainers.image.description="Detects membership-inference attacks in ML prediction-request logs" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed, numeric, unprivileged uid/gid (10001, also in deploy/kubernetes): Kubernetes' runAsNonRoot can
# only verify a numeric USER.
RUN groupadd --system --gid 10001 mia \
 && useradd --system --uid 10001 --gid mia --home-dir /var/lib/mia-detector --no-create-home \
        --shell /usr/sbin/nologin mia \
 && install -d -o mia -g mia -m 0750 /var/lib/mia-detector

COPY --from=build /opt/mia-detector /opt/mia-detector

# MIA_METRICS_ADDR: the daemon listens on 127.0.0.1:9108 by default, unreachable from outside a container.
# MIA_DATABASE_URL: SQLite in the state directory unless PostgreSQL is configured (what production uses).
# The root filesystem may be read-only: nothing is written outside /var/lib/mia-detector and /tmp
# (no bytecode, matplotlib's cache under /tmp: it is only used by `evaluate`).
ENV PATH=/opt/mia-detector/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/lib/mia-detector \
    MPLCONFIGDIR=/tmp/matplotlib \
    MIA_METRICS_ADDR=0.0.0.0:9108 \
    MIA_LOG_FORMAT=json \
    MIA_DATABASE_URL=sqlite:////var/lib/mia-detector/mia-detector.db

WORKDIR /var/lib/mia-detector
USER 10001:10001
EXPOSE 9108

# /healthz answers once the database is migrated and the consumer is being set up, without the credentials
# /metrics may require (MIA_METRICS_USERNAME); over TLS when MIA_METRICS_TLS_CERTFILE is set (the certificate
# is not checked: this is the container asking itself). No curl in the slim image: python's urllib does the
# request (an HTTP error or a refused connection exits non-zero).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, ssl, urllib.request; tls = bool(os.environ.get('MIA_METRICS_TLS_CERTFILE', '').strip()); port = os.environ.get('MIA_METRICS_ADDR', ':9108').rpartition(':')[2]; urllib.request.urlopen(f\"{'https' if tls else 'http'}://127.0.0.1:{port}/healthz\", timeout=4, context=ssl._create_unverified_context() if tls else None).close()"]

# SIGTERM (docker stop, Kubernetes) finishes the current batch, commits and exits 0: give it time
# (docker stop -t 60; terminationGracePeriodSeconds in Kubernetes).
STOPSIGNAL SIGTERM
ENTRYPOINT ["mia-detector"]
CMD ["run"]
