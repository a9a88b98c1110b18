"""Finding the host and connecting to it.

`auto` (and a literal host.docker.internal / host.containers.internal that does not resolve) walks the
chain docker-host users know: host.docker.internal -> host.containers.internal -> the default gateway
from /proc/net/route. Connecting tries every resolved address, staggered in the happy-eyeballs manner.

Rules of the Resolver (name resolution never sits on a connection's path):
1. A literal address is its own answer, once and forever: no lookup, no task, no clock.
2. `resolve()` returns the last good answer at once, however old (stale-while-revalidate). Only before the
   first answer does it wait, joining the walk in flight; its caller bounds that wait (connect timeout).
3. `run()` (one tracked task per target, started by the server at start-up without waiting for it, ended
   by `close()`) walks the chain in the background: at once, then every REFRESH_SECONDS, and soon after
   `failed()` (a connect to the answer failed), but not more often than every FAILED_REFRESH_GAP.
4. Every lookup of a name has its own time bound (LOOKUP_TIMEOUT), whatever the system resolver's timeout
   x attempts; a name that fails or times out is not asked again for NEGATIVE_SECONDS. One walk per target
   and one lookup per name run at a time. A name lower in the chain is asked STAGGER after a higher one
   that has not answered yet, so a DNS server that never answers delays the first answer by one time
   bound, not one per name.
5. The first answer and each change of address are logged once; lookups are counted by name and result
   (ok, failed, timeout).
6. A socket file (`unix:PATH`, UnixTarget) is its own answer like a literal, and connects by its path:
   the target object knows how it is reached (`open`), so connections never ask which kind it is. A
   socket file connects at once or not at all; when its listen backlog is full (EAGAIN) the connect is
   asked again, 1 ms then doubling up to 50 ms apart, until the connect timeout, as TCP's SYN retries
   wait for a full backlog. (asyncio's own connect takes that EAGAIN for "in progress" and hands over
   a socket that never connected.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from relay import hints
from relay.address import UNIX, is_unix
from relay.config import AUTO, Family

log = logging.getLogger("relay")

CHAIN = ("host.docker.internal", "host.containers.internal")
ROUTE_FILE = "/proc/net/route"
REFRESH_SECONDS = 30.0  # a good answer is checked again this often, in the background
NEGATIVE_SECONDS = 30.0  # a name that did not resolve is not asked again for this long
LOOKUP_TIMEOUT = 2.0  # one name's lookup; slower counts as no answer
STAGGER = 0.25  # ask the next name of the chain when the one before has not answered in this time
FAILED_REFRESH_GAP = 5.0  # refreshes caused by connect failures are at least this far apart
HAPPY_EYEBALLS_DELAY = 0.25
FD_LIMIT = "fd_limit"  # the relay is out of descriptors (EMFILE: its own limit, ENFILE: the system's)
NO_DESCRIPTOR = (errno.EMFILE, errno.ENFILE)
FAMILIES = {"any": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


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


def literal(target: str, family: int) -> Resolution | None:
    """The answer for an IP address written as the target (of the configured family), else None."""
    try:
        version = ipaddress.ip_address(target).version
    except ValueError:
        return None
    if family != socket.AF_UNSPEC and family != (socket.AF_INET if version == 4 else socket.AF_INET6):
        return None  # let the lookup say why it does not fit
    return Resolution(target, (target,), "literal", f"{target} -> {target} (literal)")


class SystemLookup:
    """getaddrinfo in a daemon thread per name.

    Why not loop.getaddrinfo: asyncio's default executor is joined when the loop is closed, so a lookup
    hanging on a DNS server that never answers would hold up the exit for the resolver's whole timeout x
    attempts; a daemon thread cannot. A name already being asked is not asked again until its thread
    returns, so time-bounded waiters never pile up threads.
    """

    def __init__(self, getaddrinfo: Callable[..., list[tuple[Any, ...]]] = socket.getaddrinfo) -> None:
        self._getaddrinfo = getaddrinfo
        self._running: dict[tuple[Any, ...], concurrent.futures.Future[list[tuple[Any, ...]]]] = {}
        self._lock = threading.Lock()

    async def __call__(
        self, host: str, port: Any, *, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> list[tuple[Any, ...]]:
        key = (host, port, family, type, proto, flags)
        with self._lock:
            future = self._running.get(key)
            if future is None:
                future = concurrent.futures.Future()
                future.set_running_or_notify_cancel()  # a waiter that gives up cannot cancel it for others
                self._running[key] = future
                thread = threading.Thread(target=self._ask, args=(key, future), name="lookup", daemon=True)
                thread.start()
        return await asyncio.wrap_future(future)

    def _ask(self, key: tuple[Any, ...], future: concurrent.futures.Future[list[tuple[Any, ...]]]) -> None:
        try:
            result = self._getaddrinfo(*key)
        except BaseException as exc:
            with self._lock:
                del self._running[key]
            future.set_exception(exc)
        else:
            with self._lock:
                del self._running[key]
            future.set_result(result)


system_lookup = SystemLookup()


class Resolver:
    """Resolves one target spec off the connections' path; shared by every route with that target."""

    def __init__(
        self,
        target: str,
        family: Family = "any",
        *,
        refresh_every: float = REFRESH_SECONDS,
        negative: float = NEGATIVE_SECONDS,
        lookup_timeout: float = LOOKUP_TIMEOUT,
        stagger: float = STAGGER,
        failed_gap: float = FAILED_REFRESH_GAP,
        gateway: Callable[[], str | None] = read_default_gateway,
        lookup: Lookup | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_problem: Callable[[str | None], None] | None = None,
        source: str | None = None,
    ) -> None:
        self.target = target
        self.family = FAMILIES[family]
        self.source = source  # the local address connections are made from (config `source`)
        self.refresh_every = refresh_every
        self.negative = negative
        self.lookup_timeout = lookup_timeout
        self.stagger = stagger
        self.failed_gap = failed_gap
        self._gateway = gateway
        self._lookup: Lookup = lookup or system_lookup
        self._clock = clock
        self._on_problem = on_problem
        self.last: Resolution | None = literal(target, self.family)  # the answer connections get
        self.error: str | None = None  # why the latest walk found nothing (the last answer still serves)
        self.lookups: Counter[tuple[str, str]] = Counter()  # (name, result) -> count, for metrics
        self._negative: dict[str, float] = {}  # name -> clock time before which it is not asked again
        self._asking: dict[str, asyncio.Task[tuple[str, ...]]] = {}
        self._walk: asyncio.Task[Resolution | ResolveError] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._announce = False
        self._closed = False

    @property
    def is_literal(self) -> bool:
        return self.last is not None and self.last.source in ("literal", "unix")

    async def open(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.BaseProtocol],
        addresses: tuple[str, ...],
        port: int,
        **tls: Any,
    ) -> asyncio.BaseTransport:
        """Connect to one of `addresses` (from `resolve()`) on `port`; `tls` is ssl= and server_hostname=
        for create_connection when the route speaks TLS to its target (tls.py)."""
        return await open_connection(loop, factory, addresses, port, source=self.source, **tls)

    # --- what connections use ---------------------------------------------------------------------------

    async def resolve(self) -> Resolution:
        """The last good answer at once; before the first one, wait for the walk in flight."""
        last = self.last
        if last is not None:
            return last
        if self._closed:
            raise ResolveError(f"{self.target}: the relay stopped before it resolved")
        walk = self._start_walk()
        try:
            result = await asyncio.shield(walk)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if walk.cancelled() and task is not None and not task.cancelling():
                raise ResolveError(f"{self.target}: the relay stopped before it resolved") from None
            raise
        if isinstance(result, ResolveError):
            raise ResolveError(str(result))  # a fresh one: raising the stored one would grow its traceback
        return result

    async def refresh(self) -> Resolution | ResolveError:
        """Walk the chain now (or join the walk in flight) and return its outcome; connections keep
        getting the last answer meanwhile."""
        return await self._start_walk()

    def failed(self) -> None:
        """A connect to the current answer failed: look again soon, in the background. Cheap at any rate."""
        if self._wake is not None:
            self._wake.set()

    # --- the background schedule ---------------------------------------------------------------------

    def start(self) -> None:
        """Start resolving in the background and log the answers; a literal is only logged."""
        self._announce = True
        if self.is_literal:
            assert self.last is not None
            log.info(self.last.describe())
        elif self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """Walk now, then every `refresh_every` seconds or, not sooner than `failed_gap` after the last walk,
        when `failed()` was called."""
        wake = self._wake = asyncio.Event()
        while True:
            wake.clear()
            walked = self._clock()
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_every):
                    await wake.wait()
            if wake.is_set():
                await asyncio.sleep(max(0.0, walked + self.failed_gap - self._clock()))

    async def close(self) -> None:
        """Cancel the schedule, the walk and the lookups in flight (a lookup thread just ends unheard)."""
        self._closed = True
        tasks = [t for t in (self._runner, self._walk, *self._asking.values()) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    # --- walking the chain ---------------------------------------------------------------------------

    def _start_walk(self) -> asyncio.Task[Resolution | ResolveError]:
        if self._walk is None or self._walk.done():
            self._walk = asyncio.get_running_loop().create_task(self._walk_and_record())
        return self._walk

    async def _walk_and_record(self) -> Resolution | ResolveError:
        """One walk; the result is returned, not raised, so a walk nobody waits for raises nothing."""
        try:
            result = await self._walk_chain()
        except ResolveError as err:
            self._record_failure(err)
            return err
        self._record(result)
        return result

    def _record(self, result: Resolution) -> None:
        last = self.last
        if self._announce:
            if last is None:
                log.info(result.describe())
            elif result.addresses != last.addresses:
                log.info("target changed: %s (was %s)", result.note, ", ".join(last.addresses))
        self.last, self.error = result, None
        if self._on_problem is not None:
            self._on_problem(None)

    def _record_failure(self, err: ResolveError) -> None:
        first = self.error is None
        self.error = str(err)
        if self.last is not None:
            if first and self._announce:
                log.warning("target: %s; still using %s", err, ", ".join(self.last.addresses))
            return
        if first and self._announce:
            hint = hints.unresolved(self.target)
            log.warning("target: %s; connections will fail until it does (%s)", err, hint)
        if self._on_problem is not None:
            self._on_problem(f"target {self.target}: {err}")

    async def _walk_chain(self) -> Resolution:
        chain = chain_for(self.target)
        names = [name for name in chain if name]  # "" (the gateway) is read at once, last
        asks = [self._ask(names[0])] if names else []
        failed: list[str] = []
        for i, name in enumerate(names):
            ask = asks[i]
            while not ask.done():
                if len(asks) < len(names):  # this name is slow: ask the next one meanwhile
                    await asyncio.wait({ask}, timeout=self.stagger)
                    if not ask.done():
                        asks.append(self._ask(names[len(asks)]))
                else:
                    await asyncio.wait({ask})
            addresses = ask.result()
            if addresses:
                source = "literal" if addresses == (name,) else "resolved"
                note = f"{name} -> {', '.join(addresses)} ({source})"
                if failed:
                    note = f"{failed[0]} does not resolve; using {note}"
                return Resolution(name, addresses, source, note)
            failed.append(name)
            if len(asks) == i + 1 and i + 1 < len(names):
                asks.append(self._ask(names[i + 1]))
        if "" not in chain:
            raise ResolveError(f"{self.target} does not resolve")
        gateway = self._gateway()
        if gateway is None:
            said = (
                f"neither {' nor '.join(failed)} resolves"
                if len(failed) > 1
                else f"{failed[0]} does not resolve"
            )
            raise ResolveError(f"{said}, and {ROUTE_FILE} has no default gateway")
        why = (
            f"{failed[0]} does not resolve; using default gateway {gateway}"
            if failed
            else f"default gateway {gateway}"
        )
        return Resolution(gateway, (gateway,), "gateway", why)

    def _ask(self, name: str) -> asyncio.Future[tuple[str, ...]]:
        """The lookup of `name` in flight, a new one, or at once () while it is remembered as failed."""
        loop = asyncio.get_running_loop()
        asking = self._asking.get(name)
        if asking is not None:
            return asking
        if self._clock() < self._negative.get(name, float("-inf")):
            remembered: asyncio.Future[tuple[str, ...]] = loop.create_future()
            remembered.set_result(())
            return remembered
        task = loop.create_task(self._lookup_name(name))
        self._asking[name] = task
        task.add_done_callback(lambda _: self._asking.pop(name, None))
        return task

    async def _lookup_name(self, name: str) -> tuple[str, ...]:
        addresses: tuple[str, ...] = ()
        try:
            async with asyncio.timeout(self.lookup_timeout):
                infos = await self._lookup(name, None, family=self.family, type=socket.SOCK_STREAM)
        except TimeoutError:
            result = "timeout"
        except (OSError, UnicodeError):  # socket.gaierror is an OSError
            result = "failed"
        else:
            addresses = tuple(dict.fromkeys(str(info[4][0]) for info in infos))
            result = "ok" if addresses else "failed"
        self.lookups[(name, result)] += 1
        if addresses:
            self._negative.pop(name, None)
        else:
            self._negative[name] = self._clock() + self.negative
            log.debug("lookup of %s: %s; not asked again for %gs", name, result, self.negative)
        return addresses


class UnixTarget(Resolver):
    """A socket file as the target: resolves to itself at once (rule 6) and connects by its path. Its one
    "address" is the `unix:PATH` text, which is also how the relay's own socket listeners are known
    (Shared.own), so the self-loop check before connecting works unchanged."""

    def __init__(self, target: str, family: Family = "any", **kwargs: Any) -> None:
        super().__init__(target, family, **kwargs)
        self.last = Resolution(target, (target,), "unix", f"{target} (socket file)")

    async def open(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.BaseProtocol],
        addresses: tuple[str, ...],
        port: int,
        **tls: Any,
    ) -> asyncio.BaseTransport:
        sock = await connect_unix(addresses[0][len(UNIX) :])
        try:
            transport, _ = await loop.create_unix_connection(factory, sock=sock, **tls)
        except BaseException:
            sock.close()
            raise
        return transport


BUSY_FIRST, BUSY_MAX = 0.001, 0.05  # waits between connects to a socket file whose backlog is full


async def connect_unix(path: str) -> socket.socket:
    """A connected socket to the socket file `path` (rule 6); a full backlog is waited out, bounded by
    the caller's connect timeout."""
    delay = BUSY_FIRST
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, BUSY_MAX)
            continue
        except BaseException:
            sock.close()
            raise
        return sock


def target_for(target: str, family: Family = "any", **kwargs: Any) -> Resolver:
    """The object that finds and reaches `target`: a socket file, or a name or address to resolve."""
    return (UnixTarget if is_unix(target) else Resolver)(target, family, **kwargs)


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
    """A connect failure as a metrics reason: refused, timeout, unresolved, missing (no socket file at
    the path), denied (the socket file's permissions), tls (the target's TLS handshake: tls.py) or other;
    or FD_LIMIT, the relay's own lack of a descriptor for the socket, which is no connect error at all
    (connection.py closes the pair so)."""
    if isinstance(exc, OSError) and exc.errno in NO_DESCRIPTOR:
        return FD_LIMIT
    if isinstance(exc, ResolveError):
        return "unresolved"
    if isinstance(exc, ssl.SSLError):
        return "tls"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return "missing"
    if isinstance(exc, PermissionError):
        return "denied"
    if isinstance(exc, OSError) and exc.errno in (errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "timeout"
    return "other"


def of_family(addresses: tuple[str, ...], source: str | None) -> tuple[str, ...]:
    """The addresses a socket bound to `source` can reach: those of its family (all without a source)."""
    if source is None:
        return addresses
    fitting = tuple(a for a in addresses if (":" in a) == (":" in source))
    if not fitting:
        raise OSError(
            errno.EAFNOSUPPORT,
            f"the target's addresses {', '.join(addresses)} are not of source {source}'s family",
        )
    return fitting


async def open_connection(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], asyncio.BaseProtocol],
    addresses: tuple[str, ...],
    port: int,
    *,
    source: str | None = None,
    **tls: Any,
) -> asyncio.BaseTransport:
    """Connect to the first address that answers; later ones start HAPPY_EYEBALLS_DELAY apart. With a
    `source`, from that local address, to the addresses of its family.

    With several addresses the race is run on bare sockets, so that only the winner gets a protocol (and
    a TLS handshake, with `tls`: ssl= and server_hostname=).
    """
    addresses = of_family(addresses, source)
    if len(addresses) == 1:
        local = (source, 0) if source is not None else None
        transport, _ = await loop.create_connection(factory, addresses[0], port, local_addr=local, **tls)
        return transport
    sock = await _race(loop, addresses, port, source)
    try:
        transport, _ = await loop.create_connection(factory, sock=sock, **tls)
    except BaseException:
        sock.close()
        raise
    return transport


async def _connect_sock(
    loop: asyncio.AbstractEventLoop, address: str, port: int, source: str | None
) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if source is not None:
            sock.bind((source, 0))
        await loop.sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _race(
    loop: asyncio.AbstractEventLoop, addresses: tuple[str, ...], port: int, source: str | None
) -> socket.socket:
    attempts: list[asyncio.Task[socket.socket]] = []
    errors: list[BaseException] = []
    winner: socket.socket | None = None
    try:
        for address in addresses:
            attempts.append(asyncio.ensure_future(_connect_sock(loop, address, port, source)))
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
    """A refusal says more than an unreachable address family, and the relay's own lack of descriptors
    more than whatever the other attempts met."""
    for exc in errors:
        if isinstance(exc, ConnectionRefusedError):
            return exc
    for exc in errors:
        if classify(exc) == FD_LIMIT:
            return exc
    return errors[0]
