"""UDP routes (relay/udp.py): parsing, then real datagrams through in-process relays on both loops, and a
real DNS client (dig) through the relay to a real DNS server (dnsmasq) over UDP and TCP."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import pytest

from relay import cli
from relay.address import AddressError, HostPort, PortMap, parse_ports
from relay.check import run_check
from relay.config import Config, ConfigError, Raw, Route, load
from relay.server import Server
from relay.udp import EARLY_DATAGRAMS
from relay.view import readiness
from tests.support import echo, relay, scrape, tcp_server, value, wait_until

Run = Callable[..., Any]
MAX_IPV4 = 65507  # 65535 - 20 (IPv4 header) - 8 (UDP header)


# --- parsing (no sockets) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("53/udp", (PortMap(53, 53, "udp"),)),
        ("53/UDP", (PortMap(53, 53, "udp"),)),
        ("8125:18125/udp", (PortMap(8125, 18125, "udp"),)),
        ("6000-6002/udp", tuple(PortMap(p, p, "udp") for p in range(6000, 6003))),
        ("6000-6001:7000-7001/udp", (PortMap(6000, 7000, "udp"), PortMap(6001, 7001, "udp"))),
        ("6000-6001:7000/udp", (PortMap(6000, 7000, "udp"), PortMap(6001, 7000, "udp"))),
        ("53 53/udp", (PortMap(53, 53), PortMap(53, 53, "udp"))),
        ("53/tcp,53/udp", (PortMap(53, 53, "tcp"), PortMap(53, 53, "udp"))),
    ],
)
def test_udp_port_forms(text: str, expected: tuple[PortMap, ...]) -> None:
    assert parse_ports(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("53/udp 53/udp", "listen port 53/udp appears twice ('53/udp' and '53/udp')"),
        ("6000-6005/udp 6003/udp", "listen port 6003/udp appears twice"),
        ("53/dccp", "'53/dccp' has protocol 'dccp'; expected /tcp or /udp"),
        ("53/", "'53/' has protocol ''; expected /tcp or /udp"),
        ("70-60/udp", "'70-60' is not a port range (low > high)"),
    ],
)
def test_bad_udp_port_lists(text: str, message: str) -> None:
    with pytest.raises(AddressError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_ports(text)


def test_udp_routes_from_every_source(tmp_path: Path) -> None:
    """PORTS with /udp, YAML routes with protocol:, and the two settings from env, file and CLI."""
    config = load({}, {"RELAY_PORTS": "53 53/udp 8125:18125/udp", "RELAY_TARGET": "10.9.8.7"})
    got = [(r.name, r.protocol, r.listen[0].port, r.target_port) for r in config.routes]
    assert got == [("tcp/53", "tcp", 53, 53), ("udp/53", "udp", 53, 53), ("udp/8125", "udp", 8125, 18125)]
    assert (config.udp_idle_timeout, config.max_udp_sessions) == (60.0, 4096)

    path = tmp_path / "relay.yaml"
    path.write_text(
        "target: 10.9.8.7\nudp_idle_timeout: 5s\nroutes:\n"
        "  - {listen: 514, target: 'logs:514', protocol: udp}\n"
        "  - {listen: 514, target: 'logs:514'}\n"
        "  - {name: jaeger, listen: '127.0.0.1:6831', target: 'h:6831', protocol: UDP}\n"
    )
    config = load({"max_udp_sessions": Raw("10", "--max-udp-sessions")}, {}, str(path))
    assert [(r.name, r.protocol) for r in config.routes] == [
        ("udp/514", "udp"),
        ("tcp/514", "tcp"),
        ("jaeger", "udp"),
    ]
    assert (config.udp_idle_timeout, config.max_udp_sessions) == (5.0, 10)
    assert load({}, {"RELAY_PORTS": "1/udp", "RELAY_UDP_IDLE_TIMEOUT": "250ms"}).udp_idle_timeout == 0.25


@pytest.mark.parametrize(
    ("environ", "yaml", "message"),
    [
        ({"RELAY_UDP_IDLE_TIMEOUT": "0"}, "", "RELAY_UDP_IDLE_TIMEOUT: '0' must be more than zero"),
        (
            {"RELAY_UDP_IDLE_TIMEOUT": "10ms"},
            "",
            "RELAY_UDP_IDLE_TIMEOUT: '10ms' is below 100ms, the shortest UDP idle timeout; expected a "
            "duration of 100ms or more",
        ),
        ({}, "udp_idle_timeout: 0.05\n", "udp_idle_timeout: 0.05 is below 100ms"),
        ({"RELAY_MAX_UDP_SESSIONS": "0"}, "", "RELAY_MAX_UDP_SESSIONS: '0' is not a whole number from 1"),
        (
            {},
            "routes:\n  - {listen: 53, target: 'h:53', protocol: sctp}\n",
            ":2: routes[0]: 'sctp' is not one of",
        ),
        (
            {},
            "routes:\n  - {listen: 53, target: 'h:53', protocol: udp}\n"
            "  - {listen: 53, target: 'g:53', protocol: udp}\n",
            "listen port 53 on 127.0.0.1:53 is used twice",
        ),
    ],
)
def test_bad_udp_settings_name_the_source(
    tmp_path: Path, environ: dict[str, str], yaml: str, message: str
) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(yaml or "ports: 53/udp\ntarget: 10.0.0.1\n")
    with pytest.raises(ConfigError) as err:
        load({}, environ, str(path))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("argv", "listen", "target", "family"),
    [
        (
            ["udp-listen:5353,fork,reuseaddr", "udp:host.docker.internal:53"],
            ("0.0.0.0", "::1"),
            "host.docker.internal",
            "any",
        ),
        (["UDP-RECVFROM:8125,fork", "UDP-SENDTO:statsd:8125"], ("0.0.0.0", "::1"), "statsd", "any"),
        (["udp4-listen:5353", "udp4:10.0.0.1:53"], ("0.0.0.0",), "10.0.0.1", "ipv4"),
        (["udp6-listen:5353", "udp6:[fd00::1]:53"], ("::",), "fd00::1", "ipv6"),
        (["udp-listen:5353,bind=127.0.0.1", "udp-connect:h:53"], ("127.0.0.1",), "h", "any"),
        (["udp6-recvfrom:5353,fork", "udp6-sendto:h:53"], ("::",), "h", "ipv6"),
    ],
)
def test_socat_udp_argv(argv: list[str], listen: tuple[str, ...], target: str, family: str) -> None:
    command, config, _ = cli.parse(argv, {})
    (route,) = config.routes
    assert (command, route.protocol, route.name) == (
        "run",
        "udp",
        "udp/5353" if "5353" in argv[0] else "udp/8125",
    )
    assert tuple(hp.host for hp in route.listen) == listen
    assert (route.target, config.family) == (target, family)


def test_socat_udp_idle_timeout_is_dash_t() -> None:
    _, config, _ = cli.parse(["-T", "30", "udp-listen:53", "udp:h:53"], {})
    assert (config.udp_idle_timeout, config.idle_timeout) == (30.0, None)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["udp-recvfrom:53", "udp:h:53"], "UDP-RECVFROM without fork relays one datagram and exits in socat"),
        (["tcp-listen:53", "udp-sendto:h:53"], "a TCP listener cannot forward to a UDP target"),
        (["udp-listen:53,backlog=5", "udp:h:53"], "option 'backlog=5' applies to TCP only"),
        (["udp-listen:53", "udp:h:53,connect-timeout=1"], "option 'connect-timeout=1' applies to TCP only"),
        (["-t", "1", "udp-listen:53", "udp:h:53"], "socat argument -t: UDP has no half-close"),
        (["udp-listen:53", "udp:h"], "expected HOST:PORT after UDP"),
    ],
)
def test_socat_udp_argv_that_cannot_be_honoured(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cli.parse(argv, {})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


# --- helpers for real datagrams -------------------------------------------------------------------------


class Peer(asyncio.DatagramProtocol):
    """A client (or target) socket that queues what it receives and the errors it is told of."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received: asyncio.Queue[tuple[bytes, Any]] = asyncio.Queue()
        self.errors: list[Exception] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.echo:  # b"" for b"": asyncio before 3.13 would not send an empty datagram
            assert self.transport is not None
            self.transport.sendto(data or b"(empty)", addr)
        self.received.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.errors.append(exc)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    async def reply(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            data, _ = await self.received.get()
        return data


@contextlib.asynccontextmanager
async def udp_peer(
    host: str | None = None, port: int = 0, *, remote: tuple[str, int] | None = None, echo: bool = False
) -> AsyncIterator[tuple[Peer, int]]:
    """A socket on host:port (default 127.0.0.1, any port), or connected to `remote` (from `host` when
    given)."""
    loop = asyncio.get_running_loop()
    local = (host, port) if host is not None else None if remote is not None else ("127.0.0.1", port)
    transport, peer = await loop.create_datagram_endpoint(
        lambda: Peer(echo), local_addr=local, remote_addr=remote
    )
    try:
        yield peer, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


def udp_relay(target_port: int, **settings: Any) -> contextlib.AbstractAsyncContextManager[Server]:
    """A relay with one UDP route `dns` from 127.0.0.1 (port 0) to the target; drained on exit."""
    return relay(target_port, protocol="udp", name="dns", **settings)


def udp_port(server: Server) -> int:
    return server.listeners[0].address.port


def free_for_tcp_and_udp() -> int:
    """A port number free over both TCP and UDP on 127.0.0.1 (bound then released)."""
    for _ in range(100):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no port free for both TCP and UDP in 100 tries")


def udp_port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- behaviour -----------------------------------------------------------------------------------------


def test_several_clients_each_get_only_their_own_replies(run: Run) -> None:
    """Steps: 8 clients at once each send 25 numbered datagrams through the relay to an echo target; each
    gets back exactly its own 25, in its own words, from the relay's listen address; 8 sessions."""

    async def scenario() -> None:
        async with udp_peer(echo=True) as (_, target), udp_relay(target) as server:
            port = udp_port(server)
            async with contextlib.AsyncExitStack() as stack:
                clients = [
                    (await stack.enter_async_context(udp_peer(remote=("127.0.0.1", port))))[0]
                    for _ in range(8)
                ]
                for n in range(25):
                    for i, client in enumerate(clients):
                        client.send(f"client {i} datagram {n}".encode())
                for i, client in enumerate(clients):
                    got = set()
                    for _ in range(25):
                        async with asyncio.timeout(5):
                            data, source = await client.received.get()
                        assert source[:2] == ("127.0.0.1", port)
                        got.add(data)
                    assert got == {f"client {i} datagram {n}".encode() for n in range(25)}
                    assert client.received.empty()
                assert server.udp.stats["dns"].sessions == 8
                assert server.udp.stats["dns"].datagrams_c2t == 200 == server.udp.stats["dns"].datagrams_t2c

    run(scenario())


def test_sizes_from_one_byte_to_the_ipv4_maximum(run: Run) -> None:
    """Datagram boundaries are kept: each size comes back whole and alone, up to 65,507 bytes."""

    async def scenario() -> None:
        async with (
            udp_peer(echo=True) as (_, target),
            udp_relay(target) as server,
            udp_peer(remote=("127.0.0.1", udp_port(server))) as (client, _),
        ):
            sizes = [1, 2, 512, 1472, 1473, 8192, 9000, 32768, 65000, MAX_IPV4]
            for size in sizes:
                payload = os.urandom(size)
                client.send(payload)
                assert await client.reply() == payload
            stats = server.udp.stats["dns"]
            assert stats.bytes_c2t == sum(sizes) == stats.bytes_t2c
            assert not stats.dropped

    run(scenario())


def test_an_empty_datagram_is_relayed(run: Run) -> None:
    """A zero-length datagram is a datagram: it reaches the target (which answers '(empty)')."""

    async def scenario() -> None:
        async with (
            udp_peer(echo=True) as (_, target),
            udp_relay(target) as server,
        ):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                client.connect(("127.0.0.1", udp_port(server)))
                client.send(b"")
                data = await asyncio.get_running_loop().run_in_executor(None, client.recv, 100)
            assert data == b"(empty)"
            assert server.udp.stats["dns"].datagrams_c2t == 1

    run(scenario())


def test_a_burst_at_a_new_session_is_not_cut_short(run: Run) -> None:
    """A new client sends 50 datagrams back to back, before its session's transport can be attached:
    all 50 reach the target and come back, and nothing is counted dropped."""

    async def scenario() -> None:
        async with (
            udp_peer(echo=True) as (_, target),
            udp_relay(target) as server,
            udp_peer(remote=("127.0.0.1", udp_port(server))) as (client, _),
        ):
            sent = {f"burst {n}".encode() for n in range(50)}
            for data in sorted(sent):
                client.send(data)
            assert {await client.reply() for _ in range(50)} == sent
            assert not server.udp.stats["dns"].dropped

    run(scenario())


def test_datagrams_wait_for_the_first_answer_of_the_target(run: Run) -> None:
    """Steps: the target is a name whose lookup waits on a gate; a client sends 3 datagrams, then 30
    more (past the 16 held); the gate opens: the first 16 are delivered in order, the rest were dropped
    and counted (buffer). A target that never resolves drops what was held (unresolved)."""

    async def scenario() -> None:
        gate = asyncio.Event()
        asked = asyncio.Event()

        async def lookup(name: str, *args: object, **kwargs: object) -> list[tuple[Any, ...]]:
            asked.set()
            await gate.wait()
            if name != "dns.test":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("127.0.0.1", 0))]

        async with udp_peer(echo=True) as (_, target):
            route = Route("dns", (HostPort("127.0.0.1", 0),), "dns.test", target, "udp")
            server = Server(Config(routes=(route,), metrics=None, drain_timeout=1.0), lookup=lookup)
            await server.start()
            try:
                stats = server.udp.stats["dns"]
                async with udp_peer(remote=("127.0.0.1", udp_port(server))) as (client, _):
                    for n in range(33):
                        client.send(b"%02d" % n)
                    await asyncio.wait_for(asked.wait(), 5)
                    await wait_until(lambda: stats.dropped["buffer"] == 33 - EARLY_DATAGRAMS)
                    gate.set()
                    got = [await client.reply() for _ in range(EARLY_DATAGRAMS)]
                    assert got == [b"%02d" % n for n in range(EARLY_DATAGRAMS)]
            finally:
                await server.drain()
            route = Route("none", (HostPort("127.0.0.1", 0),), "none.test", target, "udp")
            server = Server(Config(routes=(route,), metrics=None, drain_timeout=1.0), lookup=lookup)
            await server.start()
            try:
                async with udp_peer(remote=("127.0.0.1", udp_port(server))) as (client, _):
                    for _ in range(3):
                        client.send(b"lost")
                    await wait_until(lambda: server.udp.stats["none"].dropped["unresolved"] == 3)
                    assert server.udp.sessions == 0 and client.received.empty()
            finally:
                await server.drain()

    run(scenario())


def test_ipv6_loopback(run: Run) -> None:
    """A client on ::1 through a relay on ::1 to a target on ::1; the reply comes from [::1]:port."""

    async def scenario() -> None:
        async with (
            udp_peer("::1", echo=True) as (_, target),
            udp_relay(target, listen=("::1",), target="::1") as server,
        ):
            port = udp_port(server)
            async with udp_peer(remote=("::1", port)) as (client, _):
                client.send(b"over six")
                async with asyncio.timeout(5):
                    data, source = await client.received.get()
                assert (data, source[:2]) == (b"over six", ("::1", port))

    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    run(scenario())


def test_the_same_port_over_tcp_and_udp(run: Run) -> None:
    """Two routes on one port number: TCP to a TCP echo, UDP to a UDP echo; both answer, each counted."""

    async def scenario() -> None:
        port = free_for_tcp_and_udp()
        async with tcp_server(echo) as tcp_target, udp_peer(echo=True) as (_, udp_target):
            listen = (HostPort("127.0.0.1", port),)
            routes = (
                Route("tcp/x", listen, "127.0.0.1", tcp_target),
                Route("udp/x", listen, "127.0.0.1", udp_target, "udp"),
            )
            server = Server(Config(routes=routes, metrics=None, drain_timeout=1.0))
            await server.start()
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"over tcp")
                writer.write_eof()
                assert await reader.read() == b"over tcp"
                writer.close()
                async with udp_peer(remote=("127.0.0.1", port)) as (client, _):
                    client.send(b"over udp")
                    assert await client.reply() == b"over udp"
                assert server.stats["tcp/x"].accepted == 1
                assert server.udp.stats["udp/x"].datagrams_t2c == 1
                assert "udp/x" not in server.stats  # no TCP figures for a UDP route
            finally:
                await server.drain()

    run(scenario())


def test_a_target_that_is_down_then_comes_back(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    """Steps: nothing listens on the target port; a datagram goes out and the ICMP port unreachable is
    counted (unreachable) and logged, naming the target and what it means, without ending the session or
    the relay; then the target starts on that port and the same client's next datagram is answered."""

    async def scenario() -> None:
        down = unused_udp_port()
        async with udp_relay(down) as server:
            stats = server.udp.stats["dns"]
            async with udp_peer(remote=("127.0.0.1", udp_port(server))) as (client, _):
                client.send(b"anyone?")
                await wait_until(lambda: stats.dropped["unreachable"] >= 1)
                assert stats.sessions == 1
                assert f"dns: 127.0.0.1:{down} answered a datagram with an ICMP error" in caplog.text
                assert f"nothing listens on UDP port {down} at 127.0.0.1, an address of the relay's" in (
                    caplog.text
                )
                async with udp_peer("127.0.0.1", down, echo=True):
                    # The kernel may report the refusal of a datagram already in flight once more.
                    client.send(b"back?")
                    assert await client.reply() == b"back?"
                assert stats.sessions == 1
                assert not client.errors

    run(scenario())


def test_a_burst_at_a_down_target_leaves_the_session_listening(run: Run) -> None:
    """Steps: 200 datagrams at once at a target that is down, so ICMP errors reach the session's socket
    while datagrams are still being sent (the error is then taken by a send, or by a receive, in whatever
    order the loop runs); then the target starts and the same client's next datagram is answered. On
    uvloop a socket error stops libuv's polling of it: without the re-registration the session stays
    deaf to every later reply."""

    async def scenario() -> None:
        down = unused_udp_port()
        async with udp_relay(down) as server:
            stats = server.udp.stats["dns"]
            async with udp_peer(remote=("127.0.0.1", udp_port(server))) as (client, _):
                for n in range(200):
                    client.send(b"%03d" % n)
                await wait_until(lambda: stats.dropped["unreachable"] >= 1 and stats.datagrams_c2t >= 1)
                async with udp_peer("127.0.0.1", down, echo=True):
                    client.send(b"back?")
                    async with asyncio.timeout(5):
                        while await client.reply() != b"back?":
                            pass  # an echo of a burst datagram not yet read when the target came up
                assert stats.sessions == 1

    run(scenario())


def test_idle_sessions_expire(run: Run) -> None:
    """Steps: with udp_idle_timeout 0.5 s, a client that keeps talking every 50 ms for 1.5 s keeps its one
    session; once it stops, the session ends (within a generous bound), and a new datagram opens a new one."""

    async def scenario() -> None:
        async with udp_peer(echo=True) as (_, target), udp_relay(target, udp_idle_timeout=0.5) as server:
            stats = server.udp.stats["dns"]
            async with udp_peer(remote=("127.0.0.1", udp_port(server))) as (client, _):
                loop = asyncio.get_running_loop()
                until = loop.time() + 1.5
                while loop.time() < until:
                    client.send(b"tick")
                    assert await client.reply() == b"tick"
                    assert stats.sessions == 1
                    await asyncio.sleep(0.05)  # pacing, not synchronisation
                session = next(iter(server.listeners[0].sessions.values()))  # type: ignore[union-attr]
                await wait_until(lambda: stats.sessions == 0, timeout=5.0)
                client.send(b"again")
                assert await client.reply() == b"again"
                assert next(iter(server.listeners[0].sessions.values())) is not session  # type: ignore[union-attr]

    run(scenario())


def test_the_session_limit(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    """Steps: max_udp_sessions 2; two clients are served; a third client on the same address (which holds
    every session) has its datagrams dropped and counted (limit), logged with the address; readiness stays
    true (another address would still be served); when the sessions expire the third is served."""

    async def scenario() -> None:
        async with (
            udp_peer(echo=True) as (_, target),
            udp_relay(target, max_udp_sessions=2, udp_idle_timeout=0.4) as server,
        ):
            stats = server.udp.stats["dns"]
            remote = ("127.0.0.1", udp_port(server))
            async with udp_peer(remote=remote) as (first, _), udp_peer(remote=remote) as (second, _):
                for client in (first, second):
                    client.send(b"hello")
                    assert await client.reply() == b"hello"
                async with udp_peer(remote=remote) as (third, _):
                    third.send(b"me too")
                    await wait_until(lambda: stats.dropped["limit"] == 1)
                    assert readiness(server)[0] and not server.problems
                    assert (
                        "datagrams from new ports of 127.0.0.1, which holds the most sessions (2)"
                        in caplog.text
                    )
                    assert stats.sessions == 2 and third.received.empty() and not stats.dropped["evicted"]
                    await wait_until(lambda: stats.sessions == 0, timeout=5.0)  # both idle now
                    third.send(b"now?")
                    assert await third.reply() == b"now?"

    run(scenario())


@contextlib.contextmanager
def flood_sockets(host: str, count: int) -> Iterator[list[socket.socket]]:
    """`count` UDP sockets on `host`, each on its own port: one sender using many source ports."""
    with contextlib.ExitStack() as stack:
        socks = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            sock.bind((host, 0))
            sock.setblocking(False)
            socks.append(sock)
        yield socks


def test_a_flood_from_one_address_cannot_lock_out_another(run: Run, caplog: pytest.LogCaptureFixture) -> None:
    """Steps: max_udp_sessions 8; 64 ports of 127.0.0.2 send a datagram each, twice: 8 get a session, the
    rest are dropped (limit). A client on 127.0.0.3 sends: it is answered, because the least recently
    active session of 127.0.0.2 (the address holding the most) gave way, counted (evicted). The flood
    goes on from 64 new ports of 127.0.0.2: they are dropped, never taking the 127.0.0.3 client's
    session, which is answered again; readiness stays true all along (a flood cannot make it false)."""

    async def scenario() -> None:
        async with (
            udp_peer(echo=True) as (_, target),
            udp_relay(target, max_udp_sessions=8) as server,
        ):
            stats, relay_address = server.udp.stats["dns"], ("127.0.0.1", udp_port(server))
            with flood_sockets("127.0.0.2", 64) as flood, flood_sockets("127.0.0.2", 64) as more:
                for n in (1, 2):
                    for sock in flood:
                        sock.sendto(b"flood", relay_address)
                    await wait_until(lambda n=n: stats.dropped["limit"] == 56 * n)  # type: ignore[misc]
                assert stats.sessions == 8 and not server.problems
                async with udp_peer("127.0.0.3", remote=relay_address) as (client, _):
                    client.send(b"let me in")
                    assert await client.reply() == b"let me in"
                    assert stats.dropped["evicted"] == 1 and stats.sessions == 8
                    assert "ended the least recently active session of 127.0.0.2" in caplog.text
                    for sock in more:
                        sock.sendto(b"flood", relay_address)
                    await wait_until(lambda: stats.dropped["limit"] == 112 + 64)
                    client.send(b"still here")
                    assert await client.reply() == b"still here"
                    assert stats.dropped["evicted"] == 1 and not server.problems

    run(scenario())


def test_metrics_for_a_udp_route(run: Run) -> None:
    """The scrape shows datagrams and bytes by direction, sessions open and drops by reason, no client
    address in any label, and no connection figures for the UDP route."""

    async def scenario() -> None:
        async with (
            udp_peer(echo=True) as (_, target),
            udp_relay(target, metrics=HostPort("127.0.0.1", 0)) as server,
        ):
            async with udp_peer(remote=("127.0.0.1", udp_port(server))) as (client, _):
                for size in (10, 20, 30):
                    client.send(b"x" * size)
                    assert len(await client.reply()) == size
                s = await scrape(server)
            r = "dns"
            assert value(s, "relay_datagrams_total", route=r, direction="client_to_target") == 3
            assert value(s, "relay_datagrams_total", route=r, direction="target_to_client") == 3
            assert value(s, "relay_bytes_total", route=r, direction="client_to_target") == 60
            assert value(s, "relay_bytes_total", route=r, direction="target_to_client") == 60
            assert value(s, "relay_udp_sessions_active", route=r) == 1
            for reason in ("limit", "buffer", "unreachable", "unresolved", "evicted", "fd_limit"):
                assert value(s, "relay_datagrams_dropped_total", route=r, reason=reason) == 0
            assert value(s, "relay_listener_up", route=r, address=str(server.listeners[0].address)) == 1
            assert not any(
                name.startswith("relay_connections") and dict(labels).get("route") == r for name, labels in s
            )
            assert not any("127.0.0.1:" in v and k != "address" for _, labels in s for k, v in labels)

    run(scenario())


def test_reload_adds_and_removes_a_udp_route_and_drain_closes_it(run: Run, tmp_path: Path) -> None:
    """Steps: a relay with a TCP route is reloaded with a UDP route added (it serves at once, readiness
    lists it); reloaded without it (its socket closes, its sessions end); drain closes the rest."""

    async def scenario() -> None:
        async with udp_peer(echo=True) as (_, target), tcp_server(echo) as tcp_target:
            port = unused_udp_port()
            tcp_route = Route("tcp", (HostPort("127.0.0.1", 0),), "127.0.0.1", tcp_target)
            udp_route = Route("udp", (HostPort("127.0.0.1", port),), "127.0.0.1", target, "udp")
            base = Config(routes=(tcp_route,), metrics=None, drain_timeout=1.0)
            configs = [replace(base, routes=(tcp_route, udp_route)), base]
            server = Server(base, reload=lambda: configs.pop(0))
            await server.start()
            try:
                await server.reload()
                assert readiness(server)[1]["routes"]["udp"] == {  # type: ignore[index]
                    "listening": [f"127.0.0.1:{port}"],
                    "ready": True,
                }
                async with udp_peer(remote=("127.0.0.1", port)) as (client, _):
                    client.send(b"added")
                    assert await client.reply() == b"added"
                    assert server.udp.sessions == 1
                    await server.reload()
                    assert server.udp.sessions == 0 and "udp" not in readiness(server)[1]["routes"]  # type: ignore[operator]
                    await wait_until(lambda: udp_port_is_free(port))  # closed within a loop turn or two
            finally:
                await server.drain()
            assert server.udp.sessions == 0 and not server.listeners

    run(scenario())


def test_relay_check_reports_refused_and_no_answer(run: Run) -> None:
    """`relay check` on UDP routes: refused when ICMP port unreachable comes back, `no answer (open or
    filtered)` for a target that stays silent, answered for one that replies; only refused fails."""

    async def scenario() -> None:
        async with udp_peer() as (_, silent), udp_peer(echo=True) as (_, answering):
            refused = unused_udp_port()
            routes = tuple(
                Route(name, (HostPort("127.0.0.1", 1),), "127.0.0.1", port, "udp")
                for name, port in (("refused", refused), ("silent", silent), ("answers", answering))
            )
            out = io.StringIO()
            code = await run_check(Config(routes=routes), out)
            lines = {line.split()[0]: line for line in out.getvalue().splitlines() if line.split()}
            assert " refused " in lines["refused"] and "ICMP port unreachable" in lines["refused"]
            assert " no answer " in lines["silent"] and "open or filtered" in lines["silent"]
            assert " answered " in lines["answers"]
            assert code == 1
            out = io.StringIO()
            assert await run_check(Config(routes=routes[1:]), out) == 0

    run(scenario())


# --- a real DNS client and server ------------------------------------------------------------------------

DNSMASQ = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if os.path.exists("/usr/sbin/dnsmasq") else None)
DIG = shutil.which("dig")


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Any:
    """dnsmasq on 127.0.0.1 (UDP and TCP, one port), answering only from a hosts file this test writes:
    no upstream servers, no /etc/hosts, nothing forwarded, so nothing leaves the machine."""
    if DNSMASQ is None or DIG is None:
        pytest.skip("needs dnsmasq and dig (Debian: dnsmasq-base bind9-dnsutils)")
    hosts = tmp_path / "zone.hosts"
    hosts.write_text("10.1.2.3 app.relay.test\n10.1.2.4 db.relay.test\n")
    port = free_for_tcp_and_udp()
    proc = subprocess.Popen(
        [
            DNSMASQ,
            "--keep-in-foreground",
            "--log-facility=-",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--no-poll",
            "--local=/relay.test/",
            f"--addn-hosts={hosts}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            f"--port={port}",
            "--user=root",
            "--pid-file=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # ends at exit; it prints "started" once its sockets are bound
            if "started" in line:
                break
        else:
            raise AssertionError(f"dnsmasq did not start (exit {proc.wait(5)})")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


async def dig(port: int, name: str, *transport: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        DIG or "dig",
        "@127.0.0.1",
        "-p",
        str(port),
        name,
        "A",
        "+short",
        "+tries=1",
        "+timeout=3",
        *transport,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (out, err)
    return out.decode().strip()


def test_dig_through_the_relay_to_dnsmasq_over_udp_and_tcp(run: Run, dnsmasq: int) -> None:
    """Steps: the relay forwards one port number over UDP and TCP (`P P/udp` style routes) to dnsmasq;
    dig asks through it over UDP and over TCP and gets the test's own records; the counters show both."""

    async def scenario() -> None:
        port = free_for_tcp_and_udp()
        listen = (HostPort("127.0.0.1", port),)
        routes = (
            Route("tcp/dns", listen, "127.0.0.1", dnsmasq),
            Route("udp/dns", listen, "127.0.0.1", dnsmasq, "udp"),
        )
        server = Server(Config(routes=routes, metrics=None, drain_timeout=1.0))
        await server.start()
        try:
            assert await dig(dnsmasq, "app.relay.test") == "10.1.2.3"  # direct, for comparison
            assert await dig(port, "app.relay.test", "+notcp") == "10.1.2.3"
            assert await dig(port, "db.relay.test", "+tcp") == "10.1.2.4"
            assert await dig(port, "nothing.relay.test", "+notcp") == ""  # NXDOMAIN: no recursion
            udp = server.udp.stats["udp/dns"]
            assert udp.datagrams_c2t == 2 == udp.datagrams_t2c
            assert server.stats["tcp/dns"].accepted == 1
        finally:
            await server.drain()

    run(scenario())
