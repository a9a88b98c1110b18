"""The load: workers that run client operations back to back until the stop time.

A worker draws each operation from its mix (kind, route, payload sizes) with its own seeded random
generator, tells the ledger it started, runs it (bounded by OP_LIMIT) and hands the result over. Every
loop is bounded in time (the stop time) and in count (MAX_OPS).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from soak import clients
from soak.clients import Body, Dial
from soak.ledger import Ledger, Result

KiB, MiB = 1024, 1024 * 1024
OP_LIMIT = 90.0  # no operation runs longer, whatever it waits for
MAX_OPS = 1_000_000


@dataclass(frozen=True)
class Op:
    kind: str
    route: str
    address: tuple[str, int]
    body: Body
    dial: Dial = clients.dial_loopback


Mix = Callable[[random.Random], Op]


async def perform(ledger: Ledger, op: Op) -> Result:
    ledger.started(op.route)
    try:
        result = await asyncio.wait_for(
            clients.run(op.dial, op.kind, op.route, op.address, op.body), OP_LIMIT
        )
    except TimeoutError:
        now = time.monotonic()
        result = Result(op.kind, op.route, now - OP_LIMIT, now, error="timeout")
    ledger.add(result)
    return result


async def worker(mix: Mix, rng: random.Random, ledger: Ledger, stop_at: float, pause: float = 0.0) -> int:
    """Run operations from `mix` until `stop_at`; returns how many."""
    done = 0
    while time.monotonic() < stop_at and done < MAX_OPS:
        await perform(ledger, mix(rng))
        done += 1
        if pause:
            await asyncio.sleep(pause)
    return done


def pick(rng: random.Random, weighted: Sequence[tuple[int, str]]) -> str:
    return rng.choices([name for _, name in weighted], [w for w, _ in weighted])[0]


def transfers(routes: dict[str, tuple[str, int]], weights: Sequence[tuple[int, str]]) -> Mix:
    """Transfers with sha256 checks both ways and half-close replies: mostly small, some multi-megabyte,
    some read slowly (backpressure through the relay)."""

    def mix(rng: random.Random) -> Op:
        route = pick(rng, weights)
        kind = pick(rng, ((70, "small"), (20, "large"), (10, "slow reader")))
        if kind == "small":
            body = clients.transfer(rng.randint(0, 64 * KiB), rng.randint(0, 64 * KiB), rng)
        elif kind == "large":
            body = clients.transfer(rng.randint(256 * KiB, 4 * MiB), rng.randint(256 * KiB, 4 * MiB), rng)
        else:
            body = clients.transfer(rng.randint(0, 64 * KiB), rng.randint(512 * KiB, 2 * MiB), rng, slow=True)
        return Op(kind, route, routes[route], body)

    return mix


def exchanges(route: str, address: tuple[str, int]) -> Mix:
    def mix(rng: random.Random) -> Op:
        return Op("request/response", route, address, clients.exchange(rng.randint(20, 200), rng))

    return mix


def idle_holds(route: str, address: tuple[str, int], stop_at: float) -> Mix:
    """One exchange, then the connection held open and silent 2-10 s, then one more."""

    def mix(rng: random.Random) -> Op:
        idle = max(0.0, min(rng.uniform(2, 10), stop_at - time.monotonic()))
        return Op("idle", route, address, clients.exchange(2, rng, hold=lambda: asyncio.sleep(idle)))

    return mix


def storms(route: str, address: tuple[str, int]) -> Mix:
    """Early resets (0-1 ms after connecting), garbage then reset, garbage then FIN."""
    makers = {
        "early reset": clients.early_reset,
        "garbage, reset": clients.garbage_reset,
        "garbage, FIN": clients.garbage_fin,
    }

    def mix(rng: random.Random) -> Op:
        kind = pick(rng, ((60, "early reset"), (20, "garbage, reset"), (20, "garbage, FIN")))
        return Op(kind, route, address, makers[kind](rng))

    return mix


def blackhole(relayed: tuple[str, int], direct: tuple[str, int], dial: Dial) -> Mix:
    """Small transfers through the relay whose resolver never answers, alternating with the same
    transfer straight to its target, for comparison."""
    turn = [0]

    def mix(rng: random.Random) -> Op:
        turn[0] += 1
        body = clients.transfer(4 * KiB, 4 * KiB, rng)
        if turn[0] == 1:  # waits for the first answer of the resolver chain: timed on its own
            return Op("small", "blackhole (first connection)", relayed, body, dial)
        if turn[0] % 2:
            return Op("small", "blackhole", relayed, body, dial)
        return Op("small", "blackhole (direct)", direct, body, dial)

    return mix
