# relay-sidecar image: a sidecar that makes the app container's localhost ports reach the Docker host.
#
#   docker build -t relay-sidecar:local .
#
# relay-sidecar:local is the tag every example uses (README.md, compose-examples/); no registry publishes
# the image, so build it first (or let `docker compose up --build` build it: postgres-and-redis shows how).
#
# Any Debian-like image with python3 (>= 3.11) and its venv module can be the base; both stages use the
# same one, so the virtual environment copied into the final stage finds the interpreter it was made with:
#
#   docker build --build-arg BASE_IMAGE=python:3.12-slim -t relay-sidecar:local .
#
# The final stage holds the base plus one virtual environment (the project and its dependencies, without
# pip), runs as an unprivileged user, needs no capabilities and writes nothing, so it runs with
# `read_only: true` and `cap_drop: [ALL]`.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
# strip (binutils) shrinks the compiled extensions: the wheels ship them with debug info (uvloop 13 MB -> 1.6 MB).
# No version pin (DL3008): BASE_IMAGE may be any Debian-like release, and no one pin fits them all.
# hadolint ignore=DL3008
RUN command -v strip > /dev/null \
    || { apt-get update && apt-get install --yes --no-install-recommends binutils; }
WORKDIR /src
RUN python3 -m venv /opt/relay
COPY pyproject.toml README.md LICENSE ./
COPY relay ./relay
# Install the project (and so its dependencies), then drop the installer from the venv: the final stage
# never installs anything. pip byte-compiles what it installs, so a read-only root loses nothing.
RUN /opt/relay/bin/python -m pip install . \
    && /opt/relay/bin/python -m pip uninstall --yes pip setuptools wheel \
    && rm -f /opt/relay/bin/[Aa]ctivate* \
    && find /opt/relay -name '*.so' -exec strip --strip-unneeded {} + \
    && /opt/relay/bin/relay --help > /dev/null

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="relay-sidecar" \
      org.opencontainers.image.description="A sidecar that makes a container's localhost ports reach the Docker host: a fast, observable socat replacement." \
      org.opencontainers.image.source="https://github.com/relay-sidecar/relay-sidecar" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"
RUN useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin relay
COPY --from=builder /opt/relay /opt/relay
ENV PATH="/opt/relay/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# Prometheus metrics and /readyz (RELAY_METRICS, default 0.0.0.0:9464).
EXPOSE 9464
STOPSIGNAL SIGTERM
# The health check runs in the container's memory cgroup every 30 s: relay.probe imports the standard
# library's socket and relay.address only (13 MiB peak, against 29 MiB for `relay healthcheck` before);
# `relay healthcheck` does the same check through the full command line.
HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 CMD ["python", "-I", "-m", "relay.probe"]
ENTRYPOINT ["relay"]
