"""Prototype relay pumps measured against each other (issue 5).

Not the product (that is ``relay/pump.py``): three throwaway designs of the listener -> target pump,
each small enough to read in one go, all with the same guarantees:

* half-close passes through: EOF on one side becomes ``shutdown(SHUT_WR)`` on the other, and the
  opposite direction keeps flowing until it ends too;
* bounded buffering: at most ``high`` bytes (plus one read) wait in user space per direction,
  because the reader is paused while the writer is over its high-water mark;
* a reset or error on one side closes the other.

Designs:

``protocol``  asyncio.Protocol, ``data_received`` -> ``peer.write``; ``pause_writing`` pauses the peer.
``buffered``  asyncio.BufferedProtocol reading into one preallocated buffer shared by every
              connection of the loop (the read is consumed synchronously, so one buffer is enough);
              when the peer transport keeps a reference to it (a partial write), the shared buffer
              is replaced so the kept bytes are never overwritten (``--recycle`` reuses old ones).
``splice``    raw non-blocking sockets driven by ``add_reader``/``add_writer``; bytes move
              socket -> pipe -> socket with ``os.splice`` and never enter user space. Pipes come
              from a per-loop pool and go back once drained, so idle connections hold no pipe.

Run: ``python bench/experiments/pumps.py --design splice --loop uvloop --listen 9000 --target 9001``.
Prints ``ready`` on stderr once listening; SIGTERM exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any, cast

LISTEN_BACKLOG = 1024


def _nodelay(sock: Any) -> None:
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# --------------------------------------------------------------------------------------------
# (a) asyncio.Protocol
# --------------------------------------------------------------------------------------------


class _Half:
    """Behaviour shared by both transport designs; ``peer`` is the other socket of the pair."""

    __slots__ = ("early", "eof", "high", "low", "peer", "starter", "transport")
    transport: asyncio.Transport | None
    peer: Any
    eof: bool
    high: int
    low: int
    starter: Callable[[_Half], None] | None
    early: bytes

    def __init__(self, high: int, low: int) -> None:
        self.transport = None
        self.peer = None
        self.eof = False
        self.high = high
        self.low = low
        self.starter = None
        self.early = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not registered subclasses
        self.transport = transport
        transport.set_write_buffer_limits(self.high, self.low)  # TCP_NODELAY: both loops set it already
        if self.starter is not None:  # accepted side: connect to the target
            # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; accepted ones
            # have proto 0 (uvloop sets it on every TCP transport).
            _nodelay(transport.get_extra_info("socket"))
            # uvloop ignores pause_reading() here (it starts reading after connection_made),
            # so bytes can arrive before the peer exists: ``keep_early`` holds them.
            transport.pause_reading()
            self.starter(self)

    def keep_early(self, data: bytes) -> None:
        self.early += data
        self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None:  # not connected yet: _connect_pair forwards it
            return True
        if peer.eof:
            self.transport.close()  # type: ignore[union-attr]
            peer.transport.close()
            return False
        peer.transport.write_eof()
        return True

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()


class Side(_Half, asyncio.Protocol):
    """(a) One socket of a relayed pair; what it reads goes to ``peer``'s transport."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None:
            self.keep_early(data)
            return
        peer.transport.write(data)


class SharedBuffer:
    """One read buffer for every connection of a loop (reads are consumed synchronously).

    When a transport keeps a view of the buffer (a partial write on uvloop), the buffer is set aside
    and another one used; a set-aside buffer is reused once nothing exports it any more (a bytearray
    cannot be resized while exported: the resize probe raises BufferError). With ``recycle`` off a
    fresh buffer is allocated each time (the default: recycling measured no faster).
    """

    __slots__ = ("allocated", "buf", "pinned", "recycle", "renewals", "size", "view")

    def __init__(self, size: int, recycle: bool = False) -> None:
        self.size = size
        self.recycle = recycle
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.pinned: list[bytearray] = []
        self.renewals = 0
        self.allocated = 1

    def renew(self) -> None:
        self.renewals += 1
        old = self.buf
        if self.recycle:
            for i, ba in enumerate(self.pinned):
                try:
                    ba.append(0)  # raises while the transport still holds a view
                except BufferError:
                    continue
                ba.pop()
                del self.pinned[i]
                self._use(ba)
                if len(self.pinned) < 8:
                    self.pinned.append(old)
                return
            if len(self.pinned) < 8:
                self.pinned.append(old)
        self.allocated += 1
        self._use(bytearray(self.size))

    def _use(self, ba: bytearray) -> None:
        self.buf = ba
        self.view = memoryview(ba)


class BufferedSide(_Half, asyncio.BufferedProtocol):
    """(b) Like ``Side`` but the loop reads straight into the shared preallocated buffer."""

    __slots__ = ("pool",)

    def __init__(self, high: int, low: int, pool: SharedBuffer) -> None:
        super().__init__(high, low)
        self.pool = pool

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.pool.view

    def buffer_updated(self, nbytes: int) -> None:
        pool = self.pool
        if self.peer is None:
            self.keep_early(pool.view[:nbytes].tobytes())
            return
        out = self.peer.transport
        if out.get_write_buffer_size():
            out.write(pool.view[:nbytes].tobytes())
            return
        out.write(pool.view[:nbytes])
        if out.get_write_buffer_size():
            pool.renew()  # the transport kept a view of the buffer: never overwrite it


async def _connect_pair(
    loop: asyncio.AbstractEventLoop,
    client: _Half,
    factory: Callable[[], _Half],
    target: tuple[str, int],
) -> None:
    assert client.transport is not None
    try:
        _, upstream = await loop.create_connection(factory, *target)  # type: ignore[type-var]
    except OSError:
        client.transport.abort()
        return
    client.peer = upstream
    upstream.peer = client
    if client.transport.is_closing():
        upstream.transport.close()  # type: ignore[union-attr]
        return
    if client.early:
        upstream.transport.write(client.early)  # type: ignore[union-attr]
        client.early = b""
    if client.eof:
        upstream.transport.write_eof()  # type: ignore[union-attr]
    else:
        client.transport.resume_reading()


async def serve_transports(
    design: str,
    listen: tuple[str, int],
    target: tuple[str, int],
    high: int,
    low: int,
    bufsize: int,
    recycle: bool = False,
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    pool = SharedBuffer(bufsize, recycle)

    def make() -> _Half:
        return Side(high, low) if design == "protocol" else BufferedSide(high, low, pool)

    def start(side: _Half) -> None:
        task = loop.create_task(_connect_pair(loop, side, make, target))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def accepted() -> asyncio.BaseProtocol:
        side = make()
        side.starter = start
        return side  # type: ignore[return-value]

    return await loop.create_server(accepted, *listen, backlog=LISTEN_BACKLOG, reuse_address=True)


# --------------------------------------------------------------------------------------------
# (c) os.splice through a pipe
# --------------------------------------------------------------------------------------------

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class PipePool:
    """Empty pipes to lend to a direction while it has bytes in flight."""

    __slots__ = ("created", "free", "keep", "size")

    def __init__(self, size: int, keep: int = 64) -> None:
        self.size = size
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.created = 0

    def take(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.size != 65536:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, F_SETPIPE_SZ, self.size)
        self.created += 1
        return r, w

    def give(self, pipe: tuple[int, int]) -> None:
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])


class SpliceDirection:
    """src -> pipe -> dst. Reads only while the pipe is empty: at most one pipe-full in flight."""

    __slots__ = ("chunk", "conn", "dst", "eof", "loop", "pending", "pipe", "pool", "src", "writing")

    def __init__(self, conn: SpliceConn, src: int, dst: int, pool: PipePool) -> None:
        self.loop = conn.loop
        self.conn = conn
        self.src = src
        self.dst = dst
        self.pool = pool
        self.chunk = pool.size
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        self.eof = False
        self.writing = False

    def start(self) -> None:
        self.loop.add_reader(self.src, self.on_readable)

    def on_readable(self) -> None:
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = self.pool.take()
        try:
            n = os.splice(self.src, pipe[1], self.chunk, flags=SPLICE_FLAGS)
        except BlockingIOError:
            self._release_pipe()
            return
        except OSError:
            self.conn.abort()
            return
        if n == 0:
            self.loop.remove_reader(self.src)
            self.eof = True
            self._release_pipe()
            self._forward_eof()
            return
        self.pending = n
        self._flush()

    def on_writable(self) -> None:
        self._flush()

    def _flush(self) -> None:
        pipe = self.pipe
        assert pipe is not None
        while self.pending:
            try:
                m = os.splice(pipe[0], self.dst, self.pending, flags=SPLICE_FLAGS)
            except BlockingIOError:
                if not self.writing:
                    self.writing = True
                    self.loop.remove_reader(self.src)
                    self.loop.add_writer(self.dst, self.on_writable)
                return
            except OSError:
                self.conn.abort()
                return
            self.pending -= m
        self._release_pipe()
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst)
            self.loop.add_reader(self.src, self.on_readable)

    def _release_pipe(self) -> None:
        if self.pipe is not None and not self.pending:
            self.pool.give(self.pipe)
            self.pipe = None

    def _forward_eof(self) -> None:
        try:
            _shutdown_wr(self.dst)
        except OSError:
            self.conn.abort()
            return
        self.conn.direction_done()

    def stop(self) -> None:
        if not self.eof:
            self.loop.remove_reader(self.src)
        if self.writing:
            self.loop.remove_writer(self.dst)
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None


def _shutdown_wr(fd: int) -> None:
    s = socket.socket(fileno=fd)
    try:
        s.shutdown(socket.SHUT_WR)
    finally:
        s.detach()


class SpliceConn:
    __slots__ = ("a", "b", "closed", "conns", "done", "down", "loop", "up")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        a: socket.socket,
        b: socket.socket,
        pool: PipePool,
        conns: set[SpliceConn],
    ) -> None:
        self.loop = loop
        self.a = a
        self.b = b
        self.conns = conns
        self.closed = False
        self.done = 0
        self.up = SpliceDirection(self, a.fileno(), b.fileno(), pool)
        self.down = SpliceDirection(self, b.fileno(), a.fileno(), pool)

    def start(self) -> None:
        self.conns.add(self)
        self.up.start()
        self.down.start()

    def direction_done(self) -> None:
        self.done += 1
        if self.done == 2:
            self.close()

    def abort(self) -> None:
        for s in (self.a, self.b):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.stop()
        self.down.stop()
        self.a.close()
        self.b.close()
        self.conns.discard(self)


class SpliceServer:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int], pipe_size: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.target = target
        self.pool = PipePool(pipe_size)
        self.conns: set[SpliceConn] = set()
        self.connecting: dict[int, tuple[socket.socket, socket.socket]] = {}
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(listen)
        self.lsock.listen(LISTEN_BACKLOG)
        self.lsock.setblocking(False)
        self.loop.add_reader(self.lsock.fileno(), self.on_accept)

    def on_accept(self) -> None:
        for _ in range(64):
            try:
                client, _addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and friends: keep serving
                return
            client.setblocking(False)
            _nodelay(client)
            up = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            up.setblocking(False)
            _nodelay(up)
            err = up.connect_ex(self.target)
            if err not in (0, errno.EINPROGRESS):
                client.close()
                up.close()
                continue
            self.connecting[up.fileno()] = (client, up)
            self.loop.add_writer(up.fileno(), self.on_connected, up.fileno())

    def on_connected(self, fd: int) -> None:
        self.loop.remove_writer(fd)
        client, up = self.connecting.pop(fd)
        if up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            client.close()
            up.close()
            return
        SpliceConn(self.loop, client, up, self.pool, self.conns).start()

    def close(self) -> None:
        self.loop.remove_reader(self.lsock.fileno())
        self.lsock.close()
        for conn in list(self.conns):
            conn.close()


# --------------------------------------------------------------------------------------------


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def amain(args: argparse.Namespace) -> None:
    listen = ("127.0.0.1", args.listen)
    target = (args.target_host, args.target)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if args.design == "splice":
        server = SpliceServer(listen, target, args.bufsize)
        print("ready", file=sys.stderr, flush=True)
        await stop.wait()
        server.close()
    else:
        srv = await serve_transports(
            args.design, listen, target, args.high, args.low, args.bufsize, recycle=args.recycle
        )
        print("ready", file=sys.stderr, flush=True)
        await stop.wait()
        srv.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--design", choices=["protocol", "buffered", "splice"], required=True)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--target", type=int, required=True)
    p.add_argument("--target-host", default="127.0.0.1")
    p.add_argument("--bufsize", type=int, default=256 * 1024, help="shared read buffer / pipe size")
    p.add_argument("--high", type=int, default=256 * 1024, help="transport write-buffer high-water mark")
    p.add_argument("--low", type=int, default=64 * 1024, help="transport write-buffer low-water mark")
    p.add_argument("--recycle", action="store_true", help="buffered: reuse set-aside buffers once unpinned")
    args = p.parse_args()
    raise_nofile()
    if args.loop == "uvloop":
        import uvloop

        uvloop.run(amain(args))
    else:
        asyncio.run(amain(args))


if __name__ == "__main__":
    main()
