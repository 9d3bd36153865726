# syntax=docker/dockerfile:1
# The webhook sidecar image. Two stages: `builder` turns the project into a wheel (plus the wheels of its
# dependencies), the final stage installs those wheels into a venv on a clean slim base, so no compiler, pip
# cache or source tree ends up in the image that runs.
#
#   docker build -t webhook-sidecar:0.1.0 .
#   docker run --rm -p 8080:8080 webhook-sidecar:0.1.0          # the example config, embedded store
#   docker run --rm -v "$PWD/my.yaml:/etc/sidecar/sidecar.yaml:ro" webhook-sidecar:0.1.0 check-config /etc/sidecar/sidecar.yaml

# ---------------------------------------------------------------------------------------------------- builder
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Every runtime dependency publishes manylinux wheels for CPython 3.11 (amd64 and arm64), so nothing is compiled
# here; were one to need it, the compiler would be installed in this stage only.
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN pip wheel --wheel-dir /wheels .

# ------------------------------------------------------------------------------------------------------ final
FROM python:3.11-slim AS final

ARG UID=10001
ARG GID=10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml

# The wheels are bind-mounted from the builder for this one step, so they never become a layer of this image.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-index --find-links=/wheels webhook-sidecar \
    && "$VIRTUAL_ENV/bin/pip" uninstall --yes pip \
    && sidecar --help > /dev/null

# A fixed numeric user (Kubernetes' runAsNonRoot can only verify a numeric USER) and a data dir it owns: with
# `redis.url: embedded` the bundled Valkey keeps its append-only file in `redis.data_dir` (`data`, relative to
# the working directory, in the example config). Mount a volume on /var/lib/sidecar/data to keep it.
RUN groupadd --system --gid "${GID}" sidecar \
    && useradd --system --uid "${UID}" --gid "${GID}" --home-dir /var/lib/sidecar --shell /usr/sbin/nologin sidecar \
    && install -d -o "${UID}" -g "${GID}" -m 0750 /var/lib/sidecar /var/lib/sidecar/data \
    && install -d -m 0755 /etc/sidecar

# The commented example config, so the image runs as is (dev defaults, embedded store); Kubernetes mounts the
# real one over /etc/sidecar (k8s/base).
COPY --chmod=0644 config/sidecar.yaml /etc/sidecar/sidecar.yaml

WORKDIR /var/lib/sidecar
USER 10001:10001

# 8080: webhooks from providers (server.listen). 9090: admin API, /healthz, /readyz, /metrics (admin.listen; on
# loopback unless configured otherwise, which is all the HEALTHCHECK below needs).
EXPOSE 8080 9090

# No curl in a slim image: urllib raises on a refused connection or a non-2xx answer, which exits 1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('SIDECAR_HEALTHCHECK_URL', 'http://127.0.0.1:9090/healthz'), timeout=4)"]

ENTRYPOINT ["sidecar"]
CMD ["run", "--config", "/etc/sidecar/sidecar.yaml"]
