"""Faults met in the field, reproduced with real sockets on both loops: clients that reset at once,
garbage storms, leaked pairs, exhausted slots."""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import socket
import struct
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from relay.address import HostPort
from relay.audit import AUDIT_SECONDS
from relay.health import MAX_CLIENTS, HealthServer
from relay.pump import TCP_CLOSE, Side, tcp_closed
from tests.support import (
    RelayProcess,
    connect_when_ready,
    echo,
    exchange,
    free_port_block,
    http_get,
    port_of,
    relay,
    relay_args,
    scrape,
    tcp_server,
    value,
    wait_until,
)
from tests.test_cli import echo_server
from tests.test_lifecycle import readyz

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


def test_audit_finishes_a_pair_whose_close_was_never_reported(run: Run, monkeypatch: Any) -> None:
    """Steps: a loop bug is simulated (the target socket's connection_lost is dropped); the client
    leaves, so the pair can never finish by itself. The first audit only suspects it; the second
    finishes it, counts it in relay_connections_reaped_total and logs it; a healthy pair is untouched."""
    dropped: list[Side] = []
    real_lost = Side.connection_lost

    def deaf(side: Side, exc: Exception | None) -> None:
        if dropped and side is dropped[0]:
            return
        real_lost(side, exc)

    monkeypatch.setattr(Side, "connection_lost", deaf)

    async def scenario() -> None:
        async with (
            tcp_server(echo) as target,
            relay(target, metrics=HostPort("127.0.0.1", 0)) as server,
        ):
            healthy = await asyncio.open_connection("127.0.0.1", port_of(server))
            await wait_until(lambda: len(server.connections) == 1)
            _, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            await wait_until(lambda: len(server.connections) == 2)
            await wait_until(lambda: all(c.client.out is not None for c in server.connections))
            victim = max(server.connections, key=lambda c: c.started)
            dropped.append(victim.target)
            writer.close()
            await wait_until(lambda: victim.client.lost and victim.stuck())
            assert victim in server.connections  # the leak, as a loop bug would leave it
            assert server.audit.run() == 0  # first sighting: only a suspect
            assert server.audit.run() == 1
            assert victim not in server.connections and len(server.connections) == 1
            samples = await scrape(server)
            assert value(samples, "relay_connections_reaped_total", route="test") == 1
            assert value(samples, "relay_connections_active", route="test") == 1
            healthy[1].write(b"ok")
            assert await healthy[0].readexactly(2) == b"ok"
            healthy[1].close()

    run(scenario())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_out_of_descriptors_resets_at_accept_counts_logs_and_recovers(loop: str) -> None:
    """Steps: a relay process is serving; its descriptor limit is lowered from outside (prlimit) to a
    few more than it holds; 30 clients connect one after the other and hold. Each one is either served
    (echo) or gets an honest error at once (reset), none hangs; the relay logs "out of file descriptors"
    and counts the accept-time resets as relay_connections_closed_total{reason="fd_limit"}; once the
    clients leave, a new client is served and /readyz is 200 again within the audit's interval."""
    listen = free_port_block(2)
    metrics_port = listen + 1
    with (
        echo_server() as target,
        RelayProcess(
            relay_args(listen, target, "--listen", "127.0.0.1", "--metrics", f"127.0.0.1:{metrics_port}")
        ) as proc,
    ):
        proc.wait_for("ready")
        held = len(os.listdir(f"/proc/{proc.proc.pid}/fd"))
        soft, hard = resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE, (held + 6, hard))
        outcomes = {"served": 0, "reset": 0}
        clients = []
        for _ in range(30):  # one at a time, each held: the served ones keep their descriptors
            try:
                client = socket.create_connection(("127.0.0.1", listen), timeout=5)
                clients.append(client)
                client.sendall(b"x")
                outcomes["served" if client.recv(1) == b"x" else "reset"] += 1
            except (ConnectionResetError, BrokenPipeError):
                outcomes["reset"] += 1
        assert outcomes["served"] >= 1 and outcomes["reset"] >= 1, outcomes
        assert outcomes["served"] + outcomes["reset"] == 30
        proc.wait_for("out of file descriptors")
        for client in clients:
            client.close()
        resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert exchange(connect_when_ready("127.0.0.1", listen), b"again") == b"again"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        fd_limit = [ln for ln in text.splitlines() if 'reason="fd_limit"' in ln and ln.startswith("relay_")]
        assert fd_limit and float(fd_limit[0].split()[-1]) >= 1, fd_limit
        deadline = time.monotonic() + AUDIT_SECONDS + 5
        while readyz(metrics_port) != 200:
            assert time.monotonic() < deadline, "readiness never recovered"
            time.sleep(0.2)
        assert proc.stop() == 0


def test_metrics_server_caps_its_own_connections(run: Run) -> None:
    """Steps: MAX_CLIENTS idle HTTP clients hold the health server; one more closes the longest-held one
    (it reads EOF) rather than being turned away, and the server never holds more than MAX_CLIENTS (so
    scrapers cannot eat the relay's descriptor reserve); relayed traffic is unaffected; /readyz answers
    while the others are still held, and once they leave the server holds none."""

    async def scenario() -> None:
        async with (
            tcp_server(echo) as target,
            relay(target, metrics=HostPort("127.0.0.1", 0)) as server,
        ):
            health, address = server.health, server.health_address
            assert isinstance(health, HealthServer) and address is not None
            idle = [await asyncio.open_connection(address.host, address.port) for _ in range(MAX_CLIENTS)]
            await wait_until(lambda: len(health._clients) == MAX_CLIENTS)
            newest = await asyncio.open_connection(address.host, address.port)
            async with asyncio.timeout(2):
                try:
                    assert await idle[0][0].read() == b""
                except ConnectionResetError:
                    pass
            assert len(health._clients) == MAX_CLIENTS
            r, w = await asyncio.open_connection("127.0.0.1", port_of(server))
            w.write(b"relayed")
            w.write_eof()
            assert await r.read() == b"relayed"
            w.close()
            assert (await http_get(address, "/readyz"))[0] == 200
            for _, idle_writer in [*idle, newest]:
                idle_writer.close()
            await wait_until(lambda: not health._clients)

    run(scenario())


def test_a_client_that_resets_after_its_fin_frees_its_slot_at_the_next_audit(run: Run) -> None:
    """Steps: the target reads the request to its end and never answers; a client sends the request,
    half-closes (FIN), then gives up with a reset. The loop no longer reads a side that sent FIN, so it
    never sees that reset and the pair would hold its slot (and the silent target's socket) for good.
    The audit asks the kernel: the pair is closed as client_reset, and the target is reset too."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            async with relay(listener.getsockname()[1]) as server:
                client = socket.socket()
                client.setblocking(False)
                await loop.sock_connect(client, ("127.0.0.1", port_of(server)))
                await loop.sock_sendall(client, b"GET / HTTP/1.0\r\n\r\n")
                client.shutdown(socket.SHUT_WR)
                upstream, _ = await loop.sock_accept(listener)
                with upstream:
                    while await loop.sock_recv(upstream, 4096):
                        pass  # the request, then the FIN the relay passed on
                    (conn,) = server.connections
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                    client.close()
                    await wait_until(lambda: tcp_closed(conn.client.transport))  # the reset arrived
                    assert conn in server.connections  # nothing but the audit would ever finish it
                    server.audit.run()
                    await wait_until(lambda: not server.connections)
                    assert server.stats["test"].closed["client_reset"] == 1
                    await wait_until(
                        lambda: upstream.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE
                    )

    run(scenario())
