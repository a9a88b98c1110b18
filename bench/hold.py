"""Hold N relayed connections open: ``python -m bench.hold --connect H:P --server-port Q --count N``.

Runs an echo server on 127.0.0.1:Q (the relay's target) and opens N connections to H:P, at most
``--parallel`` connecting at once; each sends one byte and waits for its echo, so every connection
has crossed the relay both ways. Prints ``held N`` and keeps them open until stdin closes, SIGTERM,
or ``--max-seconds`` pass.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
import socket
import sys

WRITERS: set[asyncio.StreamWriter] = set()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    WRITERS.add(writer)
    with contextlib.suppress(OSError):
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    writer.close()
    WRITERS.discard(writer)


async def _open(host: str, port: int, sem: asyncio.Semaphore) -> socket.socket | None:
    loop = asyncio.get_running_loop()
    async with sem:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), 10)
            await loop.sock_sendall(sock, b"x")
            if await asyncio.wait_for(loop.sock_recv(sock, 1), 10) != b"x":
                raise ConnectionError("no echo")
        except (OSError, TimeoutError):
            sock.close()
            return None
        return sock


async def main(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    server = await asyncio.start_server(_echo, "127.0.0.1", args.server_port, backlog=4096)
    host, _, port = args.connect.rpartition(":")
    sem = asyncio.Semaphore(args.parallel)
    results = await asyncio.gather(*(_open(host, int(port), sem) for _ in range(args.count)))
    socks = [s for s in results if s is not None]
    print(f"held {len(socks)}", flush=True)
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_reader(sys.stdin.fileno(), done.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done.wait(), args.max_seconds)
    for s in socks:
        s.close()
    server.close()
    for w in list(WRITERS):  # end every echo task before the loop closes
        w.transport.abort()
    for _ in range(100):  # bounded: 1 s
        if not WRITERS:
            break
        await asyncio.sleep(0.01)
    return 0 if len(socks) == args.count else 1


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="hold N relayed connections open")
    p.add_argument("--connect", required=True)
    p.add_argument("--server-port", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--parallel", type=int, default=64)
    p.add_argument("--max-seconds", type=float, default=120.0)
    a = p.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.exit(asyncio.run(main(a)))
