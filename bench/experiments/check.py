"""Correctness of a relay under test: checksums both ways, half-close, bounded buffering, resets.

``python -m bench.experiments.check -- CMD...`` where CMD contains ``{listen}`` and ``{target}``
(ports on 127.0.0.1), e.g. ``python bench/experiments/pumps.py --design splice --listen {listen}
--target {target}``. Prints one line per check and a JSON summary; exits 1 if any check fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from bench import proc

MiB = 1024 * 1024
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _drain_hash(reader: asyncio.StreamReader) -> tuple[int, str]:
    h = hashlib.sha256()
    n = 0
    while chunk := await reader.read(256 * 1024):
        h.update(chunk)
        n += len(chunk)
    return n, h.hexdigest()


def _payload(seed: int, size: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(8, "big")).digest(size)


class Target:
    """The relay's target: a server whose behaviour each check swaps in."""

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        async def dispatch(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            assert self.handler is not None
            try:
                await self.handler(r, w)
            finally:
                w.close()

        self.server = await asyncio.start_server(dispatch, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


async def check_checksums(t: Target, port: int, streams: int = 8, size: int = 8 * MiB) -> dict[str, object]:
    """Each stream: client sends ``size`` bytes up while the server sends ``size`` down; both hashed."""
    got_up: dict[int, tuple[int, str]] = {}

    async def server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        seed_line = await r.readexactly(8)
        seed = int.from_bytes(seed_line, "big")

        async def send() -> None:
            w.write(_payload(seed + 1000, size))
            await w.drain()
            w.write_eof()

        sender = asyncio.create_task(send())
        got_up[seed] = await _drain_hash(r)
        await sender

    t.handler = server

    async def client(seed: int) -> bool:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        up = _payload(seed, size)

        async def send() -> None:
            w.write(seed.to_bytes(8, "big") + up)
            await w.drain()
            w.write_eof()

        sender = asyncio.create_task(send())
        down = await _drain_hash(r)
        await sender
        w.close()
        exp_down = (size, hashlib.sha256(_payload(seed + 1000, size)).hexdigest())
        for _ in range(100):  # the server may still be hashing
            if seed in got_up:
                break
            await asyncio.sleep(0.01)
        return down == exp_down and got_up.get(seed) == (size, hashlib.sha256(up).hexdigest())

    ok = await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(streams))), 60)
    return {"ok": all(ok), "streams": streams, "bytes_each_way": size}


async def check_half_close(t: Target, port: int, delay: float = 1.0) -> dict[str, object]:
    """Client sends then shuts its write side; the server answers ``delay`` s after the EOF."""
    reply = _payload(7, 200_000)

    async def server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()  # to EOF
        await asyncio.sleep(delay)
        w.write(reply)
        await w.drain()

    t.handler = server
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"request")
    w.write_eof()
    got = await asyncio.wait_for(r.read(), 10 + delay)
    w.close()
    return {"ok": got == reply, "reply_bytes": len(got), "delay_s": delay}


async def check_bounded(t: Target, port: int, relay_pid: int) -> dict[str, object]:
    """The target stops reading; the client pushes until blocked. Relay RSS must not grow with it.

    Then the target reads everything: the bytes arrive complete and in order.
    """
    release = asyncio.Event()
    received: list[tuple[int, str]] = []
    readers: list[asyncio.StreamReader] = []

    async def server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.transport.pause_reading()  # type: ignore[attr-defined]
        readers.append(r)
        await release.wait()
        w.transport.resume_reading()  # type: ignore[attr-defined]
        received.append(await _drain_hash(r))

    t.handler = server
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    rss0 = proc.tree_memory(relay_pid)[0]
    h = hashlib.sha256()
    sent = 0
    chunk = _payload(3, 1 * MiB)
    deadline = time.monotonic() + 20
    stalled_since: float | None = None
    peak = rss0
    while time.monotonic() < deadline:  # push until 0.5 s without progress (bounded by 20 s)
        try:
            n = sock.send(chunk)
        except BlockingIOError:
            n = 0
        if n:
            h.update(chunk[:n])
            sent += n
            stalled_since = None
        else:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break
            await asyncio.sleep(0.01)
            peak = max(peak, proc.tree_memory(relay_pid)[0])
    peak = max(peak, proc.tree_memory(relay_pid)[0])
    in_kernel = kernel_queued({port, t.port})
    in_target = len(getattr(readers[0], "_buffer", b"")) if readers else 0
    held = sent - in_kernel - in_target  # what the relay holds: user space, or its pipes
    release.set()
    sock.setblocking(True)
    await loop.run_in_executor(None, sock.shutdown, socket.SHUT_WR)
    for _ in range(2000):
        if received:
            break
        await asyncio.sleep(0.01)
    sock.close()
    intact = bool(received) and received[0] == (sent, h.hexdigest())
    growth = peak - rss0
    return {
        "ok": intact and held <= MiB and growth <= 2 * MiB,
        "relay_held_bytes": held,
        "pushed_bytes": sent,
        "in_socket_queues": in_kernel,
        "rss_growth_bytes": growth,
        "intact": intact,
    }


def kernel_queued(ports: set[int]) -> int:
    """Bytes in the send and receive queues of every non-listening TCP socket touching ``ports``."""
    total = 0
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                local = int(fields[1].rsplit(":", 1)[1], 16)
                remote = int(fields[2].rsplit(":", 1)[1], 16)
                if fields[3] != proc.TCP_LISTEN and (local in ports or remote in ports):
                    tx, rx = fields[4].split(":")
                    total += int(tx, 16) + int(rx, 16)
    return total


async def check_reset(t: Target, port: int) -> dict[str, object]:
    """The target resets the connection: the client sees its connection end within 2 s."""

    async def server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        s = w.get_extra_info("socket")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        w.transport.abort()

    t.handler = server
    r, w = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    ended = True
    try:
        await asyncio.wait_for(r.read(), 2)
    except ConnectionError:
        pass
    except TimeoutError:
        ended = False
    w.close()
    return {"ok": ended, "seconds": round(time.monotonic() - start, 3)}


async def main(cmd: list[str]) -> int:
    t = Target()
    await t.start()
    listen = proc.free_port()
    argv = [a.format(listen=listen, target=t.port) for a in cmd]
    results: dict[str, dict[str, object]] = {}
    with proc.running(argv, listen) as p:
        checks: list[tuple[str, Callable[[], Awaitable[dict[str, object]]]]] = [
            ("checksums", lambda: check_checksums(t, listen)),
            ("half_close", lambda: check_half_close(t, listen)),
            ("bounded", lambda: check_bounded(t, listen, p.pid)),
            ("reset", lambda: check_reset(t, listen)),
        ]
        for name, fn in checks:
            try:
                results[name] = await fn()
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                results[name] = {"ok": False, "error": repr(exc)}
            print(name, json.dumps(results[name]), flush=True)
        alive = p.poll() is None
    results["alive"] = {"ok": alive}
    print(json.dumps({"cmd": " ".join(cmd), "results": results}))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--"]:
        args = args[1:]
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(main(args)))
    os._exit(130)
