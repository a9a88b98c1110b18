"""Metrics, health and readiness over HTTP, read the way Prometheus and Docker read them."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

from relay.address import HostPort
from relay.cli import http_endpoint
from relay.server import Server
from tests.support import (
    echo,
    http_get,
    port_of,
    read_all,
    relay,
    scrape,
    tcp_server,
    unused_port,
    value,
    wait_until,
)

Run = Callable[..., Any]


def test_counters_are_exact_after_known_connections(run: Run) -> None:
    """Steps: 20 connections with random sizes go through; the scrape shows 20 accepted, 20 closed
    (eof), the exact byte totals in each direction, 0 active, and a connect histogram of 20."""

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target, metrics=HostPort("127.0.0.1", 0)) as server:
            sizes = [int.from_bytes(os.urandom(2)) + 1 for _ in range(20)]
            for size in sizes:
                reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
                writer.write(os.urandom(size))
                writer.write_eof()
                assert len(await read_all(reader)) == size
                writer.close()
            await wait_until(lambda: not server.connections)
            s = await scrape(server)
            r = "test"
            assert value(s, "relay_connections_accepted_total", route=r) == 20
            assert value(s, "relay_connections_closed_total", route=r, reason="eof") == 20
            assert value(s, "relay_connections_active", route=r) == 0
            assert value(s, "relay_bytes_total", route=r, direction="client_to_target") == sum(sizes)
            assert value(s, "relay_bytes_total", route=r, direction="target_to_client") == sum(sizes)
            assert value(s, "relay_connect_duration_seconds_count", route=r) == 20
            assert value(s, "relay_connection_duration_seconds_count", route=r) == 20
            assert value(s, "relay_listener_up", route=r, address=str(server.listeners[0].address)) == 1
            assert value(s, "relay_build_info", version=__import__("relay").__version__) == 1
            assert (
                value(s, "relay_target_info", target="127.0.0.1", address="127.0.0.1", source="literal") == 1
            )

    run(scenario())


def test_open_connection_bytes_are_current_at_scrape_time(run: Run) -> None:
    """Steps: one connection stays open after moving 5000 bytes each way; a scrape shows them."""

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target, metrics=HostPort("127.0.0.1", 0)) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"y" * 5000)
            await reader.readexactly(5000)
            s = await scrape(server)
            assert value(s, "relay_connections_active", route="test") == 1
            assert value(s, "relay_bytes_total", route="test", direction="client_to_target") == 5000
            assert value(s, "relay_bytes_total", route="test", direction="target_to_client") == 5000
            writer.close()

    run(scenario())


def test_limit_and_connect_failures_are_counted(run: Run) -> None:
    """Steps: a refusing target and max_connections 1: a held connection that fails to connect and a
    second one past the limit show up as refused/connect_failed and limit."""

    async def scenario() -> None:
        async with relay(
            unused_port(), metrics=HostPort("127.0.0.1", 0), connect_retry=3.0, max_connections=1
        ) as server:
            first = await asyncio.open_connection("127.0.0.1", port_of(server))  # retrying, so held
            await wait_until(lambda: len(server.connections) == 1)
            second_reader, second = await asyncio.open_connection("127.0.0.1", port_of(server))
            try:
                assert await second_reader.read() == b""
            except ConnectionResetError:
                pass
            s = await scrape(server)
            assert value(s, "relay_connections_closed_total", route="test", reason="limit") == 1
            await wait_until(lambda: not server.connections, timeout=8)
            s = await scrape(server)
            assert value(s, "relay_connect_errors_total", route="test", reason="refused") == 1
            assert value(s, "relay_connections_closed_total", route="test", reason="connect_failed") == 1
            assert value(s, "relay_connections_accepted_total", route="test") == 2
            first[1].close()
            second.close()

    run(scenario(), timeout=30)


def test_health_and_readiness(run: Run) -> None:
    """Steps: /healthz and /readyz answer 200 with per-route JSON while serving; unknown paths 404;
    garbage gets 400 and the server keeps answering; after drain starts /readyz is 503."""

    async def scenario() -> None:
        async with tcp_server(echo) as target:
            server = Server(_config(target), endpoint=http_endpoint)
            await server.start()
            assert server.health_address is not None
            address = server.health_address
            assert (await http_get(address, "/healthz"))[0] == 200
            status, body = await http_get(address, "/readyz")
            assert status == 200
            assert json.loads(body) == {
                "status": "ready",
                "routes": {"test": {"listening": [str(server.listeners[0].address)], "ready": True}},
            }
            assert (await http_get(address, "/nope"))[0] == 404
            reader, writer = await asyncio.open_connection(address.host, address.port)
            writer.write(b"\x00\xff garbage\r\n\r\n")
            assert (await read_all(reader)).startswith(b"HTTP/1.1 400")
            writer.close()
            server.shared.drained = asyncio.Event()  # as drain() does first, before closing the listeners
            assert (await http_get(address, "/readyz"))[0] == 503
            await server.drain()

    run(scenario())


def _config(target: int) -> Any:
    from relay.config import Config, Route

    route = Route("test", (HostPort("127.0.0.1", 0),), "127.0.0.1", target)
    return Config(routes=(route,), metrics=HostPort("127.0.0.1", 0), drain_timeout=1.0)


def test_healthcheck_command_needs_only_the_health_address() -> None:
    """Steps: a socat-style relay (routes only in its argv) serves health on a port; `relay healthcheck`
    run with just RELAY_METRICS, as Docker's HEALTHCHECK runs it, exits 0; against a closed port, 1."""
    from tests.support import RelayProcess, free_port_block
    from tests.test_cli import echo_server, run_relay

    listen = free_port_block(2)
    health = listen + 1
    with (
        echo_server() as target,
        RelayProcess(
            [f"tcp-listen:{listen},bind=127.0.0.1", f"tcp:127.0.0.1:{target}"],
            env={"RELAY_METRICS": f"127.0.0.1:{health}"},
        ) as relay,
    ):
        relay.wait_for("ready")
        ok = run_relay(["healthcheck"], {"RELAY_METRICS": f"127.0.0.1:{health}"})
        assert ok.returncode == 0, ok.stderr
        assert '"status": "ready"' in ok.stdout
        assert relay.stop() == 0
    down = run_relay(["healthcheck"], {"RELAY_METRICS": f"127.0.0.1:{health}"})
    assert down.returncode == 1
    assert f"127.0.0.1:{health}" in down.stderr


def test_durations_have_sub_millisecond_resolution(run: Run) -> None:
    """Steps: 20 connections through a loopback relay; the connect and connection duration sums are not
    whole milliseconds (uvloop's loop.time() counts whole milliseconds, which made every loopback connect
    a 0 and the 0.0005 bucket meaningless)."""

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target) as server:
            for _ in range(20):
                reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
                writer.write(b"x")
                writer.write_eof()
                assert await read_all(reader) == b"x"
                writer.close()
            await wait_until(lambda: not server.connections)
            stats = server.stats["test"]
            for histogram in (stats.connect_seconds, stats.duration_seconds):
                assert histogram.count == 20
                millis = histogram.total * 1000
                assert histogram.total > 0 and abs(millis - round(millis)) > 1e-6, histogram.total

    run(scenario())
