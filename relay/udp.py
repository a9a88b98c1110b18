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
   Sessions are kept in the order they were last active (moved at most once per sweep: a datagram only
   compares its session's sweep number with the hub's), so a sweep looks at the ones that end and at one
   more, never at every session; and it runs only while sessions are open: an idle relay has no timer.
5. Past max_udp_sessions (over every UDP route), a new client takes the place of the least recently
   active session of the client host (IP address) that holds the most sessions, if that host holds more
   than the new client's own: one host flooding from many ports cannot lock out the others. Otherwise
   (the new client's host holds the most already) its datagram is dropped. Both are counted (`evicted`,
   `limit`) and logged at a limited rate; neither makes /readyz false, as any other host would still be
   served (a flood cannot make the relay unready). No cap per host: behind a sidecar every client is
   127.0.0.1, and may use every session when nobody else wants one.
6. Per datagram: a sweep-number check, a buffer check, two counter adds and a send. Nothing else (no
   logging, no metrics call). An empty datagram is a datagram too; asyncio before 3.13 silently skips
   sendto(b""), so that one goes straight to the socket.
7. A session socket that cannot be made for lack of a descriptor drops the datagram as `fd_limit` and
   says so as the TCP side does (Shared.out_of_descriptors), never blaming the target. An ICMP error from
   the target (`unreachable`) is logged at a limited rate with what it likely means.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

from relay import hints
from relay.address import HostPort, format_target
from relay.config import UDP_IDLE_FLOOR, Route
from relay.connection import Shared, denied
from relay.listener import NO_IPV6, ListenError, bind_error
from relay.stats import UdpStats
from relay.upstream import FD_LIMIT, ResolveError, Resolver, classify, of_family

log = logging.getLogger("relay")

EARLY_DATAGRAMS = 16
# Receive buffer asked for on listening sockets: the kernel caps it at net.core.rmem_max (often 208 KiB,
# then this changes nothing). A bigger one rides out a stall of the process under a burst (StatsD,
# syslog) instead of dropping; session sockets keep the default, as 4096 of them could add up.
LISTEN_RCVBUF = 1 << 20
SWEEP_TICKS = 4

Address = Any  # (host, port) or (host, port, flowinfo, scope_id), as the socket gives it


class Transport(Protocol):
    """What the hot path uses of a datagram transport; both loops' have get_write_buffer_size (typeshed's
    DatagramTransport does not declare it)."""

    def sendto(self, data: bytes, addr: Address = None, /) -> None: ...
    def get_write_buffer_size(self) -> int: ...
    def close(self) -> None: ...


@dataclass(slots=True, eq=False)
class UdpHub:
    """What every UDP route shares: the sessions that max_udp_sessions bounds, in the order they were last
    active, overall (for the idle sweep) and by client host (for eviction); stats by route."""

    shared: Shared
    # The session class of a route by its target_protocol: "" is this module's Session; the server adds
    # udp_stream's for "tcp" (that module builds on this one, so this one does not import it).
    session_types: dict[str, type[Session]] = field(default_factory=dict)
    sessions: int = 0
    stats: dict[str, UdpStats] = field(default_factory=dict)
    tick: int = 0  # sweeps so far
    active: OrderedDict[Session, None] = field(default_factory=OrderedDict)  # least recent first
    hosts: dict[str, OrderedDict[Session, None]] = field(default_factory=dict)  # the same, by host
    by_count: dict[int, dict[str, None]] = field(default_factory=dict)  # n -> the hosts holding n
    most: int = 0  # sessions of the host that holds the most
    _sweep: asyncio.TimerHandle | None = None

    async def open(self, route: Route, resolver: Resolver, *, skipped: set[str]) -> UdpRoute:
        """Bind every listen address of the route; on failure close what was bound and raise ListenError."""
        udp = UdpRoute(route, resolver, self.stats.setdefault(route.series, UdpStats()), self)
        try:
            await udp.bind(skipped)
        except BaseException:
            udp.close()
            raise
        return udp

    # --- membership, recency and eviction (rules 4 and 5) ----------------------------------------------

    def add(self, session: Session) -> None:
        session.seen = self.tick
        self.active[session] = None
        mine = self.hosts.setdefault(session.host, OrderedDict())
        self._recount(session.host, len(mine), len(mine) + 1)
        mine[session] = None
        self.sessions += 1
        if self._sweep is None:
            self._schedule_sweep()

    def remove(self, session: Session) -> None:
        del self.active[session]
        mine = self.hosts[session.host]
        del mine[session]
        self._recount(session.host, len(mine) + 1, len(mine))
        if not mine:
            del self.hosts[session.host]
        self.sessions -= 1
        if not self.sessions and self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _recount(self, host: str, was: int, now: int) -> None:
        """Keep `by_count` and `most` right as a host's count moves by one (O(1), no scan of hosts)."""
        if was:
            holders = self.by_count[was]
            del holders[host]
            if not holders:
                del self.by_count[was]
                if self.most == was:
                    self.most = now
        if now:
            self.by_count.setdefault(now, {})[host] = None
            self.most = max(self.most, now)

    def touch(self, session: Session) -> None:
        """The session's first datagram since the last sweep: it is the most recently active now."""
        if session.closed:  # a datagram the loop read before the close took effect
            return
        session.seen = self.tick
        self.active.move_to_end(session)
        self.hosts[session.host].move_to_end(session)

    def victim(self, host: str) -> Session | None:
        """The session a new client of `host` may take the place of (rule 5), if any."""
        if self.most <= len(self.hosts.get(host, ())):
            return None
        biggest = next(iter(self.by_count[self.most]))
        return next(iter(self.hosts[biggest]))

    def _schedule_sweep(self) -> None:
        timeout = max(self.shared.config.udp_idle_timeout, UDP_IDLE_FLOOR)  # read each time: reload applies
        self._sweep = asyncio.get_running_loop().call_later(timeout / SWEEP_TICKS, self._sweep_idle)

    def _sweep_idle(self) -> None:
        self._sweep = None
        self.tick += 1
        oldest_kept = self.tick - SWEEP_TICKS  # seen before it: quiet for more than SWEEP_TICKS sweeps
        active = self.active
        while active:
            session = next(iter(active))
            if session.seen >= oldest_kept:
                break
            session.close()  # leaves `active` (remove)
        if self.sessions and self._sweep is None:
            self._schedule_sweep()


class UdpRoute:
    """One UDP route: its listening sockets, their sessions and the idle sweep."""

    def __init__(self, route: Route, resolver: Resolver, stats: UdpStats, hub: UdpHub) -> None:
        self.route = route
        self.resolver = resolver  # replaced on a reload that changes the family (server.py)
        self.stats = stats
        self.hub = hub
        self.listeners: list[UdpListener] = []
        self.session_type = hub.session_types.get(route.target_protocol, Session)

    async def bind(self, skipped: set[str]) -> None:
        loop = asyncio.get_running_loop()
        chosen_port = 0
        for want in self.route.listen:
            port = want.port or chosen_port
            try:
                config = self.hub.shared.config
                sock = _bind(want.host, port, reuseport=config.reuseport, ipv6only=config.ipv6only)
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

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
        self.listeners = []

    # --- sessions ------------------------------------------------------------------------------------------

    def new_session(self, listener: UdpListener, client: Address) -> Session | None:
        hub, host = self.hub, client[0]
        allow = self.route.allow
        if allow is not None and not allow.admits(host):  # relay/access.py
            denied(self.route, self.stats, hub.shared, host)
            return None
        limit = hub.shared.config.max_udp_sessions
        if hub.sessions >= limit and not self._make_room(host, limit):  # rule 5
            return None
        session = self.session_type(self, listener, client)
        listener.sessions[client] = session
        hub.add(session)
        self.stats.sessions += 1
        session.start()
        if session.closed:  # no descriptor, or no route to the target: counted and logged by the session
            self.stats.dropped[session.failure] += 1
            return None
        return session

    def _make_room(self, host: str, limit: int) -> bool:
        """End the session a new client of `host` takes the place of (rule 5); False: drop its datagram."""
        hub, name = self.hub, self.route.name
        victim = hub.victim(host)
        if victim is None:
            self.stats.dropped["limit"] += 1
            hub.shared.warnings.warning(
                "udp_limit",
                f"{name}: max_udp_sessions ({limit}) reached: datagrams from new ports of {host}, which "
                f"holds the most sessions ({hub.most}), are dropped; other client addresses still get a "
                "session (raise max_udp_sessions, or lower udp_idle_timeout)",
                route=name,
            )
            return False
        holder = victim.host
        victim.stats.dropped["evicted"] += 1
        hub.shared.warnings.warning(
            "udp_evict",
            f"{name}: max_udp_sessions ({limit}) reached: ended the least recently active session of "
            f"{holder}, which holds the most ({hub.most}), to serve a new client from {host}",
            route=name,
        )
        victim.close()
        return True

    def session_ended(self, session: Session) -> None:
        session.listener.sessions.pop(session.client, None)
        self.hub.remove(session)
        self.stats.sessions -= 1


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
        "failure",
        "host",
        "hub",
        "listener",
        "opening",
        "seen",
        "sock",
        "stats",
        "transport",
        "udp",
    )

    def __init__(self, udp: UdpRoute, listener: UdpListener, client: Address) -> None:
        self.udp = udp
        self.hub = udp.hub
        self.stats = udp.stats
        self.listener = listener
        self.client = client
        self.host: str = client[0]
        self.transport: Transport | None = None
        self.sock: socket.socket | None = None  # connected to the target; the transport's once attached
        self.opening: asyncio.Future[Any] | None = None  # resolving, or attaching the transport
        self.early: deque[bytes] = deque()  # while resolving (rule 3)
        self.seen = 0  # the hub's sweep number at the last datagram either way (rule 4)
        self.failure = "unreachable"  # the drop reason of a session that could not open (_failed)
        self.closed = False

    # --- the hot path (rule 6) -----------------------------------------------------------------------

    def to_target(self, data: bytes) -> None:
        if self.seen != self.hub.tick:
            self.hub.touch(self)
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
        if self.seen != self.hub.tick:
            self.hub.touch(self)
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
        except OSError as err:  # ConnectionRefusedError: an ICMP error for an earlier datagram
            self.error_received(err)

    def error_received(self, exc: Exception) -> None:
        """ICMP port/host unreachable for a datagram sent earlier: counted and logged at a limited rate;
        the session stays (rule 2)."""
        self.stats.dropped["unreachable"] += 1
        udp = self.udp
        name, port = udp.route.name, udp.route.target_port
        last = udp.resolver.last
        addresses = last.addresses if last is not None else ()
        where = format_target(addresses[0], port) if addresses else format_target(udp.route.target, port)
        if not isinstance(exc, ConnectionRefusedError):
            meaning = ""
        elif addresses and hints.is_local(addresses[0]):
            meaning = (
                f": nothing listens on UDP port {port} at {addresses[0]}, an address of the relay's own "
                "network namespace (the app container), not of the Docker host"
            )
        else:
            meaning = (
                f": nothing listens on UDP port {port} there (is the host service listening on 0.0.0.0 / "
                "the docker0 address rather than 127.0.0.1?), or a firewall rejects it"
            )
        udp.hub.shared.warnings.warning(
            f"udp_unreachable:{name}",
            f"{name}: {where} answered a datagram with an ICMP error ({exc}){meaning}; "
            "such datagrams are counted as dropped (unreachable)",
            route=name,
        )

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
            self.sock = _connect(last.addresses, self.udp.route.target_port, self.udp.resolver.source)
        except OSError as err:
            self._failed(err)
            return
        self._attach()

    async def _resolve(self) -> None:
        """Rule 3: wait for the target's first answer (bounded by connect_timeout), then connect."""
        try:
            async with asyncio.timeout(self.udp.hub.shared.config.connect_timeout):
                resolution = await self.udp.resolver.resolve()
            self.sock = _connect(resolution.addresses, self.udp.route.target_port, self.udp.resolver.source)
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
            self.failure = "unresolved"
        elif classify(err) == FD_LIMIT:  # rule 7: the relay's limit, not the target
            self.failure = FD_LIMIT
            udp.hub.shared.out_of_descriptors(udp.route.name, cast(OSError, err))
        else:
            self.failure = "unreachable"
            udp.resolver.failed()
        self.stats.dropped[self.failure] += len(self.early)
        if self.failure != FD_LIMIT:
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


def _bind(host: str, port: int, *, reuseport: bool, ipv6only: bool = True) -> socket.socket:
    """A listening UDP socket; v6-only for IPv6 unless ipv6only is off (then [::] takes IPv4 too).
    No SO_REUSEADDR: on UDP it would let a second relay bind the same port and take half the datagrams."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(ipv6only))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, LISTEN_RCVBUF)
        sock.bind((host, port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _connect(addresses: tuple[str, ...], port: int, source: str | None) -> socket.socket:
    """A UDP socket connected to the first address that takes it (connect() on UDP sends nothing; it
    fails only when there is no route, e.g. IPv6 without an interface), bound to `source` if given."""
    error: OSError = OSError(errno.EDESTADDRREQ, "no address")
    for address in of_family(addresses, source):
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if source is not None:
                sock.bind((source, 0))
            sock.connect((address, port))
        except OSError as err:
            sock.close()
            error = err
            continue
        return sock
    raise error
