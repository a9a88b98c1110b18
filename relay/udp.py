"""UDP routes: a listening socket per listen address, a session per client address.

Rules:
1. The first datagram from a client address opens a session: a UDP socket connected to the target, so
   the target's replies (and its ICMP errors) reach that session alone. Replies leave through the
   listening socket to the client's address: the client sees them come from the address it sent to.
2. Nothing blocks and nothing queues beyond the kernel: a datagram that cannot be sent at once (the
   transport holds unsent data) is dropped and counted (`buffer`), as the kernel drops what does not fit.
   An ICMP error from the target (port unreachable) is counted (`unreachable`) and ends nothing.
3. A session's socket is connected at once when the target's address is known (upstream.Resolver keeps
   the last answer), and datagrams go straight to it until the loop has attached a transport. Before the
   target's first answer, datagrams wait, at most EARLY_DATAGRAMS per session: dropping them would lose
   the first query of every new client (a DNS lookup, a StatsD burst), while an unbounded queue would
   grow before a target that never resolves; those are dropped (`unresolved`) when the wait fails.
4. Idle sessions end in a coarse sweep, SWEEP_TICKS times per udp_idle_timeout: a session that saw no
   datagram either way for more than SWEEP_TICKS sweeps ends, so between 1 and 1.25 x the timeout.
   No timer and no clock read per datagram.
5. Past max_udp_sessions (over every UDP route), datagrams from new client addresses are dropped,
   counted (`limit`) and logged at a limited rate; /readyz says so until a session ends.
6. Per datagram: a buffer check, two counter adds and a send. Nothing else (no logging, no metrics call).
   An empty datagram is a datagram too; asyncio before 3.13 silently skips sendto(b""), so that one goes
   straight to the socket.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from relay.address import HostPort
from relay.config import Route
from relay.connection import Shared
from relay.listener import NO_IPV6, ListenError, bind_error
from relay.stats import UdpStats
from relay.upstream import ResolveError, Resolver

log = logging.getLogger("relay")

EARLY_DATAGRAMS = 16
# Receive buffer asked for on listening sockets: the kernel caps it at net.core.rmem_max (often 208 KiB,
# then this changes nothing). A bigger one rides out a stall of the process under a burst (StatsD,
# syslog) instead of dropping; session sockets keep the default, as 4096 of them could add up.
LISTEN_RCVBUF = 1 << 20
SWEEP_TICKS = 4
LIMIT_PROBLEM = "udp_sessions"

Address = Any  # (host, port) or (host, port, flowinfo, scope_id), as the socket gives it


class Transport(Protocol):
    """What the hot path uses of a datagram transport; both loops' have get_write_buffer_size (typeshed's
    DatagramTransport does not declare it)."""

    def sendto(self, data: bytes, addr: Address = None, /) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def close(self) -> None: ...


@dataclass(slots=True, eq=False)
class UdpHub:
    """What every UDP route shares: the session count that max_udp_sessions bounds, stats by route."""

    shared: Shared
    sessions: int = 0
    stats: dict[str, UdpStats] = field(default_factory=dict)

    async def open(self, route: Route, resolver: Resolver, *, skipped: set[str]) -> UdpRoute:
        """Bind every listen address of the route; on failure close what was bound and raise ListenError."""
        udp = UdpRoute(route, resolver, self.stats.setdefault(route.series, UdpStats()), self)
        try:
            await udp.bind(skipped)
        except BaseException:
            udp.close()
            raise
        return udp


class UdpRoute:
    """One UDP route: its listening sockets, their sessions and the idle sweep."""

    def __init__(self, route: Route, resolver: Resolver, stats: UdpStats, hub: UdpHub) -> None:
        self.route = route
        self.resolver = resolver  # replaced on a reload that changes the family (server.py)
        self.stats = stats
        self.hub = hub
        self.listeners: list[UdpListener] = []
        self._sweep: asyncio.TimerHandle | None = None

    async def bind(self, skipped: set[str]) -> None:
        loop = asyncio.get_running_loop()
        chosen_port = 0
        for want in self.route.listen:
            port = want.port or chosen_port
            try:
                sock = _bind(want.host, port, reuseport=self.hub.shared.config.reuseport)
            except OSError as err:
                if want.host == "::1" and err.errno in NO_IPV6:
                    log.info(
                        "%s: IPv6 is not available here; not listening on [::1]:%d", self.route.name, port
                    )
                    skipped.add(want.host)
                    continue
                raise ListenError(
                    f"cannot listen on {HostPort(want.host, port)} for {self.route.name} (udp): "
                    f"{bind_error(err)}"
                ) from None
            bound = HostPort(want.host, sock.getsockname()[1])
            chosen_port = chosen_port or bound.port
            listener = UdpListener(self, bound, sock)
            try:
                await loop.create_datagram_endpoint(functools.partial(_same, listener), sock=sock)
            except BaseException:
                sock.close()
                raise
            self.listeners.append(listener)
        if not self.listeners:
            raise ListenError(f"{self.route.name}: no address to listen on ({self.route.describe()})")
        self._schedule_sweep()

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        self.listeners = []
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    # --- the idle sweep (rule 4) ---------------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        interval = self.hub.shared.config.udp_idle_timeout / SWEEP_TICKS  # read each time: reload applies
        self._sweep = asyncio.get_running_loop().call_later(interval, self._sweep_idle)

    def _sweep_idle(self) -> None:
        for listener in self.listeners:
            for session in list(listener.sessions.values()):
                session.quiet += 1
                if session.quiet > SWEEP_TICKS:
                    session.close()
        self._schedule_sweep()

    # --- sessions ------------------------------------------------------------------------------------------

    def new_session(self, listener: UdpListener, client: Address) -> Session | None:
        hub, config = self.hub, self.hub.shared.config
        if hub.sessions >= config.max_udp_sessions:  # rule 5
            self.stats.dropped["limit"] += 1
            limit = config.max_udp_sessions
            message = f"max_udp_sessions ({limit}) reached: datagrams from new client addresses are dropped"
            hub.shared.problems[LIMIT_PROBLEM] = message
            hub.shared.warnings.warning("udp_limit", f"{self.route.name}: {message}", route=self.route.name)
            return None
        session = Session(self, listener, client)
        listener.sessions[client] = session
        hub.sessions += 1
        self.stats.sessions += 1
        session.start()
        if session.closed:  # no route to the target's address: counted and logged by the session
            self.stats.dropped["unreachable"] += 1
            return None
        return session

    def session_ended(self, session: Session) -> None:
        session.listener.sessions.pop(session.client, None)
        self.hub.sessions -= 1
        self.stats.sessions -= 1
        if self.hub.sessions < self.hub.shared.config.max_udp_sessions:
            self.hub.shared.problems.pop(LIMIT_PROBLEM, None)


class UdpListener(asyncio.DatagramProtocol):
    """One listening socket: finds (or opens) the client's session and hands it the datagram."""

    def __init__(self, udp: UdpRoute, address: HostPort, sock: socket.socket) -> None:
        self.udp = udp
        self.address = address  # as bound: the real port when 0 was asked for
        self.sock = sock
        self.transport: Transport | None = None
        self.sessions: dict[Address, Session] = {}
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(Transport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        session = self.sessions.get(addr)
        if session is None:
            session = self.udp.new_session(self, addr)
            if session is None:
                return
        session.to_target(data)

    def error_received(self, exc: Exception) -> None:
        # Linux reports no ICMP errors on an unconnected socket; anything else is not worth more than this.
        log.debug("%s: %s: %s", self.udp.route.name, self.address, exc)

    def close(self) -> None:
        """Stop listening and end this socket's sessions (their replies could only leave through it)."""
        if self.closed:
            return
        self.closed = True
        for session in list(self.sessions.values()):
            session.close()
        if self.transport is not None:
            self.transport.close()


class Session(asyncio.DatagramProtocol):
    """One client address: a socket connected to the target.

    Its life: `start()` connects the socket at once when the target's address is known (else a task
    resolves it first, rule 3), then the loop attaches a transport to it, which takes a loop turn or two.
    Until then datagrams go straight to the socket, so a burst at a session's start is not cut short.
    """

    __slots__ = (
        "client",
        "closed",
        "early",
        "listener",
        "opening",
        "quiet",
        "sock",
        "stats",
        "transport",
        "udp",
    )

    def __init__(self, udp: UdpRoute, listener: UdpListener, client: Address) -> None:
        self.udp = udp
        self.stats = udp.stats
        self.listener = listener
        self.client = client
        self.transport: Transport | None = None
        self.sock: socket.socket | None = None  # connected to the target; the transport's once attached
        self.opening: asyncio.Future[Any] | None = None  # resolving, or attaching the transport
        self.early: deque[bytes] = deque()  # while resolving (rule 3)
        self.quiet = 0  # sweeps since the last datagram either way
        self.closed = False

    # --- the hot path (rule 6) -----------------------------------------------------------------------

    def to_target(self, data: bytes) -> None:
        self.quiet = 0
        transport = self.transport
        if transport is None:
            self._before_transport(data)
        elif transport.get_write_buffer_size():
            self.stats.dropped["buffer"] += 1
        else:
            self.stats.datagrams_c2t += 1
            self.stats.bytes_c2t += len(data)
            if data:
                transport.sendto(data)
            else:
                self._send(self.sock, b"", None)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.quiet = 0
        out = self.listener.transport
        if out is None or self.listener.closed:
            return
        if out.get_write_buffer_size():
            self.stats.dropped["buffer"] += 1
        else:
            self.stats.datagrams_t2c += 1
            self.stats.bytes_t2c += len(data)
            if data:
                out.sendto(data, self.client)
            else:
                self._send(self.listener.sock, b"", self.client)

    def _send(self, sock: socket.socket | None, data: bytes, to: Address) -> None:
        """Straight to a socket: an empty datagram (rule 6), or any before the transport is attached."""
        try:
            if sock is None:
                return
            if to is None:
                sock.send(data)
            else:
                sock.sendto(data, to)
        except BlockingIOError:
            self.stats.dropped["buffer"] += 1
        except OSError:  # ConnectionRefusedError: an ICMP error for an earlier datagram
            self.stats.dropped["unreachable"] += 1

    def error_received(self, exc: Exception) -> None:
        """ICMP port/host unreachable for a datagram sent earlier: counted; the session stays (rule 2)."""
        self.stats.dropped["unreachable"] += 1

    # --- opening and closing -----------------------------------------------------------------------------

    def _before_transport(self, data: bytes) -> None:
        if self.sock is not None:
            self.stats.datagrams_c2t += 1
            self.stats.bytes_c2t += len(data)
            self._send(self.sock, data, None)
        elif len(self.early) < EARLY_DATAGRAMS:
            self.early.append(data)
        else:
            self.stats.dropped["buffer"] += 1

    def start(self) -> None:
        last = self.udp.resolver.last
        if last is None:
            self.opening = asyncio.ensure_future(self._resolve())
            return
        try:
            self.sock = _connect(last.addresses, self.udp.route.target_port)
        except OSError as err:
            self._failed(err)
            return
        self._attach()

    async def _resolve(self) -> None:
        """Rule 3: wait for the target's first answer (bounded by connect_timeout), then connect."""
        try:
            async with asyncio.timeout(self.udp.hub.shared.config.connect_timeout):
                resolution = await self.udp.resolver.resolve()
            self.sock = _connect(resolution.addresses, self.udp.route.target_port)
        except (ResolveError, TimeoutError, OSError) as err:
            self.opening = None
            self._failed(err)
            return
        early, self.early = self.early, deque()
        for data in early:
            self._before_transport(data)
        self._attach()

    def _attach(self) -> None:
        loop = asyncio.get_running_loop()
        self.opening = opening = asyncio.ensure_future(
            loop.create_datagram_endpoint(functools.partial(_same, self), sock=self.sock)
        )
        opening.add_done_callback(self._attached)

    def _attached(self, opening: asyncio.Future[Any]) -> None:
        if self.opening is opening:
            self.opening = None
        failed = opening.cancelled() or opening.exception() is not None
        if failed and self.transport is None and self.sock is not None:
            self.sock.close()  # the loop never took it over (or closed it already: closing twice is fine)
        if not opening.cancelled() and (exc := opening.exception()) is not None:
            self._failed(exc)

    def _failed(self, err: BaseException) -> None:
        udp = self.udp
        if isinstance(err, ResolveError | TimeoutError):
            reason = "unresolved"
        else:
            reason = "unreachable"
            udp.resolver.failed()
        self.stats.dropped[reason] += len(self.early)
        udp.hub.shared.warnings.warning(
            f"udp_open:{udp.route.name}",
            f"{udp.route.name}: cannot reach the target over UDP: {err}",
            route=udp.route.name,
        )
        self.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.closed:
            transport.close()
        else:
            self.transport = cast(Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.early.clear()
        opening, self.opening = self.opening, None
        transport, self.transport = self.transport, None
        if opening is not None:
            opening.cancel()  # its callback closes the socket if the loop never took it over
        elif transport is None and self.sock is not None:
            self.sock.close()
        if transport is not None:
            transport.close()
        self.udp.session_ended(self)


def _same(protocol: asyncio.DatagramProtocol) -> asyncio.DatagramProtocol:
    return protocol


def _bind(host: str, port: int, *, reuseport: bool) -> socket.socket:
    """A listening UDP socket; v6-only for IPv6. No SO_REUSEADDR: on UDP it would let a second relay
    bind the same port and take half the datagrams."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect(addresses: tuple[str, ...], port: int) -> socket.socket:
    """A UDP socket connected to the first address that takes it (connect() on UDP sends nothing; it
    fails only when there is no route, e.g. IPv6 without an interface)."""
    error: OSError = OSError(errno.EDESTADDRREQ, "no address")
    for address in addresses:
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.connect((address, port))
        except OSError as err:
            sock.close()
            error = err
            continue
        return sock
    raise error
