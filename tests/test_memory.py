"""Memory under clients that stop reading (issue 17, item 1): the process-wide budget (relay/budget.py),
the container limit it is taken from (relay/memory.py), and the relay under a real 128 MiB cgroup."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, cast

import pytest

from bench import stalled
from relay import memory
from relay.address import HostPort
from relay.budget import READ_SIZES
from relay.pump import HIGH_WATER
from relay.server import Server
from tests.support import port_of, relay, scrape, tcp_server, value, wait_until

Run = Any
MIB = 1 << 20
PER_CLIENT = 16 * MIB


def pattern(n: int) -> bytes:
    """Bytes whose every 4 KiB block names its offset: a lost, doubled or reordered block shows."""
    blocks = (f"{i:08d}".encode() * 512 for i in range(n // 4096))
    return b"".join(blocks)


DATA = pattern(PER_CLIENT)


async def flood_or_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """'F': send DATA as fast as the relay takes it, then FIN; anything else: echo it."""
    first = await reader.read(1)
    if first == b"F":
        for start in range(0, len(DATA), 256 * 1024):
            writer.write(DATA[start : start + 256 * 1024])
            await writer.drain()
        writer.write_eof()
        await reader.read()
    else:
        writer.write(first)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


def buffered(server: Server) -> int:
    """What the relay holds in user space right now: every write buffer of every pair (ground truth,
    not the budget's own count)."""
    return sum(
        side.transport.get_write_buffer_size()
        for conn in server.connections
        for side in (conn.client, conn.target)
        if side.transport is not None and not side.lost
    )


def test_budget_bounds_slow_readers_and_loses_nothing(run: Run) -> None:
    """Steps: a relay with memory_budget 1 MiB; 24 clients ask for 16 MiB each and read nothing; once
    nothing moves, the relay holds about the budget (not 24 x 320 KiB as each pair's own bound alone
    allows) and says so in its metrics; a client that echoes is served meanwhile; then every client reads
    and gets its 16 MiB intact and in order, and the budget is back at 0 with no side left stopped."""
    clients = 24
    limit = MIB

    async def stalled_client(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=2**16)
        cast(asyncio.Transport, writer.transport).pause_reading()
        writer.write(b"F")
        return reader, writer

    async def scenario() -> None:
        async with (
            tcp_server(flood_or_echo) as target,
            relay(target, memory_budget=limit, metrics=HostPort("127.0.0.1", 0)) as server,
        ):
            port = port_of(server)
            pairs = [await stalled_client(port) for _ in range(clients)]
            await wait_until(lambda: len(server.connections) == clients)
            peak, last, calm = 0, -1, 0
            async with asyncio.timeout(30):
                while calm < 10:  # 0.5 s without a byte moving: every sender is held back
                    await asyncio.sleep(0.05)
                    now = buffered(server)
                    peak = max(peak, now)
                    moved = sum(c.target.nbytes for c in server.connections)
                    calm, last = (calm + 1, last) if moved == last else (0, moved)
            assert server.budget.reached >= 1
            # The budget, one pair's own bound, and one smallest read for each client that stalled after.
            bound = limit + HIGH_WATER + READ_SIZES[0] + clients * READ_SIZES[1]
            assert peak <= bound, f"held {peak} bytes, bound {bound}"
            assert peak < clients * HIGH_WATER  # each pair's own bound alone would allow more
            assert server.budget.stopped > 0
            samples = await scrape(server)
            assert value(samples, "relay_memory_budget_bytes") == limit
            assert value(samples, "relay_budget_paused_sides") > 0
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"Echo")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"Echo"
            writer.close()
            for _, writer in pairs:
                cast(asyncio.Transport, writer.transport).resume_reading()
            results = await asyncio.gather(*(reader.read() for reader, _ in pairs))
            for data in results:
                assert len(data) == len(DATA)
                assert hashlib.sha256(data).digest() == hashlib.sha256(DATA).digest()
            for _, writer in pairs:
                writer.close()
            await wait_until(lambda: not server.connections and not server.budget.charged, timeout=10)
            assert (server.budget.held, server.budget.stopped) == (0, 0)

    run(scenario(), timeout=90)


def test_socket_buffer_sets_both_sockets_of_a_pair(run: Run) -> None:
    """socket_buffer: the relay's sockets of a pair carry SO_SNDBUF/SO_RCVBUF of that size (the kernel
    doubles what it is given), so a stalled connection's kernel memory is capped."""

    async def scenario() -> None:
        async with (
            tcp_server(flood_or_echo) as target,
            relay(target, socket_buffer=65536) as server,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"Echo")
            assert await reader.readexactly(4) == b"Echo"
            (conn,) = server.connections
            for side in (conn.client, conn.target):
                assert side.transport is not None
                sock = side.transport.get_extra_info("socket")
                assert sock.getsockopt(1, 7) == 2 * 65536  # SOL_SOCKET, SO_SNDBUF
                assert sock.getsockopt(1, 8) == 2 * 65536  # SO_RCVBUF
            writer.close()

    run(scenario())


# --- the container's limit -------------------------------------------------------------------------


def cgroup_tree(tmp_path: Path, version: int, limit: str, own: str = "/app") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    folder = (root / "memory" if version == 1 else root) / own.lstrip("/")
    folder.mkdir(parents=True)
    if version == 1:
        (folder / "memory.limit_in_bytes").write_text(limit + "\n")
        (folder / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
        line = f"4:memory:{own}\n0::/\n"
    else:
        (folder / "memory.max").write_text(limit + "\n")
        (folder / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
        line = f"0::{own}\n"
    proc = tmp_path / "proc_cgroup"
    proc.write_text(line)
    return root, proc


@pytest.mark.parametrize(
    ("version", "limit", "expected", "kills"),
    [
        (1, "134217728", 128 * MIB, 2),
        (1, "9223372036854771712", None, 2),  # v1's "no limit"
        (2, "134217728", 128 * MIB, 1),
        (2, "max", None, 1),
    ],
)
def test_the_container_limit_is_found(
    tmp_path: Path, version: int, limit: str, expected: int | None, kills: int
) -> None:
    root, proc = cgroup_tree(tmp_path, version, limit)
    found = memory.find_cgroup(root, proc)
    assert found is not None
    assert (found.version, found.limit, found.oom_kills()) == (version, expected, kills)


def test_inside_a_container_the_namespace_root_is_read(tmp_path: Path) -> None:
    """With a cgroup namespace /proc/self/cgroup says '/', and the limit sits at the mount's root."""
    root, proc = cgroup_tree(tmp_path, 2, "67108864", own="/")
    found = memory.find_cgroup(root, proc)
    assert found is not None and found.limit == 64 * MIB


def test_no_cgroup_is_no_limit(tmp_path: Path) -> None:
    assert memory.find_cgroup(tmp_path / "none", tmp_path / "none") is None


@pytest.mark.parametrize(
    ("limit", "budget"),
    [(None, 64 * MIB), (128 * MIB, 32 * MIB), (1 << 40, 64 * MIB), (8 * MIB, 4 * MIB), (64 * MIB, 16 * MIB)],
)
def test_default_budget(limit: int | None, budget: int) -> None:
    assert memory.default_budget(limit) == budget


def test_an_earlier_oom_kill_is_reported_at_start(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    root, proc = cgroup_tree(tmp_path, 2, "134217728")
    cgroup = memory.find_cgroup(root, proc)
    with caplog.at_level(logging.INFO, logger="relay"):
        memory.report_at_start(cgroup, 32 * MIB)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == (
        "INFO",
        "memory: container limit 128 MiB (cgroup v2); at most 32 MiB buffered for slow receivers",
    )
    assert lines[1][0] == "WARNING"
    assert "1 OOM kill(s) under its 128 MiB limit" in lines[1][1]


@pytest.mark.parametrize(
    ("argv", "quoted"),
    [
        (["--memory-budget", "12X"], "'12X' is not a size"),
        (["--memory-budget", "100"], "'100' is not between"),
        (["--socket-buffer", "-1"], "'-1' is not a size"),
    ],
)
def test_a_bad_size_is_one_line_and_exit_2(argv: list[str], quoted: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "--ports", "1", *argv], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [f"relay: error: {argv[0]}: {quoted}" + lines[0].split(quoted, 1)[1]]
    assert lines[0].endswith("expected a size like 32MiB, 512KiB, 64M or plain bytes")


# --- the field: a real memory cgroup --------------------------------------------------------------------


@pytest.mark.skipif(bool(stalled.unavailable()), reason=stalled.unavailable() or "available")
def test_1500_stalled_clients_under_a_128_mib_limit(tmp_path: Path) -> None:
    """Steps: the relay in a v1 memory cgroup limited to 128 MiB (our Kubernetes manifest's limit), in a
    namespace of its own; 1,500 clients connect to a target that sends as fast as it may and never read.
    Once nothing moves, the relay is alive and was never OOM-killed, a client of its second route is
    served, and after the clients leave it gives the memory back. On the relay before the budget, this
    cgroup OOM-killed it (1 kill at 1,000 clients; bench/stalled.py)."""
    with stalled.namespace("rmem") as netns:
        result = stalled.measure(netns, "relay", 1500, 128 * MIB, tmp_path)
    assert (result.alive, result.oom_kills, result.connected, result.settled) == (True, 0, 1500, True), result
    assert result.echo_ms is not None, result.log
    assert result.stalled < 100 * MIB, result
    assert result.after - result.idle < 16 * MIB, result  # given back (86 MiB kept after 200 before)
    assert any("container limit 128 MiB" in line for line in result.log), result.log
