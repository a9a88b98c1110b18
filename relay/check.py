"""`relay check`: show the configuration as understood, how each target resolved, and probe every
target port, printing the likely cause and fix of each failure. Exit 0 when all answer, 1 if not.
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from dataclasses import dataclass, replace
from typing import TextIO

from relay import hints
from relay.address import format_target
from relay.config import AUTO, Config, Route, lands_on
from relay.listener import NO_IPV6
from relay.upstream import Resolution, ResolveError, Resolver, classify, target_for

PROBE_TIMEOUT = 2.0
UDP_WAIT = 0.5  # how long an ICMP port unreachable (or a reply) to the empty datagram is waited for
SLIRP_GATEWAY = "10.0.2.2"

CAUSES = {
    "refused": "nothing accepts connections there: is the host service running, and listening on 0.0.0.0 "
    "or the docker0 address rather than 127.0.0.1? If it listens only on 127.0.0.1 and has a socket file "
    "(PostgreSQL, MySQL, Redis ...), mount its directory into the relay and forward to the socket: "
    "RELAY_PORTS=5432:unix:/host/postgresql/.s.PGSQL.5432 (compose-examples/host-socket)",
    "timeout": "no answer: a host firewall (ufw, firewalld) dropping traffic from containers, or a wrong "
    "address; allow the Docker bridge (e.g. `ufw allow in on docker0`)",
    "unresolved": 'the name does not resolve: add extra_hosts: ["host.docker.internal:host-gateway"] to the '
    "*app* service (the sidecar shares its /etc/hosts), or set RELAY_TARGET",
    "other": "the connection failed; see the error",
    "udp refused": "ICMP port unreachable: nothing listens on this UDP port; is the host service running, "
    "and listening on 0.0.0.0 or the docker0 address rather than 127.0.0.1?",
    "no answer": "open or filtered: UDP has no handshake, so a service that ignores an empty datagram and a "
    "firewall that drops it look the same",
}
WILDCARDS = {"0.0.0.0": False, "::": True}  # wildcard listen address -> is IPv6


def _cause(reason: str, target: str, addresses: tuple[str, ...]) -> str:
    """The table's cause / fix: the hint for what this target is (local, an explicit name, auto, a socket
    file)."""
    socket_file = hints.for_socket(reason, target) if target.startswith("unix:") else None
    if socket_file is not None:
        return socket_file
    if reason == "refused" and addresses and all(hints.is_local(a) for a in addresses):
        return hints.refused(addresses)
    if reason == "unresolved" and target.lower() not in hints.AUTO_NAMES:
        return hints.unresolved(target)
    if reason == "loop":
        return hints.for_failure("loop", target, addresses) or ""
    return CAUSES[reason]


def _reaches_relay(config: Config, route: Route, addresses: tuple[str, ...]) -> tuple[str, ...]:
    """The addresses of `route`'s target that are one of the relay's own listen sockets: probing them
    would reach the relay (which answers), while serving them would forward into itself."""
    port = route.target_port
    listen = [hp for r in config.routes if r.protocol == route.protocol for hp in r.listen if hp.port == port]
    return tuple(
        a
        for a in addresses
        if any(
            lands_on(a, port, hp) or (WILDCARDS.get(hp.host) == (":" in a) and hints.is_local(a))
            for hp in listen
        )
    )


@dataclass(slots=True)
class Probe:
    route: str
    target: str
    status: str
    millis: float | None
    cause: str


def _has_ipv6_loopback() -> bool:
    """Whether ::1 can be listened on: a container started with IPv6 disabled has none."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError as err:
        return err.errno not in NO_IPV6
    return True


def _rootless_hint(resolutions: list[Resolution]) -> str | None:
    """Rootless Docker (slirp4netns) reaches the host at 10.0.2.2, and only with host loopback allowed."""
    slirp = any(SLIRP_GATEWAY in r.addresses for r in resolutions)
    try:
        with open("/proc/self/uid_map", encoding="ascii") as fh:
            mapped = fh.read().split()
        user_namespace = mapped[:3] != ["0", "0", "4294967295"]
    except OSError:
        user_namespace = False
    if not (slirp or user_namespace):
        return None
    return (
        "note: this looks like rootless Docker or Podman (a user namespace"
        + (", gateway 10.0.2.2" if slirp else "")
        + "). Host services bound to 127.0.0.1 are reachable only with slirp4netns allow_host_loopback=true "
        "(via 10.0.2.2); otherwise bind them to the host's LAN address."
    )


async def _probe(
    loop: asyncio.AbstractEventLoop, target: Resolver, addresses: tuple[str, ...], port: int, timeout: float
) -> float:
    started = time.perf_counter()
    async with asyncio.timeout(timeout):
        transport = await target.open(loop, asyncio.Protocol, addresses, port)
    transport.close()
    return (time.perf_counter() - started) * 1000


async def _probe_udp(loop: asyncio.AbstractEventLoop, address: str, port: int, wait: float) -> str:
    """UDP has no connection to open: send one empty datagram on a connected socket and wait `wait` for
    what comes back. `refused` (ICMP port unreachable), `answered` (a datagram) or `no answer`."""
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        try:
            sock.connect((address, port))
            sock.send(b"")
            async with asyncio.timeout(wait):
                await loop.sock_recv(sock, 1)
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "no answer"
    return "answered"


async def run_check(config: Config, out: TextIO = sys.stdout) -> int:
    loop = asyncio.get_running_loop()
    timeout = min(config.connect_timeout, PROBE_TIMEOUT)
    print(f"config file: {config.config_file or '(none; environment and flags only)'}", file=out)
    for warning in config.warnings:  # the same ones `relay run` logs at start
        print(f"warning: {warning}", file=out)
    print("routes:", file=out)
    no_ipv6 = not _has_ipv6_loopback()
    for route in config.routes:
        # As `relay run` listens: without IPv6 in the kernel, ::1 is skipped (listener.py), not listed.
        kept = tuple(hp for hp in route.listen if not (no_ipv6 and hp.host == "::1"))
        note = "  (IPv6 is not available here: not listening on [::1])" if kept != route.listen else ""
        print(f"  {route.name:<14} {replace(route, listen=kept).describe()}{note}", file=out)

    resolutions: dict[str, Resolution | ResolveError] = {}
    targets = {
        target: target_for(target, config.family) for target in dict.fromkeys(r.target for r in config.routes)
    }
    print("targets:", file=out)
    for target in targets:
        try:
            resolution: Resolution | ResolveError = await targets[target].resolve()
        except ResolveError as err:
            resolution = err
        resolutions[target] = resolution
        label = f"{target} (auto)" if target == AUTO else target
        if isinstance(resolution, ResolveError):
            print(f"  {label}: {resolution}; {_cause('unresolved', target, ())}", file=out)
        else:
            print(f"  {label}: {resolution.note}", file=out)
            if resolution.source == "gateway":
                print(f"    hint: {CAUSES['unresolved']}", file=out)

    probes: list[Probe] = []
    for route in config.routes:
        resolution = resolutions[route.target]
        if isinstance(resolution, ResolveError):
            probes.append(
                Probe(
                    route.name,
                    format_target(route.target, route.target_port),
                    "unresolved",
                    None,
                    _cause("unresolved", route.target, ()),
                )
            )
            continue
        shown = format_target(resolution.addresses[0], route.target_port)
        itself = _reaches_relay(config, route, resolution.addresses)
        if itself:
            probes.append(Probe(route.name, shown, "loop", None, _cause("loop", route.target, itself)))
            continue
        if route.protocol == "udp" and route.target_protocol != "tcp":  # UDP to TCP: probe it as TCP
            started = time.perf_counter()
            status = await _probe_udp(loop, resolution.addresses[0], route.target_port, UDP_WAIT)
            millis = (time.perf_counter() - started) * 1000 if status != "no answer" else None
            cause = {"refused": CAUSES["udp refused"], "no answer": CAUSES["no answer"]}.get(status, "")
            probes.append(Probe(route.name, shown + " udp", status, millis, cause))
            continue
        try:
            millis = await _probe(
                loop, targets[route.target], resolution.addresses, route.target_port, timeout
            )
        except Exception as exc:
            reason = classify(exc)
            detail = (
                _cause(reason, route.target, resolution.addresses)
                if reason != "other"
                else f"{type(exc).__name__}: {exc}"
            )
            probes.append(Probe(route.name, shown, reason, None, detail))
        else:
            probes.append(Probe(route.name, shown, "ok", millis, ""))

    print(file=out)
    print(f"{'ROUTE':<14} {'TARGET':<28} {'STATUS':<11} {'TIME':>8}  CAUSE / FIX", file=out)
    for p in probes:
        took = f"{p.millis:.1f}ms" if p.millis is not None else "-"
        print(f"{p.route:<14} {p.target:<28} {p.status:<11} {took:>8}  {p.cause}".rstrip(), file=out)
    hint = _rootless_hint([r for r in resolutions.values() if isinstance(r, Resolution)])
    if hint:
        print(f"\n{hint}", file=out)
    failed = sum(p.status not in ("ok", "answered", "no answer") for p in probes)
    print(f"\n{len(probes) - failed} of {len(probes)} target(s) answer", file=out)
    return 0 if failed == 0 else 1
