"""Clients that stop reading (issue 17): ``python -m bench.stalled --clients 100,1000 [--limit 128M]``.

For each subject (the relay, HAProxy in mode tcp, socat with fork), side by side in one run:
a "firehose" target that sends as fast as it may, N clients that connect through the subject and never
read, and the subject's memory in a cgroup of its own (v1 memory controller): anon memory before, once
every firehose connection is blocked (nothing more can move), and after the clients left. With
``--limit`` the cgroup has that limit and the run says whether the subject was OOM-killed; the relay
also gets a second route to an echo server, and a client of it must be served while the others stall.

Everything runs in a network namespace made here (deleted on exit) whose TCP buffers are capped
(tcp_rmem/tcp_wmem 4096 16384 65536): kernel socket memory, which cgroup v1 does not charge, then stays
small, and only loopback inside that namespace carries traffic. Needs root and the v1 memory controller.

``drive`` is the part that runs inside the namespace; tests/test_memory.py runs it too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar, cast

from bench import proc
from bench.subjects import HAPROXY_CONF

REPO = Path(__file__).resolve().parent.parent
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
TCP_MEM = "4096 16384 65536"
CHUNK = b"x" * 65536
SUBJECTS = ("relay", "haproxy", "socat")


def unavailable() -> str:
    """Empty when this machine can run the measurement, else why not."""
    if os.geteuid() != 0:
        return "needs root (a network namespace and a memory cgroup)"
    if not (CGROUP_V1 / "memory.limit_in_bytes").exists():
        return "needs the cgroup v1 memory controller at /sys/fs/cgroup/memory"
    return ""


# --- the namespace and the cgroup (outside) ----------------------------------------------------------


def enter(netns: str) -> list[str]:
    """nsenter, not `ip netns exec`: that mounts a sysfs of its own, without /sys/fs/cgroup."""
    return ["nsenter", f"--net=/run/netns/{netns}"]


@contextlib.contextmanager
def namespace(tag: str, tcp_mem: str = TCP_MEM) -> Iterator[str]:
    """A network namespace with loopback up and TCP buffers capped (`default`: as the kernel has them);
    deleted on exit."""
    name = f"{tag}{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        for argv in (
            ["ip", "-n", name, "link", "set", "lo", "up"],
            [*enter(name), "sysctl", "-qw", f"net.ipv4.tcp_rmem={tcp_mem}"],
            [*enter(name), "sysctl", "-qw", f"net.ipv4.tcp_wmem={tcp_mem}"],
        ):
            if tcp_mem == "default" and "sysctl" in argv:
                continue
            subprocess.run(argv, check=True, timeout=10)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)


@contextlib.contextmanager
def memory_cgroup(tag: str, limit: int | None) -> Iterator[Path]:
    """A v1 memory cgroup (`limit`, no swap beyond it); on exit its processes are killed and it is removed."""
    path = CGROUP_V1 / f"{tag}{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    try:
        if limit is not None:
            (path / "memory.limit_in_bytes").write_text(str(limit))
            with contextlib.suppress(OSError):  # absent without swap accounting
                (path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        yield path
    finally:
        for _ in range(50):
            pids = [int(p) for p in (path / "cgroup.procs").read_text().split()]
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            path.rmdir()


# --- inside the namespace -----------------------------------------------------------------------------


@dataclass
class Result:
    subject: str
    clients: int
    limit: int | None
    idle: int = 0  # anon bytes of the subject's cgroup before any client
    stalled: int = 0  # ... with every client stalled and nothing moving
    peak: int = 0  # the cgroup's max usage (anon and cache) during the run
    after: int = 0  # anon bytes once the clients left
    settled: bool = False  # every firehose connection was blocked when `stalled` was read
    connected: int = 0  # clients that got through
    oom_kills: int = 0
    alive: bool = True
    echo_ms: float | None = None  # a client of the second route, served while the others stall (relay)
    buffered: int | None = None  # relay_buffered_bytes then (relay)
    kernel: int = 0  # bytes queued in the subject's own sockets (ss -tm: receive + send queues)
    log: list[str] = field(default_factory=list)

    @property
    def per_client(self) -> float:
        return (self.stalled - self.idle) / max(1, self.clients)


def anon(cgroup: Path) -> int:
    stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
    return int(stat["total_rss"]) + int(stat.get("total_rss_huge", 0))


def oom_kills(cgroup: Path) -> int:
    for line in (cgroup / "memory.oom_control").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


class Firehose(asyncio.Protocol):
    """Sends CHUNKs until its transport pauses it; counts connections that are blocked."""

    blocked: ClassVar[set[Firehose]] = set()
    open: ClassVar[set[Firehose]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.paused = False
        Firehose.open.add(self)
        self._send()

    def _send(self) -> None:
        while not self.paused and not self.transport.is_closing():
            self.transport.write(CHUNK)

    def pause_writing(self) -> None:
        self.paused = True
        Firehose.blocked.add(self)

    def resume_writing(self) -> None:
        self.paused = False
        Firehose.blocked.discard(self)
        asyncio.get_running_loop().call_soon(self._send)

    def connection_lost(self, exc: Exception | None) -> None:
        self.paused = True
        Firehose.blocked.discard(self)
        Firehose.open.discard(self)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def subject_argv(subject: str, listen: int, target: int, echo: int, metrics: int, workdir: Path) -> list[str]:
    if subject in ("relay", "relay-before"):
        default = f"{sys.executable} -m relay"
        command = os.environ.get("STALLED_BEFORE" if subject == "relay-before" else "STALLED_RELAY", default)
        return [
            *command.split(),
            "--ports",
            f"{listen}:{target},{echo}:{echo + 1}",
            "--target",
            "127.0.0.1",
            "--listen",
            "127.0.0.1",
            "--metrics",
            f"127.0.0.1:{metrics}",
            "--max-connections",
            "20000",
            "--app-watch",
            "off",
        ]
    if subject == "haproxy":
        conf = workdir / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(listen=listen, server=f"127.0.0.1:{target}"))
        return ["haproxy", "-db", "-f", str(conf)]
    return ["socat", f"tcp-listen:{listen},fork,reuseaddr,backlog=4096", f"tcp-connect:127.0.0.1:{target}"]


async def connect_idle(port: int, sem: asyncio.Semaphore, rcvbuf: int | None = None) -> socket.socket | None:
    """A client of 127.0.0.1:port that will never read (None if it could not connect)."""
    loop = asyncio.get_running_loop()
    async with sem:
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 10)
        except (OSError, TimeoutError):
            sock.close()
            return None
        return sock


async def _echo_ms(port: int) -> float | None:
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        writer.write(b"p" * 64)
        await asyncio.wait_for(reader.readexactly(64), 5)
        writer.close()
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None
    return (time.perf_counter() - start) * 1000


def kernel_bytes(listen: int, target: int) -> int:
    """Kernel memory of the subject's sockets: those on its listening port and those to the target
    (`ss -tmn`, skmem r + w: what was received and not read, what was written and not acknowledged)."""
    out = subprocess.run(["ss", "-tmnH"], capture_output=True, text=True, timeout=30, check=True).stdout
    total, mine = 0, False
    for line in out.splitlines():
        if "skmem:(" not in line:
            fields = line.split()
            mine = len(fields) >= 5 and (fields[3].endswith(f":{listen}") or fields[4].endswith(f":{target}"))
            continue
        if mine:
            mem = dict(
                (item.rstrip("0123456789"), int(item[len(item.rstrip("0123456789")) :]))
                for item in line.strip().removeprefix("skmem:(").removesuffix(")").split(",")
            )
            total += mem.get("r", 0) + mem.get("w", 0)
    return total


def _metric(port: int, name: str) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b"".join(iter(lambda: sock.recv(65536), b""))
    except OSError:
        return None
    for line in data.decode().splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return None


async def _settle(result: Result, cgroup: Path, child: subprocess.Popen[bytes], seconds: float) -> None:
    """Until every firehose connection is blocked at three looks in a row, or `seconds` pass."""
    deadline = time.monotonic() + seconds
    calm = 0
    while time.monotonic() < deadline and child.poll() is None:
        full = len(Firehose.open) >= result.connected and Firehose.blocked >= Firehose.open
        calm = calm + 1 if full else 0
        if calm >= 3:
            result.settled = True
            return
        await asyncio.sleep(0.25)


async def drive(subject: str, clients: int, cgroup: Path, limit: int | None, workdir: Path) -> Result:
    result = Result(subject, clients, limit)
    firehose = await asyncio.get_running_loop().create_server(Firehose, "127.0.0.1", 0, backlog=8192)
    target = firehose.sockets[0].getsockname()[1]
    listen, echo, metrics = proc.free_port(), proc.free_port(), proc.free_port()
    echo_server = await asyncio.get_running_loop().create_server(Echo, "127.0.0.1", echo + 1)
    argv = subject_argv(subject, listen, target, echo, metrics, workdir)
    procs = cgroup / "cgroup.procs"
    err = workdir / f"{subject}.stderr"
    with open(err, "wb") as log:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=lambda: procs.write_text(str(os.getpid())),  # joins before exec
        )
    socks: list[socket.socket] = []
    try:
        proc.wait_listening(child, listen, timeout=20)
        await asyncio.sleep(0.5)
        result.idle = anon(cgroup)
        sem = asyncio.Semaphore(64)
        got = await asyncio.gather(*(connect_idle(listen, sem) for _ in range(clients)))
        socks = [s for s in got if s is not None]
        result.connected = len(socks)
        await _settle(result, cgroup, child, seconds=60)
        result.stalled = anon(cgroup)
        result.kernel = kernel_bytes(listen, target)
        if subject.startswith("relay") and child.poll() is None:
            result.echo_ms = await _echo_ms(echo)
            result.buffered = _metric(metrics, "relay_buffered_bytes")
        for sock in socks:
            sock.close()
        socks = []
        deadline = time.monotonic() + 30
        while Firehose.open and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the relay gives memory back at its next budget tick (50 ms)
        result.after = anon(cgroup)
        result.peak = int((cgroup / "memory.max_usage_in_bytes").read_text())
        result.oom_kills = oom_kills(cgroup)
        result.alive = child.poll() is None
    finally:
        for sock in socks:
            sock.close()
        proc.stop(child)
        firehose.close()
        echo_server.close()
        result.log = err.read_text(errors="replace").splitlines()[-20:]
    return result


def _inside(args: argparse.Namespace) -> int:
    """`python -m bench.stalled --inside ...`: one subject, one count, in the namespace; JSON out."""
    workdir = Path(args.workdir)
    result = asyncio.run(drive(args.subject, args.clients, Path(args.cgroup), args.limit, workdir))
    print(json.dumps(asdict(result)))
    return 0


def measure(
    netns: str,
    subject: str,
    clients: int,
    limit: int | None,
    workdir: Path,
    relay: str | None = None,
    before: str | None = None,
) -> Result:
    """One subject with `clients` stalled clients, in `netns`, in a fresh memory cgroup."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, command in (("STALLED_RELAY", relay), ("STALLED_BEFORE", before)):
        if command is not None:
            env[name] = command
    with memory_cgroup("relay-stalled-", limit) as cgroup:
        argv = [
            *enter(netns),
            *(sys.executable, "-m", "bench.stalled", "--inside"),
            *("--subject", subject, "--clients", str(clients), "--cgroup", str(cgroup)),
            *("--workdir", str(workdir)),
            *(("--limit", str(limit)) if limit is not None else ()),
        ]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{subject} x{clients}: exit {out.returncode}: {out.stderr[-2000:]}")
    data = json.loads(out.stdout.splitlines()[-1])
    return Result(**data)


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    # Here, not at the top: the engine test imports this module where only bench/ is on the path.
    from relay.config import parse_size

    def size(text: str) -> int:
        return parse_size(text, 1 << 20, 1 << 40)

    p = argparse.ArgumentParser(prog="python -m bench.stalled", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="100,1000", help="stalled clients, comma-separated counts")
    p.add_argument("--subjects", default=",".join(SUBJECTS))
    p.add_argument(
        "--limit",
        type=size,
        help="memory limit of each subject's cgroup (e.g. 128M)",
    )
    p.add_argument(
        "--tcp-mem",
        default=TCP_MEM,
        help=f"tcp_rmem/tcp_wmem in the namespace (default {TCP_MEM!r}; or default)",
    )
    p.add_argument("--relay", help="command that starts the relay (default: python -m relay of this tree)")
    p.add_argument(
        "--before",
        help="also measure the relay started by this command (an earlier checkout) as subject relay-before",
    )
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--subject", help=argparse.SUPPRESS)
    p.add_argument("--cgroup", help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="/tmp", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inside:
        args.clients = int(args.clients)
        return _inside(args)
    if why := unavailable():
        print(f"skipped: {why}")
        return 0
    for sig in (signal.SIGTERM, signal.SIGINT):  # unwind the `with`s: cgroup and namespace removed
        signal.signal(sig, _stop)
    import tempfile

    mib = 1 << 20
    with tempfile.TemporaryDirectory() as tmp, namespace("rstall", args.tcp_mem) as netns:
        print(
            "| subject | clients | idle MiB | stalled MiB | MiB per client | after MiB | peak MiB | alive | "
            "OOM kills | echo ms | kernel MiB per client |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for count in (int(c) for c in args.clients.split(",")):
            names = [n for n in args.subjects.split(",") if n] + (["relay-before"] if args.before else [])
            for subject in names:
                r = measure(netns, subject, count, args.limit, Path(tmp), args.relay, args.before)
                echo = "-" if not subject.startswith("relay") else "failed"
                if r.echo_ms is not None:
                    echo = f"{r.echo_ms:.1f}"
                print(
                    f"| {subject} | {r.connected}/{count}{'' if r.settled else ' (not settled)'} | "
                    f"{r.idle / mib:.1f} | {r.stalled / mib:.1f} | {r.per_client / mib:.3f} | "
                    f"{r.after / mib:.1f} | {r.peak / mib:.1f} | {r.alive} | {r.oom_kills} | {echo} | "
                    f"{r.kernel / mib / max(1, r.connected):.3f} |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
