"""The image recipe and the examples users copy: parsed, and checked for the shape that makes them work.

The compose files and the Kubernetes manifest are read with PyYAML; the relay's own parser reads each
relay service's `command` and `environment`, so an example that the relay would refuse fails here. The
examples run for real in tests/docker/run.sh (1 and 2); this file guards all of them, Kubernetes included.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli import parse

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "compose-examples"
COMPOSE_EXAMPLES = ("socat-dropin", "many-ports", "postgres-and-redis", "host-socket")
SEED_COMMAND = ["-d", "tcp-listen:8000,fork,reuseaddr", "tcp-connect:host.docker.internal:8000"]
HOST_GATEWAY = "host.docker.internal:host-gateway"
RELAY_IMAGE = "relay-sidecar:local"  # built from the clone: no registry publishes the image
BUILD_EXAMPLE = "postgres-and-redis"  # the one whose relay service also says how to build it


def load_compose(name: str) -> dict[str, Any]:
    document = yaml.safe_load((EXAMPLES / name / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def services(name: str) -> dict[str, dict[str, Any]]:
    found = load_compose(name)["services"]
    assert isinstance(found, dict)
    return found


RouteShape = tuple[tuple[str, ...], int, str, int]  # (listen hosts, listen port, target, target port)


def routes(command: list[str], environment: dict[str, str]) -> set[RouteShape]:
    """What the relay would listen on and forward to, given a relay service's command and environment."""
    run, config, _ = parse(command, environment)
    assert run == "run"
    return {
        (tuple(sorted(hp.host for hp in route.listen)), route.listen[0].port, route.target, route.target_port)
        for route in config.routes
    }


def loopback_routes(pairs: list[tuple[int, int]], target: str = "auto") -> set[RouteShape]:
    return {(("127.0.0.1", "::1"), listen, target, to) for listen, to in pairs}


@pytest.mark.parametrize("name", COMPOSE_EXAMPLES)
def test_relay_shares_the_app_network_namespace(name: str) -> None:
    """Every compose example: an app and a relay; the relay joins the app's network namespace, carries no
    extra_hosts (Docker refuses them with network_mode service:) and publishes no ports, and uses the
    project's image as the README says to build it; one example also builds it (`build: ../..`, the
    repository, so `docker compose up --build` works from a clone)."""
    found = services(name)
    assert set(found) == {"app", "relay"}
    relay = found["relay"]
    assert relay["network_mode"] == "service:app"
    assert relay["image"] == RELAY_IMAGE
    assert "extra_hosts" not in relay
    assert "ports" not in relay
    if name == BUILD_EXAMPLE:
        assert (EXAMPLES / name / relay["build"] / "Dockerfile").resolve() == ROOT / "Dockerfile"
    else:
        assert "build" not in relay


@pytest.mark.parametrize("name", COMPOSE_EXAMPLES)
def test_examples_use_public_tagged_images(name: str) -> None:
    """The app images are public names with an explicit tag: nothing local, nothing built, no `latest`."""
    for role, service in services(name).items():
        image = service["image"]
        assert re.fullmatch(r"[a-z0-9./-]+:[A-Za-z0-9._-]+", image), image
        assert not image.endswith(":latest"), image
        if role == "app":
            assert "build" not in service


def test_socat_dropin_is_the_seed_recipe() -> None:
    """socat-dropin keeps the seed's sidecar as it was but for the image: the exact socat command, the
    app's namespace, nothing else; and the relay reads that command as socat does (all IPv4 addresses,
    plus ::1 for clients whose localhost is IPv6) forwarding to host.docker.internal:8000."""
    relay = services("socat-dropin")["relay"]
    assert relay == {"image": RELAY_IMAGE, "command": SEED_COMMAND, "network_mode": "service:app"}
    assert routes(relay["command"], {}) == {(("0.0.0.0", "::1"), 8000, "host.docker.internal", 8000)}


def test_many_ports_shape() -> None:
    """many-ports: extra_hosts on the app (not the relay); the relay restarts with its app; RELAY_PORTS
    holds a single port, a range, a mapping and a UDP port (StatsD), and the relay expands them as the
    comment says; the relay runs read-only with no capabilities."""
    found = services("many-ports")
    assert found["app"]["extra_hosts"] == [HOST_GATEWAY]
    relay = found["relay"]
    assert relay["depends_on"] == {"app": {"condition": "service_started", "restart": True}}
    assert relay["environment"] == {"RELAY_PORTS": "3000 8000-8002 5432:5433 8125/udp"}
    assert "command" not in relay
    assert routes([], relay["environment"]) == loopback_routes(
        [(3000, 3000), (8000, 8000), (8001, 8001), (8002, 8002), (5432, 5433), (8125, 8125)]
    )
    _, config, _ = parse([], relay["environment"])
    assert [r.name for r in config.routes if r.protocol == "udp"] == ["udp/8125"]
    assert relay["read_only"] is True
    assert relay["cap_drop"] == ["ALL"]


def test_host_socket_shape() -> None:
    """host-socket: the app's localhost:5432 goes to PostgreSQL's socket file in the host directory the
    relay mounts (read-only); no extra_hosts needed (no host address is used); the relay's root stays
    read-only with no capabilities."""
    found = services("host-socket")
    relay = found["relay"]
    assert "extra_hosts" not in found["app"]
    assert relay["volumes"] == ["/var/run/postgresql:/host/postgresql:ro"]
    assert routes([], relay["environment"]) == loopback_routes(
        [(5432, 0)], "unix:/host/postgresql/.s.PGSQL.5432"
    )
    assert relay["read_only"] is True and relay["cap_drop"] == ["ALL"]
    mount = relay["volumes"][0].split(":")[1]
    assert relay["environment"]["RELAY_PORTS"].startswith(f"5432:unix:{mount}/")


def test_postgres_and_redis_shape() -> None:
    """postgres-and-redis: the app's connection strings say localhost:5432 and localhost:6379, and the
    relay forwards exactly those ports; extra_hosts on the app; the stand-in app script is there."""
    found = services("postgres-and-redis")
    app, relay = found["app"], found["relay"]
    assert app["extra_hosts"] == [HOST_GATEWAY]
    assert "@localhost:5432/" in app["environment"]["DATABASE_URL"]
    assert app["environment"]["REDIS_URL"].startswith("redis://localhost:6379")
    assert app["volumes"] == ["./check.py:/app/check.py:ro"]
    assert (EXAMPLES / "postgres-and-redis" / "check.py").is_file()
    assert relay["depends_on"] == {"app": {"condition": "service_started", "restart": True}}
    assert routes([], relay["environment"]) == loopback_routes([(5432, 5432), (6379, 6379)])


def test_kubernetes_native_sidecar() -> None:
    """kubernetes: a Deployment whose relay is a native sidecar (an init container with restartPolicy:
    Always), forwarding localhost:5432 to a named service outside the pod, gated by a startup probe on
    /readyz, read-only, non-root, no capabilities; the app is an ordinary container."""
    documents = list(yaml.safe_load_all((EXAMPLES / "kubernetes" / "relay-sidecar.yaml").read_text()))
    assert [d["kind"] for d in documents] == ["Deployment"]
    pod = documents[0]["spec"]["template"]["spec"]
    (relay,) = pod["initContainers"]
    assert relay["name"] == "relay"
    assert relay["restartPolicy"] == "Always"
    assert relay["image"] == RELAY_IMAGE
    env = {item["name"]: item["value"] for item in relay["env"]}
    assert env["RELAY_TARGET"] == "postgres.databases.svc.cluster.local"
    assert routes([], env) == loopback_routes([(5432, 5432)], target="postgres.databases.svc.cluster.local")
    assert relay["ports"] == [{"name": "metrics", "containerPort": 9464}]
    assert relay["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    security = relay["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert [c["name"] for c in pod["containers"]] == ["app"]
    labels = documents[0]["spec"]["selector"]["matchLabels"]
    assert documents[0]["spec"]["template"]["metadata"]["labels"] == labels


def test_dockerfile_shape() -> None:
    """Dockerfile: BASE_IMAGE argument defaulting to python:3.12-slim for the builder; python3 from PATH; a
    distroless final stage (scratch plus the root the builder assembled: no shell, no package manager),
    running as a non-root user, starting `relay`, stopping on SIGTERM, carrying the OCI labels with the
    version from the VERSION build argument (no .git in the context; scripts/image-version gives it)."""
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith((" ", "#"))]
    assert instructions[0] == "ARG BASE_IMAGE=python:3.12-slim"
    assert [line for line in instructions if line.startswith("FROM")] == [
        "FROM ${BASE_IMAGE} AS builder",
        "FROM scratch",
    ]
    final = text[text.index("FROM scratch\n") :]
    assert re.findall(r"^COPY .*", final, re.M) == ["COPY --from=builder /rootfs /"]
    assert re.findall(r"^RUN", final, re.M) == []  # nothing to run it with
    assert "python3 -m venv" in text
    assert "docker/rootfs.py /opt/relay /rootfs" in text
    assert not re.search(r"/usr/(local/)?bin/python", text)
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert 'ENTRYPOINT ["relay"]' in instructions
    assert "STOPSIGNAL SIGTERM" in instructions
    assert 'org.opencontainers.image.version="${VERSION}"' in final
    assert 'SETUPTOOLS_SCM_PRETEND_VERSION="$VERSION"' in text
    for label in ("title", "description", "source", "licenses", "version"):
        assert f"org.opencontainers.image.{label}=" in final


def test_dockerignore_keeps_the_context_small() -> None:
    """.dockerignore excludes everything but what the build copies (so .venv, .git, caches stay out), and
    lets in every file the Dockerfile copies from the context."""
    text = (ROOT / ".dockerignore").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    for sources in copied:
        for source in sources.split():
            # "." is the whole context, which is what the .dockerignore lets in.
            assert source == "." or source in allowed, f"{source} is copied but excluded by .dockerignore"
    assert {"pyproject.toml", "README.md", "LICENSE", "relay", "docker", "wheels"} <= allowed
    assert "**/__pycache__" in lines


def test_readme_covers_every_example() -> None:
    """compose-examples/README.md names each example folder and the host-side needs."""
    text = (EXAMPLES / "README.md").read_text()
    for name in (*COMPOSE_EXAMPLES, "kubernetes"):
        assert f"{name}/" in text
    for topic in ("extra_hosts", "0.0.0.0", "Rootless", "Docker Desktop", "Podman", "Image size"):
        assert topic in text


def test_one_image_tag_everywhere() -> None:
    """The Dockerfile's build comment, both READMEs and every example name the image the same way, and
    the READMEs say how to build it; nothing names a registry image that nobody publishes."""
    named = {
        ROOT / "Dockerfile": f"docker build -t {RELAY_IMAGE} .",
        ROOT / "README.md": f"docker build -t {RELAY_IMAGE} .",
        EXAMPLES / "README.md": f"docker build -t {RELAY_IMAGE} .",
    }
    for path, build in named.items():
        text = path.read_text()
        assert build in text, path
        assert "ghcr.io" not in text, path
    examples = sorted(EXAMPLES.glob("*/*.yaml"))
    assert len(examples) >= 5
    for path in examples:
        text = path.read_text()
        images = re.findall(r"image: (\S*relay-sidecar\S*)", text)
        assert images == [RELAY_IMAGE], (path, images)
    readme = (ROOT / "README.md").read_text()
    assert f"image: {RELAY_IMAGE}" in readme and "docker compose up --build" in readme


def test_readme_says_which_docker_hub_images_the_examples_pull_and_how_to_substitute() -> None:
    """compose-examples/README.md names every image an example pulls (all from Docker Hub, issue 19) and
    the ways to use local ones instead: a tag, an override file, the relay's BASE_IMAGE."""
    text = (EXAMPLES / "README.md").read_text()
    pulled = set()
    for path in EXAMPLES.glob("*/*.yaml"):
        pulled.update(re.findall(r"image: (\S+)", path.read_text()))
    pulled -= {RELAY_IMAGE, "your-app"}
    assert len(pulled) >= 4
    assert not [image for image in sorted(pulled) if f"`{image}`" not in text], text
    for way in ("Docker Hub", "docker tag ", "compose.override.yaml", "--build-arg BASE_IMAGE="):
        assert way in text, way


def test_readme_names_every_debian_package_scripts_test_installs() -> None:
    """README's "Packages" paragraph says what scripts/test apt-get installs: the same names (it missed
    dnsmasq-base, bind9-dnsutils, dnsperf, redis and postgresql, issue 19)."""
    lines = (ROOT / "scripts/test").read_text().splitlines()
    packages = next(line for line in lines if line.startswith(". scripts/bootstrap.sh")).split()[3:]
    readme = (ROOT / "README.md").read_text()
    paragraph = readme[readme.index("- **Packages.**") :].split("\n- **", 1)[0]
    named = set(re.findall(r"[a-z0-9][a-z0-9.+-]*", paragraph))
    assert len(packages) > 10 and not [p for p in packages if p not in named], paragraph
