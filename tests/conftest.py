"""Shared fixtures: run each async test on asyncio and on uvloop, failing on unhandled loop exceptions."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.netns import topology as topology  # the app/host namespace pair, for every module

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


NETNS_REASON = "needs root, Linux and `ip netns` (iproute2)"


def _can_use_netns() -> bool:
    return sys.platform == "linux" and os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.fixture
def namespace() -> Iterator[str]:
    """A private network namespace with loopback and a veth pair, both ends inside it: 10.203.0.1/24 on
    one end, nothing on the other, so 10.203.0.x never answers (a silent host). hosts/resolv.conf files
    keep name lookups inside it. Deleting the namespace deletes the pair."""
    if not _can_use_netns():
        pytest.skip(NETNS_REASON)
    name = f"relaychk{os.getpid()}"
    etc = Path("/etc/netns") / name
    subprocess.run(["ip", "netns", "del", name], capture_output=True)  # a leftover from an aborted run
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        for cmd in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", "silent0", "type", "veth", "peer", "name", "silent1"],
            ["ip", "addr", "add", "10.203.0.1/24", "dev", "silent0"],
            ["ip", "link", "set", "silent0", "up"],
            ["ip", "link", "set", "silent1", "up"],
        ):
            subprocess.run(["ip", "netns", "exec", name, *cmd], check=True)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # nothing answers: lookups fail fast
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
        shutil.rmtree(etc, ignore_errors=True)


def in_namespace(name: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        ["ip", "netns", "exec", name, sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
