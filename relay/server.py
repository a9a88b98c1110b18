"""The relay's lifecycle: start, serve, reload on SIGHUP, drain on SIGTERM.

Rules:
1. Signal handlers only record the signal; `serve()` does the work in order.
2. Start: bind every listener (any failure closes what was bound and raises ListenError before anything
   is served), then log `ready`. Targets are resolved in the background (upstream.py): no lookup ever
   delays `ready` or a stop. SIGTERM/SIGINT during start-up cuts it short and stops at once.
3. Drain (first SIGTERM/SIGINT): close listeners (readiness goes false), wait up to drain_timeout for
   the live connections to finish, then reset what is left and log how many. A second SIGTERM/SIGINT
   ends the wait at once.
4. Reload (SIGHUP): build the new config first, in a thread (no file can hold the loop); if it is bad,
   log one error and keep the old one.
   Otherwise stop listening for removed routes (their connections finish on their own), start added
   ones, and leave unchanged routes and their connections untouched.
5. App watch (relay/netwatch.py): when the app container started again, serve() drains at once (its
   connections belong to the old namespace) and returns with exit_reason APP_RESTARTED (exit code 75).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import gc
import logging
import resource
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol

from relay import __version__, logs, memory, privileges
from relay.address import HostPort, format_hostport, format_target, is_loopback
from relay.audit import Audit
from relay.budget import Budget
from relay.config import AUTO, Config, ConfigError, Route
from relay.connection import Connection, RouteContext, Shared, denied, own_addresses
from relay.listener import Listener, ListenError, Reserve, bind_error, open_route
from relay.netwatch import APP_RESTARTED, HOSTNAME_FILE, AppWatch, start_watch
from relay.stats import RouteStats
from relay.udp import UdpHub, UdpListener, UdpRoute
from relay.udp_stream import StreamSession
from relay.upstream import CHAIN, Lookup, Resolver, target_for

log = logging.getLogger("relay")

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
FDS_PER_CONNECTION = 2
FD_RESERVE = 64


class Endpoint(Protocol):
    """The HTTP endpoint on the metrics address (relay/health.py): a view of this server's state that
    this module does not import; the entry point (cli.py) passes its class as `endpoint`."""

    async def start(self, address: HostPort) -> HostPort: ...
    async def close(self) -> None: ...


@dataclass(slots=True)
class ActiveRoute:
    ctx: RouteContext | UdpRoute
    listeners: list[Listener] | list[UdpListener]


class Server:
    def __init__(
        self,
        config: Config,
        *,
        reload: Callable[[], Config] | None = None,
        lookup: Lookup | None = None,
        app_watch_file: str = HOSTNAME_FILE,  # tests only: the file the app watch follows
        endpoint: Callable[[Server], Endpoint] | None = None,  # serves config.metrics; None: not served
    ) -> None:
        self.config = config
        self._endpoint = endpoint
        self._lookup = lookup
        self._reload_config = reload
        self.shared = Shared(config)
        self.routes: dict[Route, ActiveRoute] = {}
        self.stats: dict[str, RouteStats] = {}
        # UDP routes' sessions and stats (relay/udp.py); a TCP target's sessions are udp_stream.py's.
        self.udp = UdpHub(self.shared, session_types={"tcp": StreamSession})
        self.resolvers: dict[tuple[str, str], Resolver] = {}
        self.skipped_hosts: set[str] = set()  # ::1 when the kernel has no IPv6
        self.health: Endpoint | None = None
        self.health_address: HostPort | None = None  # as bound (the real port when 0 was asked for)
        self._reserve = Reserve()  # one descriptor kept back to reset clients when none is left
        self.audit = Audit(self.shared, reserve=FD_RESERVE // 2)
        # Signals, and stops the relay asks for itself (a reason string, e.g. APP_RESTARTED).
        self._signals: asyncio.Queue[signal.Signals | str] = asyncio.Queue()
        self.exit_reason: str | None = None  # set by stop(): why serve() returned without a signal
        # Whether serve() leaves SIGTERM, SIGINT and SIGHUP ignored once it has drained, instead of restoring
        # their defaults: the process's entry point sets it (cli.py), so a late second signal (docker stop
        # twice, Ctrl-C twice) cannot turn a clean exit 0 into death by signal while the process winds down.
        self.ignore_late_signals = False
        self._app_watch_file = app_watch_file
        self.app_watch: AppWatch | None = None
        self._exposed: set[str] = set()  # series already warned about as listening beyond loopback
        self._app_watch_task: asyncio.Task[None] | None = None

    # --- reading state (metrics, health, tests) --------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.shared.drained is not None

    @property
    def connections(self) -> set[Connection]:
        return self.shared.connections

    @property
    def problems(self) -> dict[str, str]:
        """Why the relay cannot do its job right now (key -> one human line): /readyz answers 503 with
        these, so readiness never says "ready" while new connections would fail. Set and cleared by
        whoever detects the condition (slots, descriptors, a stranded namespace ...)."""
        return self.shared.problems

    @property
    def budget(self) -> Budget:
        return self.shared.budget

    @property
    def listeners(self) -> list[Listener | UdpListener]:
        return [lst for active in self.routes.values() for lst in active.listeners]

    # --- start ---------------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.shared.set_nodelay = not type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        self._check_fd_limit(self.config)
        for warning in self.config.warnings:
            log.warning(warning)
        self._set_budget(self.config, at_start=True)
        self._start_resolvers(self.config)
        try:
            for route in self.config.routes:
                await self._open(route)
            if self.config.metrics is not None:
                await self._start_health(self.config.metrics)
        except BaseException:
            self._close_listeners(list(self.routes))
            self._reserve.close()
            raise
        privileges.drop(self.config.user)  # after binding: ports below 1024 need root (privileges.py)
        self.audit.start()
        # The routes' listeners, contexts and stats live until a reload: out of the collector's sight (as
        # cli.py does for the modules), else each full collection walks them all (~100 ms at 10,000 routes).
        gc.freeze()
        log.info(
            "ready: relay %s, %d route(s), %d listener(s)", __version__, len(self.routes), len(self.listeners)
        )

    def _set_budget(self, config: Config, *, at_start: bool = False) -> None:
        """memory_budget, or a share of the container's limit (memory.py); said once at start."""
        cgroup = memory.find_cgroup()
        budget = self.shared.budget
        budget.limit = config.memory_budget or memory.default_budget(cgroup.limit if cgroup else None)
        budget.on_full = self._budget_full
        if at_start:
            budget.trim = memory.Trimmer()
            memory.report_at_start(cgroup, budget.limit)

    def _budget_full(self, budget: Budget) -> None:
        self.shared.warnings.warning(
            "budget",
            f"memory budget reached: {memory.mib(budget.held)} waits for receivers that do not read as fast "
            f"as their senders send; reading from those senders is paused until their receivers catch up "
            f"(memory_budget {memory.mib(budget.limit)}; relay_buffered_bytes)",
        )

    async def _start_health(self, address: HostPort) -> None:
        if self._endpoint is None:
            return
        self.health = self._endpoint(self)
        try:
            self.health_address = await self.health.start(address)
        except OSError as err:
            self.health = None
            if err.errno == errno.EADDRINUSE and not self.config.metrics_explicit:
                # Two socat-style relays in one namespace (one per port, as the socat recipe has it) both
                # default to 9464: the second serves its ports without the endpoint rather than exit.
                log.warning(
                    "metrics and health: %s is already in use (another relay in this network namespace?); "
                    "running without /metrics, /healthz and /readyz. Set RELAY_METRICS to a free address "
                    "to have them, or to off to silence this",
                    address,
                )
                return
            raise ListenError(
                f"cannot listen on {address} for metrics and health: {bind_error(err)}"
            ) from None
        log.info("metrics and health: http://%s/metrics, /healthz, /readyz", self.health_address)

    async def _open(self, route: Route) -> None:
        if route.protocol == "udp":
            udp = await self.udp.open(route, self._resolver(route.target), skipped=self.skipped_hosts)
            self.routes[route] = ActiveRoute(udp, udp.listeners)
            log.info("%s: %s", route.name, _describe(route, udp.listeners), extra={"route": route.name})
            self._note_exposure(route, udp.listeners)
            return
        ctx = RouteContext(
            route,
            self._resolver(route.target),
            self.stats.setdefault(route.series, RouteStats()),
            self.shared,
        )
        listeners = open_route(
            route,
            lambda sock: Connection(ctx).take(sock),
            backlog=self.config.backlog,
            reuseport=self.config.reuseport,
            skipped=self.skipped_hosts,
            on_fd_limit=functools.partial(self._fd_limit, ctx),
            reserve=self._reserve,
            on_denied=functools.partial(denied, ctx.route, ctx.stats, self.shared),
            ipv6only=self.config.ipv6only,
        )
        self.routes[route] = ActiveRoute(ctx, listeners)
        self.shared.own.update(own_addresses(lst.address for lst in listeners))
        log.info("%s: %s", route.name, _describe(route, listeners), extra={"route": route.name})
        self._note_exposure(route, listeners)

    def _note_exposure(self, route: Route, listeners: Sequence[Listener | UdpListener]) -> None:
        """A listener beyond loopback (RELAY_LISTEN=0.0.0.0, socat's TCP-LISTEN without bind=) lets every
        neighbour on the container's networks reach the target, host services bound to 127.0.0.1 of the
        host included: a WARNING naming how to restrict it, unless allow: already does. Once per series:
        a range of 1,000 ports is one line, not 1,000."""
        exposed = [
            lst.address
            for lst in listeners
            if isinstance(lst.address, HostPort) and not is_loopback(lst.address.host)
        ]
        if not exposed or route.series in self._exposed:
            return
        self._exposed.add(route.series)
        where = ", ".join(str(hp) for hp in exposed)
        if route.group:  # every port of the range: the hosts with the range, as the series names it
            span = route.series.partition("/")[2]
            where = ", ".join(
                f"[{hp.host}]:{span}" if ":" in hp.host else f"{hp.host}:{span}" for hp in exposed
            )
        if route.allow:
            log.info(
                "%s: %s is reachable from outside this network namespace, as asked (clients admitted: %s)",
                route.series,
                where,
                route.allow,
                extra={"route": route.series},
            )
            return
        log.warning(
            "%s: %s is reachable from outside this network namespace: every container on its networks "
            "can reach %s through it; restrict sources with allow: / socat range= (see README "
            "'Exposure'), or listen on loopback only (RELAY_LISTEN=127.0.0.1,::1, socat bind=127.0.0.1)",
            route.series,
            where,
            format_target(route.target, route.target_port),
            extra={"route": route.series},
        )

    def _resolver(self, target: str) -> Resolver:
        key = (target, self.config.family)
        if key not in self.resolvers:
            self.resolvers[key] = target_for(
                target,
                self.config.family,
                lookup=self._lookup,
                on_problem=functools.partial(self._target_problem, f"target:{target}"),
                source=self.config.source,
            )
        return self.resolvers[key]

    def _start_resolvers(self, config: Config) -> None:
        """Resolve each target in the background (a literal is only logged); never waits."""
        for target in dict.fromkeys(r.target for r in config.routes):
            self._resolver(target).start()

    def _target_problem(self, key: str, problem: str | None) -> None:
        if problem is None:
            self.problems.pop(key, None)
        else:
            self.problems[key] = problem

    async def _close_resolvers(self) -> None:
        for resolver in self.resolvers.values():
            await resolver.close()

    def _fd_limit(self, ctx: RouteContext, err: OSError) -> None:
        """A client was reset at accept for lack of a descriptor (listener.py rule 1)."""
        ctx.stats.accepted += 1
        ctx.stats.closed["fd_limit"] += 1
        self.shared.out_of_descriptors(ctx.route.name, err)

    def _check_fd_limit(self, config: Config) -> None:
        """Raise the open-files soft limit so that max_connections (2 descriptors each), max_udp_sessions
        (1 each, when a route is UDP) and the listeners cannot run into EMFILE; when it cannot be raised,
        lower both limits in proportion and say so in one line."""
        listeners = sum(len(route.listen) for route in config.routes) + (config.metrics is not None)
        udp = config.max_udp_sessions if any(r.protocol == "udp" for r in config.routes) else 0
        tcp = config.max_connections * FDS_PER_CONNECTION
        need = tcp + udp + listeners + FD_RESERVE
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < need:
            new = need if hard == resource.RLIM_INFINITY else min(need, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
                soft = new
            except (ValueError, OSError):
                pass
        if soft == resource.RLIM_INFINITY or soft >= need:
            return
        share = max(0, soft - listeners - FD_RESERVE) / (tcp + udp)  # what fits, kept in proportion
        connections = max(1, int(config.max_connections * share))
        sessions = max(1, int(udp * share)) if udp else config.max_udp_sessions
        asked = f"max_connections {config.max_connections}" + (
            f" and max_udp_sessions {udp} need" if udp else " needs"
        )
        log.warning(
            "%s %d open files (%d per connection%s, 1 per listener, %d spare) but the limit is %d; "
            "allowing %d connections%s (raise it with ulimits: nofile in compose)",
            asked,
            need,
            FDS_PER_CONNECTION,
            ", 1 per UDP session" if udp else "",
            FD_RESERVE,
            soft,
            connections,
            f" and {sessions} UDP sessions" if udp else "",
        )
        self.config = config = replace(config, max_connections=connections, max_udp_sessions=sessions)
        self.shared.config = config

    # --- serve -------------------------------------------------------------------------------------------

    async def serve(self) -> None:
        """Start, then handle signals until told to stop; drain and return."""
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        try:
            self._start_app_watch()  # first: remember the app's /etc/hostname as early as possible
            await self._unless_stopped(self.start())
            while True:
                got = await self._signals.get()
                if got == signal.SIGHUP:
                    await self._unless_stopped(self.reload())
                    continue
                if isinstance(got, str):  # the app restarted: nothing in this namespace is worth a wait
                    await self.drain(got, timeout=0.0)
                else:
                    await self.drain(got.name)
                return
        finally:
            await self._stop_app_watch()
            await self._close_resolvers()
            if self.ignore_late_signals:  # held back while the handlers change: no moment of SIG_DFL
                signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
            for sig in SIGNALS:
                loop.remove_signal_handler(sig)
                if self.ignore_late_signals:
                    signal.signal(sig, signal.SIG_IGN)  # a pending one is discarded with it
            if self.ignore_late_signals:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)

    async def _unless_stopped(self, work: Coroutine[None, None, None]) -> None:
        """start() or reload(), cut short by a stop (SIGTERM, SIGINT, stop()): `work` is cancelled (start
        closes what it bound; a reload still reading its file leaves the reading thread behind) and the
        stop is queued again for serve(). A SIGHUP meanwhile is queued again after `work`."""
        starting = asyncio.ensure_future(work)
        held: list[signal.Signals | str] = []
        while not starting.done():
            getter = asyncio.ensure_future(self._signals.get())
            await asyncio.wait({starting, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()  # a cancelled get leaves the queue as it was
            elif getter.result() == signal.SIGHUP:
                held.append(getter.result())
            else:
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
                self._signals.put_nowait(getter.result())
                return
        for sig in held:
            self._signals.put_nowait(sig)
        starting.result()  # ListenError and the like

    def stop(self, reason: str) -> None:
        """Make serve() drain and return, as SIGTERM does; `exit_reason` tells the CLI why."""
        self.exit_reason = reason
        self._signals.put_nowait(reason)

    def _start_app_watch(self) -> None:
        self.app_watch = start_watch(
            self.config.app_watch,
            self.problems,
            lambda: self.stop(APP_RESTARTED),
            hostname=self._app_watch_file,
        )
        if self.app_watch is not None:
            self._app_watch_task = asyncio.ensure_future(self.app_watch.run())

    async def _stop_app_watch(self) -> None:
        task, self._app_watch_task = self._app_watch_task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            log.error("app watch failed: %r", task.exception())

    async def drain(self, why: str = "stop", timeout: float | None = None) -> None:
        """`timeout` (default: drain_timeout) bounds the wait for live connections."""
        limit = self.config.drain_timeout if timeout is None else timeout
        await self._stop_app_watch()
        shared = self.shared
        shared.drained = asyncio.Event()  # from here on: readiness false, late accepts refused
        udp_sessions = self.udp.sessions
        self._close_listeners(list(self.routes))
        if udp_sessions:  # nothing to finish: a datagram has no connection (relay/udp.py)
            log.info("%s: closed %d UDP session(s) with their listeners", why, udp_sessions)
        log.info(
            "%s: stopped listening; draining %d connection(s), up to %gs",
            why,
            len(self.connections),
            limit,
        )
        waited_from, cut_short = time.monotonic(), False
        if shared.connections:
            waiter = asyncio.ensure_future(shared.drained.wait())
            second = asyncio.ensure_future(self._second_signal())
            await asyncio.wait({waiter, second}, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
            cut_short = second.done()
            for task in (waiter, second):
                task.cancel()
        waited = time.monotonic() - waited_from
        left = list(shared.connections)
        for conn in left:
            conn.close("shutdown")
        if left:
            log.warning(
                "drain: closed %d connection(s) still open after %.1fs%s",
                len(left),
                waited,
                f" (a second signal ended the {limit:g}s drain)" if cut_short else "",
            )
            if shared.connections:  # let the resets reach the kernel and the pairs finish
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(shared.drained.wait(), timeout=1.0)
        if self.health is not None:
            await self.health.close()
        await self._close_resolvers()
        self.audit.stop()
        self.shared.budget.close()
        self._reserve.close()
        log.info("stopped")

    async def _second_signal(self) -> None:
        while (await self._signals.get()) == signal.SIGHUP:
            continue
        log.info("second signal: closing now")

    def _close_listeners(self, routes: list[Route]) -> None:
        for route in routes:
            active = self.routes.get(route)
            if active is not None:
                for listener in active.listeners:
                    listener.close()
                active.listeners = []
                if isinstance(active.ctx, UdpRoute):
                    active.ctx.close()  # its sessions and idle sweep
        # TCP's own addresses only: a TCP target on a port the relay listens on for UDP is no loop.
        self.shared.own = own_addresses(lst.address for lst in self.listeners if isinstance(lst, Listener))

    # --- reload ------------------------------------------------------------------------------------------

    async def reload(self) -> None:
        if self._reload_config is None:
            log.warning("SIGHUP: no configuration source to reload; ignored")
            return
        try:
            new = await self._load(self._reload_config)
        except ConfigError as err:
            log.error("reload failed, keeping the running configuration: %s", err)
            return
        old, old_routes, new_routes = self.config, set(self.routes), set(new.routes)
        removed = [r for r in self.routes if r not in new_routes]
        added = [r for r in new.routes if r not in old_routes]
        self._close_listeners(removed)
        self.config = new
        self.shared.config = new
        opened: list[Route] = []
        self._exposed.clear()  # added routes are warned about again
        try:
            self._start_resolvers(Config(routes=tuple(added)))
            for route in added:
                await self._open(route)
                opened.append(route)
        except ListenError as err:
            log.error("reload: %s; routes added by this reload are not served", err)
            self._close_listeners(opened)
            for route in opened:
                del self.routes[route]
        for route in removed:
            del self.routes[route]
        changed = await self._apply_settings(old)
        # Certificates rotated at the same paths (relay/tls.py rule 5): unchanged TLS routes read them again.
        kept = [self.routes[r].ctx for r in old_routes & new_routes if r.tls or r.target_tls]
        read = sum(ctx.reload_tls() for ctx in kept if isinstance(ctx, RouteContext))
        tls_note = f"; TLS files read again for {read} route(s)" if kept else ""
        log.info(
            "reloaded: %d route(s) added, %d removed, %d unchanged%s%s",
            len(added),
            len(removed),
            len(old_routes & new_routes),
            f"; settings changed: {', '.join(changed)}" if changed else "",
            tls_note,
        )

    @staticmethod
    async def _load(reload: Callable[[], Config]) -> Config:
        """Read and check the configuration in a thread of its own, so no file (a 1 MiB one takes seconds
        to parse, a stalled mount forever) holds the event loop: relayed traffic keeps flowing, and a
        stop ends the wait (_unless_stopped). A daemon thread: one stuck in a read never holds up exit."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Config] = loop.create_future()

        def settle(result: Config | None, error: BaseException | None) -> None:
            if done.done():  # the reload was cancelled meanwhile
                return
            if error is not None:
                done.set_exception(error)
            else:
                assert result is not None
                done.set_result(result)

        def work() -> None:
            try:
                result, error = reload(), None
            except BaseException as err:  # handed to the loop as it is: ConfigError, or a bug to see
                result, error = None, err
            with contextlib.suppress(RuntimeError):  # the loop closed while this thread read
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=work, name="relay-reload", daemon=True).start()
        return await done

    async def _apply_settings(self, old: Config) -> list[str]:
        """Apply the reloaded settings other than routes; say plainly which ones need a restart.

        Timeouts, limits, keepalive and drain_timeout are read per connection (shared.config): they apply
        to connections from now on. metrics rebinds, the log settings and family take effect at once.
        """
        self._check_fd_limit(self.config)  # may lower max_connections again, as at start
        new = self.config
        changed = [
            f"{name} ({_setting(getattr(old, name))} -> {_setting(getattr(new, name))})"
            for name in SETTINGS
            if getattr(old, name) != getattr(new, name)
        ]
        if old.memory_budget != new.memory_budget:
            self._set_budget(new)
        if old.source != new.source:  # connections from now on
            for resolver in self.resolvers.values():
                resolver.source = new.source
        if old.metrics != new.metrics:
            await self._rebind_health(old.metrics)
        if (old.log_level, old.log_format) != (new.log_level, new.log_format):
            logs.setup(new.log_level, new.log_format)
        if old.family != new.family:
            for active in self.routes.values():
                active.ctx.resolver = self._resolver(active.ctx.route.target)
            self._start_resolvers(new)
        restart = [name for name in RESTART_SETTINGS if getattr(old, name) != getattr(new, name)]
        if restart:
            log.warning(
                "reload: %s cannot change while the relay runs (listeners already open, or chosen at "
                "start): restart the relay to apply %s",
                ", ".join(restart),
                "it" if len(restart) == 1 else "them",
            )
        return changed

    async def _rebind_health(self, old: HostPort | None) -> None:
        """Move /metrics, /healthz and /readyz to the reloaded address; back to the old one if it fails."""
        if self.health is not None:
            await self.health.close()
            self.health = self.health_address = None
        address = self.config.metrics
        if address is None:
            log.info("metrics and health: off")
            return
        try:
            await self._start_health(address)
        except ListenError as err:
            log.error("reload: %s; metrics and health stay on %s", err, old or "off")
            self.config = self.shared.config = replace(self.config, metrics=old)
            if old is not None:
                with contextlib.suppress(ListenError):
                    await self._start_health(old)


# Settings a reload compares (routes, target and listen are compared as routes).
SETTINGS = tuple(
    f.name
    for f in fields(Config)
    if f.name not in {"routes", "target", "listen", "config_file", "warnings", "metrics_explicit"}
)
RESTART_SETTINGS = ("loop", "backlog", "reuseport", "app_watch")


def _setting(value: object) -> str:
    return "off" if value is None else str(value)


def _describe(route: Route, listeners: Sequence[Listener | UdpListener]) -> str:
    """`127.0.0.1:5432, [::1]:5432 -> host.docker.internal:5432 (auto, else ...)`: where connections go by
    name; the resolver's `target:` line follows with the name it settled on and its address. UDP routes
    say `udp 127.0.0.1:53 ...`."""
    bound = ("udp " if route.protocol == "udp" else "") + ", ".join(str(lst.address) for lst in listeners)
    if route.target != AUTO:
        return f"{bound} -> {format_target(route.target, route.target_port)}"
    first, *rest = CHAIN
    fallbacks = "".join(f", else {name}" for name in rest)
    target = format_hostport(first, route.target_port)
    return f"{bound} -> {target} (auto{fallbacks}, else the default gateway)"
