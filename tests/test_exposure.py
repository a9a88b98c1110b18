"""A route listening beyond loopback is a WARNING that names it and how to restrict its sources (issue 17,
item 7): RELAY_LISTEN=0.0.0.0 or socat's TCP-LISTEN without bind= let every neighbour reach the host."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest

from relay.cli import http_endpoint
from relay.config import load
from relay.server import Server
from tests.support import free_port_block, relay

HOW = "restrict sources with allow: / socat range= (see README 'Exposure')"


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "relay"]


@pytest.mark.parametrize("protocol", ["tcp", "udp"])
def test_a_route_on_every_address_is_a_warning_naming_it(
    run: Callable[..., Any], caplog: pytest.LogCaptureFixture, protocol: str
) -> None:
    """Steps: a route on 0.0.0.0 and one on 127.0.0.1; only the first gets a WARNING (it was INFO, and UDP
    routes had no line at all), naming the route, its address, its target and the way to restrict it."""
    caplog.set_level(logging.INFO, logger="relay")

    async def main() -> None:
        async with relay(9, listen=("0.0.0.0",), protocol=protocol, name="open") as server:
            port = server.listeners[0].address.port
        async with relay(9, listen=("127.0.0.1",), protocol=protocol, name="closed"):
            pass
        (line,) = warnings(caplog)
        assert line.startswith(f"open: 0.0.0.0:{port} is reachable from outside this network namespace")
        assert "127.0.0.1:9" in line and HOW in line, line

    run(main())


def test_a_port_range_is_one_warning_and_allow_is_no_warning(
    run: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: RELAY_PORTS=P-P+2 on 0.0.0.0 is one WARNING for the range, not three; the same with
    RELAY_ALLOW set is an INFO line naming the admitted clients and no warning."""
    caplog.set_level(logging.INFO, logger="relay")
    first = free_port_block(3)
    env = {
        "RELAY_PORTS": f"{first}-{first + 2}:9",
        "RELAY_LISTEN": "0.0.0.0",
        "RELAY_TARGET": "127.0.0.1",
        "RELAY_METRICS": "off",
    }

    async def serve(config_env: dict[str, str]) -> None:
        server = Server(load({}, config_env), endpoint=http_endpoint)
        await server.start()
        await server.drain()

    async def main() -> None:
        await serve(env)
        (line,) = warnings(caplog)
        assert line.startswith(f"tcp/{first}-{first + 2}: 0.0.0.0:{first}-{first + 2} is reachable"), line
        caplog.clear()
        await serve({**env, "RELAY_ALLOW": "10.0.0.0/8"})
        assert warnings(caplog) == []
        assert any("clients admitted: 10.0.0.0/8" in r.getMessage() for r in caplog.records)

    run(main())
