"""UDP listener to a TCP target, as socat's `UDP-LISTEN:514,fork TCP:collector:601` (syslog to a TCP
collector): a session per client address, holding one TCP connection to the target.

Rules (on top of relay/udp.py's, which own the listener, the session table, the limits and the sweep):
1. Each datagram is written to the client's TCP connection as it is: no framing, no separator, as socat
   writes what it read. What the target sends back leaves as datagrams to the client, at most
   DATAGRAM_BYTES each (socat's read size, its -b default), in order.
2. The TCP side is pump.py's Side, so reading the target, half-close and write-buffer limits work as for
   a TCP pair; the client "transport" it writes to is this session (`write`), which turns bytes into
   datagrams. A UDP client cannot be paused: while the target's write buffer is above HIGH_WATER,
   datagrams are dropped and counted (`buffer`), as udp.py drops what cannot be sent at once.
3. Until the connection is made, datagrams wait (at most EARLY_DATAGRAMS, udp.py rule 3); a connect that
   fails drops them (`unreachable`/`unresolved`) and ends the session: the client's next datagram
   opens a new one.
4. The session ends when the target closes or resets its connection, when the session is idle
   (udp_idle_timeout, udp.py rule 4: the TCP connection is then closed with FIN), or with the listener.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

from relay.pump import HIGH_WATER, Side
from relay.udp import EARLY_DATAGRAMS, Address, Session, UdpListener, UdpRoute
from relay.upstream import ResolveError

DATAGRAM_BYTES = 8192


class StreamSession(Session):
    """One client address of a UDP route with a TCP target: udp.Session's bookkeeping, a TCP side."""

    __slots__ = ("side", "task")

    def __init__(self, udp: UdpRoute, listener: UdpListener, client: Address) -> None:
        super().__init__(udp, listener, client)
        self.side = Side(self, udp.hub.shared.budget)
        self.side.out = self  # type: ignore[assignment]  # rule 2: this session is the client's transport
        self.task: asyncio.Task[None] | None = None

    # --- the hot path -------------------------------------------------------------------------------------

    def to_target(self, data: bytes) -> None:
        if self.seen != self.hub.tick:
            self.hub.touch(self)
        transport = self.side.transport
        if transport is None or self.task is not None:
            if len(self.early) < EARLY_DATAGRAMS:
                self.early.append(data)
            else:
                self.stats.dropped["buffer"] += 1
        elif transport.get_write_buffer_size() > HIGH_WATER or transport.is_closing():
            self.stats.dropped["buffer"] += 1
        else:
            self.stats.datagrams_c2t += 1
            self.stats.bytes_c2t += len(data)
            transport.write(data)

    def write(self, data: bytes | memoryview) -> None:
        """Bytes from the target (the Side's `out.write`): to the client as datagrams (rule 1). `data` may
        be a view of the pump's shared buffer, so each datagram is a copy (a transport may keep it)."""
        if self.seen != self.hub.tick:
            self.hub.touch(self)
        out = self.listener.transport
        if out is None or self.listener.closed:
            return
        for start in range(0, len(data), DATAGRAM_BYTES):
            if out.get_write_buffer_size():
                self.stats.dropped["buffer"] += 1
                continue
            piece = bytes(data[start : start + DATAGRAM_BYTES])
            self.stats.datagrams_t2c += 1
            self.stats.bytes_t2c += len(piece)
            out.sendto(piece, self.client)

    # --- what the Side calls on its "other transport" (rule 2) --------------------------------------------

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0  # datagrams are sent or dropped, never kept (rule 1)

    def pause_reading(self) -> None:
        """A UDP client cannot be paused: to_target drops past HIGH_WATER instead."""

    def resume_reading(self) -> None:
        pass

    # --- the Side's owner ---------------------------------------------------------------------------------

    def side_made(self, side: Side) -> None:
        pass

    def side_eof(self, side: Side) -> None:
        self.close()  # the target is done: nothing can reach the client any more (rule 4)

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        self.close()

    # --- opening and closing -------------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._open())

    async def _open(self) -> None:
        udp = self.udp
        config = udp.hub.shared.config
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(config.connect_timeout):
                resolution = await udp.resolver.resolve()
                await udp.resolver.open(loop, self._side, resolution.addresses, udp.route.target_port)
        except (ResolveError, TimeoutError, OSError) as err:
            self.task = None
            self._connect_failed(err)
            return
        self.task = None
        if self.closed:
            return
        early, self.early = self.early, deque()
        for data in early:
            self.to_target(data)

    def _side(self) -> Side:
        return self.side

    def _connect_failed(self, err: BaseException) -> None:
        """Rule 3: counted as the datagrams it drops, logged at a limited rate, the session ends."""
        udp = self.udp
        self.failure = "unresolved" if isinstance(err, ResolveError | TimeoutError) else "unreachable"
        if self.failure == "unreachable":
            udp.resolver.failed()
        self.stats.dropped[self.failure] += max(1, len(self.early))
        udp.hub.shared.warnings.warning(
            f"udp_tcp_open:{udp.route.name}",
            f"{udp.route.name}: cannot connect to the TCP target: {err}",
            route=udp.route.name,
        )
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.early.clear()
        task, self.task = self.task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        transport = self.side.transport
        if transport is not None and not self.side.lost:
            transport.close()  # FIN after what is buffered (rule 4)
        self.side.owner = _GONE
        self.udp.session_ended(self)


class _Gone:
    """The owner of a closed session's side: a connection made after the close is closed at once; other
    late events have nothing left to do."""

    def side_made(self, side: Side) -> None:
        if side.transport is not None:
            side.transport.abort()

    def side_eof(self, side: Side) -> None:
        pass

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        pass


_GONE: Any = _Gone()
