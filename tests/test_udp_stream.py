"""UDP listener to a TCP target (relay/udp_stream.py), as socat's `UDP-LISTEN:514,fork TCP:collector:601`,
end to end on both loops against a syslog-like line collector."""

from __future__ import annotations

import asyncio
from typing import Any

from relay.address import HostPort
from relay.cli import http_endpoint, parse
from relay.config import Config, Route
from relay.server import Server
from tests.support import scrape, tcp_server, value
from tests.test_udp import udp_peer

Run = Any


class Collector:
    """A TCP line collector: records what each connection sent, answers `ack N` per line, and notes
    each connection's end."""

    def __init__(self) -> None:
        self.received: list[bytearray] = []
        self.ended = asyncio.Event()
        self.lines: asyncio.Queue[bytes] = asyncio.Queue()

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine = bytearray()
        self.received.append(mine)
        while line := await reader.readline():
            mine.extend(line)
            self.lines.put_nowait(line)
            writer.write(f"ack {len(mine)}\n".encode())
            await writer.drain()
        self.ended.set()


async def _relay(target: int, **settings: Any) -> Server:
    route = Route("syslog", (HostPort("127.0.0.1", 0),), "127.0.0.1", target, "udp", target_protocol="tcp")
    settings.setdefault("metrics", HostPort("127.0.0.1", 0))
    server = Server(Config(routes=(route,), drain_timeout=1.0, **settings), endpoint=http_endpoint)
    await server.start()
    return server


def test_datagrams_reach_a_tcp_collector_and_replies_come_back(run: Run) -> None:
    """Two clients each send two syslog lines as datagrams: the collector gets one TCP connection per
    client with that client's bytes as sent (no framing added), and its replies come back to the right
    client as datagrams; the route's UDP counters and metrics count them."""

    async def scenario() -> None:
        collector = Collector()
        async with tcp_server(collector.handler) as target:
            server = await _relay(target)
            try:
                port = server.listeners[0].address.port
                async with (
                    udp_peer(remote=("127.0.0.1", port)) as (one, _),
                    udp_peer(remote=("127.0.0.1", port)) as (two, _),
                ):
                    one.send(b"<14>one: first\n")
                    assert await one.reply() == b"ack 15\n"
                    two.send(b"<14>two: first\n")
                    assert await two.reply() == b"ack 15\n"
                    one.send(b"<14>one: second\n")
                    assert await one.reply() == b"ack 31\n"
                    assert sorted(bytes(r) for r in collector.received) == [
                        b"<14>one: first\n<14>one: second\n",
                        b"<14>two: first\n",
                    ]
                    assert one.received.empty() and two.received.empty()
                stats = server.udp.stats["syslog"]
                assert (stats.datagrams_c2t, stats.datagrams_t2c, stats.sessions) == (3, 3, 2)
                samples = await scrape(server)
                assert value(samples, "relay_udp_sessions_active", route="syslog") == 2
                assert value(samples, "relay_bytes_total", route="syslog", direction="client_to_target") == 46
            finally:
                await server.drain()

    run(scenario())


def test_a_burst_before_the_connection_is_made_arrives_in_order(run: Run) -> None:
    async def scenario() -> None:
        collector = Collector()
        async with tcp_server(collector.handler) as target:
            server = await _relay(target)
            try:
                port = server.listeners[0].address.port
                async with udp_peer(remote=("127.0.0.1", port)) as (client, _):
                    for n in range(10):
                        client.send(f"line {n}\n".encode())
                    for _ in range(10):
                        await asyncio.wait_for(collector.lines.get(), 5)
                    assert bytes(collector.received[0]) == b"".join(f"line {n}\n".encode() for n in range(10))
            finally:
                await server.drain()

    run(scenario())


def test_an_idle_session_closes_its_tcp_connection(run: Run) -> None:
    """udp_idle_timeout ends the session: the collector sees its connection end (FIN); the client's next
    datagram opens a new connection."""

    async def scenario() -> None:
        collector = Collector()
        async with tcp_server(collector.handler) as target:
            server = await _relay(target, udp_idle_timeout=1.0)
            try:
                port = server.listeners[0].address.port
                async with udp_peer(remote=("127.0.0.1", port)) as (client, _):
                    client.send(b"hello\n")
                    assert await client.reply() == b"ack 6\n"
                    await asyncio.wait_for(collector.ended.wait(), 10)
                    assert server.udp.stats["syslog"].sessions == 0
                    client.send(b"again\n")
                    assert await client.reply() == b"ack 6\n"
                    assert len(collector.received) == 2
            finally:
                await server.drain()

    run(scenario())


def test_a_refused_target_drops_and_counts(run: Run) -> None:
    async def scenario() -> None:
        async with tcp_server(Collector().handler) as target:
            pass  # closed: nothing listens there now
        server = await _relay(target)
        try:
            port = server.listeners[0].address.port
            async with udp_peer(remote=("127.0.0.1", port)) as (client, _):
                client.send(b"lost\n")
                async with asyncio.timeout(5):
                    while not server.udp.stats["syslog"].dropped["unreachable"]:
                        await asyncio.sleep(0.01)
                assert server.udp.stats["syslog"].sessions == 0
        finally:
            await server.drain()

    run(scenario())


def test_socat_udp_listen_to_tcp_is_a_udp_route_with_a_tcp_target() -> None:
    _, config, _ = parse(["-T", "30", "UDP4-RECVFROM:514,fork", "TCP4:10.0.0.1:601"], {})
    (route,) = config.routes
    assert (route.protocol, route.target_protocol, route.target, route.target_port) == (
        "udp",
        "tcp",
        "10.0.0.1",
        601,
    )
    assert [str(hp) for hp in route.listen] == ["0.0.0.0:514"]
    assert config.udp_idle_timeout == 30.0


def test_a_tcp_target_on_the_udp_listen_port_is_no_loop() -> None:
    """UDP-LISTEN:5140 to TCP:127.0.0.1:5140 reaches a TCP service, not the relay's own UDP socket; the
    loop check compared it with the UDP listeners and refused the line."""
    _, config, _ = parse(["UDP-LISTEN:5140,fork", "TCP:127.0.0.1:5140"], {})
    assert config.routes[0].target_port == 5140
