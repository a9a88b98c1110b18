"""One soak run: targets, relays, load and faults for a bounded time, then the figures.

Rules:
1. Everything started is registered for cleanup before it starts: processes and namespaces on the
   caller's ExitStack (unwound even on Ctrl-C or SIGTERM), in-process targets in a finally.
2. Every loop ends by itself: workers and faults stop at `stop_at`, each operation within OP_LIMIT,
   waits for the relays within fixed bounds; tasks still running TAIL seconds after `stop_at` are
   cancelled and counted.
3. Ports the relays listen on come from below the kernel's ephemeral range (tests.support), so a
   route removed and re-added by a reload finds its port free again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import signal
import subprocess
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from soak import blackhole, faults, traffic
from soak.clients import STALL
from soak.faults import Findings
from soak.ledger import Ledger
from soak.relays import RelayProcess, RouteSpec, Sample, effective_loop
from soak.targets import ProcessTarget, Target
from tests.support import free_port_block

NOFILE = 128
TAIL = 2 * STALL + 15  # after stop_at: time for the last operations to end
IDLE_WAIT = 10.0  # for relay_connections_active to reach 0 after the load stops
BLACKHOLE_PORT, BLACKHOLE_METRICS = 18000, 19464  # inside the namespace: nothing else there
HOST = "127.0.0.1"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
OTHER_LOOP = {"asyncio": "uvloop", "uvloop": "asyncio", "auto": "asyncio"}


@dataclass(frozen=True)
class Plan:
    seconds: float
    seed: int = 1
    loop: str = "auto"
    blackhole: bool = True
    transfer_workers: int = 8
    exchange_workers: int = 2
    idle_holders: int = 16
    storm_workers: int = 2


async def _guard(name: str, aw: Awaitable[Any], found: Findings) -> None:
    """A fault task that breaks is a finding (the run fails), not a crash of the harness."""
    try:
        await aw
    except Exception as err:  # reported as a failed check, with its text
        found.problems.append(f"{name}: {type(err).__name__}: {err}")


class SoakError(Exception):
    """The run could not be set up (a relay or target did not start); the message says which."""


@dataclass
class Setup:
    """What a run drives: the targets, the relays and the address of every route."""

    targets: list[Target]
    crashy: ProcessTarget
    main: RelayProcess
    limited: RelayProcess
    fixed: list[RouteSpec]
    flapping: list[RouteSpec]
    address: dict[str, tuple[str, int]]
    hole: blackhole.Hole | None = None
    hole_target: Target | None = None
    extra: list[RelayProcess] = dataclasses.field(default_factory=list)  # the black-hole relay

    @property
    def relays(self) -> list[RelayProcess]:
        return [self.main, self.limited, *self.extra]


async def _set_up(plan: Plan, workdir: Path, stack: contextlib.ExitStack, notes: list[str]) -> Setup:
    """Start the targets and the relays (registered for cleanup first); return when all listen."""
    main_target, flaky = Target("main"), Target("flaky")
    crashy = ProcessTarget("crashy", workdir)
    stack.callback(crashy.close)
    ports = iter(range(free_port_block(12), 1 << 16))
    fixed = [
        RouteSpec(name, next(ports), HOST, target.port)
        for name, target in (
            ("bulk", main_target),
            ("rr", main_target),
            ("storm", main_target),
            ("crashy", crashy),
            ("flaky", flaky),
        )
    ]
    flapping = [RouteSpec(f"hup-{i}", next(ports), HOST, main_target.port) for i in range(3)]
    fd_route = RouteSpec("fdlim", next(ports), HOST, main_target.port)
    setup = Setup(
        targets=[main_target, flaky],
        crashy=crashy,
        main=RelayProcess("main", workdir, fixed + flapping, metrics=(HOST, next(ports)), loop=plan.loop),
        limited=RelayProcess(
            "fdlim",
            workdir,
            [fd_route],
            metrics=(HOST, next(ports)),
            loop=OTHER_LOOP[plan.loop],
            prefix=("prlimit", f"--nofile={NOFILE}:{NOFILE}", "--"),
        ),
        fixed=fixed,
        flapping=flapping,
        address={r.name: (HOST, r.listen_port) for r in [*fixed, *flapping, fd_route]},
    )
    if not plan.blackhole:
        notes.append(f"The {faults.BLACKHOLE} was not run (--no-blackhole).")
    elif why := blackhole.available():
        notes.append(f"The {faults.BLACKHOLE} was skipped: it {why} (network namespaces).")
    else:
        try:
            setup.hole = hole = stack.enter_context(blackhole.blackhole())
        except subprocess.CalledProcessError as err:
            why = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else err.stderr or ""
            raise SoakError(f"cannot set up the namespaces: {err.cmd}: {why.strip()}") from None
        setup.hole_target = Target("blackhole", sock=hole.host.listen(hole.gateway))
        setup.targets.append(setup.hole_target)
        setup.extra.append(
            RelayProcess(
                "blackhole",
                workdir,
                [RouteSpec("blackhole", BLACKHOLE_PORT, "auto", setup.hole_target.port)],
                metrics=(HOST, BLACKHOLE_METRICS),
                loop=plan.loop,
                prefix=hole.prefix,
                dial=hole.app.dial,
            )
        )
    for relay in setup.relays:
        stack.callback(relay.close)
    return setup


async def _start(setup: Setup) -> None:
    for target in setup.targets:
        await target.start()
    await asyncio.to_thread(setup.crashy.start)
    results = await asyncio.gather(
        *(asyncio.to_thread(r.start) for r in setup.relays), return_exceptions=True
    )
    for relay, result in zip(setup.relays, results, strict=True):
        if isinstance(result, BaseException):
            raise SoakError(f"relay {relay.name} did not start: {result}\n{relay.log_tail()}")
    for relay in setup.relays:
        await relay.get("/metrics")  # the first scrape builds the collectors: part of start-up
        relay.sample()


def _jobs(plan: Plan, setup: Setup, ledger: Ledger, found: Findings, stop_at: float) -> list[Awaitable[Any]]:
    """The load (workers) and the faults, as coroutines that all end by `stop_at` (+ one operation)."""
    address = setup.address
    weights = [(40, "bulk"), (20, "crashy"), (20, "flaky")]  # fdlim: its own task (faults.py)
    weights += [(6, r.name) for r in setup.flapping]
    jobs: list[Awaitable[Any]] = []

    def workers(count: int, name: str, mix: traffic.Mix, pause: float = 0.0) -> None:
        for i in range(count):
            rng = random.Random(f"{plan.seed}-{name}-{i}")
            jobs.append(traffic.worker(mix, rng, ledger, stop_at, pause))

    workers(plan.transfer_workers, "transfer", traffic.transfers(address, weights))
    workers(plan.exchange_workers, "exchange", traffic.exchanges("rr", address["rr"]))
    workers(plan.idle_holders, "idle", traffic.idle_holds("rr", address["rr"], stop_at))
    workers(plan.storm_workers, "storm", traffic.storms("storm", address["storm"]))
    if setup.hole is not None and setup.hole_target is not None:
        relayed = (HOST, BLACKHOLE_PORT)
        direct = (setup.hole.gateway, setup.hole_target.port)
        workers(1, "blackhole", traffic.blackhole(relayed, direct, setup.hole.app.dial), pause=0.25)

    def rng(fault: str) -> random.Random:
        return random.Random(f"{plan.seed}-{fault}")

    kill = faults.kill_target(setup.crashy, "crashy", address["crashy"], ledger, rng("kill"), stop_at)
    flap = faults.flap_target(setup.targets[1], "flaky", ledger, rng("flap"), stop_at)
    reload = faults.reload_routes(
        setup.main, setup.fixed, setup.flapping, ledger, rng("reload"), stop_at, found
    )
    fds = faults.exhaust_descriptors(
        setup.limited, "fdlim", address["fdlim"], ledger, rng("descriptors"), stop_at, found
    )
    jobs += [
        _guard(name, job, found)
        for name, job in (("kill", kill), ("flap", flap), ("reload", reload), ("descriptors", fds))
    ]
    jobs.append(faults.sample_every(setup.relays, 5.0, stop_at))
    return jobs


async def soak(plan: Plan, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Run `plan`; SIGINT or SIGTERM cancels it cleanly (CancelledError out of here, then the caller's
    stack stops the processes)."""
    ledger, found, notes = Ledger(), Findings(), list[str]()
    loop, me = asyncio.get_running_loop(), asyncio.current_task()
    assert me is not None
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, me.cancel)
    tasks: list[asyncio.Future[Any]] = []
    setup: Setup | None = None
    try:
        setup = await _set_up(plan, workdir, stack, notes)
        await _start(setup)
        started = time.monotonic()
        tasks += [asyncio.ensure_future(j) for j in _jobs(plan, setup, ledger, found, started + plan.seconds)]
        _, pending = await asyncio.wait(tasks, timeout=plan.seconds + TAIL)
        if pending:
            found.problems.append(f"{len(pending)} task(s) still running {TAIL:g} s after the stop time")
        for task in tasks:
            if task.done() and not task.cancelled() and (exc := task.exception()) is not None:
                raise exc  # a harness bug: let it show
        elapsed = time.monotonic() - started
        found.hung_up = sum(t.hang_up_silent() for t in setup.targets)
        relay_figures = {r.name: await _finish(r) for r in setup.relays}
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        for target in setup.targets if setup else []:
            await target.close()  # before the loop ends, so no handler is left to be cancelled
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, handler)
    return _figures(plan, ledger, found, notes, relay_figures, elapsed)


async def _finish(relay: RelayProcess) -> dict[str, Any]:
    active, by_route, waited = await relay.wait_idle(IDLE_WAIT)
    alive = relay.alive
    end = relay.sample() if alive else None
    relay.stop()
    samples = relay.samples
    start = samples[0]
    loaded = samples[1 : len(samples) - (1 if end else 0)] or [start]
    return {
        "loop": effective_loop(relay.loop),
        "startup_seconds": relay.startup_seconds,
        "start": _sample(start),
        "first_loaded": _sample(loaded[0]),
        "last_loaded": _sample(loaded[-1]),
        "end": _sample(end) if end else None,
        "peak_rss_bytes": max(s.rss_bytes for s in samples),
        "active_end": active,
        "active_end_by_route": by_route,
        "active_wait_seconds": waited,
        "alive_at_end": alive,
        "exit_code": relay.exit[0],
        "stop_seconds": relay.exit[1],
        "log_lines": relay.log_lines(),
        "log_tail": relay.log_tail() if not alive or relay.exit[0] != 0 or active != 0 else "",
    }


def _sample(s: Sample) -> dict[str, int]:
    return {"rss_bytes": s.rss_bytes, "fds": s.fds}


def _figures(
    plan: Plan,
    ledger: Ledger,
    found: Findings,
    notes: list[str],
    relays: dict[str, dict[str, Any]],
    elapsed: float,
) -> dict[str, Any]:
    kinds: dict[str, dict[str, int]] = {}
    for (kind, verdict), n in sorted(ledger.by_kind.items()):
        kinds.setdefault(kind, {})[verdict] = n
    return {
        "plan": dataclasses.asdict(plan),
        "elapsed_seconds": elapsed,
        "verdicts": dict(ledger.verdicts),
        "kinds": kinds,
        "errors": {f"{v} {e}": n for (v, e), n in sorted(ledger.errors.items())},
        "bytes_verified": ledger.bytes_verified,
        "longest_honest_wait": {"seconds": ledger.honest_wait[0], "fault": ledger.honest_wait[1]},
        "gave_up": {"count": ledger.gave_up[0], "longest_seconds": ledger.gave_up[1]},
        "faults": {name: dataclasses.asdict(f) for name, f in ledger.faults.items()},
        "timing": {
            route: {"verified": n, "mean_ms": 1000 * total / n, "max_ms": 1000 * longest}
            for route, (n, total, longest) in sorted(ledger.timing.items())
        },
        "relays": relays,
        "readiness_during_descriptor_limit": found.readiness,
        "reloads": found.reloads,
        "silent_hung_up": found.hung_up,
        "examples": ledger.examples,
        "problems": found.problems,
        "notes": notes,
    }
