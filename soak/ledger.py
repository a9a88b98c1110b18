"""Fault windows and the verdict on every client operation.

Rules:
1. A fault opens a window on the routes it hurts when it is injected and closes it when the route is
   whole again (the target listens again, the route is back in the relay ...).
2. An operation whose bytes all checked out is *verified*. One that saw a wrong byte (or the target saw
   one) is *corrupted*, whatever else happened: the pass condition. One that failed is *expected* when
   it overlapped a window on its route, else *unexpected*. Windows marked `new_only` (a route removed
   by a reload) excuse only connections opened inside them, or in the NEW_GRACE before (those may still
   sit in the closing listener's backlog): connections already running must finish.
3. Verdicts are given as operations end, so nothing but counters and a few examples is kept. Windows on
   one route never overlap (each fault task works its own routes one fault at a time), which lets the
   search stop at the first window that closed before the operation started.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

NEW_GRACE = 1.0
HONEST = frozenset({"refused", "reset", "eof"})  # the client was told; "timeout" means it gave up
VERIFIED, CORRUPTED, EXPECTED, UNEXPECTED = "verified", "corrupted", "expected", "unexpected"
KEEP = 20  # examples kept of each bad verdict


@dataclass(slots=True)
class Window:
    fault: str
    routes: frozenset[str]
    start: float
    end: float = math.inf
    new_only: bool = False
    excused: int = 0  # failures it excused
    cut: int = 0  # of those, operations already running when it opened
    survived: int = 0  # verified operations that overlapped it

    def covers(self, start: float, end: float) -> bool:
        if self.new_only:
            return self.start - NEW_GRACE <= start <= self.end
        return start <= self.end and end >= self.start


@dataclass(slots=True)
class Result:
    """One client operation: `error` empty when every byte checked out; `corrupt` says what was wrong."""

    kind: str
    route: str
    start: float
    end: float
    error: str = ""
    corrupt: str = ""
    up: int = 0  # bytes verified client -> target
    down: int = 0  # bytes verified target -> client


@dataclass
class FaultFigures:
    injected: int = 0
    excused: int = 0
    cut: int = 0
    survived: int = 0
    longest_honest_wait: float = 0.0


@dataclass
class Ledger:
    clock: Callable[[], float] = time.monotonic
    windows: dict[str, list[Window]] = field(default_factory=dict)
    verdicts: Counter[str] = field(default_factory=Counter)
    by_kind: Counter[tuple[str, str]] = field(default_factory=Counter)  # (kind, verdict)
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)  # (verdict, error)
    faults: dict[str, FaultFigures] = field(default_factory=dict)
    bytes_verified: int = 0
    honest_wait: tuple[float, str] = (0.0, "")  # longest wait for an honest error after a fault, and which
    gave_up: tuple[int, float] = (0, 0.0)  # expected failures where the client's own timeout ended it
    examples: dict[str, list[str]] = field(default_factory=dict)
    inflight: Counter[str] = field(default_factory=Counter)
    timing: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # route: (n, sum, max) verified

    def open(self, fault: str, routes: set[str] | frozenset[str], *, new_only: bool = False) -> Window:
        window = Window(fault, frozenset(routes), self.clock(), new_only=new_only)
        for route in window.routes:
            self.windows.setdefault(route, []).append(window)
        self.faults.setdefault(fault, FaultFigures()).injected += 1
        return window

    def close(self, window: Window) -> None:
        window.end = self.clock()

    def started(self, route: str) -> None:
        self.inflight[route] += 1

    def add(self, result: Result) -> str:
        self.inflight[result.route] -= 1
        overlapping = [w for w in self._recent(result) if w.covers(result.start, result.end)]
        if result.corrupt:
            verdict = CORRUPTED
            self._example(verdict, f"{result.kind} on {result.route}: {result.corrupt}")
        elif not result.error:
            verdict = VERIFIED
            self.bytes_verified += result.up + result.down
            n, total, longest = self.timing.get(result.route, (0, 0.0, 0.0))
            took = result.end - result.start
            self.timing[result.route] = (n + 1, total + took, max(longest, took))
            for w in overlapping:
                w.survived += 1
                self.faults[w.fault].survived += 1
        elif overlapping:
            verdict = EXPECTED
            self._excuse(result, overlapping[0])  # the first fault that hit it
        else:
            verdict = UNEXPECTED
            self._example(verdict, f"{result.kind} on {result.route}: {result.error}")
        self.verdicts[verdict] += 1
        self.by_kind[result.kind, verdict] += 1
        if result.error:
            self.errors[verdict, result.error] += 1
        return verdict

    def _recent(self, result: Result) -> list[Window]:
        found = []
        for w in reversed(self.windows.get(result.route, [])):
            if w.end < result.start - NEW_GRACE:
                break
            found.append(w)
        return found[::-1]

    def _excuse(self, result: Result, window: Window) -> None:
        figures = self.faults[window.fault]
        window.excused += 1
        figures.excused += 1
        if result.start < window.start:
            window.cut += 1
            figures.cut += 1
        if result.error in HONEST:
            wait = result.end - max(result.start, window.start)
            figures.longest_honest_wait = max(figures.longest_honest_wait, wait)
            if wait > self.honest_wait[0]:
                self.honest_wait = (wait, window.fault)
        else:
            count, longest = self.gave_up
            self.gave_up = (count + 1, max(longest, result.end - result.start))

    def _example(self, verdict: str, text: str) -> None:
        kept = self.examples.setdefault(verdict, [])
        if len(kept) < KEEP:
            kept.append(text)
