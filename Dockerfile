# trace-source container image: `make image` builds it with buildah (no Docker daemon); README "Container image".
#
# BASE: a Debian bookworm root filesystem with python3 (3.11), python3-venv, git and ca-certificates. `make image`
# makes one with debootstrap from Debian's packages (no registry needed); python:3.11-slim-bookworm works as well
# when it can be pulled (IMAGE_BASE=docker.io/library/python:3.11-slim-bookworm make image).
ARG BASE=localhost/trace-source-base:bookworm

# -- build: a virtualenv with trace-source and its dependencies, all from wheels (nothing is compiled) -------------
FROM ${BASE} AS build
# HOST_CA: a CA bundle mounted into the build for pip, where PyPI is reached through a TLS-inspecting proxy
# (scripts/build_image.sh mounts the host's); nothing of it stays in the image.
ARG HOST_CA=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trace_source ./trace_source
COPY receiver ./receiver
COPY sinks ./sinks
COPY pipeline ./pipeline
COPY normalizers ./normalizers
RUN python3 -m venv /opt/trace-source \
 && if [ -n "$HOST_CA" ]; then export PIP_CERT="$HOST_CA"; fi \
 && /opt/trace-source/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/trace-source/bin/pip install --only-binary=:all: /wheels/*.whl \
 && /opt/trace-source/bin/pip uninstall -q -y setuptools \
 && /opt/trace-source/bin/python -m compileall -q /opt/trace-source \
 && /opt/trace-source/bin/trace-source --version

# -- runtime: the base plus the virtualenv (pip stays, for images built FROM this one; setuptools goes); no
# compiler, no sources; runs as 10001 on a read-only root --------------------------------------------------------
FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="trace-source" \
      org.opencontainers.image.description="OpenTelemetry-native streaming trace receiver for AI agents" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
# The chart runs every pod as 10001:10001 (podSecurityContext); a named user makes `id` and git happy.
# (Written directly: a minbase root filesystem has no useradd.)
RUN echo "trace-source:x:10001:10001:trace-source:/var/lib/trace-source:/usr/sbin/nologin" >> /etc/passwd \
 && echo "trace-source:x:10001:" >> /etc/group \
 && mkdir -p /var/lib/trace-source \
 && chown 10001:10001 /var/lib/trace-source
COPY --from=build /opt/trace-source /opt/trace-source
# Bytecode is compiled at build time (the root filesystem is read-only at run time); state goes to the working
# directory, a volume in the chart; HOME (git) is the same directory unless the chart points it elsewhere.
ENV PATH=/opt/trace-source/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/trace-source \
    LANG=C.UTF-8
WORKDIR /var/lib/trace-source
USER 10001:10001
# OTLP/gRPC, OTLP/HTTP (+ /metrics, /healthz, /readyz), worker metrics
EXPOSE 4317 4319 9464 9465
ENTRYPOINT ["trace-source"]
CMD ["serve", "--host", "0.0.0.0"]
