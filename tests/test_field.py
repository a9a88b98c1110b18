"""Faults met in the field, reproduced with real sockets on both loops: clients that reset at once,
garbage storms, leaked pairs, exhausted slots."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import struct
from collections.abc import Callable
from typing import Any

from relay.address import HostPort
from tests.support import echo, http_get, port_of, relay, scrape, tcp_server, value, wait_until

Run = Callable[..., Any]
LINGER_RST = struct.pack("ii", 1, 0)


def open_sockets() -> int:
    """Sockets this process holds now (the relay runs in-process in these tests)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            continue  # the fd of the listing itself, gone already
    return count


async def storm_client(port: int, kind: str, rng: random.Random) -> None:
    """One misbehaving client: reset after 0-1 ms, garbage then reset, or bytes then FIN."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await asyncio.sleep(rng.random() / 1000)
        if kind != "rst":
            await loop.sock_sendall(sock, rng.randbytes(rng.randint(1, 2048)))
        if kind == "fin":
            sock.shutdown(socket.SHUT_WR)
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except ConnectionError:
        pass  # the relay may reset first (a full backlog, or the target's own reset); that is its right
    finally:
        sock.close()


def test_early_reset_storm_leaves_no_connection_behind(run: Run) -> None:
    """Steps: 3,000 clients, 100 at a time, mixed: reset 0-1 ms after connecting (two thirds), random
    bytes then reset, bytes then FIN. Then: relay_connections_active is 0 on /metrics, every pair has
    finished, the process holds exactly the sockets it held before the storm, /readyz is 200, and a
    normal client still gets its echo.

    Before the fix, uvloop left some pairs waiting forever for a target connection_lost that never came
    (its create_connection, cut by the client's reset, closed the transport without reporting)."""
    rng = random.Random(8)
    kinds = ["rst", "rst", "garbage", "rst", "fin", "rst"]

    async def scenario() -> None:
        async with (
            tcp_server(echo) as target,
            relay(target, metrics=HostPort("127.0.0.1", 0)) as server,
        ):
            port = port_of(server)
            assert server.health_address is not None
            await http_get(server.health_address, "/readyz")  # the health server's own socket, settled
            before = open_sockets()
            for batch in range(30):
                await asyncio.gather(
                    *(storm_client(port, kinds[(batch + i) % len(kinds)], rng) for i in range(100))
                )
            await wait_until(lambda: not server.connections, timeout=10)
            samples = await scrape(server)
            assert value(samples, "relay_connections_active", route="test") == 0
            assert value(samples, "relay_connections_accepted_total", route="test") == 3000
            await wait_until(lambda: open_sockets() == before, timeout=10)
            status, body = await http_get(server.health_address, "/readyz")
            assert status == 200, body
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"still here")
            writer.write_eof()
            assert await reader.read() == b"still here"
            writer.close()

    run(scenario(), timeout=90)


def test_readiness_says_when_slots_are_exhausted(run: Run) -> None:
    """Steps: max_connections 2; two clients hold connections; a third is refused; /readyz answers 503
    naming max_connections; after one holder leaves, /readyz is 200 again."""

    async def scenario() -> None:
        async with (
            tcp_server(echo) as target,
            relay(target, max_connections=2, metrics=HostPort("127.0.0.1", 0)) as server,
        ):
            assert server.health_address is not None
            held = [await asyncio.open_connection("127.0.0.1", port_of(server)) for _ in range(2)]
            await wait_until(lambda: len(server.connections) == 2)
            assert (await http_get(server.health_address, "/readyz"))[0] == 200
            _, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            await wait_until(lambda: server.stats["test"].closed["limit"] == 1)
            status, body = await http_get(server.health_address, "/readyz")
            assert status == 503
            reasons = json.loads(body)["reasons"]
            assert any("max_connections (2) reached" in r for r in reasons), reasons
            writer.close()
            held[0][1].close()
            await wait_until(lambda: len(server.connections) == 1)
            status, body = await http_get(server.health_address, "/readyz")
            assert status == 200, body
            held[1][1].close()

    run(scenario())
