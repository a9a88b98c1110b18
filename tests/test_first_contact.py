"""What a new user hits in the first hour (issue 9): a route into the relay itself, two socat-style relays
in one namespace, hints that point the wrong way, and the demo `scripts/run` starts."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.address import HostPort
from relay.config import Config, Route
from relay.server import Server
from tests.netns import APP_IP, HOST_IP, Topology
from tests.support import free_port_block, wait_until

Run = Callable[..., Any]


def resolves_to(address: str) -> Callable[..., Any]:
    """A lookup that answers `address` for every name."""

    async def lookup(name: str, *args: object, **kwargs: object) -> list[tuple[Any, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, 0))]

    return lookup


async def reset_or_closed(port: int, host: str = "127.0.0.1") -> bytes:
    """Connect, send, read: what came back (b"" when the relay closed or reset the connection)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"hello")
        return await reader.read(100)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def test_a_name_that_resolves_to_the_relay_itself_is_refused_before_connecting(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: a route on 127.0.0.1:P whose target name resolves, at run time, to 127.0.0.1 (the relay's
    own listen address, port P); a client is closed at once; the relay accepted that one connection only
    (before: one connection became thousands, until max_connections), counted a `loop` connect error and
    logged why."""
    port = free_port_block(1)

    async def scenario() -> None:
        route = Route("self", (HostPort("127.0.0.1", port),), "myself.test", port)
        config = Config(routes=(route,), metrics=None, max_connections=50, drain_timeout=1.0)
        server = Server(config, lookup=resolves_to("127.0.0.1"))
        await server.start()
        try:
            assert await reset_or_closed(port) == b""
            await wait_until(lambda: not server.connections)
            stats = server.stats["self"]
            assert stats.accepted == 1
            assert stats.connect_errors["loop"] == 1
        finally:
            await server.drain()

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario())
    (line,) = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert f"(loop: SelfLoop: 127.0.0.1:{port} is the relay's own)" in line
    assert "the target is this relay itself" in line


def test_an_address_of_this_host_on_a_wildcard_listener_is_refused_after_connecting(run: Run) -> None:
    """Steps: a socat-style listener on 0.0.0.0:P and a target 127.0.0.2:P, which no rule written down
    in advance tells apart from another host; the first client finds out at connect time: the relay
    refuses instead of forwarding into itself, and the few connections it made to itself meanwhile end
    (not 50, the limit). A second client is refused before any connection is made (accepted + 1)."""
    port = free_port_block(1)

    async def scenario() -> None:
        route = Route("wild", (HostPort("0.0.0.0", port),), "127.0.0.2", port)
        server = Server(Config(routes=(route,), metrics=None, max_connections=50, drain_timeout=1.0))
        await server.start()
        try:
            stats = server.stats["wild"]
            assert await reset_or_closed(port) == b""
            await wait_until(lambda: not server.connections)
            first = stats.accepted
            assert 2 <= first <= 4, first  # the client's, then at most a few the relay made to itself
            assert stats.closed["limit"] == 0
            assert ("127.0.0.2", port) in server.shared.own
            assert await reset_or_closed(port) == b""
            await wait_until(lambda: not server.connections)
            assert stats.accepted == first + 1
            assert stats.connect_errors["loop"] >= 2
        finally:
            await server.drain()

    run(scenario())


def test_the_same_port_on_an_address_that_is_not_the_relays_is_forwarded(run: Run) -> None:
    """A listener on 127.0.0.1:P and a target 127.0.0.2:P (an echo server): same port, not the relay."""
    from tests.support import echo, read_all, tcp_server

    port = free_port_block(1)

    async def scenario() -> None:
        route = Route("same-port", (HostPort("127.0.0.1", port),), "127.0.0.2", port)
        server = Server(Config(routes=(route,), metrics=None, drain_timeout=1.0))
        async with tcp_server(echo, host="127.0.0.2", port=port):
            await server.start()
            try:
                assert server.shared.own == {("127.0.0.1", port)}
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"through")
                writer.write_eof()
                assert await read_all(reader) == b"through"
                writer.close()
            finally:
                await server.drain()

    run(scenario())


def test_connect_warnings_fit_the_target(topology: Callable[..., Topology]) -> None:
    """Steps: a relay in the app namespace with a route to a name nobody knows (other.host) and one to a
    closed port on the namespace's own veth address; start-up warns that other.host does not resolve,
    naming it and without extra_hosts advice; a client on each route is reset, and each warning gives
    the hint that fits: the unknown name, and "this address is the app container's own" (not "bind
    0.0.0.0")."""
    topo = topology()
    config = Path("/etc/netns") / topo.app / "relay.yaml"
    config.write_text(
        "listen: 127.0.0.1\nmetrics: off\nroutes:\n"
        "  - {name: typo, listen: 7001, target: 'other.host:5432'}\n"
        f"  - {{name: here, listen: 7002, target: '{APP_IP}:7999'}}\n"
    )
    relay = topo.relay(["--config", str(config)])
    start = relay.wait_for("target: other.host does not resolve")
    assert "other.host is not in this container's /etc/hosts" in start and "extra_hosts" not in start
    for port in (7001, 7002):
        probe = topo.run_in_app(["-c", CLIENT, str(port)])
        assert probe.stdout.strip() == "closed", probe.stdout + probe.stderr
    typo = relay.wait_for("typo: cannot connect")
    assert "(unresolved: " in typo and "other.host is not in this container's /etc/hosts" in typo
    assert "extra_hosts" not in typo and "host.docker.internal" not in typo
    here = relay.wait_for("here: cannot connect")
    assert f"cannot connect to {APP_IP}:7999 (refused: " in here
    assert f"{APP_IP} is an address of the relay's own network namespace" in here and "0.0.0.0" not in here
    assert relay.stop() == 0


# Run in the app namespace: connect to 127.0.0.1:PORT, send, print "closed" when the relay closes or
# resets the connection without an answer.
CLIENT = """
import socket, sys
try:
    with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as s:
        s.sendall(b"hello")
        print("closed" if s.recv(100) == b"" else "answered")
except ConnectionError:
    print("closed")
"""


def test_two_socat_style_relays_share_one_namespace(topology: Callable[..., Topology]) -> None:
    """Steps: the socat recipe, one sidecar per port, in one app namespace: two relays started with
    only socat arguments (so both default to metrics on 0.0.0.0:9464). The first serves the endpoint;
    the second warns once that the address is taken and serves its port without it (before: it exited
    1). Both forward to the host namespace, over 127.0.0.1 and ::1. A third relay that asks for 9464
    explicitly still fails with exit 1."""
    topo = topology()
    topo.host_services(HOST_IP, 8001, 8002)
    first = topo.relay(["-d", "tcp-listen:7001,fork,reuseaddr", f"tcp-connect:{HOST_IP}:8001"])
    first.wait_for("metrics and health: http://0.0.0.0:9464/metrics")
    second = topo.relay(["-d", "tcp-listen:7002,fork,reuseaddr", f"tcp-connect:{HOST_IP}:8002"])
    warning = second.wait_for("already in use")
    assert "0.0.0.0:9464 is already in use (another relay in this network namespace?)" in warning
    assert sum("already in use" in line for line in second.lines) == 1
    result = topo.app_client("4:7001:8001", "6:7001:8001", "4:7002:8002", "6:7002:8002")
    assert result.returncode == 0, result.stdout + result.stderr
    third = topo.relay(["--ports", "7003", "--target", HOST_IP, "--metrics", "9464"], wait=False)
    assert third.proc.wait(30) == 1
    assert "cannot listen on 0.0.0.0:9464 for metrics and health: address already in use" in third.output()
    assert second.stop() == 0 and first.stop() == 0


def test_start_up_log_says_where_connections_go_as_the_readme_shows(
    topology: Callable[..., Topology],
) -> None:
    """Steps: RELAY_PORTS=5432 with the default auto target in the sidecar topology (the hosts file maps
    host.docker.internal to the host namespace's address); the relay's start-up lines are the README's
    example, with this topology's address and the version in place of the README's."""
    from relay import __version__

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("### Logs", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    expected = [
        line.split(" ", 1)[1].replace("172.17.0.1", HOST_IP).replace("relay 0.1.0", f"relay {__version__}")
        for line in block.splitlines()
    ]
    assert len(expected) == 3
    relay = topology().relay([], {"RELAY_PORTS": "5432", "RELAY_METRICS": "off"})
    relay.wait_for("target: ")
    logged = [line.split(" ", 2)[2] for line in relay.lines if line.count(" ") >= 2]
    for line in expected:
        assert line in logged, (line, relay.output())
    assert relay.stop() == 0


def test_scripts_run_without_arguments_is_a_loopback_demo() -> None:
    """Steps: `scripts/run` with no arguments runs scripts/demo.py (before: the example config, which
    forwarded 5432 and 8000-8010 to the default gateway and opened metrics on all interfaces). The demo
    prints what it started and the curl line to try; that curl works through the relay; the relay and
    its metrics listen on loopback only; Ctrl-C (SIGINT) ends it with exit 0."""
    import signal
    import sys
    import urllib.request

    from tests.support import LineProcess, has_ipv6_loopback

    root = Path(__file__).resolve().parent.parent
    script = (root / "scripts" / "run").read_text()
    no_arguments = script.split("if [[ $# == 0 && -z ${RELAY_CONFIG:-}", 1)[1].split("fi\n", 1)[0]
    assert "exec .venv/bin/python scripts/demo.py" in no_arguments
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("RELAY_") and k != "PORTS"}
    with LineProcess([sys.executable, str(root / "scripts" / "demo.py")], env, cwd=root) as demo:
        port = _number(r"localhost:(\d+)/", demo.wait_for("  curl http://localhost:"))
        metrics = _number(r"127\.0\.0\.1:(\d+)/metrics", demo.wait_for("/metrics | grep"))
        demo.wait_for("ready")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
            assert response.read().startswith(b"hello from the demo server behind relay-sidecar")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as response:
            assert f'relay_connections_accepted_total{{route="tcp/{port}"}} 1.0' in response.read().decode()
        route = demo.wait_for(f"tcp/{port}: ")
        listening = f"127.0.0.1:{port}, [::1]:{port}" if has_ipv6_loopback() else f"127.0.0.1:{port}"
        assert f"tcp/{port}: {listening} -> 127.0.0.1:" in route
        assert f"metrics and health: http://127.0.0.1:{metrics}/metrics" in demo.output()
        assert "0.0.0.0" not in demo.output()
        assert demo.stop(signal.SIGINT) == 0


def _number(pattern: str, line: str) -> int:
    found = re.search(pattern, line)
    assert found is not None, (pattern, line)
    return int(found.group(1))
