"""The Resolver keeps name lookups off the connections' path (relay/upstream.py, its rules).

Every lookup here is an injected function (a table, a gate that answers when the test says so, one that
never answers), so no DNS query leaves the machine and each test decides exactly when answers come. The
async tests run on asyncio and on uvloop (conftest's `run`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest

from relay.address import HostPort
from relay.cli import http_endpoint
from relay.config import Config, Route
from relay.server import Server
from relay.upstream import Resolution, ResolveError, Resolver, SystemLookup
from tests.support import echo, port_of, read_all, relay, scrape, tcp_server, unused_port, value, wait_until

Run = Callable[..., Any]
Lookup = Callable[..., Awaitable[list[tuple[Any, ...]]]]
Infos = list[tuple[Any, ...]]


def infos(address: str) -> Infos:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return [(family, socket.SOCK_STREAM, 6, "", (address, 0))]


class Names:
    """An injected lookup: answers from `table`, fails for names not in it, and for names in `gates`
    waits until the gate's event is set (never, if the test does not set it). Records every call."""

    def __init__(self, table: dict[str, str] | None = None) -> None:
        self.table = dict(table or {})
        self.gates: dict[str, asyncio.Event] = {}
        self.calls: list[str] = []
        self.asked = asyncio.Condition()

    def gate(self, name: str) -> asyncio.Event:
        self.gates[name] = asyncio.Event()
        return self.gates[name]

    async def __call__(self, name: str, *args: object, **kwargs: object) -> Infos:
        self.calls.append(name)
        async with self.asked:
            self.asked.notify_all()
        gate = self.gates.get(name)
        if gate is not None:
            await gate.wait()
        if name not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return infos(self.table[name])

    async def wait_calls(self, count: int) -> None:
        async with self.asked:
            await self.asked.wait_for(lambda: len(self.calls) >= count)


class Clock:
    """A clock the test moves by hand (negative-cache expiry without waiting)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def resolve_now(resolver: Resolver) -> Resolution:
    """resolve(), which must answer without waiting for anything: fails if it suspends even once."""
    coro: Coroutine[Any, Any, Resolution] = resolver.resolve()
    try:
        coro.send(None)
    except StopIteration as done:
        result: Resolution = done.value
        return result
    coro.close()
    raise AssertionError("resolve() waited although an answer was there")


# --- the chain ------------------------------------------------------------------------------------------


def test_auto_prefers_host_docker_internal(run: Run) -> None:
    async def scenario() -> None:
        names = Names({"host.docker.internal": "172.17.0.1"})
        resolver = Resolver("auto", lookup=names, gateway=lambda: "10.9.9.9")
        result = await resolver.resolve()
        assert (result.addresses, result.source) == (("172.17.0.1",), "resolved")
        assert result.describe() == "target: host.docker.internal -> 172.17.0.1 (resolved)"
        await resolver.close()

    run(scenario())


def test_auto_falls_back_to_podman_name_then_gateway(run: Run) -> None:
    async def scenario() -> None:
        podman = Resolver(
            "auto", lookup=Names({"host.containers.internal": "10.88.0.1"}), gateway=lambda: None
        )
        assert (await podman.resolve()).note == (
            "host.docker.internal does not resolve; using host.containers.internal -> 10.88.0.1 (resolved)"
        )
        gateway = Resolver("host.docker.internal", lookup=Names(), gateway=lambda: "172.18.0.1")
        result = await gateway.resolve()
        assert (result.addresses, result.source) == (("172.18.0.1",), "gateway")
        assert result.describe() == (
            "target: host.docker.internal does not resolve; using default gateway 172.18.0.1"
        )
        for resolver in (podman, gateway):
            await resolver.close()

    run(scenario())


def test_named_target_does_not_fall_back(run: Run) -> None:
    async def scenario() -> None:
        resolver = Resolver("db.internal", lookup=Names(), gateway=lambda: "172.18.0.1")
        with pytest.raises(ResolveError, match=r"db\.internal does not resolve"):
            await resolver.resolve()
        await resolver.close()

    run(scenario())


def test_literal_resolves_once_without_any_lookup(run: Run) -> None:
    """A literal address answers at once, with no lookup and no background task; one of the wrong family
    is not taken as literal (the lookup then says why it does not fit)."""

    async def scenario() -> None:
        names = Names()
        for address in ("127.0.0.1", "::1"):
            resolver = Resolver(address, lookup=names)
            resolver.start()
            assert resolve_now(resolver) == Resolution(
                address, (address,), "literal", f"{address} -> {address} (literal)"
            )
            resolver.failed()
            await resolver.close()
        assert names.calls == []
        v6_only = Resolver("127.0.0.1", "ipv6", lookup=names)
        with pytest.raises(ResolveError):
            await v6_only.resolve()
        assert names.calls == ["127.0.0.1"]
        await v6_only.close()

    run(scenario())


# --- first answer, stale answers, negative cache, single flight ---------------------------------------


def test_callers_wait_for_the_first_answer_and_share_one_lookup(run: Run) -> None:
    """Steps: the lookup of db.test waits on a gate; ten resolve() calls start; all wait, and one lookup
    is in flight; the gate opens; all ten get the answer; later calls answer at once, with no lookup."""

    async def scenario() -> None:
        names = Names({"db.test": "10.1.2.3"})
        gate = names.gate("db.test")
        resolver = Resolver("db.test", lookup=names)
        waiting = [asyncio.ensure_future(resolver.resolve()) for _ in range(10)]
        await names.wait_calls(1)
        assert not any(task.done() for task in waiting)
        gate.set()
        results = await asyncio.gather(*waiting)
        assert {r.addresses for r in results} == {("10.1.2.3",)}
        assert resolve_now(resolver).addresses == ("10.1.2.3",)
        assert names.calls == ["db.test"]
        await resolver.close()

    run(scenario())


def test_stale_answer_is_served_while_a_refresh_hangs(run: Run) -> None:
    """Steps: db.test answers once; then its lookups hang; a refresh starts (after failed()); while it
    hangs, resolve() answers at once with the old address; when the lookup's time bound passes the
    old answer still serves, the failure is logged once and counted as a timeout."""

    async def scenario() -> None:
        names = Names({"db.test": "10.1.2.3"})
        resolver = Resolver("db.test", lookup=names, lookup_timeout=0.2, failed_gap=0.0)
        resolver.start()
        await names.wait_calls(1)
        await wait_until(lambda: resolver.last is not None)
        names.gate("db.test")  # never set: every later lookup hangs
        resolver.failed()
        await names.wait_calls(2)
        assert resolve_now(resolver).addresses == ("10.1.2.3",)
        await wait_until(lambda: resolver.error is not None)
        assert resolve_now(resolver).addresses == ("10.1.2.3",)
        assert resolver.lookups[("db.test", "timeout")] == 1
        assert resolver.lookups[("db.test", "ok")] == 1
        await resolver.close()

    run(scenario())


def test_names_that_do_not_resolve_are_not_asked_again_for_a_while(run: Run) -> None:
    """Steps: auto with no name resolving and no gateway; 20 resolve() calls (as 20 connections would
    make) each fail, but each name is asked once; after the negative-cache time they are asked again.
    Then with a gateway: the answer comes from it and refreshes do not re-ask the failed names either."""

    async def scenario() -> None:
        clock, names = Clock(), Names()
        gateway: list[str | None] = [None]
        resolver = Resolver("auto", lookup=names, clock=clock, negative=30.0, gateway=lambda: gateway[0])
        for _ in range(20):
            with pytest.raises(ResolveError, match="no default gateway"):
                await resolver.resolve()
        assert names.calls == ["host.docker.internal", "host.containers.internal"]
        clock.now += 31
        with pytest.raises(ResolveError):
            await resolver.resolve()
        assert len(names.calls) == 4
        gateway[0] = "10.0.0.1"
        assert (await resolver.resolve()).addresses == ("10.0.0.1",)
        for _ in range(5):
            assert not isinstance(await resolver.refresh(), ResolveError)
        assert len(names.calls) == 4
        assert resolver.lookups[("host.docker.internal", "failed")] == 2
        await resolver.close()

    run(scenario())


def test_each_lookup_has_its_own_time_bound(run: Run) -> None:
    """Steps: auto; host.docker.internal never answers and host.containers.internal fails; with a time
    bound of 0.2 s the walk reaches the gateway (well within the test's 5 s), the hung name is counted
    as a timeout and remembered, so the next walk answers without asking it."""

    async def scenario() -> None:
        names = Names()
        names.gate("host.docker.internal")  # never set
        resolver = Resolver("auto", lookup=names, lookup_timeout=0.2, gateway=lambda: "10.0.0.1")
        async with asyncio.timeout(5):
            result = await resolver.resolve()
        assert (result.addresses, result.source) == (("10.0.0.1",), "gateway")
        assert resolver.lookups == {
            ("host.docker.internal", "timeout"): 1,
            ("host.containers.internal", "failed"): 1,
        }
        assert not isinstance(await resolver.refresh(), ResolveError)
        assert len(names.calls) == 2
        await resolver.close()

    run(scenario())


def test_slow_names_are_asked_side_by_side(run: Run) -> None:
    """Steps: auto; both names hang; the second is asked while the first is still unanswered (stagger),
    so the first answer (the gateway) takes about one time bound, not one per name."""

    async def scenario() -> None:
        names = Names()
        names.gate("host.docker.internal")
        names.gate("host.containers.internal")
        resolver = Resolver(
            "auto", lookup=names, lookup_timeout=1.0, stagger=0.05, gateway=lambda: "10.0.0.1"
        )
        first = asyncio.ensure_future(resolver.resolve())
        await names.wait_calls(2)
        assert not first.done()  # both asked, neither answered yet
        assert (await first).source == "gateway"
        await resolver.close()

    run(scenario())


def test_failed_connect_triggers_a_refresh_no_more_often_than_the_gap(run: Run) -> None:
    """Steps: db.test resolves; refreshes only on failed() (schedule of an hour). With no gap, failed()
    brings a new lookup; with a gap of an hour, five more failed() calls bring none."""

    async def scenario() -> None:
        names = Names({"db.test": "10.1.2.3"})
        resolver = Resolver("db.test", lookup=names, refresh_every=3600.0, failed_gap=0.0)
        resolver.start()
        await names.wait_calls(1)
        resolver.failed()
        await names.wait_calls(2)
        resolver.failed_gap = 3600.0
        await wait_until(lambda: resolver.lookups[("db.test", "ok")] == 2)
        for _ in range(5):
            resolver.failed()
            await asyncio.sleep(0.02)  # give the schedule a chance to (wrongly) walk again
        assert len(names.calls) == 2
        await resolver.close()

    run(scenario())


def test_a_change_of_address_is_logged_once(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    """Steps: db.test -> 10.1.2.3 (logged as the first answer); it moves to 10.1.2.4; three refreshes:
    one `target changed` line naming both addresses."""

    async def scenario() -> None:
        names = Names({"db.test": "10.1.2.3"})
        resolver = Resolver("db.test", lookup=names, refresh_every=3600.0)
        resolver.start()
        await names.wait_calls(1)
        await wait_until(lambda: resolver.last is not None)
        names.table["db.test"] = "10.1.2.4"
        for _ in range(3):
            await resolver.refresh()
        assert resolve_now(resolver).addresses == ("10.1.2.4",)
        await resolver.close()

    with caplog.at_level(logging.INFO, logger="relay"):
        run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("target: db.test -> 10.1.2.3 (resolved)") == 1
    changed = [m for m in messages if m.startswith("target changed")]
    assert changed == ["target changed: db.test -> 10.1.2.4 (resolved) (was 10.1.2.3)"], messages


def test_system_lookup_runs_one_thread_per_name_at_a_time(run: Run) -> None:
    """Steps: a blocking getaddrinfo held by the test; three concurrent lookups of one name and one of
    another: two calls reach getaddrinfo; a waiter that gives up (time bound) does not end the thread;
    once released, the remaining waiters get the answer."""
    release = threading.Event()
    seen: list[str] = []

    def blocking(host: str, *args: object) -> Infos:
        seen.append(host)
        release.wait(10)
        return infos("10.4.4.4")

    async def scenario() -> None:
        lookup = SystemLookup(blocking)
        impatient = asyncio.ensure_future(asyncio.wait_for(lookup("a.test", None), 0.05))
        patient = [asyncio.ensure_future(lookup("a.test", None)) for _ in range(2)]
        other = asyncio.ensure_future(lookup("b.test", None))
        with pytest.raises(TimeoutError):
            await impatient
        await wait_until(lambda: len(seen) == 2)
        assert sorted(seen) == ["a.test", "b.test"]
        release.set()
        for result in await asyncio.gather(*patient, other):
            assert result == infos("10.4.4.4")
        assert sorted(seen) == ["a.test", "b.test"]

    run(scenario())


# --- in the server ------------------------------------------------------------------------------------


def server_for(target_port: int, names: Names, **settings: Any) -> Server:
    route = Route("test", (HostPort("127.0.0.1", 0),), "db.test", target_port)
    settings.setdefault("metrics", None)
    return Server(
        Config(routes=(route,), drain_timeout=1.0, **settings), lookup=names, endpoint=http_endpoint
    )


def test_ready_before_any_lookup_answers_and_early_connections_wait(run: Run) -> None:
    """Steps: target db.test, whose lookup waits on a gate; start() returns (listening, `ready`) while
    the lookup is unanswered; a client connects and sends `hello`; the gate opens; the echo comes back
    through the relay; no connect error is counted; after drain no task is left behind."""

    async def scenario() -> None:
        names = Names({"db.test": "127.0.0.1"})
        gate = names.gate("db.test")
        async with tcp_server(echo) as target:
            server = server_for(target, names)
            await server.start()
            try:
                await names.wait_calls(1)
                assert server.resolvers[("db.test", "any")].last is None
                reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
                writer.write(b"hello")
                await writer.drain()
                gate.set()
                assert await reader.readexactly(5) == b"hello"
                writer.close()
                assert server.stats["test"].connect_errors["timeout"] == 0
            finally:
                await server.drain()
            assert asyncio.all_tasks() == {asyncio.current_task()}

    run(scenario())


def test_unresolved_target_makes_readiness_say_why(run: Run) -> None:
    """Steps: db.test does not resolve (its first lookup held until the test has turned the negative cache
    off, so every walk asks again): the server's problems name the target, and a connection is closed
    and counted `unresolved` (its walk asks once more); once the name resolves, a refresh clears the
    problem; relay_resolver_lookups_total counts the lookups by target, host and result."""

    async def scenario() -> None:
        names = Names()
        gate = names.gate("db.test")
        async with tcp_server(echo) as target:
            server = server_for(target, names, metrics=HostPort("127.0.0.1", 0))
            await server.start()
            try:
                resolver = server.resolvers[("db.test", "any")]
                resolver.negative = 0.0
                gate.set()
                await wait_until(lambda: "target:db.test" in server.problems)
                assert "db.test does not resolve" in server.problems["target:db.test"]
                reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
                with pytest.raises(ConnectionError):
                    await read_all(reader)
                writer.close()
                await wait_until(lambda: server.stats["test"].connect_errors["unresolved"] == 1)
                names.table["db.test"] = "127.0.0.1"
                await resolver.refresh()
                assert "target:db.test" not in server.problems
                samples = await scrape(server)
                lookups = "relay_resolver_lookups_total"
                assert value(samples, lookups, target="db.test", host="db.test", result="failed") == 2
                assert value(samples, lookups, target="db.test", host="db.test", result="ok") == 1
            finally:
                await server.drain()

    run(scenario())


def test_connect_timeout_while_dns_is_silent_counts_as_unresolved(run: Run) -> None:
    """Steps: target db.test, whose first lookup never answers; connect_timeout 0.3 s; a client is reset
    when the timer fires, and the failure is counted and hinted as `unresolved` (no DNS answer yet), not
    as a `timeout` with the host-firewall hint."""

    async def scenario() -> None:
        names = Names({"db.test": "127.0.0.1"})
        names.gate("db.test")  # never opened
        async with tcp_server(echo) as target:
            server = server_for(target, names, connect_timeout=0.3)
            await server.start()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
                with pytest.raises(ConnectionResetError):
                    await reader.read()
                writer.close()
                stats = server.stats["test"]
                assert stats.connect_errors["unresolved"] == 1
                assert stats.connect_errors["timeout"] == 0
            finally:
                await server.drain()

    run(scenario())


def test_a_refused_connect_asks_the_resolver_again(run: Run) -> None:
    """Steps: db.test resolves to 127.0.0.1, where nothing listens on the target port; a client's connect
    is refused; the resolver looks the name up again in the background (the host may have moved)
    without the client waiting for it."""

    async def scenario() -> None:
        names = Names({"db.test": "127.0.0.1"})
        server = server_for(unused_port(), names)
        server._resolver("db.test").failed_gap = 0.0  # no wait between failure-driven refreshes here
        await server.start()
        try:
            await names.wait_calls(1)
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            with pytest.raises(ConnectionResetError):
                await reader.read()
            writer.close()
            assert server.stats["test"].connect_errors["refused"] == 1
            async with asyncio.timeout(5):
                await names.wait_calls(2)
        finally:
            await server.drain()

    run(scenario())


def test_lookup_counters_are_exported_at_zero_before_any_lookup(run: Run) -> None:
    """Steps: target db.test, whose first lookup never answers, and a second relay with a literal target.
    Before any lookup has finished, /metrics already has relay_resolver_lookups_total at 0 for db.test
    with each result (ok, failed, timeout), and the literal target has its one name at 0 too: a dashboard
    panel shows 0, not "No data" (issue 19)."""

    async def scenario() -> None:
        names = Names({"db.test": "127.0.0.1"})
        names.gate("db.test")  # never opened
        server = server_for(unused_port(), names, metrics=HostPort("127.0.0.1", 0))
        await server.start()
        try:
            await names.wait_calls(1)
            s = await scrape(server)
            for result in ("ok", "failed", "timeout"):
                assert (
                    value(s, "relay_resolver_lookups_total", target="db.test", host="db.test", result=result)
                    == 0
                )
        finally:
            await server.drain()
        async with relay(unused_port(), metrics=HostPort("127.0.0.1", 0)) as literal:
            s = await scrape(literal)
            assert (
                value(s, "relay_resolver_lookups_total", target="127.0.0.1", host="127.0.0.1", result="ok")
                == 0
            )

    run(scenario())
