# syntax=docker/dockerfile:1
#
# Tidings as a container image: `docker build -t tidings .` (docs/operations.md).
#
# Two stages. The build stage installs Tidings and its dependencies into a
# virtual environment; the final stage is a fresh slim Python with only that
# environment copied in, so pip's build machinery and the source tree stay
# behind. Every dependency ships a manylinux wheel, so neither stage needs a
# compiler. The venv path is the same in both stages because the console
# scripts' shebangs name it.
#
# tests/test_deploy.py replays the build stage's RUN steps in a fresh venv on
# the developer's machine (no Docker engine there), so keep them plain shell
# that refers to the venv as $VIRTUAL_ENV and to the sources relative to the
# WORKDIR.

ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build

ENV VIRTUAL_ENV=/opt/tidings \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /build
# No pip in the venv: the base image's pip installs into it (--python), so the
# runtime environment holds Tidings and its dependencies only.
RUN python -m venv --without-pip "$VIRTUAL_ENV"

COPY pyproject.toml README.md ./
COPY src ./src

# A non-editable install: pip builds the wheel and installs it, compiling the
# .pyc files now, since the read-only image cannot write them at run time.
# The cache mount keeps downloads across builds without putting them in a layer.
RUN --mount=type=cache,target=/root/.cache/pip \
    python -m pip --python "$VIRTUAL_ENV/bin/python" install . \
    && "$VIRTUAL_ENV/bin/tidings" --help > /dev/null


FROM ${PYTHON_IMAGE}

ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="tidings" \
      org.opencontainers.image.description="Real-time messaging over WebSockets, stored in MongoDB and carried by change streams." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# A fixed numeric UID, so that Kubernetes' runAsNonRoot can verify it without
# reading /etc/passwd, and file ownership on volumes is predictable.
RUN groupadd --system --gid 10001 tidings \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tidings

COPY --from=build /opt/tidings /opt/tidings

# TIDINGS_HOST: the default 127.0.0.1 cannot be reached from outside a container.
# HOME and TMPDIR point at /tmp, the one writable place when the root
# filesystem is read-only.
ENV VIRTUAL_ENV=/opt/tidings \
    PATH="/opt/tidings/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp \
    TIDINGS_HOST=0.0.0.0 \
    TIDINGS_PORT=8000

USER 10001:10001
WORKDIR /tmp
EXPOSE 8000

# No curl in a slim image: the standard library asks /healthz on the port
# Tidings listens on (TIDINGS_PORT may be changed at run time).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; url = 'http://127.0.0.1:%s/healthz' % os.environ.get('TIDINGS_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(url, timeout=4).status == 200 else 1)"]

ENTRYPOINT ["tidings"]
CMD ["serve"]
