"""Per-route counters in plain integers, written by connections and read by the metrics collector.

Connections update these once per connection event (accept, connect, close), never per chunk; live byte
counts stay on each connection until it closes and are added in at scrape time (metrics.py).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DURATION_BUCKETS = (
    0.01,
    0.1,
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    43200.0,
    86400.0,
)
CLOSE_REASONS = (
    "eof",
    "client_reset",
    "target_reset",
    "idle_timeout",
    "connect_failed",
    "shutdown",
    "limit",
    "fd_limit",
)
CONNECT_ERRORS = ("refused", "timeout", "unresolved", "loop", "missing", "denied", "tls", "other")


@dataclass(slots=True)
class Histogram:
    """Bucket counts (non-cumulative, +Inf last), sum and count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(slots=True)
class RouteStats:
    accepted: int = 0
    active: int = 0
    closed: Counter[str] = field(default_factory=Counter)
    connect_errors: Counter[str] = field(default_factory=Counter)
    reaped: int = 0  # pairs the audit finished (audit.py): a loop bug, never expected
    bytes_c2t: int = 0  # of closed connections; open ones are added at scrape time
    bytes_t2c: int = 0
    connect_seconds: Histogram = field(default_factory=lambda: Histogram(CONNECT_BUCKETS))
    duration_seconds: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    tls_failures: Counter[tuple[str, str]] = field(default_factory=Counter)  # (side, reason): relay/tls.py
    denied: int = 0  # clients the route's allow refused (relay/access.py)


DROP_REASONS = ("limit", "buffer", "unreachable", "unresolved", "evicted", "fd_limit")


@dataclass(slots=True)
class UdpStats:
    """One UDP route's counters (relay/udp.py), added to once per datagram and read at scrape time."""

    sessions: int = 0  # open now
    datagrams_c2t: int = 0
    datagrams_t2c: int = 0
    bytes_c2t: int = 0
    bytes_t2c: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    denied: int = 0  # datagrams from addresses the route's allow refused (relay/access.py)
