"""Moving bytes from one socket of a relayed pair to the other.

Rules this module keeps:
1. Order and completeness: every byte read from one side is handed to the other side's transport, in
   order, before the next read on that side. Nothing is dropped while the other side is open.
2. Bounded memory: when a transport's write buffer passes its high-water mark the loop calls
   `pause_writing` on its protocol, which stops reading the *other* side until `resume_writing`.
   So each direction holds at most HIGH_WATER + one read (256 + 256 KiB), whatever the sender does.
3. Half-close passes through: EOF read on one side becomes `write_eof()` (FIN) on the other, and the
   opposite direction keeps flowing. The pair (connection.py) decides when both directions are done.
4. Memory follows what is in flight: the loop reads into its own buffer (256 KiB) and hands over a
   bytes object of exactly the size read, which is written on at once; only what the other side cannot
   take yet stays allocated. An idle connection holds no buffer.

A plain Protocol, not a BufferedProtocol into a shared buffer: measured level on throughput at the same
read size and ahead on connections per second (docs/benchmarks.md, pump experiments), and uvloop may keep
a view of a written buffer, which a shared read buffer would then overwrite.

The hot path (`data_received`) does a counter add and one write: no logging, no metrics calls.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Protocol, cast

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
LINGER_RST = struct.pack("ii", 1, 0)


class Owner(Protocol):
    """What a side reports to the pair that owns it."""

    def side_made(self, side: Side) -> None: ...
    def side_eof(self, side: Side) -> None: ...
    def side_lost(self, side: Side, exc: Exception | None) -> None: ...


class Side(asyncio.Protocol):
    """One socket of a pair: what it reads is written to `out`, the other socket's transport."""

    __slots__ = ("early", "eof", "lost", "nbytes", "out", "owner", "transport")

    def __init__(self, owner: Owner) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.out: asyncio.Transport | None = None
        self.nbytes = 0
        self.eof = False
        self.lost = False
        self.early: list[bytes] = []  # read before `out` existed; the pair writes it first

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport but have its methods.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        self.owner.side_made(self)

    def data_received(self, data: bytes) -> None:
        out = self.out
        if out is None:
            self._hold(data)
            return
        if out.is_closing():
            return  # the other side is gone; the pair is being closed
        self.nbytes += len(data)
        out.write(data)

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
        peer = self.out
        if peer is not None:
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.out
        if peer is not None and not peer.is_closing():
            peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return  # the pair already wrote this side off (a connect attempt cut short: connection.py)
        self.lost = True
        self.owner.side_lost(self, exc)


def set_socket_options(transport: asyncio.BaseTransport, *, keepalive: bool) -> None:
    """TCP_NODELAY always (request/response latency), SO_KEEPALIVE when asked.

    uvloop sets TCP_NODELAY itself, but asyncio only on sockets whose proto is IPPROTO_TCP, which
    accepted sockets are not (proto 0), so it is set here; tests/test_relay.py checks both sockets.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if keepalive:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
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
