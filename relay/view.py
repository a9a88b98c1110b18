"""What the HTTP endpoint (health.py) and the metrics (metrics.py) read of a running relay: a view.

`State` names the parts of the server's state they read; `server.Server` has them. The endpoint and the
metrics import this module, never server.py, and server.py imports neither of them: the process's
entry point (cli.py) hands the server an endpoint factory. `readiness` is the one answer both give.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from relay.address import HostPort, UnixAddress, format_hostport
from relay.budget import Budget
from relay.config import Config, Route
from relay.connection import Connection
from relay.netwatch import AppWatch
from relay.stats import RouteStats
from relay.udp import UdpHub
from relay.upstream import Resolver


class Bound(Protocol):
    """A listener (TCP, socket file or UDP) as bound."""

    @property
    def address(self) -> HostPort | UnixAddress: ...


class Serving(Protocol):
    """One route's listeners open now."""

    @property
    def listeners(self) -> Sequence[Bound]: ...


class State(Protocol):
    """The server's state as the endpoint and the metrics read it (between callbacks, on its loop)."""

    @property
    def config(self) -> Config: ...
    @property
    def routes(self) -> Mapping[Route, Serving]: ...
    @property
    def stats(self) -> Mapping[str, RouteStats]: ...
    @property
    def udp(self) -> UdpHub: ...
    @property
    def connections(self) -> set[Connection]: ...
    @property
    def resolvers(self) -> Mapping[tuple[str, str], Resolver]: ...
    @property
    def skipped_hosts(self) -> set[str]: ...
    @property
    def problems(self) -> dict[str, str]: ...
    @property
    def draining(self) -> bool: ...
    @property
    def app_watch(self) -> AppWatch | None: ...
    @property
    def budget(self) -> Budget: ...


def is_ready(state: State) -> bool:
    """What /readyz answers, without the body (the relay_ready gauge): one pass, no allocation per route."""
    if state.draining or state.problems or not state.routes:
        return False
    skipped = state.skipped_hosts
    return all(_complete(route, active, skipped) for route, active in state.routes.items())


def readiness(state: State) -> tuple[bool, dict[str, object]]:
    """Ready when not draining, every configured address of every route is listening, and nothing in
    `state.problems` says new connections would fail (slots or descriptors exhausted, stranded ...).

    The body lists each metrics series (a route, or a port range as one entry) with what listens."""
    problems = sorted(state.problems.values())
    draining = state.draining
    by_series: dict[str, list[tuple[Route, Serving]]] = {}
    for route, active in state.routes.items():
        by_series.setdefault(route.series, []).append((route, active))
    ready = not draining and bool(by_series) and not problems
    routes: dict[str, object] = {}
    skipped = state.skipped_hosts
    for series, members in by_series.items():
        complete = all(_complete(route, active, skipped) for route, active in members)
        ready = ready and complete
        routes[series] = {"listening": _listening(members), "ready": complete and not draining}
    status = "ready" if ready else ("draining" if draining else "not ready")
    body: dict[str, object] = {"status": status, "routes": routes}
    if problems:
        body["reasons"] = problems
    return ready, body


def _complete(route: Route, active: Serving, skipped: set[str]) -> bool:
    """Every configured host of the route listens (a host without IPv6 is skipped, not missing)."""
    bound = len(active.listeners)
    return bound >= len(route.listen) or bound >= len({hp.host for hp in route.listen} - skipped)


def _listening(members: list[tuple[Route, Serving]]) -> list[str]:
    """Each bound address; for a port range, one `host:LO-HI` per host (with how many of its ports
    listen when not all do), so a 1,000-port range is two lines, not 2,000."""
    if len(members) == 1:
        return [str(lst.address) for lst in members[0][1].listeners]
    ports: dict[str, list[int]] = {}
    for _, active in members:
        for lst in active.listeners:
            if isinstance(lst.address, HostPort):
                ports.setdefault(lst.address.host, []).append(lst.address.port)
    shown = []
    for host, bound in ports.items():
        span = format_hostport(host, min(bound)) + f"-{max(bound)}"
        shown.append(span if len(bound) == len(members) else f"{span} ({len(bound)} of {len(members)} ports)")
    return shown
