"""Scrapes of many routes (issue 17): a port range is one metrics series, and a scrape of 10,000 series
never holds the loop for long while relayed traffic flows."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from relay.address import HostPort
from relay.cli import http_endpoint
from relay.config import Config, Raw, Route, build
from relay.server import Server
from tests.support import echo, free_port_block, http_get, scrape, tcp_server, value

Run = Callable[..., Any]
ROUTES = 10_000


def test_a_port_range_is_one_series(run: Run) -> None:
    """Steps: RELAY_PORTS=LO-HI:T, 1,000 ports on 127.0.0.1; one connection through a port in the middle.
    The scrape has one route label value, `tcp/LO-HI` (single ports keep `tcp/P`), counting that
    connection; relay_listener_up says 127.0.0.1:LO-HI listens; /readyz lists the range as one entry;
    the whole scrape stays under 16 KB (it was 3.8 MB, one series set per port)."""

    async def scenario() -> None:
        async with tcp_server(echo) as target:
            lo = free_port_block(1000, ipv6=False)
            hi = lo + 999
            config = build(
                {
                    "ports": Raw(f"{lo}-{hi}:{target} {hi + 1}:{target}", "RELAY_PORTS"),
                    "target": Raw("127.0.0.1", "RELAY_TARGET"),
                    "listen": Raw("127.0.0.1", "RELAY_LISTEN"),
                }
            )
            server = Server(
                replace(config, metrics=HostPort("127.0.0.1", 0), drain_timeout=1.0), endpoint=http_endpoint
            )
            await server.start()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", lo + 500)
                writer.write(b"ranged")
                writer.write_eof()
                assert await reader.read() == b"ranged"
                writer.close()
                assert server.health_address is not None
                status, body = await http_get(server.health_address, "/metrics")
                assert status == 200 and len(body) < 16_000, len(body)
                series = f"tcp/{lo}-{hi}"
                s = await scrape(server)
                assert {dict(labels).get("route") for _, labels in s} - {None} == {series, f"tcp/{hi + 1}"}
                assert value(s, "relay_connections_accepted_total", route=series) == 1
                assert value(s, "relay_listener_up", route=series, address=f"127.0.0.1:{lo}-{hi}") == 1
                status, body = await http_get(server.health_address, "/readyz")
                assert status == 200
                assert json.loads(body)["routes"][series] == {
                    "listening": [f"127.0.0.1:{lo}-{hi}"],
                    "ready": True,
                }
            finally:
                await server.drain()

    run(scenario(), timeout=60)


def test_a_scrape_of_10000_series_never_holds_the_loop(run: Run) -> None:
    """Steps: 10,000 routes, each its own series (the worst case: no range to fold), on 127.0.0.1 port 0.
    A ticker on the loop records the CPU time the loop's thread spends between two of its ticks while
    three scrapes are read by another thread and a client sends round trips through a route. Every gap is
    under 50 ms of CPU (a scrape took 3.5 s in one piece before), every round trip comes back intact, and
    each scrape holds every series."""
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < ROUTES + 500:
        pytest.skip(f"needs {ROUTES + 500} open files for {ROUTES} listeners")

    async def scenario() -> None:
        async with tcp_server(echo) as target:
            routes = tuple(
                Route(f"r{i}", (HostPort("127.0.0.1", 0),), "127.0.0.1", target) for i in range(ROUTES)
            )
            config = Config(
                routes=routes, metrics=HostPort("127.0.0.1", 0), max_connections=64, drain_timeout=1.0
            )
            server = Server(config, endpoint=http_endpoint)
            await server.start()
            try:
                assert server.health_address is not None
                gaps = await while_scraping(server, server.health_address.port)
                assert max(gaps) < 0.05, f"the loop ran {max(gaps) * 1000:.0f} ms of CPU without a turn"
            finally:
                await server.drain()

    run(scenario(), timeout=120)


async def while_scraping(server: Server, metrics_port: int) -> list[float]:
    """CPU seconds of the loop's thread between consecutive ticks while 3 scrapes are read by a thread
    and round trips go through the first route; checks the scrapes and the round trips."""
    loop = asyncio.get_running_loop()
    bodies: list[bytes] = []
    scraping = threading.Thread(target=lambda: bodies.extend(_get(metrics_port) for _ in range(3)))
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.thread_time()
        while scraping.is_alive():
            await asyncio.sleep(0.001)
            now = time.thread_time()
            gaps.append(now - last)
            last = now

    async def round_trips() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.listeners[0].address.port)
        count = 0
        while scraping.is_alive():
            message = count.to_bytes(4) * 16
            writer.write(message)
            assert await reader.readexactly(len(message)) == message
            count += 1
        writer.close()
        return count

    scraping.start()
    ticks = asyncio.ensure_future(ticker())
    trips = await round_trips()
    await ticks
    await loop.run_in_executor(None, scraping.join)
    assert trips > 0 and len(bodies) == 3
    for body in bodies:
        assert body.count(b"relay_connections_accepted_total{route=") == ROUTES
        assert f'relay_connections_accepted_total{{route="r{ROUTES - 1}"}}'.encode() in body
    return gaps


def _get(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body
