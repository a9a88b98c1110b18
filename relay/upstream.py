"""Finding the host and connecting to it.

`auto` (and a literal host.docker.internal / host.containers.internal that does not resolve) walks the
chain docker-host users know: host.docker.internal -> host.containers.internal -> the default gateway
from /proc/net/route. Results are cached for a few seconds so a changed address is picked up without a
lookup per connection. Connecting tries every resolved address, staggered in the happy-eyeballs manner.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from relay.config import AUTO, Family

log = logging.getLogger("relay")

CHAIN = ("host.docker.internal", "host.containers.internal")
ROUTE_FILE = "/proc/net/route"
CACHE_SECONDS = 5.0
HAPPY_EYEBALLS_DELAY = 0.25
FAMILIES = {"any": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}

REFUSED_HINT = "is the host service listening on 0.0.0.0 / the docker0 address rather than 127.0.0.1?"
TIMEOUT_HINT = "a host firewall (ufw, firewalld) dropping the connection, or a wrong address?"
UNRESOLVED_HINT = 'add extra_hosts: ["host.docker.internal:host-gateway"] to the app service'


Lookup = Callable[..., Awaitable[list[tuple[Any, ...]]]]  # loop.getaddrinfo's shape


class ResolveError(Exception):
    """The target name (and, for the auto chain, every fallback) did not resolve."""


@dataclass(frozen=True, slots=True)
class Resolution:
    """What a target name resolved to and how: source is literal, resolved or gateway."""

    name: str
    addresses: tuple[str, ...]
    source: str
    note: str

    def describe(self) -> str:
        return f"target: {self.note}"


def parse_default_gateway(route_table: str) -> str | None:
    """The gateway of the first default route (destination 00000000) in /proc/net/route text."""
    for line in route_table.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3 and fields[1] == "00000000":
            try:
                packed = int(fields[2], 16).to_bytes(4, "little")
            except ValueError:
                continue
            gateway = socket.inet_ntoa(packed)
            if gateway != "0.0.0.0":
                return gateway
    return None


def read_default_gateway(path: str = ROUTE_FILE) -> str | None:
    try:
        with open(path, encoding="ascii") as fh:
            return parse_default_gateway(fh.read())
    except OSError:
        return None


def chain_for(target: str) -> tuple[str, ...]:
    """Names to try in order; an empty string stands for the default gateway."""
    if target == AUTO:
        return (*CHAIN, "")
    if target in CHAIN:
        return (*CHAIN[CHAIN.index(target) :], "")
    return (target,)


class Resolver:
    """Resolves one target spec, with a short cache; shared by every route with that target."""

    def __init__(
        self,
        target: str,
        family: Family = "any",
        *,
        ttl: float = CACHE_SECONDS,
        gateway: Callable[[], str | None] = read_default_gateway,
        lookup: Lookup | None = None,
    ) -> None:
        self.target = target
        self.family = FAMILIES[family]
        self.ttl = ttl
        self._gateway = gateway
        self._lookup = lookup
        self._cached: Resolution | None = None
        self._expires = 0.0
        self._lock: asyncio.Lock | None = None
        self.last: Resolution | None = None

    async def resolve(self) -> Resolution:
        now = time.monotonic()
        if self._cached is not None and now < self._expires:
            return self._cached
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # one lookup at a time, whatever the connection rate
            if self._cached is not None and time.monotonic() < self._expires:
                return self._cached
            try:
                result = await self._walk()
            finally:
                self._expires = time.monotonic() + self.ttl
            if self.last is not None and result.addresses != self.last.addresses:
                log.info("target changed: %s", result.note)
            self._cached = self.last = result
            return result

    async def _walk(self) -> Resolution:
        lookup = self._lookup or asyncio.get_running_loop().getaddrinfo
        failed: list[str] = []
        for name in chain_for(self.target):
            if not name:
                gateway = self._gateway()
                if gateway is None:
                    names = " nor ".join(failed)
                    raise ResolveError(f"{names} does not resolve and {ROUTE_FILE} has no default gateway")
                why = (
                    f"{failed[0]} does not resolve; using default gateway {gateway}"
                    if failed
                    else (f"default gateway {gateway}")
                )
                return Resolution(gateway, (gateway,), "gateway", why)
            try:
                infos = await lookup(name, None, family=self.family, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                failed.append(name)
                continue
            addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
            if not addresses:
                failed.append(name)
                continue
            source = "literal" if addresses == (name,) else "resolved"
            note = f"{name} -> {', '.join(addresses)} ({source})"
            if failed:
                note = f"{failed[0]} does not resolve; using {note}"
            return Resolution(name, addresses, source, note)
        raise ResolveError(f"{self.target} does not resolve")


def backoff_delays(
    budget: float, first: float = 0.1, factor: float = 2.0, cap: float = 2.0
) -> Iterator[float]:
    """Sleeps between retries: 0.1, 0.2, 0.4 ... capped, until their sum would pass the budget."""
    spent = 0.0
    delay = first
    while spent + delay <= budget:
        yield delay
        spent += delay
        delay = min(delay * factor, cap)


def classify(exc: BaseException) -> str:
    """A connect failure as a metrics reason: refused, timeout, unresolved or other."""
    if isinstance(exc, ResolveError):
        return "unresolved"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, OSError) and exc.errno in (errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "timeout"
    return "other"


HINTS = {"refused": REFUSED_HINT, "timeout": TIMEOUT_HINT, "unresolved": UNRESOLVED_HINT}


async def open_connection(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    addresses: tuple[str, ...],
    port: int,
) -> asyncio.BaseTransport:
    """Connect to the first address that answers; later ones start HAPPY_EYEBALLS_DELAY apart.

    With several addresses the race is run on bare sockets, so that only the winner gets a protocol.
    """
    if len(addresses) == 1:
        transport, _ = await loop.create_connection(factory, addresses[0], port)
        return transport
    sock = await _race(loop, addresses, port)
    try:
        transport, _ = await loop.create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport


async def _connect_sock(loop: asyncio.AbstractEventLoop, address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _race(loop: asyncio.AbstractEventLoop, addresses: tuple[str, ...], port: int) -> socket.socket:
    attempts: list[asyncio.Task[socket.socket]] = []
    errors: list[BaseException] = []
    winner: socket.socket | None = None
    try:
        for address in addresses:
            attempts.append(asyncio.ensure_future(_connect_sock(loop, address, port)))
            winner = await _wait_first(attempts, errors, HAPPY_EYEBALLS_DELAY)
            if winner is not None:
                return winner
        while winner is None and any(not t.done() for t in attempts):
            winner = await _wait_first(attempts, errors, None)
        if winner is not None:
            return winner
        raise _most_telling(errors)
    finally:
        for task in attempts:
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None and task.result() is not winner:
                task.result().close()  # a loser that connected too


async def _wait_first(
    attempts: list[asyncio.Task[socket.socket]], errors: list[BaseException], timeout: float | None
) -> socket.socket | None:
    """Wait until an attempt succeeds, all pending ones fail, or the stagger delay passes."""
    pending = {t for t in attempts if not t.done()}
    while pending:
        done, pending = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            return None
        for task in done:
            exc = task.exception()
            if exc is None:
                return task.result()
            errors.append(exc)
    return None


def _most_telling(errors: list[BaseException]) -> BaseException:
    """A refusal says more than an unreachable address family."""
    for exc in errors:
        if isinstance(exc, ConnectionRefusedError):
            return exc
    return errors[0]
