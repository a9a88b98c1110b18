"""The health endpoint under a hostile neighbour: sockets held open on the metrics port, idle or with a
partial request, must not keep /healthz, /readyz or the image's health check from answering (issue 17).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from relay import health as health_module
from relay.address import HostPort
from relay.cli import http_endpoint
from relay.config import Config, Route
from relay.health import HealthServer
from relay.server import Server
from tests.support import (
    RelayProcess,
    echo,
    free_port_block,
    http_get,
    relay,
    scrape,
    tcp_server,
    value,
    wait_until,
)
from tests.test_cli import echo_server, run_relay

Run = Callable[..., Any]
PARTIAL = b"GET /readyz HTTP/1.1\r\nHost: relay\r\n"  # no blank line: the request never ends


async def hold(address: HostPort, count: int) -> list[asyncio.StreamWriter]:
    """`count` connections to the port: every other one sends a partial request, the rest nothing."""
    writers = []
    for i in range(count):
        _, writer = await asyncio.open_connection(address.host, address.port)
        if i % 2:
            writer.write(PARTIAL)
        writers.append(writer)
    return writers


@pytest.mark.parametrize("count", [20, 200])
def test_health_answers_within_a_second_while_sockets_are_held(run: Run, count: int) -> None:
    """Steps: `count` sockets connect to the metrics port and stay open, half of them with a partial
    request; then /readyz and /healthz each answer 200 within 1 s, and the metrics count the held
    sockets the endpoint closed to make room (evicted)."""

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target, metrics=HostPort("127.0.0.1", 0)) as server:
            address = server.health_address
            assert address is not None
            held = await hold(address, count)
            try:
                for path in ("/readyz", "/healthz", "/readyz"):
                    async with asyncio.timeout(1.0):
                        status, body = await http_get(address, path)
                    assert status == 200, body
                s = await scrape(server)
                assert value(s, "relay_http_clients_closed_total", reason="evicted") >= count - 16
            finally:
                for writer in held:
                    writer.transport.abort()

    run(scenario())


def test_idle_and_partial_clients_are_closed_counted_and_logged_once(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: three clients connect; two send a partial request, one nothing. Each is closed once the
    header timeout passes (its read sees EOF), the scrape counts 3 timeouts, and the log has one line
    for them (rate-limited), naming the port."""

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target, metrics=HostPort("127.0.0.1", 0)) as server:
            address = server.health_address
            assert address is not None
            readers = []
            for i in range(3):
                reader, writer = await asyncio.open_connection(address.host, address.port)
                if i:
                    writer.write(PARTIAL)
                readers.append((reader, writer))
            for reader, writer in readers:
                async with asyncio.timeout(5.0):
                    with contextlib.suppress(ConnectionResetError):
                        assert await reader.read() == b""
                writer.close()
            s = await scrape(server)
            assert value(s, "relay_http_clients_closed_total", reason="timeout") == 3
            assert value(s, "relay_http_clients_closed_total", reason="slow") == 0

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records if "sent no complete request" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "metrics and health on 127.0.0.1:" in lines[0]


@contextlib.contextmanager
def held_sockets(port: int, count: int) -> Iterator[list[socket.socket]]:
    socks = []
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            if i % 2:
                sock.sendall(PARTIAL)
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


@contextlib.contextmanager
def relay_with_health() -> Iterator[int]:
    """A relay process (one route to an echo server) with its health endpoint on a free port."""
    listen = free_port_block(2)
    health = listen + 1
    with (
        echo_server() as target,
        RelayProcess(
            ["--ports", f"{listen}:{target}", "--target", "127.0.0.1", "--listen", "127.0.0.1"],
            env={"RELAY_METRICS": f"127.0.0.1:{health}"},
        ) as proc,
    ):
        proc.wait_for("ready")
        yield health
        assert proc.stop() == 0


@pytest.mark.parametrize("count", [20, 200])
def test_healthcheck_command_passes_while_sockets_are_held(count: int) -> None:
    """Steps: a relay process; `count` sockets held on its metrics port (half with a partial request);
    `relay healthcheck`, as the image's HEALTHCHECK ran it, exits 0 with the ready answer."""
    with relay_with_health() as health, held_sockets(health, count):
        done = run_relay(["healthcheck"], {"RELAY_METRICS": f"127.0.0.1:{health}"})
        assert done.returncode == 0, done.stderr
        assert '"status": "ready"' in done.stdout


def test_probe_module_passes_while_sockets_are_held() -> None:
    """Steps: as above with 200 held sockets, the image's light health check (`python -I -m relay.probe`,
    address from RELAY_METRICS) exits 0 with the ready answer; once the relay is gone it exits 1 and
    names the address."""
    env = {"RELAY_METRICS": ""}
    with relay_with_health() as health, held_sockets(health, 200):
        env["RELAY_METRICS"] = f"127.0.0.1:{health}"
        done = probe(env)
        assert done.returncode == 0, done.stderr
        assert '"status": "ready"' in done.stdout
    down = probe(env)
    assert down.returncode == 1
    assert f"127.0.0.1:{health}" in down.stderr


def probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-I", "-m", "relay.probe"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


def test_probe_reads_the_address_as_the_relay_does(tmp_path: Path) -> None:
    """Steps: with no RELAY_METRICS, the probe takes the config file's `metrics:` (RELAY_CONFIG) and
    exits 0 against the running relay; RELAY_METRICS wins over the file; a bad RELAY_METRICS is one line
    naming the variable and the value, exit 1 (Docker reserves 2); off says the endpoint is off."""
    config = tmp_path / "relay.yaml"
    with relay_with_health() as health:
        config.write_text(f"ports: [1]\nmetrics: 127.0.0.1:{health}\n")
        done = probe({"RELAY_CONFIG": str(config)})
        assert done.returncode == 0, done.stderr
        assert '"status": "ready"' in done.stdout
        config.write_text("metrics: 127.0.0.1:1\n")
        assert probe({"RELAY_CONFIG": str(config), "RELAY_METRICS": f"127.0.0.1:{health}"}).returncode == 0
    bad = probe({"RELAY_METRICS": "127.0.0.1:http"})
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and "RELAY_METRICS: '127.0.0.1:http'" in bad.stderr, bad.stderr
    off = probe({"RELAY_METRICS": "off"})
    assert off.returncode == 1 and "off" in off.stderr


def test_probe_imports_neither_the_relay_nor_its_dependencies() -> None:
    """Steps: the probe runs (nothing answers: exit 1) with Python's import log on; it never imported
    asyncio, ssl, uvloop, yaml or prometheus_client (each costs the container memory every 30 s)."""
    done = subprocess.run(
        [sys.executable, "-I", "-X", "importtime", "-m", "relay.probe"],
        env={"RELAY_METRICS": f"127.0.0.1:{free_port_block(1)}"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "relay.address" in imported
    heavy = {"asyncio", "ssl", "uvloop", "yaml", "prometheus_client", "relay.config", "relay.server"}
    assert not heavy & imported, heavy & imported


def test_a_scraper_that_stops_reading_is_closed_and_counted(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Steps: 1,000 routes make /metrics a few MB; a client asks for it with a small receive buffer and
    never reads. Once the relay's send buffer is full and nothing moves for SEND_TIMEOUT (0.5 s here),
    the client is closed and counted as `slow`; /readyz still answers 200 meanwhile and after."""
    monkeypatch.setattr(health_module, "SEND_TIMEOUT", 0.5)

    async def scenario() -> None:
        async with tcp_server(echo) as target:
            routes = tuple(
                Route(f"r{i}", (HostPort("127.0.0.1", 0),), "127.0.0.1", target) for i in range(1000)
            )
            server = Server(
                Config(
                    routes=routes, metrics=HostPort("127.0.0.1", 0), max_connections=64, drain_timeout=1.0
                ),
                endpoint=http_endpoint,
            )
            await server.start()
            try:
                health, address = server.health, server.health_address
                assert isinstance(health, HealthServer) and address is not None
                with socket.socket() as stuck:
                    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    stuck.setblocking(False)
                    await asyncio.get_running_loop().sock_connect(stuck, (address.host, address.port))
                    await asyncio.get_running_loop().sock_sendall(stuck, b"GET /metrics HTTP/1.1\r\n\r\n")
                    assert (await http_get(address, "/readyz"))[0] == 200
                    await wait_until(lambda: health.closed["slow"] == 1)
                assert (await http_get(address, "/readyz"))[0] == 200
                assert health.closed["timeout"] == health.closed["evicted"] == 0
            finally:
                await server.drain()

    run(scenario(), timeout=60)
