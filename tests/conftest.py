"""Shared fixtures: run each async test on asyncio and on uvloop, failing on unhandled loop exceptions."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

T = TypeVar("T")
Runner = Callable[[Coroutine[Any, Any, T]], T]

LOOPS = ["asyncio", "uvloop"]


def _factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


@pytest.fixture(params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def run(loop_name: str) -> Iterator[Callable[..., Any]]:
    """run(coro, timeout=20): run on the chosen loop; any exception the loop reports fails the test."""
    errors: list[dict[str, Any]] = []

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(context)

    def runner(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        async def guarded() -> T:
            asyncio.get_running_loop().set_exception_handler(handler)
            async with asyncio.timeout(timeout):
                return await coro

        with asyncio.Runner(loop_factory=_factory(loop_name)) as r:
            return r.run(guarded())

    yield runner
    assert not errors, f"unhandled loop exceptions: {errors}"
