# syntax=docker/dockerfile:1
# deribit-keeper as a container: built as a wheel in one stage, run from a copied virtualenv in a
# second stage with no compiler, no pip and no package cache.
#
#   docker build -t deribit-keeper:0.1.0 .
#   docker run --rm -v "$PWD/config.yaml:/etc/deribit-keeper/config.yaml:ro" \
#       -v "$PWD/secrets:/run/secrets:ro" -p 127.0.0.1:9464:9464 deribit-keeper:0.1.0
#
# The config must serve the health endpoint on port 9464 (`http: {listen: "0.0.0.0:9464"}`, or
# 127.0.0.1:9464 when only this HEALTHCHECK needs it); without it the container reports unhealthy.

# Both stages must use the same interpreter: the venv's python is a symlink to the base image's.
# Pin a digest (python:3.11-slim-bookworm@sha256:...) for bit-for-bit reproducible builds.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
# Every dependency ships wheels, so no compiler is needed even here. The venv has no pip of its
# own (`pip --python` installs into it from outside), so the runtime image carries no installer.
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv --without-pip /opt/deribit-keeper \
 && pip --python /opt/deribit-keeper/bin/python install --compile /wheels/*.whl

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="deribit-keeper" \
      org.opencontainers.image.description="Keeps one authenticated, Cancel-On-Disconnect-protected Deribit session per account" \
      org.opencontainers.image.licenses="MIT"
# A fixed numeric UID/GID, so Kubernetes can verify runAsNonRoot and fsGroup can match it.
# The base image's own pip and setuptools go too: nothing at run time installs anything.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 keeper \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin keeper
COPY --from=builder /opt/deribit-keeper /opt/deribit-keeper
# CREDENTIALS_DIRECTORY: relative client_secret_file names resolve here, where Docker and Compose
# mount secrets (/run/secrets/<name>); Kubernetes manifests point it at their Secret volume.
ENV PATH="/opt/deribit-keeper/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    DERIBIT_KEEPER_CONFIG=/etc/deribit-keeper/config.yaml \
    CREDENTIALS_DIRECTORY=/run/secrets
USER 10001:10001
EXPOSE 9464
# Liveness only (/healthz: the supervisor loop runs): an exchange outage is not the container's
# fault. The keeper stops within 5 s of SIGTERM, well inside Docker's default 10 s stop timeout.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["deribit-keeper", "probe", "http://127.0.0.1:9464/healthz"]
STOPSIGNAL SIGTERM
# Exec form: the keeper is PID 1 and receives SIGTERM itself (it installs its own handlers).
# Arguments after the image name are appended, e.g. `--shard 0/3`.
ENTRYPOINT ["deribit-keeper", "run"]
