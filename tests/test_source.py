"""The last socat lines of the corpus that differed (issue 18): bind= on the connect address (the
relay's `source`), service names as ports, and Docker's embedded DNS as a target beside a listener on
port 53. End to end on both loops where there are bytes to move."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from relay.cli import parse
from relay.config import ConfigError
from tests.support import port_of, relay, tcp_server
from tests.test_udp import udp_peer, udp_port, udp_relay

Run = Any
SOURCE = "127.0.0.2"  # an address of this host (all of 127/8 is loopback) other than the default


def test_tcp_target_connections_come_from_the_source_address(run: Run) -> None:
    """Steps: a relay with source 127.0.0.2; a client's bytes reach the target, which sees the
    connection come from 127.0.0.2 and echoes; the client gets its echo."""
    peers: list[str] = []

    async def echo_and_note(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer.get_extra_info("peername")[0])
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def scenario() -> None:
        async with tcp_server(echo_and_note) as target, relay(target, source=SOURCE) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"from where?")
            assert await reader.readexactly(11) == b"from where?"
            writer.close()
        assert peers == [SOURCE]

    run(scenario())


def test_udp_sessions_come_from_the_source_address(run: Run) -> None:
    """Steps: a UDP route with source 127.0.0.2; the target sees the session's datagrams come from
    127.0.0.2 and answers; the client gets the answer."""

    async def scenario() -> None:
        async with udp_peer(echo=True) as (target_peer, target), udp_relay(target, source=SOURCE) as server:
            async with udp_peer(remote=("127.0.0.1", udp_port(server))) as (client, _):
                client.send(b"ping")
                assert await client.reply() == b"ping"
            data, sender = target_peer.received.get_nowait()
            assert (data, sender[0]) == (b"ping", SOURCE)

    run(scenario())


def test_a_source_of_the_other_family_is_a_connect_error_not_a_hang(run: Run) -> None:
    """source ::1 with an IPv4-only target: the client is reset and the connect error is counted."""

    async def scenario() -> None:
        async with tcp_server(lambda r, w: asyncio.sleep(0)) as target, relay(target, source="::1") as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
                await asyncio.wait_for(reader.readexactly(1), 5)
            writer.close()
            assert server.stats["test"].connect_errors["other"] == 1

    run(scenario())


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["TCP-LISTEN:8080,fork", "TCP:127.0.0.1:80,bind=127.0.0.2"], ("127.0.0.2", 8080, 80)),
        (["TCP4-LISTEN:www,fork", "TCP4:192.0.2.1:https"], (None, 80, 443)),
        (["UDP-RECVFROM:domain,fork", "UDP-SENDTO:127.0.0.1:5353"], (None, 53, 5353)),
    ],
)
def test_socat_bind_and_service_names(argv: list[str], expected: tuple[str | None, int, int]) -> None:
    _, config, _ = parse(argv, {})
    route = config.routes[0]
    assert (config.source, route.listen[0].port, route.target_port) == expected


def test_an_unknown_service_name_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"'nosuchservice' is neither a port number nor a tcp service name"):
        parse(["TCP-LISTEN:nosuchservice,fork", "TCP:127.0.0.1:80"], {})


def test_dockers_embedded_dns_beside_a_listener_on_53_is_no_loop() -> None:
    """socat's DNS forward to Docker's resolver (home-assistant's supervisor) loads; the same line to
    127.0.0.1:53 is still refused as a loop into the relay's own listener."""
    _, config, _ = parse(["UDP-RECVFROM:53,fork", "UDP-SENDTO:127.0.0.11:53"], {})
    assert config.routes[0].target == "127.0.0.11"
    with pytest.raises(ConfigError, match="come back into the relay in a loop"):
        parse(["UDP-RECVFROM:53,fork", "UDP-SENDTO:127.0.0.1:53"], {})
