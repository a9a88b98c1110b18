"""The Prometheus text exposition of the relay's plain counters, rendered at scrape time.

Rules:
1. Bounded series: one set per metrics series (`Route.series`: a route by its name, a port range item as
   one `tcp/LO-HI`), never one per port of a range and never a client address. Label values that are
   known are exported from the start, at 0 (every reason, every name of a target's lookup chain).
2. A scrape never holds the loop for long: `render` works in slices of about SLICE seconds and lets the
   loop run between them, so relayed traffic waits at most about one slice whatever the number of
   routes. Scrapes that arrive while one renders share its result (one render, however many scrapers).
3. Consistency: each series is read within one slice (a histogram's buckets, sum and count agree). Bytes
   of open connections move into the route's stats when they close, so the bytes family is summed in one
   step for all series (connections + series additions, no formatting), then formatted in slices.
4. Cache: a TCP series' lines are kept with a signature of its stats (_signature) and rendered again
   only when it changed; an idle series costs a tuple comparison per scrape. The label text is kept too.
5. Nothing here runs per chunk or per connection, and this module reads the state through view.State.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

from relay import __version__
from relay.address import HostPort, format_hostport
from relay.netwatch import APP_REMOVED, STRANDED
from relay.stats import CLOSE_REASONS, CONNECT_ERRORS, DROP_REASONS, Histogram, RouteStats, UdpStats
from relay.tls import LISTEN, TARGET
from relay.tls import REASONS as TLS_REASONS
from relay.upstream import chain_for
from relay.view import State, is_ready

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Integers are written as floats ("20.0"), as prometheus-client wrote them: scripts grep for them.
SLICE = 0.002  # seconds of rendering between two turns of the loop
CHECK_EVERY = 8  # pieces rendered between two looks at the clock
CHUNK = 64 * 1024  # characters of exposition encoded at a time
SERIES_PER_PIECE = 16  # series rendered per piece: the render looks at the clock every CHECK_EVERY pieces
# The families read from RouteStats alone, cached per series (rule 4); relay_bytes_total (open
# connections' bytes too) is rendered between the connect errors and the histograms, as before.
TCP_FAMILIES = (
    ("relay_connections_accepted_total", "counter", "Connections accepted"),
    ("relay_connections_active", "gauge", "Connections open now"),
    ("relay_connections_closed_total", "counter", "Connections closed, by reason"),
    ("relay_connect_errors_total", "counter", "Failed connects to the target, by reason"),
    ("relay_connect_duration_seconds", "histogram", "Time to connect to the target"),
    ("relay_connection_duration_seconds", "histogram", "Lifetime of closed connections"),
    (
        "relay_connections_reaped_total",
        "counter",
        "Connections the periodic audit finished because nothing else could (a loop bug; expect 0)",
    ),
)
LOOKUP_RESULTS = ("ok", "failed", "timeout")  # upstream.Resolver._lookup_name counts these
DIRECTIONS = ("client_to_target", "target_to_client")

Pieces = Iterator[str]
S = TypeVar("S")


def label(value: str) -> str:
    """A label value as the text format quotes it."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def header(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


def counter(name: str, help_text: str, key: str, values: Mapping[str, int]) -> str:
    """A small counter family with one label (the HTTP endpoint's own counters)."""
    lines = [header(name, "counter", help_text)]
    lines.extend(f"{name}{{{key}={label(k)}}} {v}.0\n" for k, v in values.items())
    return "".join(lines)


class Rows(Generic[S]):
    """The series of a stats mapping when a render starts (a reload may add some meanwhile), and their
    stats. Names only are kept: a (name, stats) tuple per series alive for the whole render would hand
    the garbage collector thousands of objects each scrape, and its full passes hold the loop."""

    def __init__(self, stats: Mapping[str, S]) -> None:
        self.names = list(stats)
        self.stats = stats

    def __iter__(self) -> Iterator[tuple[str, S]]:
        stats = self.stats
        for name in self.names:
            yield name, stats[name]


class Metrics:
    """Renders the exposition of one relay's state; `extra` adds families at the end (the endpoint's own)
    and `threaded` more, read in a worker thread (the process collector lists /proc/self/fd: ~10 ms with
    10,000 listeners)."""

    def __init__(
        self,
        state: State,
        extra: Iterable[Callable[[], str]] = (),
        threaded: Iterable[Callable[[], str]] = (),
    ) -> None:
        self.state = state
        self.extra = tuple(extra)
        self.threaded = tuple(threaded)
        self._labels: dict[str, str] = {}  # series -> `route="..."`, escaped once
        self._texts: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}  # series -> (signature, lines)
        self._rendering: asyncio.Future[list[bytes]] | None = None

    async def render(self) -> list[bytes]:
        """The exposition now, in parts of about CHUNK bytes; a scrape arriving during a render gets that
        render's result. Parts, not one string: joining and encoding tens of MB at once would hold the
        loop for as long as the slices saved."""
        if self._rendering is None:
            self._rendering = asyncio.ensure_future(self._render())
            self._rendering.add_done_callback(self._done)
        return await asyncio.shield(self._rendering)

    def _done(self, _: asyncio.Future[list[bytes]]) -> None:
        self._rendering = None

    async def _render(self) -> list[bytes]:
        chunks: list[bytes] = []
        parts: list[str] = []
        size = 0
        started = time.perf_counter()
        for count, piece in enumerate(itertools.chain(self.pieces(), (extra() for extra in self.extra)), 1):
            parts.append(piece)
            size += len(piece)
            if size >= CHUNK:
                chunks.append("".join(parts).encode())
                parts, size = [], 0
            if count % CHECK_EVERY == 0 and time.perf_counter() - started > SLICE:
                await asyncio.sleep(0)
                started = time.perf_counter()
        for read in self.threaded:
            parts.append(await asyncio.to_thread(read))
        chunks.append("".join(parts).encode())
        return chunks

    def _route(self, series: str) -> str:
        text = self._labels.get(series)
        if text is None:
            text = self._labels[series] = f"route={label(series)}"
        return text

    # --- the families, each a run of pieces -----------------------------------------------------------

    def pieces(self) -> Pieces:
        state = self.state
        tcp, udp = Rows(state.stats), Rows(state.udp.stats)
        texts = yield from self._tcp_texts(tcp)
        for index, (name, kind, help_text) in enumerate(TCP_FAMILIES):
            if name == "relay_connect_duration_seconds":
                yield from self._bytes(tcp, udp)
            yield header(name, kind, help_text)
            for start in range(0, len(texts), SERIES_PER_PIECE):
                yield "".join(text[index] for text in texts[start : start + SERIES_PER_PIECE])
        yield from self._udp(udp)
        yield from self._denied(tcp, udp)
        yield from self._tls()
        yield from self._listeners()
        yield self._targets()
        yield self._lookups()
        yield self._memory()
        yield self._singles()

    def _per_series(
        self, rows: Iterable[tuple[str, Any]], name: str, kind: str, help_text: str, get: Callable[[Any], int]
    ) -> Pieces:
        yield header(name, kind, help_text)
        for series, stats in rows:
            yield f"{name}{{{self._route(series)}}} {get(stats)}.0\n"

    def _by_reason(
        self, rows: Rows[Any], name: str, help_text: str, reasons: tuple[str, ...], field: str
    ) -> Pieces:
        """A counter by route and reason: every reason of every series, 0 until it happens."""
        yield header(name, "counter", help_text)
        for series, stats in rows:
            route = self._route(series)
            counts = getattr(stats, field)
            yield "".join(f'{name}{{{route},reason="{r}"}} {counts[r]}.0\n' for r in reasons)

    def _bytes(self, tcp: Rows[RouteStats], udp: Rows[UdpStats]) -> Pieces:
        """Rule 3: closed + open bytes summed in one step, then formatted."""
        live: dict[str, list[int]] = {}
        for conn in self.state.connections:
            sums = live.setdefault(conn.ctx.route.series, [0, 0])
            sums[0] += conn.bytes_c2t
            sums[1] += conn.bytes_t2c
        none = [0, 0]
        names = [*tcp.names, *udp.names]
        c2t = [s.bytes_c2t + live.get(series, none)[0] for series, s in tcp]  # ints: no garbage to trace
        t2c = [s.bytes_t2c + live.get(series, none)[1] for series, s in tcp]
        c2t.extend(u.bytes_c2t for _, u in udp)
        t2c.extend(u.bytes_t2c for _, u in udp)
        yield header("relay_bytes_total", "counter", "Bytes relayed, by direction")
        for series, up, down in zip(names, c2t, t2c, strict=True):
            route = self._route(series)
            yield (
                f'relay_bytes_total{{{route},direction="client_to_target"}} {up}.0\n'
                f'relay_bytes_total{{{route},direction="target_to_client"}} {down}.0\n'
            )

    def _tcp_texts(self, tcp: Rows[RouteStats]) -> Generator[str, None, list[tuple[str, ...]]]:
        """Each TCP series' lines of TCP_FAMILIES, from the cache while its stats have not changed (rule 4).
        A generator of nothing: it only gives the render a point to let the loop run every so often."""
        texts = []
        cache = self._texts
        for count, (series, stats) in enumerate(tcp, 1):
            signature = _signature(stats)
            cached = cache.get(series)
            if cached is None or cached[0] != signature:
                cached = cache[series] = (signature, self._series_texts(self._route(series), stats))
            texts.append(cached[1])
            if count % SERIES_PER_PIECE == 0:
                yield ""
        return texts

    def _series_texts(self, route: str, s: RouteStats) -> tuple[str, ...]:
        """One series' lines of each of TCP_FAMILIES, in that order."""
        closed = "".join(
            f'relay_connections_closed_total{{{route},reason="{r}"}} {s.closed[r]}.0\n' for r in CLOSE_REASONS
        )
        errors = "".join(
            f'relay_connect_errors_total{{{route},reason="{r}"}} {s.connect_errors[r]}.0\n'
            for r in CONNECT_ERRORS
        )
        return (
            f"relay_connections_accepted_total{{{route}}} {s.accepted}.0\n",
            f"relay_connections_active{{{route}}} {s.active}.0\n",
            closed,
            errors,
            _histogram("relay_connect_duration_seconds", route, s.connect_seconds),
            _histogram("relay_connection_duration_seconds", route, s.duration_seconds),
            f"relay_connections_reaped_total{{{route}}} {s.reaped}.0\n",
        )

    def _udp(self, udp: Rows[UdpStats]) -> Pieces:
        """UDP routes (relay/udp.py): datagrams, sessions open now, drops by reason."""
        yield header("relay_datagrams_total", "counter", "UDP datagrams relayed, by direction")
        for series, stats in udp:
            route = self._route(series)
            yield (
                f'relay_datagrams_total{{{route},direction="client_to_target"}} {stats.datagrams_c2t}.0\n'
                f'relay_datagrams_total{{{route},direction="target_to_client"}} {stats.datagrams_t2c}.0\n'
            )
        yield from self._per_series(
            udp,
            "relay_udp_sessions_active",
            "gauge",
            "UDP client addresses with a session open now",
            lambda s: s.sessions,
        )
        yield from self._by_reason(
            udp,
            "relay_datagrams_dropped_total",
            "UDP datagrams dropped: limit (max_udp_sessions), buffer (could not be sent at once), "
            "unreachable (ICMP error from the target), unresolved (target not resolved), evicted (its "
            "session gave way to a new client's at max_udp_sessions), fd_limit (no descriptor for a session)",
            DROP_REASONS,
            "dropped",
        )

    def _denied(self, tcp: Rows[RouteStats], udp: Rows[UdpStats]) -> Pieces:
        """Clients refused by a route's allow list (relay/access.py), for the routes that have one."""
        limited = {route.series for route in list(self.state.routes) if route.allow is not None}
        rows = [(series, stats) for series, stats in (*tcp, *udp) if series in limited]
        yield from self._per_series(
            rows,
            "relay_connections_denied_total",
            "counter",
            "Clients refused by the route's allow list (TCP: connections reset; UDP: datagrams dropped)",
            lambda s: s.denied,
        )

    def _tls(self) -> Pieces:
        """Failed TLS handshakes (relay/tls.py): each TLS side of a series with every reason."""
        yield header(
            "relay_tls_handshake_failures_total",
            "counter",
            "Failed TLS handshakes, by side (listen: with clients; target: with the target) and reason",
        )
        sides: dict[str, set[str]] = {}
        for route in list(self.state.routes):
            if route.tls is not None or route.target_tls is not None:
                on = sides.setdefault(route.series, set())
                on.update(side for side, tls in ((LISTEN, route.tls), (TARGET, route.target_tls)) if tls)
        for series, on in sides.items():
            stats = self.state.stats.get(series)
            counts = stats.tls_failures if stats is not None else {}
            name = self._route(series)
            yield "".join(
                f'relay_tls_handshake_failures_total{{{name},side="{side}",reason="{reason}"}} '
                f"{counts.get((side, reason), 0)}.0\n"
                for side in (LISTEN, TARGET)
                if side in on
                for reason in TLS_REASONS
            )

    def _listeners(self) -> Pieces:
        """1 per configured address of a route; a port range has one `HOST:LO-HI` address per host,
        1 while every port of the range listens there."""
        yield header("relay_listener_up", "gauge", "1 while the address is listening")
        ranges: dict[str, dict[str, list[int]]] = {}  # series -> host -> [ports, listening, lo, hi]
        routes = self.state.routes
        for route in list(routes):  # the routes now (no tuple per route kept, see Rows)
            active = routes.get(route)
            if active is None:
                continue  # removed by a reload meanwhile
            bound = {lst.address.host: str(lst.address) for lst in active.listeners}
            if not route.group:
                series = self._route(route.series)
                yield "".join(
                    f"relay_listener_up{{{series},address={label(bound.get(want.host, str(want)))}}} "
                    f"{1 if want.host in bound else 0}.0\n"
                    for want in route.listen
                )
                continue
            hosts = ranges.setdefault(route.series, {})
            for want in route.listen:
                if isinstance(want, HostPort):
                    seen = hosts.setdefault(want.host, [0, 0, want.port, want.port])
                    seen[0] += 1
                    seen[1] += want.host in bound
                    seen[2], seen[3] = min(seen[2], want.port), max(seen[3], want.port)
        for series, hosts in ranges.items():
            name = self._route(series)
            yield "".join(
                f"relay_listener_up{{{name},address={label(format_hostport(host, lo) + f'-{hi}')}}} "
                f"{1 if listening == ports else 0}.0\n"
                for host, (ports, listening, lo, hi) in hosts.items()
            )

    def _targets(self) -> str:
        lines = [header("relay_target_info", "gauge", "How each target resolved")]
        for resolver in self.state.resolvers.values():
            last = resolver.last
            if last is not None:
                lines.append(
                    f"relay_target_info{{target={label(resolver.target)},"
                    f"address={label(','.join(last.addresses))},source={label(last.source)}}} 1.0\n"
                )
        return "".join(lines)

    def _lookups(self) -> str:
        """Lookups by configured target, the name asked (from its fixed chain) and result: every name of
        the chain with every result from the start, at 0 (a literal target shows its one name)."""
        lines = [
            header(
                "relay_resolver_lookups_total",
                "counter",
                "Name lookups made for each target (in the background), by name and result",
            )
        ]
        for resolver in self.state.resolvers.values():
            if resolver.last is not None and resolver.last.source == "unix":
                continue  # a socket file is never looked up
            counts = dict.fromkeys(
                ((name, result) for name in chain_for(resolver.target) if name for result in LOOKUP_RESULTS),
                0,
            )
            counts.update(resolver.lookups)
            target = label(resolver.target)
            lines.extend(
                f"relay_resolver_lookups_total{{target={target},host={label(name)},result={label(result)}}} "
                f"{count}.0\n"
                for (name, result), count in counts.items()
            )
        return "".join(lines)

    def _memory(self) -> str:
        """The process-wide budget of bytes held for slow receivers (budget.py)."""
        budget = self.state.budget
        return "".join(
            (
                header(
                    "relay_buffered_bytes",
                    "gauge",
                    "Bytes the relay holds for receivers slower than their senders, all connections (as of "
                    "the budget's last count, at most 50 ms old)",
                ),
                f"relay_buffered_bytes {budget.held}.0\n",
                header(
                    "relay_memory_budget_bytes",
                    "gauge",
                    "At most this many bytes are buffered (memory_budget)",
                ),
                f"relay_memory_budget_bytes {budget.limit}.0\n",
                header(
                    "relay_memory_budget_reached_total",
                    "counter",
                    "Times the buffered bytes reached memory_budget (senders to slow receivers then wait)",
                ),
                f"relay_memory_budget_reached_total {budget.reached}.0\n",
                header(
                    "relay_budget_paused_sides",
                    "gauge",
                    "Sockets not read now because the budget is full and their receiver has not taken "
                    "what it holds",
                ),
                f"relay_budget_paused_sides {budget.stopped}.0\n",
            )
        )

    def _singles(self) -> str:
        """The app watch, stranded, what /readyz answers, the connection limit, the build."""
        state = self.state
        stranded = STRANDED in state.problems or APP_REMOVED in state.problems
        return "".join(
            (
                header(
                    "relay_app_watch",
                    "gauge",
                    "1 while the relay follows the app container's restarts (app_watch)",
                ),
                f"relay_app_watch {1 if state.app_watch is not None else 0}.0\n",
                header(
                    "relay_stranded",
                    "gauge",
                    "1 while stranded: the namespace lost its interfaces, or the app container was removed",
                ),
                f"relay_stranded {1 if stranded else 0}.0\n",
                header("relay_ready", "gauge", "1 while /readyz answers 200 (see its reasons when 0)"),
                f"relay_ready {1 if is_ready(state) else 0}.0\n",
                header(
                    "relay_max_connections",
                    "gauge",
                    "Connections held open at most (max_connections, after the fd limit)",
                ),
                f"relay_max_connections {state.config.max_connections}.0\n",
                header("relay_build_info", "gauge", "relay-sidecar build"),
                f"relay_build_info{{version={label(__version__)}}} 1.0\n",
            )
        )


def _histogram(name: str, route: str, hist: Histogram) -> str:
    lines, running = [], 0
    for le, n in zip(_les(hist.bounds), hist.counts, strict=True):
        running += n
        lines.append(f'{name}_bucket{{{route},le="{le}"}} {running}.0\n')
    lines.append(f"{name}_count{{{route}}} {running}.0\n{name}_sum{{{route}}} {hist.total!r}\n")
    return "".join(lines)


def _signature(s: RouteStats) -> tuple[int, ...]:
    """Changes whenever anything TCP_FAMILIES show of the series changes: counters only ever grow, so a
    sum moves with any of its parts (a histogram's count with any bucket)."""
    return (
        s.accepted,
        s.active,
        s.reaped,
        sum(s.closed.values()),
        sum(s.connect_errors.values()),
        sum(s.connect_seconds.counts),
        sum(s.duration_seconds.counts),
    )


@functools.cache
def _les(bounds: tuple[float, ...]) -> list[str]:
    """The `le` values of a histogram's buckets, +Inf last."""
    return [*(repr(float(b)) for b in bounds), "+Inf"]
