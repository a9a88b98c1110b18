"""The open-files budget (server.py) and running out of descriptors anyway: a relay process under a low
RLIMIT_NOFILE, with a TCP and a UDP route, on both loops. Out of descriptors is the relay's own limit:
it is counted and logged as `fd_limit`, never as the target's failure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
from collections.abc import Callable, Iterator
from typing import Any

from relay.address import HostPort
from tests.support import LineProcess, RelayProcess, Samples, echo, free_port_block, scrape_at, tcp_server
from tests.test_udp import Peer, udp_peer

Run = Callable[..., Any]
TARGET_BLAMED = ("cannot connect", "cannot reach the target", "firewall")


def relay_process(
    port: int, targets: tuple[int, int], metrics: int, loop: str, *extra: str, **popen: Any
) -> RelayProcess:
    """A relay on 127.0.0.1:port over TCP and UDP (one route each) to the (tcp, udp) targets, metrics on."""
    return RelayProcess(
        [
            *("--ports", f"{port}:{targets[0]} {port}:{targets[1]}/udp", "--target", "127.0.0.1"),
            *("--listen", "127.0.0.1", "--metrics", f"127.0.0.1:{metrics}", "--loop", loop, *extra),
        ],
        **popen,
    )


@contextlib.contextmanager
def told(proc: LineProcess) -> Iterator[None]:
    """A failure inside says what the relay printed."""
    try:
        yield
    except Exception as err:
        raise AssertionError(f"{err!r}; the relay's output:\n{proc.output()}") from err


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


async def tcp_client(port: int) -> tuple[bool, asyncio.StreamWriter | None]:
    """Connect and send a byte: (True, the open connection) if it is echoed; (False, None) if the relay
    resets or closes the connection instead."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        async with asyncio.timeout(5):
            got = await reader.read(1)
    except (ConnectionResetError, BrokenPipeError):
        return False, None
    if got == b"x":
        return True, writer
    writer.close()
    return False, None


def test_udp_sessions_and_listeners_count_in_the_descriptor_budget(run: Run, loop_name: str) -> None:
    """Steps: a relay starts under RLIMIT_NOFILE 256 (soft and hard: it cannot raise it) with
    max_connections 60 and max_udp_sessions 200, which with the listeners do not fit: one warning line
    says so and what it allows instead. 200 UDP clients open what sessions they may; then 60 TCP clients
    connect one by one and hold. Exactly as many as the line allows are served, the rest are turned away
    as over the limit: no connection dies for lack of a descriptor, none is blamed on the target."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    async def scenario() -> None:
        port = free_port_block(2)  # below the ephemeral range: no other test's client takes it
        metrics = port + 1
        held: list[asyncio.StreamWriter] = []
        async with (
            tcp_server(echo) as tcp_target,
            udp_peer(echo=True) as (_, udp_target),
            contextlib.AsyncExitStack() as stack,
        ):
            proc = stack.enter_context(
                relay_process(
                    port,
                    (tcp_target, udp_target),
                    metrics,
                    loop_name,
                    *("--max-connections", "60", "--max-udp-sessions", "200"),
                    preexec_fn=low_limit,
                )
            )
            stack.enter_context(told(proc))
            await asyncio.to_thread(proc.wait_for, "ready")
            budget = re.search(r"allowing (\d+) connections and (\d+) UDP sessions", proc.output())
            allowed, sessions = (int(budget[1]), int(budget[2])) if budget else (60, 200)
            address = HostPort("127.0.0.1", metrics)
            clients: list[Peer] = []
            for n in range(200):
                client, _ = await stack.enter_async_context(udp_peer(remote=("127.0.0.1", port)))
                client.send(b"%d" % n)
                clients.append(client)
            async with asyncio.timeout(10):
                while True:  # every datagram seen: a session, or dropped over the limit
                    s = await scrape_at(address)
                    if (
                        total(s, "relay_datagrams_total", direction="client_to_target")
                        + total(s, "relay_datagrams_dropped_total", reason="limit")
                        == 200
                    ):
                        break
                    await asyncio.sleep(0.05)
            assert total(s, "relay_udp_sessions_active") == sessions
            served = 0
            for _ in range(60):
                ok, writer = await tcp_client(port)
                served += ok
                if writer is not None:
                    held.append(writer)
            s = await scrape_at(address)
            for writer in held:
                writer.close()
            assert await asyncio.to_thread(proc.stop) == 0
        output = proc.output()
        assert served == allowed, (served, allowed, output)
        assert total(s, "relay_connections_closed_total", reason="limit") == 60 - allowed
        assert total(s, "relay_connections_closed_total", reason="fd_limit") == 0
        assert total(s, "relay_connect_errors_total") == 0
        assert not [line for line in output.splitlines() if any(b in line for b in TARGET_BLAMED)], output
        assert budget is not None, output
        assert "max_connections 60 and max_udp_sessions 200 need 387 open files" in output

    run(scenario(), timeout=60)


def one_descriptor_left(pid: int) -> tuple[int, int]:
    """Lower the process's open-files soft limit so that exactly one descriptor can still be opened;
    returns the old (soft, hard) limit."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    free = [fd for fd in range(max(used) + 3) if fd not in used]
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (free[1], old[1]))  # below it, free[0] alone is free
    return old


def test_out_of_descriptors_at_connect_and_for_a_udp_session_is_fd_limit(run: Run, loop_name: str) -> None:
    """Steps: a relay is serving TCP and UDP; its limit is lowered from outside to leave one descriptor.
    A TCP client is accepted on it, so the connect to the target finds none: the client is reset, and
    the relay logs "out of file descriptors", not a connect error. A UDP client then gets the one
    descriptor for its session and is answered; a second one finds none: its datagram is dropped as
    fd_limit. With the limit restored, the scrape shows both as fd_limit, no connect error and no
    unreachable drop, and the log blames no target."""

    async def scenario() -> None:
        port = free_port_block(2)  # below the ephemeral range: no other test's client takes it
        metrics = port + 1
        async with (
            tcp_server(echo) as tcp_target,
            udp_peer(echo=True) as (_, udp_target),
            contextlib.AsyncExitStack() as stack,
        ):
            proc = stack.enter_context(relay_process(port, (tcp_target, udp_target), metrics, loop_name))
            stack.enter_context(told(proc))
            await asyncio.to_thread(proc.wait_for, "ready")
            limit = one_descriptor_left(proc.proc.pid)
            ok, _ = await tcp_client(port)
            assert not ok
            await asyncio.to_thread(proc.wait_for, "out of file descriptors")
            first, _ = await stack.enter_async_context(udp_peer(remote=("127.0.0.1", port)))
            second, _ = await stack.enter_async_context(udp_peer(remote=("127.0.0.1", port)))
            first.send(b"one")
            assert await first.reply() == b"one"
            second.send(b"two")
            first.send(b"three")  # read after "two" from the same socket: "two" has been dealt with
            assert await first.reply() == b"three"
            assert second.received.empty()
            resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE, limit)
            s = await scrape_at(HostPort("127.0.0.1", metrics))
            assert await asyncio.to_thread(proc.stop) == 0
        output = proc.output()
        assert total(s, "relay_connections_closed_total", reason="fd_limit") == 1
        assert total(s, "relay_datagrams_dropped_total", reason="fd_limit") == 1
        assert total(s, "relay_connect_errors_total") == 0
        assert total(s, "relay_datagrams_dropped_total", reason="unreachable") == 0
        assert not [line for line in output.splitlines() if any(b in line for b in TARGET_BLAMED)], output

    run(scenario(), timeout=60)
