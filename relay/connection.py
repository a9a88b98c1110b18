"""One relayed pair: accept, connect to the target, two pumps, close once.

Rules:
1. The client is not read until the target is connected. Bytes it sends first (HTTP, PostgreSQL
   clients speak first) wait in the kernel's receive buffer, or, for at most one read, in
   `Side.early`; they are delivered first, in order.
2. The pair ends when both sides are closed. Clean EOFs travel as FIN (pump.py); a reset or error on
   one side resets the other at once; idle and half-close timeouts, shutdown and connect failures close
   both. The first cause seen is the reason recorded.
3. Every pair is in `Shared.connections` from accept until both sockets are gone, and `finish` runs
   exactly once; drain, limits, metrics and tests read that set.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

from relay import hints, tls
from relay.address import AddressError, HostPort, UnixAddress, format_hostport, format_target
from relay.budget import Budget
from relay.config import Config, Route
from relay.listener import ListenError
from relay.logs import RateLimited
from relay.pump import Side, reset, set_socket_options, tcp_closed
from relay.stats import RouteStats, UdpStats
from relay.upstream import FD_LIMIT, ResolveError, Resolver, backoff_delays, classify

log = logging.getLogger("relay")

# Reasons that end a pair with FIN after flushing; the others (resets, a failed connect, shutdown after
# the drain timeout) reset both sides so nobody mistakes a cut connection for a complete answer. A failed
# connect resets the client on purpose: a FIN would turn into a reset anyway whenever the client had
# sent bytes the relay never read, so only RST is the same every time, on both loops.
GRACEFUL = frozenset({"eof", "idle_timeout"})
FD_PROBLEM = "descriptors"  # the key in Shared.problems while descriptors run out (cleared by audit.py)


@dataclass(slots=True)
class Shared:
    """State every connection on the loop shares."""

    config: Config
    connections: set[Connection] = field(default_factory=set)
    warnings: RateLimited = field(default_factory=RateLimited)
    drained: asyncio.Event | None = None  # set when `connections` becomes empty during a drain
    # Why new connections would fail now (key -> one line); /readyz reports these (server.py, health.py).
    problems: dict[str, str] = field(default_factory=dict)
    full: bool = False  # max_connections reached: "slots" is in problems until a pair finishes
    # uvloop sets TCP_NODELAY on every TCP transport itself; asyncio not on accepted sockets (pump.py).
    set_nodelay: bool = True
    # (ip, port) that reach one of the relay's own listeners: what it listens on (own_addresses), and
    # addresses found at run time to lead back into it. A target among them is refused, not forwarded.
    own: set[tuple[str, int]] = field(default_factory=set)
    budget: Budget = field(default_factory=Budget)  # bytes held for slow receivers, process-wide

    def out_of_descriptors(self, route: str, err: OSError) -> None:
        """A socket could not be made for lack of a descriptor (accept, target connect, UDP session): the
        process's limit, never the target's fault. /readyz says so until the audit sees headroom again."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        message = (
            f"out of file descriptors ({err.strerror}; limit {soft}): new connections are reset and new "
            "UDP sessions refused at once; raise the limit (ulimits: nofile in compose) or lower "
            "max_connections or max_udp_sessions"
        )
        self.problems[FD_PROBLEM] = message
        self.warnings.warning("fd_limit", f"{route}: {message}", route=route)


def denied(route: Route, stats: RouteStats | UdpStats, shared: Shared, who: str) -> None:
    """A client the route's allow refused (listener.py rule 6, udp.py): counted, logged at a limited rate.
    For UDP, each datagram from a refused address counts (it has no session to remember the verdict)."""
    stats.denied += 1
    shared.warnings.warning(
        f"denied:{route.name}",
        f"{route.name}: refused a client from {who}: not in allow ({route.allow})",
        route=route.name,
    )


class _Finished:
    """The owner of the sides of a finished pair: no event can reach it any more (both sides are lost:
    rule 3), and if one did, there is nothing left to do."""

    def side_made(self, side: Side) -> None:
        pass

    def side_eof(self, side: Side) -> None:
        pass

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        pass


FINISHED = _Finished()


class SelfLoop(ConnectionError):
    """The target turned out to be the relay itself (say, a name that now resolves to this host)."""


def own_addresses(bound: Iterable[HostPort | UnixAddress]) -> set[tuple[str, int]]:
    """Listen addresses as (ip, port), plus the loopback address that reaches a wildcard listener.
    ("0.0.0.0", port) in the set also marks a wildcard listener for `Connection._loops_back`. A socket
    file is ("unix:PATH", 0), which is how a socket file target resolves (upstream.UnixTarget)."""
    own = set()
    for hp in bound:
        own.add((hp.host, hp.port))
        if hp.host in ("0.0.0.0", "::"):
            own.add(("127.0.0.1" if hp.host == "0.0.0.0" else "::1", hp.port))
    return own


@dataclass(slots=True)
class RouteContext:
    route: Route
    resolver: Resolver
    stats: RouteStats
    shared: Shared
    # TLS on the listen side and towards the target (tls.py), made from the route's settings.
    server_tls: ssl.SSLContext | None = field(init=False, default=None)
    target_tls: tls.TargetSide | None = field(init=False, default=None)
    client_name: str | None = field(init=False, default=None)  # the name client certificates must carry

    def __post_init__(self) -> None:
        route = self.route
        self.client_name = route.tls.commonname if route.tls is not None else None
        if route.tls is not None or route.target_tls is not None:
            try:
                self.server_tls, self.target_tls = tls.contexts(route.name, route.tls, route.target_tls)
            except AddressError as err:  # a file changed since the config was read (tls.py rule 1)
                raise ListenError(f"{route.name}: TLS: {err}") from None

    def reload_tls(self) -> bool:
        """Read the route's certificate files again (SIGHUP: a rotated certificate at the same path) for
        the connections from now on; open ones keep theirs. False, keeping the old contexts, when a file
        became unreadable since the config was read."""
        route = self.route
        try:
            self.server_tls, self.target_tls = tls.contexts(
                route.name, route.tls, route.target_tls, warn=False
            )
        except AddressError as err:
            log.error("%s: TLS files not reloaded, keeping the ones in use: %s", route.name, err)
            return False
        return True


class Connection:
    __slots__ = (
        "_half_timer",
        "_idle_bytes",
        "_idle_since",
        "_idle_timer",
        "_timed_out",
        "client",
        "ctx",
        "reason",
        "started",
        "target",
        "task",
    )

    def __init__(self, ctx: RouteContext) -> None:
        self.ctx = ctx
        budget = ctx.shared.budget
        self.client = Side(self, budget)
        self.target = Side(self, budget)
        self.reason: str | None = None
        self.task: asyncio.Task[None] | None = None
        self.started = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        self._half_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._timed_out = False
        self._idle_bytes = 0

    @property
    def bytes_c2t(self) -> int:
        return self.client.nbytes

    @property
    def bytes_t2c(self) -> int:
        return self.target.nbytes

    # --- events from the two sides ------------------------------------------------------------------

    def side_made(self, side: Side) -> None:
        if side is self.client:
            self._accepted()
        else:
            self._target_connected()

    def _accepted(self) -> None:
        transport = self.client.transport
        assert transport is not None
        ctx = self.ctx
        if ctx.client_name is not None and self._wrong_client_name(transport, ctx.client_name):
            return
        shared = ctx.shared
        ctx.stats.accepted += 1
        draining = shared.drained is not None
        if draining or len(shared.connections) >= shared.config.max_connections:
            ctx.stats.closed["shutdown" if draining else "limit"] += 1
            self.client.lost = self.target.lost = True  # never registered: nothing to finish
            reset(transport)
            if not draining:
                message = (
                    f"max_connections ({shared.config.max_connections}) reached: "
                    "new connections are closed at once"
                )
                shared.full = True
                shared.problems["slots"] = message
                shared.warnings.warning("limit", message, route=ctx.route.name)
            return
        transport.pause_reading()  # rule 1
        self.started = time.perf_counter()  # durations: uvloop's loop.time() has whole milliseconds
        shared.connections.add(self)
        ctx.stats.active += 1

    async def take(self, sock: socket.socket) -> None:
        """The pair's one task (listener.py rule 3): make the client's transport, which registers the
        pair (`_accepted`), then connect in the same task (a second task cost ~10 µs a connection)."""
        loop = asyncio.get_running_loop()  # once: each call is a getpid() system call on Python 3.11
        server_tls = self.ctx.server_tls
        try:
            if server_tls is None:
                await loop.connect_accepted_socket(self._client_side, sock)
            else:  # the handshake completes before the pair sees the client (tls.py rule 2)
                await loop.connect_accepted_socket(
                    self._client_side,
                    sock,
                    ssl=server_tls,
                    ssl_handshake_timeout=self.ctx.shared.config.connect_timeout,
                )
        except OSError as err:  # the client left between accept and here, or its handshake failed
            sock.close()
            ctx = self.ctx
            if server_tls is not None:
                warn = ctx.shared.warnings.warning
                tls.handshake_failed(
                    ctx.stats.tls_failures, warn, ctx.route.name, tls.LISTEN, ctx.route.tls, err
                )
            else:
                log.debug("%s: a client left before it was taken over: %s", ctx.route.name, err)
            return
        if self.reason is not None or self.client.lost:
            return  # refused (limit, drain), or gone meanwhile: nothing to connect for
        self.task = asyncio.current_task(loop)
        await self._connect(loop)

    def _client_side(self) -> Side:
        return self.client

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        ctx = self.ctx
        config = ctx.shared.config
        delays = backoff_delays(config.connect_retry) if config.connect_retry else iter(())
        while True:
            try:
                await self._attempt(loop, config.connect_timeout)
            except Exception as exc:
                reason = "loop" if isinstance(exc, SelfLoop) else classify(exc)
                if reason == FD_LIMIT:  # the relay's own limit, not the target's: no connect error
                    ctx.shared.out_of_descriptors(ctx.route.name, cast(OSError, exc))
                    self.close(FD_LIMIT)
                    return
                delay = next(delays, None) if reason == "refused" else None
                if delay is not None and self.reason is None:
                    await asyncio.sleep(delay)
                    continue
                self._connect_failed(reason, exc)
                return
            ctx.stats.connect_seconds.observe(time.perf_counter() - self.started)
            return

    async def _attempt(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Resolve and connect once, cut by a plain timer: asyncio.timeout() cost ~25 µs a connection
        in a profile under wrk, a tenth of the relay's whole per-connection time."""
        self._timed_out = False
        if self.target.transport is not None:  # a retry: the last attempt's side is written off
            self.target = Side(self, self.ctx.shared.budget)
        timer = loop.call_later(timeout, self._expire)
        resolution = None
        try:
            resolution = await self.ctx.resolver.resolve()
            port = self.ctx.route.target_port
            own = self.ctx.shared.own
            if any((address, port) in own for address in resolution.addresses):
                raise SelfLoop(f"{format_target(resolution.addresses[0], port)} is the relay's own")
            target_tls = self.ctx.target_tls
            if target_tls is None:
                await self.ctx.resolver.open(loop, self._target_side, resolution.addresses, port)
            else:
                name = target_tls.server_hostname(resolution.name)
                await self.ctx.resolver.open(
                    loop,
                    self._target_side,
                    resolution.addresses,
                    port,
                    ssl=target_tls.context,
                    server_hostname=name,
                )
        except BaseException as exc:
            self._write_off_target()
            if not isinstance(exc, asyncio.CancelledError) or not self._timed_out:
                raise  # a connect error, shutdown, or the client went away
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if resolution is None:  # still waiting for the first answer: DNS, not the host, is silent
                raise ResolveError(f"no DNS answer for {self.ctx.route.target} within {timeout:g}s") from None
            raise TimeoutError(f"no answer within {timeout:g}s") from None
        finally:
            timer.cancel()

    def _write_off_target(self) -> None:
        """An attempt that did not complete owns no live target socket.

        The loop may have made the transport (and called connection_made) before the attempt was cut:
        asyncio then closes it and reports connection_lost, but uvloop closes it without reporting, and
        a pair waiting for that report would never finish (rule 3). So close it here and mark the side
        lost ourselves; a late connection_lost is ignored (pump.Side.connection_lost).
        """
        target = self.target
        if target.transport is not None and not target.lost:
            target.lost = True
            target.transport.abort()

    def _expire(self) -> None:
        if self.task is not None and not self.task.done():
            self._timed_out = True
            self.task.cancel()

    def _target_side(self) -> Side:
        return self.target

    def _connect_failed(self, reason: str, exc: BaseException) -> None:
        ctx = self.ctx
        ctx.stats.connect_errors[reason] += 1
        if reason in ("refused", "timeout"):
            ctx.resolver.failed()  # the host may have moved: refresh in the background (never waits)
        route = ctx.route
        resolved = ctx.resolver.last
        addresses = resolved.addresses if resolved is not None else ()
        name = resolved.name if resolved is not None else route.target
        where = format_target(name, route.target_port)
        if addresses and addresses != (name,):
            where += f" ({', '.join(addresses)})"
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        key = f"connect:{route.name}:{reason}"
        if reason == "tls":  # the TCP connect worked, the TLS handshake did not (tls.py rule 3)
            why = tls.classify(exc)
            ctx.stats.tls_failures[(tls.TARGET, why)] += 1
            hint = tls.hint(tls.TARGET, route.target_tls, why, exc)
            detail, key = f"handshake {why}, {detail}", f"{key}:{why}"
        else:
            hint = hints.for_failure(reason, route.target, addresses)
        ctx.shared.warnings.warning(
            key,
            f"{route.name}: cannot connect to {where} ({reason}: {detail})" + (f"; {hint}" if hint else ""),
            route=route.name,
            reason=reason,
        )
        self.close("connect_failed")

    def _target_connected(self) -> None:
        client, target = self.client, self.target
        assert target.transport is not None and client.transport is not None
        if self.reason is not None or client.lost:
            target.transport.abort()  # closed while we were connecting
            return
        shared = self.ctx.shared
        if shared.own and self._loops_back(target.transport, shared.own):
            return
        target_tls = self.ctx.target_tls
        if (
            target_tls is not None
            and target_tls.check_after
            and self._wrong_name(target_tls, target.transport)
        ):
            return
        keepalive, buffer = shared.config.keepalive, shared.config.socket_buffer
        if keepalive or shared.set_nodelay or buffer is not None:
            set_socket_options(client.transport, keepalive=keepalive, buffer=buffer)
            set_socket_options(target.transport, keepalive=keepalive, buffer=buffer)
        # Wired before the early bytes are written: if they fill the target's buffer, its pause_writing
        # must find the client to stop (pump.py rule 2), and the client then stays paused.
        client.out, client.peer = target.transport, target
        target.out, target.peer = client.transport, client
        if client.early:  # rule 1: what the client said first goes first
            target.transport.writelines(client.early)
            client.early = []
        if client.eof:
            _send_eof(target.transport)
        if not client.stops:
            client.transport.resume_reading()
        config = self.ctx.shared.config
        if config.idle_timeout:
            loop = asyncio.get_running_loop()
            self._idle_since = loop.time()
            self._idle_timer = loop.call_later(config.idle_timeout / 4, self._idle_check)
        log.debug("%s: connected", self.ctx.route.name, extra={"route": self.ctx.route.name})

    def _loops_back(self, transport: asyncio.BaseTransport, own: set[tuple[str, int]]) -> bool:
        """The target is one of the relay's own listeners (an address of this host that no lookup could
        tell): refuse, and remember the address so the next attempts are refused before they connect
        (which is what ends the chain of connections the relay made to itself meanwhile)."""
        peer = transport.get_extra_info("peername")
        if not isinstance(peer, tuple):
            return False  # already gone (the pair ends through connection_lost), or a socket file's path
        host, port = peer[:2]
        if (host, port) not in own:
            if (("::" if ":" in host else "0.0.0.0"), port) not in own:
                return False  # no wildcard listener on that port: (host, port) is not ours
            local = host.startswith("127.") or transport.get_extra_info("sockname")[0] == host
            if not local:
                return False
            own.add((host, port))
        self._connect_failed("loop", SelfLoop(f"{format_hostport(host, port)} is the relay's own"))
        return True

    def _wrong_client_name(self, transport: asyncio.Transport, name: str) -> bool:
        """socat's commonname= on OPENSSL-LISTEN: the client's verified certificate must carry `name`; a
        client whose does not is reset like a failed handshake, never a pair (tls.py rule 3)."""
        err = tls.name_mismatch(transport, name)
        if err is None:
            return False
        self.client.lost = self.target.lost = True  # never registered: nothing to finish
        reset(transport)
        ctx = self.ctx
        warn = ctx.shared.warnings.warning
        tls.handshake_failed(ctx.stats.tls_failures, warn, ctx.route.name, tls.LISTEN, ctx.route.tls, err)
        return True

    def _wrong_name(self, target_tls: tls.TargetSide, transport: asyncio.BaseTransport) -> bool:
        """Without SNI, the target's verified certificate must still carry the expected name (tls.py
        rule 4); checked before any byte is relayed."""
        resolved = self.ctx.resolver.last
        err = target_tls.mismatch(transport, resolved.name if resolved is not None else self.ctx.route.target)
        if err is None:
            return False
        self._connect_failed("tls", err)
        return True

    def _other(self, side: Side) -> Side:
        return self.target if side is self.client else self.client

    def side_eof(self, side: Side) -> None:
        other = self._other(side)
        if other.eof:
            self.close("eof")
            return
        if other.transport is not None and not other.transport.is_closing():
            _send_eof(other.transport)
        timeout = self.ctx.shared.config.half_close_timeout
        if timeout and self._half_timer is None:
            self._half_timer = asyncio.get_running_loop().call_later(timeout, self.close, "idle_timeout")

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        other = self._other(side)
        if self.reason is None:
            if exc is None:
                self.reason = "eof"
            else:
                self.reason = "client_reset" if side is self.client else "target_reset"
        _shut(other, graceful=exc is None)
        self._maybe_finish()

    # --- closing -----------------------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Close both sides: FIN for GRACEFUL reasons, RST for the rest."""
        if self.reason is None:
            self.reason = reason
        if self.task is not None and not self.task.done() and self.task is not asyncio.current_task():
            self.task.cancel()
        for side in (self.client, self.target):
            _shut(side, graceful=reason in GRACEFUL)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        client, target = self.client, self.target
        if not client.lost:
            return
        if target.transport is not None and not target.lost:
            return
        task = self.task
        if (
            target.transport is None
            and task is not None
            and not task.done()
            and task is not asyncio.current_task()
        ):
            task.cancel()
            task.add_done_callback(lambda _: self._maybe_finish())
            return
        self._finish()

    def _finish(self) -> None:
        shared = self.ctx.shared
        if self not in shared.connections:
            return
        shared.connections.discard(self)
        # Cut the pair <-> side and side <-> side cycles: the pair, its sides and transports are then freed
        # at once by reference counting, not by the cyclic collector (~13 objects a connection;
        # docs/benchmarks.md). A side the budget still counts goes at its next tick (budget.py rule 4).
        self.client.owner = self.target.owner = FINISHED
        self.client.peer = self.target.peer = None
        for timer in (self._idle_timer, self._half_timer):
            if timer is not None:
                timer.cancel()
        stats = self.ctx.stats
        reason = self.reason or "eof"
        stats.active -= 1
        stats.closed[reason] += 1
        stats.bytes_c2t += self.client.nbytes
        stats.bytes_t2c += self.target.nbytes
        stats.duration_seconds.observe(time.perf_counter() - self.started)
        log.debug(
            "%s: closed (%s), %d bytes to target, %d bytes to client",
            self.ctx.route.name,
            reason,
            self.client.nbytes,
            self.target.nbytes,
            extra={"route": self.ctx.route.name},
        )
        if shared.full:
            shared.full = False
            del shared.problems["slots"]
        if shared.drained is not None and not shared.connections:
            shared.drained.set()

    # --- the audit's safety net (audit.py) ------------------------------------------------------------

    def stuck(self) -> bool:
        """Both sockets gone and no connect under way: no event is left that could finish this pair."""
        task = self.task
        return (task is None or task.done()) and _gone(self.client) and _gone(self.target)

    def reap(self) -> None:
        self.client.lost = self.target.lost = True
        self.ctx.stats.reaped += 1
        self._finish()

    def close_if_peer_gone(self) -> bool:
        """A side that sent FIN is no longer read, so the loop never sees a reset that follows, and a
        pair whose other end stays silent would hold its slot for good: ask the kernel, and close the
        pair as that side's reset if its connection is over."""
        for side in (self.client, self.target):
            if side.eof and not side.lost and tcp_closed(side.transport):
                self.close("client_reset" if side is self.client else "target_reset")
                return True
        return False

    # --- timers --------------------------------------------------------------------------------------------

    def _idle_check(self) -> None:
        """Runs every idle_timeout/4: close when no byte moved for idle_timeout (no per-chunk clock)."""
        timeout = self.ctx.shared.config.idle_timeout
        assert timeout is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        moved = self.client.nbytes + self.target.nbytes
        if moved != self._idle_bytes:
            self._idle_bytes, self._idle_since = moved, now
        elif now - self._idle_since >= timeout:
            self.close("idle_timeout")
            return
        self._idle_timer = loop.call_later(timeout / 4, self._idle_check)


def _gone(side: Side) -> bool:
    """Lost, never opened, or closing with nothing left to write (connection_lost is then due)."""
    transport = side.transport
    return (
        side.lost or transport is None or (transport.is_closing() and not transport.get_write_buffer_size())
    )


def _send_eof(transport: asyncio.Transport) -> None:
    """FIN towards a TCP side; a TLS side cannot half-close on either loop, so it is closed after
    flushing (close_notify, then FIN: tls.py rule 2)."""
    if transport.can_write_eof():
        transport.write_eof()
    else:
        transport.close()


def _shut(side: Side, *, graceful: bool) -> None:
    """Close a side that is still open: FIN after flushing, or RST at once."""
    if side.transport is None or side.lost:
        return
    if graceful:
        side.transport.close()
    else:
        reset(side.transport)
