"""The faults, each a task that injects one kind again and again until the stop time.

Each opens a ledger window on the routes it hurts before it acts and closes it once the route is whole
again, and always leaves its route whole when it returns (also when cancelled). What each does is in
DESCRIPTIONS, which the report repeats.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from soak import clients
from soak.ledger import Ledger
from soak.relays import RelayProcess, RouteSpec
from soak.targets import ProcessTarget, Target
from soak.traffic import KiB, MiB, Op, perform

KILLED = "target killed mid-transfer"
REFUSING = "target refusing"
SILENT = "target accepting but silent"
RELOAD = "route removed and re-added by SIGHUP"
DESCRIPTORS = "descriptor limit"
BLACKHOLE = "resolver black hole"
SLOW = "slow readers"

DESCRIPTIONS = {
    KILLED: "the target process of route `crashy` is SIGKILLed while a paced 16 MiB upload is in flight, "
    "left dead (its port refuses) 0.3-1 s, then started again on the same port",
    REFUSING: "the target of route `flaky` stops listening for 1.5-3 s (connections refused)",
    SILENT: "the target of route `flaky` accepts for 1.5-3 s but never answers (the client gives up)",
    RELOAD: "the relay's config file loses one of the `hup-*` routes, SIGHUP, 1-2 s, the route comes "
    "back, SIGHUP; transfers on the other routes keep going",
    DESCRIPTORS: "a second relay runs under `prlimit --nofile=128:128`; every few seconds 48 clients "
    "hold connections through it (more than its slots) and 64 more hold idle connections to its metrics "
    "port, then all let go; between these episodes transfers through it must simply work",
    BLACKHOLE: "a third relay runs in a network namespace whose only DNS server is an on-link address "
    "nobody owns, with target `auto`: host.docker.internal and host.containers.internal never resolve "
    "(each lookup waits out the resolver), the default gateway leads to the target",
    SLOW: "one transfer in ten reads its 0.5-2 MiB reply 16 KiB at a time with 10 ms pauses",
}


@dataclass
class Findings:
    """What the fault tasks saw beyond the ledger's windows."""

    problems: list[str] = field(default_factory=list)  # the harness could not inject as planned
    readiness: list[tuple[str, str]] = field(default_factory=list)  # (phase, /readyz answer)
    reloads: int = 0
    hung_up: int = 0  # connections the silent target still held when the load stopped


async def _nap(rng: random.Random, low: float, high: float, stop_at: float) -> bool:
    """Sleep low-high s, at most to `stop_at`; False when there is no time for another round."""
    await asyncio.sleep(max(0.0, min(rng.uniform(low, high), stop_at - time.monotonic())))
    return time.monotonic() < stop_at


async def kill_target(
    target: ProcessTarget,
    route: str,
    address: tuple[str, int],
    ledger: Ledger,
    rng: random.Random,
    stop_at: float,
) -> None:
    while await _nap(rng, 2, 5, stop_at - 3):
        # An upload the target is still reading: a reply could already sit whole in kernel buffers
        # (several MiB on loopback) and survive the kill; 16 MiB at ~1.6 MB/s is in flight for 10 s.
        victim = asyncio.ensure_future(
            perform(ledger, Op("victim", route, address, clients.transfer(16 * MiB, 0, rng, paced=True)))
        )
        await asyncio.sleep(0.3)
        window = ledger.open(KILLED, {route})
        try:
            target.kill()
            await asyncio.sleep(rng.uniform(0.3, 1.0))  # refused meanwhile
        finally:
            await asyncio.to_thread(target.start)  # if it cannot, the run fails with the reason
            ledger.close(window)
        await victim


async def flap_target(target: Target, route: str, ledger: Ledger, rng: random.Random, stop_at: float) -> None:
    refusing = True
    while await _nap(rng, 2, 4, stop_at - 3):
        window = ledger.open(REFUSING if refusing else SILENT, {route})
        if refusing:
            target.refuse()
        else:
            target.mode = "silent"
        try:
            await asyncio.sleep(rng.uniform(1.5, 3))
        finally:
            target.mode = "normal"
            await target.listen()
            ledger.close(window)
        refusing = not refusing


async def _until_listening(relay: RelayProcess, port: int, listening: bool, timeout: float) -> bool:
    """Wait until `port` is (or is no longer) listening in the relay's namespace; False on timeout."""
    deadline = time.monotonic() + timeout
    while (port in await asyncio.to_thread(relay.listening)) != listening:
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def reload_routes(
    relay: RelayProcess,
    fixed: list[RouteSpec],
    flapping: list[RouteSpec],
    ledger: Ledger,
    rng: random.Random,
    stop_at: float,
    found: Findings,
) -> None:
    while await _nap(rng, 2, 4, stop_at - 4):
        gone = rng.choice(flapping)
        window = ledger.open(RELOAD, {gone.name}, new_only=True)
        try:
            relay.reload(fixed + [r for r in flapping if r is not gone])
            found.reloads += 1
            if not await _until_listening(relay, gone.listen_port, False, 5):
                found.problems.append(f"reload: {gone.name} still listening 5 s after SIGHUP removed it")
            await asyncio.sleep(rng.uniform(1, 2))
        finally:
            relay.reload(fixed + flapping)
            found.reloads += 1
            if not await _until_listening(relay, gone.listen_port, True, 5):
                found.problems.append(f"reload: {gone.name} not listening 5 s after SIGHUP added it back")
            ledger.close(window)


HELD = 48
IDLE_SCRAPES = 64
SLOTS_FULL = "every connection slot taken"
SCRAPES_HELD = "slots taken and 64 idle connections held to the metrics port"


async def exhaust_descriptors(
    relay: RelayProcess,
    route: str,
    address: tuple[str, int],
    ledger: Ledger,
    rng: random.Random,
    stop_at: float,
    found: Findings,
) -> None:
    while time.monotonic() < stop_at - 8:
        calm_until = min(time.monotonic() + rng.uniform(3, 6), stop_at - 8)
        while time.monotonic() < calm_until:  # the only traffic here: it must simply work
            body = clients.transfer(rng.randint(0, 64 * KiB), rng.randint(0, 64 * KiB), rng)
            await perform(ledger, Op("small", route, address, body))
        if time.monotonic() >= stop_at - 8:
            return
        window = ledger.open(DESCRIPTORS, {route})
        release = asyncio.Event()
        held = [
            asyncio.ensure_future(
                perform(ledger, Op("held", route, address, clients.exchange(2, rng, hold=release.wait)))
            )
            for _ in range(HELD)
        ]
        idle: list[asyncio.StreamWriter] = []
        try:
            await asyncio.sleep(1.0)  # every held connection has landed
            if any(task.done() for task in held):  # some were turned away: the slots are all taken
                found.readiness.append((SLOTS_FULL, await _readiness(relay)))
            else:
                found.problems.append(f"descriptor limit: {HELD} held connections did not fill the slots")
            for _ in range(IDLE_SCRAPES):
                try:
                    idle.append((await asyncio.wait_for(relay.dial(*relay.metrics), 1.0))[1])
                except OSError:  # TimeoutError included: its backlog is full
                    break
            await asyncio.sleep(0.5)
            found.readiness.append((SCRAPES_HELD, await _readiness(relay)))
        finally:
            release.set()
            for writer in idle:
                writer.transport.abort()
            await asyncio.gather(*held)
            ledger.close(window)


async def _readiness(relay: RelayProcess) -> str:
    try:
        status, body = await asyncio.wait_for(relay.get("/readyz"), 3.0)
    except TimeoutError:
        return "no answer within 3 s"
    except (OSError, EOFError, asyncio.IncompleteReadError):
        return "connection closed without an answer"
    return f"{status} {' '.join(body.split())}"


async def sample_every(relays: list[RelayProcess], seconds: float, stop_at: float) -> None:
    """Under load: the first sample `seconds` after the start, the last at `stop_at`."""
    while time.monotonic() < stop_at:
        await asyncio.sleep(min(seconds, max(0.0, stop_at - time.monotonic())))
        for relay in relays:
            if relay.alive:
                relay.sample()
