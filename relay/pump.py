"""Moving bytes from one socket of a relayed pair to the other.

Rules this module keeps:
1. Order and completeness: every byte read from one side is handed to the other side's transport, in
   order, before the next read on that side. Nothing is dropped while the other side is open.
2. Bounded memory per pair: when a transport's write buffer passes its high-water mark the loop calls
   `pause_writing` on its protocol, which stops reading the *other* side until `resume_writing`.
   So each direction holds at most HIGH_WATER + one read, whatever the sender does.
3. Half-close passes through: EOF read on one side becomes `write_eof()` (FIN) on the other, and the
   opposite direction keeps flowing. The pair (connection.py) decides when both directions are done.
4. Memory follows what is in flight: every side reads into the budget's one shared buffer and writes
   a view of what it read, with no copy. Where the other side's transport already holds bytes, the
   write is a copy of exactly the size read (the transport keeps it); where a transport kept part of a
   view, that buffer is left to it and the budget hands out a new one (budget.py rule 3). Only what
   the other side cannot take yet stays allocated; an idle connection holds no buffer.
5. Bounded memory per process: bytes left in a write buffer are charged to the budget (budget.py),
   which stops sides and shrinks reads when receivers that do not read add up. A side stops reading
   while any reason holds (FULL: the other side's buffer is full; BUDGET); stop and go are safe to
   call twice.

A BufferedProtocol rather than a plain Protocol: it alone lets the relay choose the read size on both
loops (rule 5), and the common write needs no copy, where a plain Protocol gets a new bytes object per
read from the loop.

The hot path (`buffer_updated`) adds to a counter, writes, and asks the buffer's size before and after:
no logging, no metrics calls.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Protocol, cast

from relay.budget import Budget

# 64/16 KiB: level with 256/64 KiB on throughput (docs/benchmarks.md), a quarter of the memory held
# for each receiver that stalls.
HIGH_WATER = 64 * 1024
LOW_WATER = 16 * 1024
# Why a side is not read (rule 5): the other side's buffer is above HIGH_WATER; budget.BUDGET is the other.
FULL = 1
LINGER_RST = struct.pack("ii", 1, 0)


class Owner(Protocol):
    """What a side reports to the pair that owns it."""

    def side_made(self, side: Side) -> None: ...
    def side_eof(self, side: Side) -> None: ...
    def side_lost(self, side: Side, exc: Exception | None) -> None: ...


class Side(asyncio.BufferedProtocol):
    """One socket of a pair: what it reads is written to `out`, the other socket's transport."""

    __slots__ = (
        "budget",
        "early",
        "eof",
        "held",
        "lost",
        "nbytes",
        "out",
        "owner",
        "peer",
        "pin",
        "stops",
        "transport",
    )

    def __init__(self, owner: Owner, budget: Budget) -> None:
        self.owner = owner
        self.budget = budget
        self.transport: asyncio.Transport | None = None
        self.out: asyncio.Transport | None = None
        self.peer: Side | None = None  # the side that writes into this side's transport
        self.nbytes = 0
        self.held = 0  # bytes charged to the budget for `out`'s write buffer
        self.pin = 0  # size of a shared read buffer `out` may still hold a view of (budget.py rule 3)
        self.stops = 0  # FULL | budget.BUDGET: why this side is not read (rule 5)
        self.eof = False
        self.lost = False
        self.early: list[bytes] = []  # read before `out` existed; the pair writes it first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport but have its methods.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        self.owner.side_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.budget.view

    def buffer_updated(self, nbytes: int) -> None:
        budget = self.budget
        out = self.out
        if out is None:
            self._hold(budget.view[:nbytes].tobytes())
            return
        if out.is_closing():
            return  # the other side is gone; the pair is being closed
        self.nbytes += nbytes
        if out.get_write_buffer_size():  # rule 4: it will be kept, so a copy
            out.write(budget.view[:nbytes].tobytes())
            budget.charge(self)
        else:
            out.write(budget.view[:nbytes])
            if out.get_write_buffer_size():
                budget.pinned(self)

    def _hold(self, data: bytes) -> None:
        """Bytes that came before the other side exists: keep them and stop reading (bounded by one read).

        A paused transport is the normal case; uvloop starts reading only after connection_made, so
        the pause asked for there lands after the first read.
        """
        self.nbytes += len(data)
        self.early.append(data)
        if self.transport is not None:
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        self.owner.side_eof(self)
        # Keep a TCP transport open: the other direction may still be flowing. A TLS transport cannot stay
        # half-open on either loop (both warn when asked to): it closes after close_notify (tls.py rule 2).
        return self.transport is None or self.transport.can_write_eof()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.stop(FULL)

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.go(FULL)

    def stop(self, why: int) -> bool:
        """Stop reading for `why`; True when that reason was not already set."""
        if self.stops & why:
            return False
        if not self.stops and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self.stops |= why
        return True

    def go(self, why: int) -> bool:
        """Drop reason `why`; read again once no reason is left. True when the reason was set."""
        if not self.stops & why:
            return False
        self.stops &= ~why
        if not self.stops and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return  # the pair already wrote this side off (a connect attempt cut short: connection.py)
        self.lost = True
        self.owner.side_lost(self, exc)


def set_socket_options(
    transport: asyncio.BaseTransport, *, keepalive: bool, buffer: int | None = None
) -> None:
    """TCP_NODELAY always (request/response latency), SO_KEEPALIVE and buffer sizes when asked.

    uvloop sets TCP_NODELAY itself, but asyncio only on sockets whose proto is IPPROTO_TCP, which
    accepted sockets are not (proto 0), so it is set here; tests/test_relay.py checks both sockets.
    `buffer` (socket_buffer) sets SO_SNDBUF and SO_RCVBUF, which turns the kernel's autotuning off for
    the socket: it bounds the kernel memory of a stalled connection (charged to the container on
    cgroup v2), at a cost in throughput over long paths.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    except OSError:
        pass  # the socket was reset between accept and here; the read path reports it


TCP_CLOSE = 7  # tcpi_state of a socket whose connection is over (linux/tcp_states.h)


def tcp_closed(transport: asyncio.BaseTransport | None) -> bool:
    """True when the kernel says the TCP connection under `transport` is over (reset by the peer).

    Needed for a side that sent FIN: the loop stops reading it, so a reset that follows goes unseen.
    One getsockopt; False for non-TCP sockets and wherever TCP_INFO is not available.
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if (
        sock is None
        or sock.family not in (socket.AF_INET, socket.AF_INET6)
        or not hasattr(socket, "TCP_INFO")
    ):
        return False
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE)
    except OSError:
        return False


def reset(transport: asyncio.Transport) -> None:
    """Close with RST rather than FIN, so the peer sees the failure the other side saw."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        except OSError:
            pass  # already dead: abort() below is all that is left to do
    transport.abort()
