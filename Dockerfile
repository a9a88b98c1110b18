# relay-sidecar image: a sidecar that makes the app container's localhost ports reach the Docker host.
#
#   docker build -t relay-sidecar:local .
#
# relay-sidecar:local is the tag every example uses (README.md, compose-examples/); no registry publishes
# the image yet, so build it first (or let `docker compose up --build` build it: postgres-and-redis shows
# how). Multi-platform: `docker buildx build --platform linux/amd64,linux/arm64 ...` (README "Image").
#
# Any Debian-like image with python3 (>= 3.11) and its venv module can be the base:
#
#   docker build --build-arg BASE_IMAGE=python:3.12-slim -t relay-sidecar:local .
#
# Two stages. The builder makes one virtual environment (the project and its dependencies, without pip)
# and then assembles a root filesystem from the base (docker/rootfs.py): the interpreter, the standard
# library without tests, IDLE, Tk and the installers, the shared libraries all of it loads, the venv, CA
# certificates and a passwd with user 10001. The final stage is that tree alone on `scratch`: no shell, no
# package manager, no pip. It runs as an unprivileged user, needs no capabilities and writes nothing, so
# it runs with `read_only: true` and `cap_drop: [ALL]`.
#
# Offline (README "Offline build"): a `wheels/` folder in the build context (scripts/fetch-wheels fills
# it) is installed from with --no-index, so the build needs no package index; a base image that has
# `strip` (binutils) needs no apt either. A step that fails for lack of network says so in its last line.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS builder
# The whole build context: pyproject.toml, README.md, LICENSE, relay/, docker/ and, when present, wheels/.
# Each stage's one COPY comes first: the classic builder (docker build --platform linux/arm64 on an amd64
# engine) labels every image it commits with the engine's platform, and a COPY onto such an image fails
# with "does not match the specified platform".
COPY . /src
# The version for the labels and the package (setuptools-scm reads git tags; the build context has no .git,
# so the version comes in as a build argument; scripts/image-version prints it).
ARG VERSION=0.0.0+unknown
ARG STRIP=auto
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# strip (binutils) shrinks the compiled extensions: the wheels ship them with debug info (uvloop 13 MB -> 1.6 MB).
# STRIP=no skips it (on an offline engine whose base has no binutils; the image is then ~11 MB larger).
# No version pin (DL3008): BASE_IMAGE may be any Debian-like release, and no one pin fits them all.
# hadolint ignore=DL3008
RUN [ "$STRIP" = no ] || command -v strip > /dev/null \
    || docker/online.sh "apt-get install binutils (for strip; or --build-arg STRIP=no)" \
        sh -c 'apt-get update && apt-get install --yes --no-install-recommends binutils'
RUN python3 -m venv /opt/relay
# Install the project (and so its dependencies), then drop the installer from the venv: the final stage
# never installs anything. pip byte-compiles what it installs, so a read-only root loses nothing.
RUN if [ -d wheels ]; then set -- --no-index --find-links wheels; else set --; fi \
    && SETUPTOOLS_SCM_PRETEND_VERSION="$VERSION" docker/online.sh "pip install (or fill wheels/ first)" \
        /opt/relay/bin/python -m pip install "$@" . \
    && /opt/relay/bin/python -m pip uninstall --yes --quiet pip setuptools \
    && rm -f /opt/relay/bin/[Aa]ctivate* \
    && if [ "$STRIP" != no ]; then find /opt/relay -name '*.so' -exec strip --strip-unneeded {} +; fi \
    && /opt/relay/bin/relay --version
# The final root, checked on its own (chroot): the relay and every module it needs import there.
RUN python3 docker/rootfs.py /opt/relay /rootfs \
    && python3 -m compileall -q -s /rootfs -p / /rootfs/usr \
    && chroot /rootfs /opt/relay/bin/python -c 'import relay.cli, ssl, uvloop, yaml, prometheus_client' \
    && chroot /rootfs /opt/relay/bin/relay --version

FROM scratch
COPY --from=builder /rootfs /
ARG VERSION=0.0.0+unknown
LABEL org.opencontainers.image.title="relay-sidecar" \
      org.opencontainers.image.description="A sidecar that makes a container's localhost ports reach the Docker host: a fast, observable socat replacement." \
      org.opencontainers.image.source="https://github.com/relay-sidecar/relay-sidecar" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}"
ENV PATH="/opt/relay/bin:/usr/bin" \
    LANG=C.UTF-8 \
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
