"""Properties the speed work (issue 13) relies on; speed itself is measured in bench/, never here."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from relay.connection import Connection
from relay.pump import Side
from tests.support import echo, port_of, relay, tcp_server, wait_until
from tests.test_relay import round_trip

Run = Callable[..., Any]


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic garbage collector off for the test: what is still tracked afterwards was not freed
    by reference counting."""
    gc.collect()
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
        gc.collect()


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if type(o) is kind)


def test_finished_pairs_are_freed_without_the_collector(run: Run, no_collector: None) -> None:
    """Steps: with the cyclic collector off, 20 connections through the relay each echo a payload and
    close; once they have finished, no pair and no side is left in memory (a pair <-> side cycle would
    keep every one until a collection: connection.py FINISHED)."""

    async def scenario() -> None:
        async with tcp_server(echo) as target, relay(target) as server:
            port = port_of(server)
            for _ in range(20):
                payload = os.urandom(1000)
                assert await round_trip(port, payload) == payload
            await wait_until(lambda: not server.connections and server.stats["test"].closed["eof"] == 20)
            assert _alive(Connection) == 0
            assert _alive(Side) == 0

    run(scenario())
