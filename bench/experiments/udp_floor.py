"""How fast can a Python process forward UDP? The issue 10 round-trip targets against the floor.

``python -m bench.experiments.udp_floor [--reps 12] [--seconds 2] [--one-cpu]``

`sockperf ping-pong -m 64` (one datagram in flight) through socat `udp-listen,fork`, the relay, and two
forwarders with none of the relay's code, each about twenty lines: `uvloop` (a DatagramProtocol per
socket, as the relay's sessions) and `epoll` (select.epoll in a plain loop, no asyncio at all); plus
direct. Subjects interleaved, each started fresh per measurement; medians, and each subject's p50 per
repetition so the spread shows. `--one-cpu` runs everything on CPU 0: a round trip then pays context
switches instead of cross-CPU wake-ups, which isolates what each subject itself costs.

Raw records go to ``bench/results/udp-floor-<time>.jsonl``. Findings: bench/experiments/SPEED.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.udp import free_udp_port, pingpong, running

REPO = Path(__file__).resolve().parents[2]
SUBJECTS = ("socat", "relay", "uvloop", "epoll", "direct")
X = "\u00d7"


# --- the two floor forwarders (run as `python -m bench.experiments.udp_floor forward KIND L T`) ---------


def forward_uvloop(listen: int, target: int) -> None:
    import uvloop

    class Back(asyncio.DatagramProtocol):
        def __init__(self, front: Front, client: tuple[str, int]) -> None:
            self.front, self.client = front, client

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.front.transport.sendto(data, self.client)

    class Front(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.sessions: dict[tuple[str, int], asyncio.DatagramTransport] = {}
            self.opening: set[asyncio.Task[None]] = set()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            session = self.sessions.get(addr)
            if session is None:
                task = asyncio.ensure_future(self.open(data, addr))
                self.opening.add(task)
                task.add_done_callback(self.opening.discard)
            else:
                session.sendto(data)

        async def open(self, data: bytes, client: tuple[str, int]) -> None:
            loop = asyncio.get_running_loop()
            transport, _ = await loop.create_datagram_endpoint(
                lambda: Back(self, client), remote_addr=("127.0.0.1", target)
            )
            self.sessions[client] = transport
            transport.sendto(data)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(Front, local_addr=("127.0.0.1", listen))
        await asyncio.Event().wait()

    uvloop.run(main())


def forward_epoll(listen: int, target: int) -> None:
    front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    front.bind(("127.0.0.1", listen))
    poller = select.epoll()
    poller.register(front.fileno(), select.EPOLLIN)
    buffer = memoryview(bytearray(65536))
    sessions: dict[tuple[str, int], socket.socket] = {}
    backs: dict[int, tuple[socket.socket, tuple[str, int]]] = {}
    while True:
        for fd, _ in poller.poll():
            if fd == front.fileno():
                size, client = front.recvfrom_into(buffer)
                back = sessions.get(client)
                if back is None:
                    back = sessions[client] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    back.connect(("127.0.0.1", target))
                    backs[back.fileno()] = (back, client)
                    poller.register(back.fileno(), select.EPOLLIN)
                back.send(buffer[:size])
            else:
                back, client = backs[fd]
                size = back.recv_into(buffer)
                front.sendto(buffer[:size], client)


# --- the run ---------------------------------------------------------------------------------------------


def argv(subject: str, listen: int, target: int) -> list[str]:
    python = sys.executable
    if subject == "socat":
        return ["socat", f"udp-listen:{listen},fork,reuseaddr", f"udp:127.0.0.1:{target}"]
    if subject == "relay":
        ports, local = f"{listen}:{target}/udp", "127.0.0.1"
        return [
            python,
            "-m",
            "relay",
            "--ports",
            ports,
            "--target",
            local,
            "--listen",
            local,
            "--metrics",
            "off",
        ]
    return [python, "-m", "bench.experiments.udp_floor", "forward", subject, str(listen), str(target)]


def measure(subject: str, target: int, seconds: float, workdir: Path) -> dict[str, float]:
    if subject == "direct":
        return pingpong("127.0.0.1", target, seconds)
    listen = free_udp_port()
    with running(argv(subject, listen, target), listen, workdir / f"{subject}.stderr"):
        return pingpong("127.0.0.1", listen, seconds)


def main(args: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments.udp_floor", description=__doc__)
    p.add_argument("--reps", type=int, default=12)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--one-cpu", action="store_true", help="run every process on CPU 0")
    opts = p.parse_args(args)
    if opts.one_cpu:
        os.sched_setaffinity(0, {0})  # inherited by every process started from here
    out = REPO / "bench" / "results" / f"udp-floor-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {s: [] for s in SUBJECTS}
    load = os.getloadavg()[0]
    with open(out, "w") as raw, contextlib.chdir(REPO), tempfile.TemporaryDirectory() as tmp:
        workdir, target = Path(tmp), free_udp_port()
        server = ["sockperf", "sr", "-i", "127.0.0.1", "-p", str(target)]
        with running(server, target, workdir / "sockperf.stderr"):
            for rep in range(opts.reps):
                for subject in SUBJECTS:
                    got = measure(subject, target, opts.seconds, workdir)
                    results[subject].append(got)
                    raw.write(json.dumps({"subject": subject, "rep": rep, "values": got}) + "\n")
    socat = statistics.median(v["p50_us"] for v in results["socat"])
    cpus = "CPU 0 only" if opts.one_cpu else f"{os.cpu_count()} CPUs"
    print(
        f"{opts.reps} repetitions of {opts.seconds:g} s, {cpus}, load {load:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    print(f"{'subject':8} {'round trips/s':>13} {'p50 µs':>7} {'÷ socat':>7}  p50 by repetition")
    for subject, values in results.items():
        rate = statistics.median(v["rt_s"] for v in values)
        p50 = statistics.median(v["p50_us"] for v in values)
        reps = " ".join(f"{v['p50_us']:.0f}" for v in values)
        print(f"{subject:8} {rate:13,.0f} {p50:7.1f} {p50 / socat:6.2f}{X}  {reps}")
    print(f"raw: {out.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["forward"]:
        kind, listen, target = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        {"uvloop": forward_uvloop, "epoll": forward_epoll}[kind](listen, target)
    else:
        sys.exit(main())
