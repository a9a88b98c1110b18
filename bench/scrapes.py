"""Scrapes against relayed traffic (issue 17): ``python -m bench.scrapes --routes 1000 [--form range]``.

Starts a relay (``python -m relay`` from ``--tree``, default this checkout) forwarding ``--routes``
loopback ports to an echo server, as one PORTS range item (``range``) or as that many single items
(``single``: one metrics series each, the worst case). Prints the time and size of a scrape (median of
5), then the round-trip time of 64-byte messages through the relay for ``--seconds``, first with no
scrapes, then while a child process scrapes ``--rate`` times a second. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import proc

REPO = Path(__file__).resolve().parent.parent


def get(port: int, path: str = "/metrics") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        chunks = []
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
    return b"".join(chunks).partition(b"\r\n\r\n")[2]


def scraper(port: int, rate: float, seconds: float) -> None:
    """The child: scrape `rate` times a second (or as fast as the relay answers) for `seconds`."""
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        get(port)
        time.sleep(max(0.0, 1 / rate - (time.monotonic() - now)))


def free_block(count: int) -> int:
    """The first of `count` consecutive ports free on 127.0.0.1 now, below the ephemeral range."""
    for base in range(12000, 32768 - count, 1000):
        socks = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError(f"no {count} free consecutive ports")


async def round_trips(port: int, seconds: float) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    message, times = b"x" * 64, []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        writer.write(message)
        await reader.readexactly(len(message))
        times.append(time.perf_counter() - start)
    writer.close()
    return times


ECHOES: set[asyncio.Task[None]] = set()  # the echo handlers: waited for once the relay is stopped


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    task = asyncio.current_task()
    assert task is not None
    ECHOES.add(task)
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()
    ECHOES.discard(task)


def summary(times: list[float]) -> str:
    ordered = sorted(times)
    p99 = ordered[int(len(ordered) * 0.99)] * 1000
    return (
        f"p50 {statistics.median(ordered) * 1000:.2f} ms, p99 {p99:.2f} ms, max {ordered[-1] * 1000:.1f} ms"
    )


async def main(args: argparse.Namespace) -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    base, metrics = free_block(args.routes), proc.free_port()
    last = base + args.routes - 1
    ports = (
        f"{base}-{last}:{target}"
        if args.form == "range"
        else " ".join(f"{p}:{target}" for p in range(base, last + 1))
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(args.tree),
        "RELAY_PORTS": ports,
        "RELAY_TARGET": "127.0.0.1",
        "RELAY_LISTEN": "127.0.0.1",
        "RELAY_METRICS": f"127.0.0.1:{metrics}",
        "RELAY_LOG_LEVEL": "warning",
    }
    child = subprocess.Popen(  # in the tree: `-m` puts the working directory first on the path
        [sys.executable, "-m", "relay"],
        env=env,
        cwd=args.tree,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    try:
        proc.wait_listening(child, metrics, timeout=120)
        proc.wait_listening(child, last, timeout=120)
        sizes, durations = [], []
        for _ in range(5):
            start = time.perf_counter()
            body = await asyncio.to_thread(get, metrics)
            durations.append(time.perf_counter() - start)
            sizes.append(len(body))
        series = body.count(b"relay_connections_accepted_total{")
        print(
            f"{args.tree.name} {args.routes} routes ({args.form}): scrape "
            f"{statistics.median(durations) * 1000:.0f} ms, {statistics.median(sizes) / 1e6:.3f} MB, "
            f"{series} series"
        )
        print(f"  RTT, no scrapes: {summary(await round_trips(base, args.seconds))}")
        scraping = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.scrapes",
                "--scraper",
                str(metrics),
                "--rate",
                str(args.rate),
                "--seconds",
                str(args.seconds + 2),
            ],
            cwd=REPO,
        )
        try:
            await asyncio.sleep(1.0)  # the scrapes are under way
            print(f"  RTT, {args.rate:g} scrapes/s: {summary(await round_trips(base, args.seconds))}")
        finally:
            scraping.kill()
            scraping.wait()
    finally:
        proc.stop(child)
        server.close()
        if ECHOES:
            await asyncio.wait(ECHOES, timeout=5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--routes", type=int, default=1000)
    parser.add_argument("--form", choices=("single", "range"), default="single")
    parser.add_argument("--tree", type=Path, default=REPO, help="the checkout whose relay runs")
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--scraper", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.scraper:
        scraper(args.scraper, args.rate, args.seconds)
    else:
        asyncio.run(main(args))
