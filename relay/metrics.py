"""Prometheus collectors, read from the server's plain counters at scrape time.

Nothing here runs per chunk or per connection: `RelayCollector.collect` walks the per-route stats and
the live connections when Prometheus scrapes, so open connections' bytes are current to the last read.
Labels are bounded: route names, reasons, directions and configured addresses, never a client address.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from relay import __version__
from relay.netwatch import APP_REMOVED, STRANDED
from relay.stats import CLOSE_REASONS, CONNECT_ERRORS, DROP_REASONS, Histogram
from relay.tls import LISTEN, REASONS, TARGET

if TYPE_CHECKING:
    from relay.server import Server

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RelayCollector(Collector):
    def __init__(self, server: Server) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        accepted = CounterMetricFamily("relay_connections_accepted", "Connections accepted", labels=["route"])
        active = GaugeMetricFamily("relay_connections_active", "Connections open now", labels=["route"])
        closed = CounterMetricFamily(
            "relay_connections_closed", "Connections closed, by reason", labels=["route", "reason"]
        )
        errors = CounterMetricFamily(
            "relay_connect_errors", "Failed connects to the target, by reason", labels=["route", "reason"]
        )
        bytes_total = CounterMetricFamily(
            "relay_bytes", "Bytes relayed, by direction", labels=["route", "direction"]
        )
        connect = HistogramMetricFamily(
            "relay_connect_duration_seconds", "Time to connect to the target", labels=["route"]
        )
        duration = HistogramMetricFamily(
            "relay_connection_duration_seconds", "Lifetime of closed connections", labels=["route"]
        )
        reaped = CounterMetricFamily(
            "relay_connections_reaped",
            "Connections the periodic audit finished because nothing else could (a loop bug; expect 0)",
            labels=["route"],
        )
        live: dict[str, tuple[int, int]] = {}
        for conn in server.connections:
            name = conn.ctx.route.name
            c2t, t2c = live.get(name, (0, 0))
            live[name] = (c2t + conn.bytes_c2t, t2c + conn.bytes_t2c)
        for name, stats in server.stats.items():
            accepted.add_metric([name], stats.accepted)
            active.add_metric([name], stats.active)
            for reason in CLOSE_REASONS:
                closed.add_metric([name, reason], stats.closed[reason])
            for reason in CONNECT_ERRORS:
                errors.add_metric([name, reason], stats.connect_errors[reason])
            c2t, t2c = live.get(name, (0, 0))
            bytes_total.add_metric([name, "client_to_target"], stats.bytes_c2t + c2t)
            bytes_total.add_metric([name, "target_to_client"], stats.bytes_t2c + t2c)
            connect.add_metric([name], *_buckets(stats.connect_seconds))
            duration.add_metric([name], *_buckets(stats.duration_seconds))
            reaped.add_metric([name], stats.reaped)
        for name, udp in server.udp.stats.items():
            bytes_total.add_metric([name, "client_to_target"], udp.bytes_c2t)
            bytes_total.add_metric([name, "target_to_client"], udp.bytes_t2c)
        yield from (accepted, active, closed, errors, bytes_total, connect, duration, reaped)
        yield from self._udp()
        yield tls_failures(server)
        yield self._listeners()
        yield self._targets()
        yield self._lookups()
        yield from self._app_watch()
        yield from self._readiness()
        build = InfoMetricFamily("relay_build", "relay-sidecar build", labels=[])
        build.add_metric([], {"version": __version__})
        yield build

    def _udp(self) -> Iterator[Metric]:
        """UDP routes (relay/udp.py): datagrams, sessions open now, drops by reason."""
        datagrams = CounterMetricFamily(
            "relay_datagrams", "UDP datagrams relayed, by direction", labels=["route", "direction"]
        )
        sessions = GaugeMetricFamily(
            "relay_udp_sessions_active", "UDP client addresses with a session open now", labels=["route"]
        )
        dropped = CounterMetricFamily(
            "relay_datagrams_dropped",
            "UDP datagrams dropped: limit (max_udp_sessions), buffer (could not be sent at once), "
            "unreachable (ICMP error from the target), unresolved (target not resolved)",
            labels=["route", "reason"],
        )
        for name, udp in self.server.udp.stats.items():
            datagrams.add_metric([name, "client_to_target"], udp.datagrams_c2t)
            datagrams.add_metric([name, "target_to_client"], udp.datagrams_t2c)
            sessions.add_metric([name], udp.sessions)
            for reason in DROP_REASONS:
                dropped.add_metric([name, reason], udp.dropped[reason])
        yield from (datagrams, sessions, dropped)

    def _listeners(self) -> Metric:
        up = GaugeMetricFamily(
            "relay_listener_up", "1 while the address is listening", labels=["route", "address"]
        )
        for route, active in self.server.routes.items():
            bound = {lst.address.host: str(lst.address) for lst in active.listeners}
            for want in route.listen:
                up.add_metric([route.name, bound.get(want.host, str(want))], 1 if want.host in bound else 0)
        return up

    def _lookups(self) -> Metric:
        """Lookups by configured target, the name asked (from its fixed chain) and result: bounded labels."""
        lookups = CounterMetricFamily(
            "relay_resolver_lookups",
            "Name lookups made for each target (in the background), by name and result",
            labels=["target", "host", "result"],
        )
        for resolver in self.server.resolvers.values():
            for (name, result), count in sorted(resolver.lookups.items()):
                lookups.add_metric([resolver.target, name, result], count)
        return lookups

    def _targets(self) -> Metric:
        info = InfoMetricFamily("relay_target", "How each target resolved", labels=[])
        for resolver in self.server.resolvers.values():
            last = resolver.last
            if last is not None:
                info.add_metric(
                    [],
                    {"target": resolver.target, "address": ",".join(last.addresses), "source": last.source},
                )
        return info

    def _app_watch(self) -> Iterator[Metric]:
        """Whether the app watch runs, and whether the relay is stranded in a namespace the app left."""
        server = self.server
        watching = GaugeMetricFamily(
            "relay_app_watch", "1 while the relay follows the app container's restarts (app_watch)"
        )
        watching.add_metric([], 1 if server.app_watch is not None else 0)
        stranded = GaugeMetricFamily(
            "relay_stranded",
            "1 while stranded: the namespace lost its interfaces, or the app container was removed",
        )
        stranded.add_metric([], 1 if STRANDED in server.problems or APP_REMOVED in server.problems else 0)
        yield from (watching, stranded)

    def _readiness(self) -> Iterator[Metric]:
        """What /readyz answers, and the connection limit (alert rules compare the open connections to it)."""
        from relay.health import readiness  # health imports this module

        ready = GaugeMetricFamily("relay_ready", "1 while /readyz answers 200 (see its reasons when 0)")
        ready.add_metric([], 1 if readiness(self.server)[0] else 0)
        limit = GaugeMetricFamily(
            "relay_max_connections", "Connections held open at most (max_connections, after the fd limit)"
        )
        limit.add_metric([], self.server.config.max_connections)
        yield from (ready, limit)


def tls_failures(server: Server) -> Metric:
    """Failed TLS handshakes (relay/tls.py), each TLS side of a route with every reason: bounded labels."""
    failures = CounterMetricFamily(
        "relay_tls_handshake_failures",
        "Failed TLS handshakes, by side (listen: with clients; target: with the target) and reason",
        labels=["route", "side", "reason"],
    )
    for route in server.routes:
        stats = server.stats.get(route.name)
        sides = [side for side, on in ((LISTEN, route.tls), (TARGET, route.target_tls)) if on is not None]
        for side in sides:
            for reason in REASONS:
                count = stats.tls_failures[(side, reason)] if stats is not None else 0
                failures.add_metric([route.name, side, reason], count)
    return failures


def _buckets(hist: Histogram) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs ending with +Inf, and the sum."""
    cumulative: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*hist.bounds, float("inf")), hist.counts, strict=True):
        running += count
        cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return cumulative, hist.total


def registry_for(server: Server, extra: Iterable[Collector] = ()) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(RelayCollector(server))
    for collector in extra:
        registry.register(collector)
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
