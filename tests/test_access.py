"""Source ranges (relay/access.py): parsing and matching as tables, then end to end on both loops.

A refused TCP client is reset before the relay connects to the target; a refused UDP datagram opens no
session; both are counted in relay_connections_denied_total and logged at a limited rate.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from relay.access import parse_allow, parse_range
from relay.address import AddressError, HostPort
from relay.config import ConfigError, load
from tests.support import has_ipv6_loopback, relay, scrape, tcp_server, value
from tests.test_udp import udp_peer

Run = Any

# --- parsing and matching: tables, no sockets -------------------------------------------------------------

ADMITS = [
    ("10.0.0.0/8", "10.255.1.2", True),
    ("10.0.0.0/8", "11.0.0.1", False),
    ("10.1.2.3/8", "10.9.9.9", True),  # host bits are masked, as socat does
    ("10.0.0.0:255.0.0.0", "10.2.3.4", True),  # socat's ADDR:MASK form
    ("10.0.0.0:255.0.0.0", "192.168.0.1", False),
    ("127.0.0.1", "127.0.0.1", True),  # a bare address is one host
    ("127.0.0.1", "127.0.0.2", False),
    ("[::1]/128", "::1", True),
    ("[::1]/128", "::2", False),
    ("::1", "::1", True),
    ("[fd00::]/8", "fd12:3456::1", True),
    ("[fd00::]/8", "fe80::1", False),
    # a v4 client on a dual-stack socket arrives v4-mapped and matches an IPv4 range
    ("127.0.0.0/8", "::ffff:127.0.0.5", True),
    ("10.0.0.0/8", "::ffff:127.0.0.5", False),
    # socat's spelling of a v4 range on an IPv6 socket admits the plain v4 address too
    ("[::ffff:127.0.0.0]/104", "127.0.0.9", True),
    ("[::ffff:127.0.0.0]/104", "::ffff:127.0.0.9", True),
    ("[::ffff:127.0.0.0]/104", "128.0.0.1", False),
    ("127.0.0.0/8", "::1", False),  # families do not mix otherwise
    ("[::1]/128", "127.0.0.1", False),
    ("10.0.0.0/8 192.168.0.0/16, ::1", "192.168.7.7", True),  # several, by space or comma
    ("10.0.0.0/8 192.168.0.0/16, ::1", "172.16.0.1", False),
    ("0.0.0.0/0", "203.0.113.9", True),
    ("127.0.0.0/8", "not an address", False),
]


@pytest.mark.parametrize(("ranges", "peer", "admitted"), ADMITS)
def test_admits(ranges: str, peer: str, admitted: bool) -> None:
    allow = parse_allow(ranges)
    assert allow is not None
    assert allow.admits(peer) is admitted


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10.0.0.0/33", "'10.0.0.0/33' is not an address range"),
        ("10.0.0/8x", "'10.0.0/8x' is not an address range"),
        ("[::1/128", "'[::1/128' is not an address range"),
        ("[::1]128", "'[::1]128' is not an address range"),
        ("10.0.0.0:255.0.255.0", "is not an address range"),  # not a contiguous mask
        ("db.example", "'db.example' is not an address range; expected CIDRs such as 10.0.0.0/8"),
        ("uid:x", "'uid:x' is not a uid; expected uid:N"),
        ([], "lists no address range"),
        ([True], "True is not an address range"),
    ],
)
def test_bad_ranges_name_the_value(value: object, message: str) -> None:
    with pytest.raises(AddressError, match=None) as err:
        parse_allow(value)
    assert message in str(err.value)


@pytest.mark.parametrize("text", ["", "any", "none", "  "])
def test_no_restriction(text: str) -> None:
    assert parse_allow(text) is None


def test_uids() -> None:
    allow = parse_allow(["uid:1000", "uid:0"])
    assert allow is not None and allow.admits_uid(1000) and allow.admits_uid(0)
    assert not allow.admits_uid(1001) and not allow.admits("127.0.0.1")


def test_mapped_range_is_stored_as_ipv4() -> None:
    assert str(parse_range("[::ffff:10.0.0.0]/104")) == "10.0.0.0/8"


# --- configuration --------------------------------------------------------------------------------------


def test_allow_from_env_applies_to_port_routes() -> None:
    config = load({}, {"RELAY_PORTS": "5432,53/udp", "RELAY_ALLOW": "10.0.0.0/8,::1"})
    for route in config.routes:
        assert route.allow is not None and route.allow.admits("10.1.1.1") and route.allow.admits("::1")
        assert not route.allow.admits("127.0.0.1")


def test_allow_per_route_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "allow: 127.0.0.0/8\n"
        "routes:\n"
        "  - {name: db, listen: 5432, target: db:5432, allow: [10.0.0.0/8, '[fd00::]/8']}\n"
        "  - {name: web, listen: 8080, target: web:80}\n"
    )
    db, web = load({}, {}, str(path)).routes
    assert db.allow is not None and db.allow.admits("10.0.0.1") and not db.allow.admits("127.0.0.1")
    assert web.allow is not None and web.allow.admits("127.0.0.1")  # the file's own allow: is the default


def test_bad_allow_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "routes:\n  - name: db\n    listen: 5432\n    target: db:5432\n    allow: [10.0.0.0/40]\n"
    )
    with pytest.raises(ConfigError) as err:
        load({}, {}, str(path))
    assert str(err.value).startswith(f"{path}:5: routes[0]: allow: '10.0.0.0/40' is not an address range")


def test_bad_env_allow_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"^RELAY_ALLOW: 'example.com' is not an address range"):
        load({}, {"RELAY_PORTS": "80", "RELAY_ALLOW": "example.com"})


# --- end to end ---------------------------------------------------------------------------------------------


async def _target() -> tuple[list[int], Any]:
    """A target that answers `ok` and records each connection it gets."""
    seen: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        await reader.read(100)
        writer.write(b"ok")
        await writer.drain()

    return seen, handler


async def _try(port: int, host: str = "127.0.0.1", source: str | None = None) -> bytes | str:
    """Connect (from `source`), send, half-close and read: the reply, or 'reset'."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    if source is not None:
        sock.bind((source, 0))
    try:
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
        reader, writer = await asyncio.open_connection(sock=sock)
    except ConnectionResetError:  # the reset can come before the loop has seen the connect complete
        sock.close()
        return "reset"
    try:
        writer.write(b"hi")
        writer.write_eof()
        return await reader.read(100)
    except ConnectionResetError:
        return "reset"
    finally:
        writer.close()


def test_tcp_clients_outside_the_ranges_are_reset_before_any_connect(
    run: Run, caplog: pytest.LogCaptureFixture
) -> None:
    """127.0.0.1 is allowed, 127.0.0.2 is not: the first gets the target's answer, the second a reset,
    and the target never sees it; both refusals are counted, and logged once (rate-limited)."""

    async def scenario() -> None:
        seen, handler = await _target()
        allow = parse_allow("127.0.0.1/32")
        metrics = HostPort("127.0.0.1", 0)
        async with tcp_server(handler) as target, relay(target, allow=allow, metrics=metrics) as server:
            port = server.listeners[0].address.port
            assert await _try(port) == b"ok"
            assert await _try(port, source="127.0.0.2") == "reset"
            assert await _try(port, source="127.0.0.3") == "reset"
            assert len(seen) == 1
            samples = await scrape(server)
            assert value(samples, "relay_connections_denied_total", route="test") == 2
            assert server.stats["test"].accepted == 1  # a refused client never became a connection

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario())
    refusals = [r.getMessage() for r in caplog.records if "refused a client" in r.getMessage()]
    assert refusals == ["test: refused a client from 127.0.0.2: not in allow (127.0.0.1/32)"]


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")


@needs_ipv6
def test_ipv6_clients_are_matched_against_ipv6_ranges(run: Run) -> None:
    """A route on 127.0.0.1 and ::1 that admits [::1]/128 only: ::1 gets through, 127.0.0.1 is reset."""

    async def scenario() -> None:
        seen, handler = await _target()
        async with (
            tcp_server(handler) as target,
            relay(target, listen=("::1", "127.0.0.1"), allow=parse_allow("[::1]/128")) as server,
        ):
            port = server.listeners[0].address.port
            assert await _try(port, "::1") == b"ok"
            assert await _try(port, "127.0.0.1") == "reset"
            assert len(seen) == 1 and server.stats["test"].denied == 1

    run(scenario())


@needs_ipv6
def test_a_v4_client_of_a_dual_stack_listener_matches_an_ipv4_range(run: Run) -> None:
    """[::] with ipv6only off (socat's TCP6-LISTEN) serves 127.0.0.1 as ::ffff:127.0.0.1, which the IPv4
    range 127.0.0.1/32 admits; 127.0.0.2 is reset, and so is ::1 (not in the range)."""

    async def scenario() -> None:
        seen, handler = await _target()
        async with (
            tcp_server(handler) as target,
            relay(target, listen=("::",), allow=parse_allow("127.0.0.1/32"), ipv6only=False) as server,
        ):
            port = server.listeners[0].address.port
            assert await _try(port, "127.0.0.1") == b"ok"
            assert await _try(port, "127.0.0.1", source="127.0.0.2") == "reset"
            assert await _try(port, "::1") == "reset"
            assert len(seen) == 1 and server.stats["test"].denied == 2

    run(scenario())


def test_udp_datagrams_from_outside_the_ranges_open_no_session(run: Run) -> None:
    """A UDP route admitting 127.0.0.1 only: a client on 127.0.0.2 gets no session and no reply, and each
    of its datagrams is counted; the allowed client's datagrams reach the target and come back."""

    async def scenario() -> None:
        async with (
            udp_peer(echo=True) as (_, target),
            relay(
                target, protocol="udp", allow=parse_allow("127.0.0.1"), metrics=HostPort("127.0.0.1", 0)
            ) as server,
        ):
            port = server.listeners[0].address.port
            async with udp_peer("127.0.0.2", remote=None) as (outsider, _):
                assert outsider.transport is not None
                for _ in range(3):
                    outsider.transport.sendto(b"let me in", ("127.0.0.1", port))
                async with udp_peer(remote=("127.0.0.1", port)) as (client, _):
                    client.send(b"query")
                    assert await client.reply() == b"query"
                await asyncio.wait_for(_until(lambda: server.udp.stats["test"].denied == 3), 5)
                assert outsider.received.empty()
            assert server.udp.stats["test"].datagrams_c2t == 1
            samples = await scrape(server)
            assert value(samples, "relay_connections_denied_total", route="test") == 3

    run(scenario())


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another uid")
def test_socket_file_peers_are_matched_by_uid(run: Run) -> None:
    """A socket file route admitting uid:0: root's connection is relayed; a process running as nobody
    (setuid in a child) is reset."""
    import pwd
    import subprocess
    import sys
    import tempfile

    from relay.address import UnixAddress
    from relay.config import Config, Route
    from relay.server import Server

    nobody = pwd.getpwnam("nobody").pw_uid

    async def scenario(path: str) -> None:
        seen, handler = await _target()
        async with tcp_server(handler) as target:
            route = Route(
                "sock", (UnixAddress(path, 0o666),), "127.0.0.1", target, allow=parse_allow("uid:0")
            )
            server = Server(Config(routes=(route,), metrics=None, drain_timeout=1.0))
            await server.start()
            try:
                reader, writer = await asyncio.open_unix_connection(path)
                writer.write(b"hi")
                writer.write_eof()
                assert await reader.read(100) == b"ok"
                writer.close()
                code = (
                    "import os,socket,sys;os.setuid(int(sys.argv[2]));s=socket.socket(socket.AF_UNIX);"
                    "s.connect(sys.argv[1])\n"
                    "try: s.sendall(b'hi');s.shutdown(1);print(s.recv(9) or b'eof')\n"
                    "except (ConnectionResetError, BrokenPipeError): print('reset')"
                )
                child = await asyncio.create_subprocess_exec(
                    sys.executable, "-c", code, path, str(nobody), stdout=subprocess.PIPE
                )
                out, _ = await asyncio.wait_for(child.communicate(), 10)
                assert out.strip() == b"reset"
                assert len(seen) == 1 and server.stats["sock"].denied == 1
            finally:
                await server.drain()

    with tempfile.TemporaryDirectory(dir="/tmp") as where:  # pytest's tmp_path is root's alone (0700)
        os.chmod(where, 0o755)
        run(scenario(os.path.join(where, "app.sock")))
