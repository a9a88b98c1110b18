"""Processes the benchmark starts: spawn in their own session, wait until listening, always kill.

Readiness is read from ``/proc/PID/net/tcp{,6}`` (the listening sockets of the process's network
namespace), so no probe connection ever reaches a server that would count it (iperf3, sockperf).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

TCP_LISTEN = "0A"
RUN_ENV = "RELAY_BENCH_RUN"  # every process started here carries it: leftovers can be found by it
RUN_ID = os.environ.get(RUN_ENV) or f"{os.getpid()}-{time.time_ns()}"
ENV = {**os.environ, RUN_ENV: RUN_ID}


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel just handed out and released (a tiny race, fine on a quiet loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _same_netns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/net") == os.readlink("/proc/self/ns/net")
    except OSError:
        return False


def _diag_listening(family: int) -> set[int]:
    """Listening TCP ports of this network namespace via NETLINK_SOCK_DIAG (listeners only)."""
    nlmsg_done, nlmsg_error = 3, 2
    sock_diag_by_family = 20
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 1 << 10)  # states: TCP_LISTEN
    req += b"\0" * 48  # inet_diag_sockid: any
    msg = struct.pack("=IHHII", 16 + len(req), sock_diag_by_family, 0x301, 1, 0) + req  # REQUEST|DUMP
    ports: set[int] = set()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
        nl.sendto(msg, (0, 0))
        while True:
            data = nl.recv(65536)
            off = 0
            while off + 16 <= len(data):
                length, mtype = struct.unpack_from("=IH", data, off)
                if mtype in (nlmsg_done, nlmsg_error) or length < 16:
                    return ports
                ports.add(struct.unpack_from("!H", data, off + 16 + 4)[0])
                off += (length + 3) & ~3


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of ``pid``.

    Netlink (listeners only) in our own namespace: /proc/net/tcp also lists every TIME_WAIT socket,
    tens of thousands after a connection-rate run, and reading it would load the machine.
    """
    if _same_netns(pid):
        return _diag_listening(socket.AF_INET) | _diag_listening(socket.AF_INET6)
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            text = Path(f"/proc/{pid}/net/{name}").read_text()
        except OSError:
            continue
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == TCP_LISTEN:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(proc: subprocess.Popen[bytes], port: int, timeout: float = 10.0) -> float:
    """Seconds until ``port`` listens in ``proc``'s namespace; raises if it dies or times out."""
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        if port in listening_ports(proc.pid):
            return time.monotonic() - start
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening on {port}")
        time.sleep(0.002)
    raise TimeoutError(f"{proc.args!r} not listening on {port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left; reap."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # forked children (socat) share the group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)


def popen(argv: Sequence[str], *, stderr_path: Path | None = None) -> subprocess.Popen[bytes]:
    err = open(stderr_path, "ab") if stderr_path is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            env=ENV,
        )
    finally:
        if stderr_path is not None:
            err.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def running(
    argv: Sequence[str], port: int | None = None, *, stderr_path: Path | None = None, timeout: float = 10.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` in its own process group, wait for ``port`` to listen, kill it on exit."""
    proc = popen(argv, stderr_path=stderr_path)
    try:
        if port is not None:
            wait_listening(proc, port, timeout)
        yield proc
    finally:
        stop(proc)


def run(argv: Sequence[str], timeout: float) -> str:
    """Run a load tool to completion (own process group, killed on timeout); return stdout."""
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=ENV,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    finally:
        stop(proc)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {text[-800:]}")
    return text


def leftovers(run_id: str = RUN_ID) -> list[int]:
    """Live processes (not zombies) started by the run ``run_id``."""
    needle = f"{RUN_ENV}={run_id}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry))
        except OSError:
            continue
    return found


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants (socat forks one child per connection)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS bytes, PSS bytes, process count) summed over ``pid`` and its descendants."""
    pids = tree_pids(pid)
    rss = sum(_status_kib(p, "VmRSS") for p in pids) * 1024
    pss = sum(_pss_kib(p) for p in pids) * 1024
    return rss, pss, len(pids)
