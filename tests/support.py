"""In-process relays and target servers on port 0, for the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from relay.address import HostPort
from relay.config import Config, Route
from relay.server import Server

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def relay(
    target_port: int, *, listen: tuple[str, ...] = ("127.0.0.1",), target: str = "127.0.0.1", **settings: Any
) -> AsyncIterator[Server]:
    """A relay with one route from `listen` (port 0) to target:target_port; drained on exit."""
    route = Route("test", tuple(HostPort(host, 0) for host in listen), target, target_port)
    settings.setdefault("drain_timeout", 1.0)
    server = Server(Config(routes=(route,), metrics=None, **settings))
    await server.start()
    try:
        yield server
    finally:
        await server.drain()


def port_of(server: Server) -> int:
    return server.listeners[0].address.port


@contextlib.asynccontextmanager
async def tcp_server(handler: Handler, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[int]:
    """An asyncio stream server; on exit every open connection is aborted and its handler awaited."""
    open_writers: set[asyncio.StreamWriter] = set()
    done: set[asyncio.Future[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.add(writer)
        finished = asyncio.get_running_loop().create_future()
        done.add(finished)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            open_writers.discard(writer)
            finished.set_result(None)

    server = await asyncio.start_server(tracked, host, port)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in list(open_writers):
            writer.transport.abort()
        if done:
            await asyncio.wait(done, timeout=5)
        await server.wait_closed()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def unused_port() -> int:
    """A port nobody listens on (bound then released, so connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await reader.read(-1)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port_block(count: int, after: int = 0) -> int:
    """The first of `count` consecutive ports above `after`, free on 127.0.0.1 and ::1 right now."""
    start = max(after + 1, 20000 + (os.getpid() % 200) * 150)
    for base in range(start, 60000, 997):
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                for fam, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
                    if fam == socket.AF_INET6 and not has_ipv6_loopback():
                        continue
                    s = socket.socket(fam, socket.SOCK_STREAM)
                    socks.append(s)
                    s.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no block of free ports found")
