"""One bound, for the whole process, on the bytes held for receivers that do not keep up.

Each pair already stops reading a side once the other side's write buffer passes pump.HIGH_WATER,
but that bound is per connection: a thousand clients that stop reading while their targets keep
sending would each hold a full buffer, and a 128 MiB container is OOM-killed (issue 17). Rules:

1. Only bytes waiting in a transport's write buffer count (`held`): they wait because the receiver is
   slower than the sender. A pair whose writes complete at once is never charged.
2. Over the budget, a side whose bytes wait is stopped (BUDGET) until its receiver has taken all
   of them; only then does it read again. Resuming it earlier would buffer one more read for a
   receiver that is still stuck, which is exactly the growth being bounded. Healthy pairs keep going.
3. Reads shrink as the budget fills (READ_SIZES: 256 KiB below a quarter of it, 16 KiB below the
   budget, 4 KiB above), so each receiver that stalls adds at most one small read before it stops.
   Every side reads into the shared buffer of the current size (pump.py rule 4). A transport that could
   not send all of a write may keep a view of that buffer: it is then the side's (`pin`, charged in
   full until its output has drained) and the next reads go into a new one.
4. A tick refreshes the charges every TICK seconds while any side is charged, and stops when none is.
   After a burst, freed heap pages go back to the kernel (memory.Trimmer).
5. Nothing here runs per chunk: the pump asks its output's `get_write_buffer_size()` around a write,
   and the budget works only when a write leaves bytes behind, and in the tick.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from relay.memory import DEFAULT_BUDGET

BUDGET = 2  # a side's stop reason (pump.Side.stops, beside pump.FULL): the budget is full (rule 2)
READ_SIZES = (256 * 1024, 16 * 1024, 4 * 1024)
TICK = 0.05
TRIM_AFTER = 4 * 1024 * 1024  # a burst that held this much is worth giving back


class Output(Protocol):
    def get_write_buffer_size(self) -> int: ...


class Side(Protocol):
    """What the budget needs of a reading side (pump.Side), without importing the pump that uses it."""

    @property
    def out(self) -> Output | None: ...

    held: int
    pin: int
    lost: bool

    def stop(self, why: int) -> bool: ...
    def go(self, why: int) -> bool: ...


class Budget:
    __slots__ = (
        "_buffers",
        "_level",
        "_timer",
        "charged",
        "held",
        "limit",
        "on_full",
        "peak",
        "reached",
        "stopped",
        "trim",
        "view",
    )

    def __init__(self, limit: int = DEFAULT_BUDGET, trim: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.held = 0  # bytes in the write buffers of `charged` sides' outputs, as of the last count
        self.peak = 0  # the most held since the last trim
        self.reached = 0  # times the budget was reached (relay_memory_budget_reached_total)
        self.stopped = 0  # sides stopped by the budget now
        self.charged: set[Side] = set()
        self._buffers = [memoryview(bytearray(size)) for size in READ_SIZES]  # one per level (rule 3)
        self._level = 0
        self.view = self._buffers[0]  # what the next read goes into
        self.trim = trim
        self.on_full: Callable[[Budget], None] | None = None  # told once each time the budget is reached
        self._timer: asyncio.TimerHandle | None = None

    def pinned(self, side: Side) -> None:
        """`side` wrote a view of the shared buffer and its output kept part of it (rule 3)."""
        side.pin = len(self.view)
        self.view = self._buffers[self._level] = memoryview(bytearray(side.pin))
        self.charge(side)

    def charge(self, side: Side) -> None:
        """`side` wrote and bytes stayed behind in its output's buffer (rule 1)."""
        out = side.out
        size = (out.get_write_buffer_size() if out is not None else 0) + side.pin
        was_over = self.held > self.limit
        self.held += size - side.held
        side.held = size
        if side not in self.charged:
            self.charged.add(side)
            if self._timer is None:
                self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)
        if self.held > self.limit:
            if side.stop(BUDGET):
                self.stopped += 1
            if not was_over:
                self.reached += 1
                if self.on_full is not None:
                    self.on_full(self)
        self._relevel()

    def _relevel(self) -> None:
        held, limit = self.held, self.limit
        self.peak = max(self.peak, held)
        level = 0 if held < limit >> 2 else 1 if held <= limit else 2
        if level != self._level:
            self._level = level
            self.view = self._buffers[level]

    def _tick(self) -> None:
        self._timer = None
        total = 0
        drained = []
        for side in self.charged:
            out = side.out
            size = 0 if out is None or side.lost else out.get_write_buffer_size()
            if size:
                side.held = size + side.pin
                total += side.held
            else:
                drained.append(side)
        for side in drained:  # rule 2: its receiver took everything
            self.charged.discard(side)
            side.held = side.pin = 0
            if side.go(BUDGET):
                self.stopped -= 1
        self.held = total
        self._relevel()
        if self.charged:
            self._timer = asyncio.get_running_loop().call_later(TICK, self._tick)
        elif self.peak >= TRIM_AFTER and self.trim is not None:
            self.peak = 0
            self.trim()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
