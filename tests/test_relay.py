"""The relay's TCP behaviour with real sockets on loopback, on asyncio and on uvloop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import Callable
from typing import Any, cast

import pytest

from relay.config import Raw, build
from relay.server import Server
from tests.support import (
    echo,
    free_port_block,
    has_ipv6_loopback,
    port_of,
    read_all,
    relay,
    tcp_server,
    unused_port,
    wait_until,
)

Run = Callable[..., Any]


async def round_trip(port: int, payload: bytes, host: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    writer.write_eof()
    data = await read_all(reader)
    writer.close()
    return data


def test_round_trip_over_ipv4_and_ipv6(run: Run) -> None:
    """Steps: relay listens on 127.0.0.1 and ::1; a payload sent over each comes back intact."""
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target, listen=("127.0.0.1", "::1")) as server:
            assert {a.address.host for a in server.listeners} == {"127.0.0.1", "::1"}
            port = port_of(server)
            payload = os.urandom(300_000)
            assert await round_trip(port, payload, "127.0.0.1") == payload
            assert await round_trip(port, payload, "::1") == payload
            await wait_until(lambda: not server.connections)
            assert server.stats["test"].closed["eof"] == 2

    run(scenario())


def test_reply_after_client_half_close_arrives(run: Run) -> None:
    """Steps: client sends a request and shuts its write side; the server reads to EOF, answers a
    second later; the answer reaches the client (socat's 0.5 s cut would lose it)."""

    async def answer_late(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read(-1)
        await asyncio.sleep(1.0)  # the scenario: a reply well after the client's FIN
        writer.write(b"reply to " + request)
        await writer.drain()

    async def scenario() -> None:
        async with tcp_server(answer_late) as target, relay(target) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"question")
            writer.write_eof()
            assert await read_all(reader) == b"reply to question"
            writer.close()

    run(scenario())


def test_target_half_close_passes_to_client(run: Run) -> None:
    """Steps: the server sends a banner and shuts its write side; the client sees EOF, then sends data
    that still reaches the server, which reports what it got over a side channel."""
    got: asyncio.Future[bytes] | None = None

    async def banner_then_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        writer.write_eof()
        data = await reader.read(-1)
        assert got is not None
        got.set_result(data)

    async def scenario() -> None:
        nonlocal got
        got = asyncio.get_running_loop().create_future()
        async with tcp_server(banner_then_read) as target, relay(target) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            assert await read_all(reader) == b"banner"
            writer.write(b"after the server's FIN")
            writer.write_eof()
            assert await got == b"after the server's FIN"
            writer.close()

    run(scenario())


def test_200_concurrent_connections_keep_their_bytes(run: Run) -> None:
    """Steps: 200 clients at once each send a random payload (up to 200 kB) and read the echo;
    every echo matches its payload's checksum, and the byte counters add up exactly."""

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target) as server:
            port = port_of(server)
            payloads = [os.urandom(int.from_bytes(os.urandom(3)) % 200_000 + 1) for _ in range(200)]
            echoed = await asyncio.gather(*(round_trip(port, p) for p in payloads))
            for sent, got in zip(payloads, echoed, strict=True):
                assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()
            await wait_until(lambda: not server.connections)
            stats = server.stats["test"]
            total = sum(len(p) for p in payloads)
            assert (stats.bytes_c2t, stats.bytes_t2c, stats.closed["eof"]) == (total, total, 200)

    run(scenario(), timeout=60)


def test_slow_reader_keeps_relay_buffers_bounded(run: Run) -> None:
    """Steps: the server pushes 32 MiB at a client that does not read; the server ends up blocked
    (backpressure reached it) with the relay holding at most 1 MiB per direction; then the client
    reads everything and it is intact."""
    size = 32 * 1024 * 1024
    block = os.urandom(64 * 1024)
    sent = 0

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        while sent < size:
            writer.write(block)
            sent += len(block)
            await writer.drain()
        writer.write_eof()

    def relay_buffered(server: Server) -> int:
        sides = [s for c in server.connections for s in (c.client, c.target) if s.transport is not None]
        return max((s.transport.get_write_buffer_size() for s in sides if s.transport), default=0)

    async def scenario() -> None:
        async with tcp_server(flood) as target, relay(target) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server), limit=2**16)
            transport = cast(asyncio.Transport, writer.transport)
            transport.pause_reading()  # the slow reader: reads nothing for now
            peak = 0
            last, stalled_since = -1, asyncio.get_running_loop().time()
            async with asyncio.timeout(15):
                while asyncio.get_running_loop().time() - stalled_since < 0.5:
                    await asyncio.sleep(0.02)
                    peak = max(peak, relay_buffered(server))
                    if sent != last:
                        last, stalled_since = sent, asyncio.get_running_loop().time()
            assert sent < size, "the server was never slowed down"
            assert peak <= 1024 * 1024
            transport.resume_reading()
            data = await read_all(reader)
            assert len(data) == size
            assert data == block * (size // len(block))
            writer.close()

    run(scenario(), timeout=60)


def test_bytes_sent_before_the_target_answers_arrive_first(run: Run) -> None:
    """Steps: the target port refuses at first and the relay retries; the client speaks first; the
    target starts listening; it receives the client's bytes first and intact, and the echo returns."""
    target_port = unused_port()
    received: list[bytes] = []

    async def record_and_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(-1)
        received.append(data)
        writer.write(data)
        await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with relay(target_port, connect_retry=10.0) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + os.urandom(100_000)
            writer.write(request)
            writer.write_eof()
            await wait_until(lambda: server.stats["test"].accepted == 1)
            target = await asyncio.start_server(record_and_echo, "127.0.0.1", target_port)
            try:
                assert await read_all(reader) == request
                assert received == [request]
            finally:
                target.close()
            writer.close()

    run(scenario())


async def assert_reset(reader: asyncio.StreamReader) -> None:
    """The relay must reset the client (a failed connect), never close it as if the answer were empty."""
    async with asyncio.timeout(2):
        with pytest.raises(ConnectionResetError):
            data = await read_all(reader)
            raise AssertionError(f"closed cleanly after {data!r}: expected a reset")


def test_refused_target_resets_client_promptly_and_relay_stays_up(run: Run) -> None:
    """Steps: nothing listens on the target port; two clients in a row, one silent and one that sent
    bytes first, are reset within the test's 2 s limit each (the same on both loops, whatever the client
    sent); both failures are counted as refused; the relay still accepts."""

    async def scenario() -> None:
        async with relay(unused_port()) as server:
            for first_words in (b"", b"hello"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
                writer.write(first_words)
                await assert_reset(reader)
                writer.close()
            await wait_until(lambda: not server.connections)
            stats = server.stats["test"]
            assert stats.connect_errors["refused"] == 2
            assert stats.closed["connect_failed"] == 2

    run(scenario())


def test_unresolvable_target_resets_client(run: Run) -> None:
    """Steps: the target name does not resolve (a lookup that fails, so no DNS traffic leaves this
    machine); the client is reset and the failure is counted as unresolved."""

    async def no_such_name(*args: object, **kwargs: object) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    async def scenario() -> None:
        from relay.address import HostPort
        from relay.config import Config, Route

        route = Route("test", (HostPort("127.0.0.1", 0),), "db.example.invalid", 5432)
        server = Server(Config(routes=(route,), metrics=None, drain_timeout=1.0), lookup=no_such_name)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            await assert_reset(reader)
            writer.close()
            await wait_until(lambda: not server.connections)
            assert server.stats["test"].connect_errors["unresolved"] == 1
        finally:
            await server.drain()

    run(scenario())


def test_max_connections_closes_extra_connections_at_once(run: Run) -> None:
    """Steps: limit 2; two clients hold connections; a third is closed at once and counted as `limit`;
    after one of the first two leaves, a new client is served again."""

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target, max_connections=2) as server:
            port = port_of(server)
            held = []
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"x")
                assert await reader.readexactly(1) == b"x"
                held.append((reader, writer))
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(2):
                try:
                    assert await reader.read(1) == b""
                except ConnectionResetError:
                    pass
            writer.close()
            assert server.stats["test"].closed["limit"] == 1
            held[0][1].close()
            await wait_until(lambda: len(server.connections) == 1)
            assert await round_trip(port, b"served again") == b"served again"
            held[1][1].close()

    run(scenario())


def test_target_reset_resets_client_promptly(run: Run) -> None:
    """Steps: the target answers once and then resets the connection; the client sees the connection
    end (reset or EOF) at once and the reason is target_reset."""

    async def answer_then_reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(b"pong")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def scenario() -> None:
        async with tcp_server(answer_then_reset) as target, relay(target) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"pong"
            async with asyncio.timeout(2):
                with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                    await reader.readexactly(1)
            writer.close()
            await wait_until(lambda: not server.connections)
            assert server.stats["test"].closed["target_reset"] == 1

    run(scenario())


def test_idle_timeout_closes_quiet_connections(run: Run) -> None:
    """Steps: idle timeout 0.3 s; a client exchanges one message then stays quiet; the relay closes it
    and records idle_timeout."""

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target, idle_timeout=0.3) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
            async with asyncio.timeout(3):
                assert await reader.read(1) == b""
            writer.close()
            await wait_until(lambda: not server.connections)
            assert server.stats["test"].closed["idle_timeout"] == 1

    run(scenario())


def test_every_port_syntax_form_end_to_end(run: Run) -> None:
    """Steps: target servers on 127.0.0.2 report their own port; the relay is configured from one
    RELAY_PORTS string using P, LO-HI, L:T, LLO-LHI:TLO-THI and LLO-LHI:T; every listen port on
    127.0.0.1 reaches the target port the syntax says."""
    try:
        socket.create_server(("127.0.0.2", 0)).close()
    except OSError:
        pytest.skip("127.0.0.2 is not usable on this machine")
    t = free_port_block(3)
    lp = free_port_block(6, after=t + 3)
    spec = f"{t}, {t + 1}-{t + 2}, {lp}:{t}, {lp + 1}-{lp + 3}:{t}-{t + 2}, {lp + 4}-{lp + 5}:{t + 1}/tcp"
    expected = {
        t: t,
        t + 1: t + 1,
        t + 2: t + 2,
        lp: t,
        lp + 1: t,
        lp + 2: t + 1,
        lp + 3: t + 2,
        lp + 4: t + 1,
        lp + 5: t + 1,
    }

    async def scenario() -> None:
        async def report(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(str(writer.get_extra_info("sockname")[1]).encode())
            await writer.drain()

        servers = contextlib.AsyncExitStack()
        for port in range(t, t + 3):
            await servers.enter_async_context(tcp_server(report, "127.0.0.2", port))
        config = build(
            {
                "ports": Raw(spec, "RELAY_PORTS"),
                "target": Raw("127.0.0.2", "RELAY_TARGET"),
                "listen": Raw("127.0.0.1", "RELAY_LISTEN"),
                "metrics": Raw("off", "RELAY_METRICS"),
            }
        )
        server = Server(config)
        await server.start()
        try:
            for listen, target in expected.items():
                reader, writer = await asyncio.open_connection("127.0.0.1", listen)
                assert await read_all(reader) == str(target).encode(), f"listen {listen}"
                writer.close()
        finally:
            await server.drain()
            await servers.aclose()

    run(scenario())


def test_both_sockets_have_nodelay_and_keepalive_when_asked(run: Run) -> None:
    """Steps: with keepalive on, a relayed pair's two sockets both have TCP_NODELAY and SO_KEEPALIVE."""

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target, keepalive=True) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"x")
            await reader.readexactly(1)
            (conn,) = server.connections
            for side in (conn.client, conn.target):
                assert side.transport is not None
                sock = side.transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            writer.close()

    run(scenario())


def test_client_reset_resets_target_promptly(run: Run) -> None:
    """Steps: a client resets its connection mid-stream; the target sees the connection end (reset or
    EOF) at once and the reason is client_reset."""
    ended: asyncio.Future[None] | None = None

    async def wait_for_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert ended is not None
        writer.write(b"hello")
        with contextlib.suppress(ConnectionResetError):
            await reader.read(-1)
        ended.set_result(None)

    async def scenario() -> None:
        nonlocal ended
        ended = asyncio.get_running_loop().create_future()
        async with tcp_server(wait_for_end) as target, relay(target) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            assert await reader.readexactly(5) == b"hello"
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            async with asyncio.timeout(2):
                await ended
            await wait_until(lambda: not server.connections)
            assert server.stats["test"].closed["client_reset"] == 1

    run(scenario())
