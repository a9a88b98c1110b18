"""UDP workloads (issue 10): the relay's UDP routes against socat as users run it and direct.

Subjects: the relay (`--ports L:Q/udp`, default loop), `socat udp-listen:L,fork,reuseaddr udp:HOST:Q`
(one child per client address), `socat udp-recvfrom:L,fork udp:HOST:Q` (one child per datagram) and
direct. Workloads, each subject started fresh for each measurement, interleaved and repeated like the TCP
ones (harness.py):

- udp_rtt: `sockperf ping-pong -m 64 --full-rtt` (UDP): round trips per second (one in flight) and p50/p99.
- udp_flood: `sockperf throughput -m 64 --mps=RATE` into a fresh `sockperf server` whose count of received
  messages is read when it stops: a ladder of paced rates (the highest with ≥ 99.9 % delivered is
  "without loss"), then `--mps=max` (the loss at full speed). Not for udp-recvfrom: a process per datagram
  at these rates would fork tens of thousands of processes on a shared machine.
- udp_dns: `dnsperf` (real DNS client, 4 sockets) through the subject to dnsmasq answering from a hosts
  file: queries/s, mean latency, lost. Not for udp-recvfrom either (same reason).

Readiness of a UDP subject is its port appearing in /proc/net/udp{,6}; nothing is sent to probe it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import proc
from bench.harness import Record

TOPOLOGY = "udp"
UDP_RTT = "udp_rtt"
UDP_FLOOD = "udp_flood"
UDP_DNS = "udp_dns"
ALL_WORKLOADS = (UDP_RTT, UDP_FLOOD, UDP_DNS)
PACED_RATES = (10_000, 25_000, 50_000, 100_000, 200_000)
# The round trip is compared with socat against a target of 1.00x, while one repetition's p50 swings by
# +-15 % with where the processes happen to wake up (bench/experiments/SPEED.md, UDP): full runs give it
# RTT_REPS times the repetitions of the other workloads.
RTT_REPS = 3
# The flood's sink gets a large receive buffer (capped by net.core.rmem_max): with the default one the
# sink itself drops what a relay forwards in a burst after a stall on a busy machine, and the figure
# would measure the sink.
SINK_BUFFER = 4 << 20
DELIVERED_WITHOUT_LOSS = 0.999
X = "\u00d7"
NONE = "\u2013"


@dataclass(frozen=True)
class UdpSubject:
    name: str
    kind: str  # relay | socat-listen | socat-recvfrom | direct
    python: str = ""
    floods: bool = True  # takes udp_flood and udp_dns

    def argv(self, listen: int, host: str, port: int) -> list[str]:
        if self.kind == "relay":
            return [
                self.python,
                "-m",
                "relay",
                "--ports",
                f"{listen}:{port}/udp",
                "--target",
                host,
                "--listen",
                "127.0.0.1",
                "--metrics",
                "off",
            ]
        if self.kind == "socat-listen":
            return ["socat", f"udp-listen:{listen},fork,reuseaddr", f"udp:{host}:{port}"]
        if self.kind == "socat-recvfrom":
            return ["socat", f"udp-recvfrom:{listen},fork", f"udp:{host}:{port}"]
        raise ValueError(f"{self.kind!r} starts no process")

    @contextlib.contextmanager
    def serve(self, host: str, port: int, workdir: Path) -> Iterator[tuple[str, int]]:
        """(host, port) to point the load at."""
        if self.kind == "direct":
            yield host, port
            return
        listen = free_udp_port()
        with running(self.argv(listen, host, port), listen, workdir / f"udp-{self.name}.stderr"):
            yield "127.0.0.1", listen


def subjects(names: Sequence[str], python: str) -> list[UdpSubject]:
    """The UDP subjects for the run's subject names (socat stands for both of its UDP forms)."""
    out = []
    if "relay" in names:
        out.append(UdpSubject("relay", "relay", python))
    if "socat" in names:
        out.append(UdpSubject("socat-udp-listen", "socat-listen"))
        out.append(UdpSubject("socat-udp-recvfrom", "socat-recvfrom", floods=False))
    if "direct" in names:
        out.append(UdpSubject("direct", "direct"))
    return out


def missing_tools(workloads: Sequence[str]) -> list[str]:
    need = {"sockperf"} | ({"dnsperf", "dnsmasq"} if UDP_DNS in workloads else set())
    return sorted(t for t in need if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists())


# --- processes ------------------------------------------------------------------------------------------


def free_tcp_and_udp_port() -> int:
    """A port free for both (dnsmasq binds its port over TCP too); a few tries, then give up."""
    for _ in range(50):
        with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port: int = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both TCP and UDP")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def udp_bound(port: int) -> bool:
    """Whether a UDP socket of this network namespace is bound to ``port`` (/proc/net/udp is short)."""
    for name in ("udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        if any(int(line.split()[1].rsplit(":", 1)[1], 16) == port for line in lines if line.split()):
            return True
    return False


@contextlib.contextmanager
def running(argv: Sequence[str], port: int, stderr: Path, timeout: float = 10.0) -> Iterator[None]:
    p = proc.popen(argv, stderr_path=stderr)
    try:
        deadline = time.monotonic() + timeout
        while not udp_bound(port):
            if p.poll() is not None:
                raise RuntimeError(f"{' '.join(argv)} exited with {p.returncode} before binding {port}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{' '.join(argv)} did not bind UDP {port} in {timeout} s")
            time.sleep(0.002)
        yield
    finally:
        proc.stop(p)
        gone(p.pid)


def gone(group: int, timeout: float = 3.0) -> None:
    """Wait (bounded) until the process group has no process left: socat's forked children, killed with
    it, may take a moment to exit, and the run's leftover check would count them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


@contextlib.contextmanager
def sockperf_server(port: int, workdir: Path) -> Iterator[Callable[[], int]]:
    """A UDP `sockperf server` on 127.0.0.1:port; yields a function that stops it and returns the count
    of messages it received (it prints that on SIGINT)."""
    out = workdir / f"sockperf-sr-{port}.out"
    with open(out, "wb") as fh:
        p = subprocess.Popen(
            ["sockperf", "sr", "-i", "127.0.0.1", "-p", str(port), "--buffer-size", str(SINK_BUFFER)],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=proc.ENV,
        )
    try:
        deadline = time.monotonic() + 10
        while not udp_bound(port):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sockperf server did not bind {port}: {out.read_text()[-300:]}")
            time.sleep(0.002)

        def received() -> int:
            os.killpg(p.pid, signal.SIGINT)
            p.wait(10)
            match = re.search(r"Total (\d+) messages received", out.read_text())
            if match is None:
                raise RuntimeError(f"sockperf server: no count: {out.read_text()[-300:]}")
            return int(match.group(1))

        yield received
    finally:
        proc.stop(p)


_VALID = re.compile(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)")
_PCT = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_SENT = re.compile(r"Total of (\d+) messages sent in ([\d.]+) sec")


def pingpong(host: str, port: int, seconds: float) -> dict[str, float]:
    argv = ["sockperf", "pp", "-i", host, "-p", str(port), "-t", f"{max(1, round(seconds))}"]
    out = proc.run([*argv, "-m", "64", "--full-rtt"], timeout=seconds + 20)
    valid = _VALID.search(out)
    pct = {float(k): float(v) for k, v in _PCT.findall(out)}
    if valid is None or 50.0 not in pct or 99.0 not in pct:
        raise RuntimeError(f"sockperf pp: unexpected output: {out[-600:]}")
    return {"rt_s": int(valid.group(3)) / float(valid.group(1)), "p50_us": pct[50.0], "p99_us": pct[99.0]}


def flood(
    host: str, port: int, seconds: float, mps: int | None, received: Callable[[], int]
) -> tuple[float, float]:
    """(fraction delivered, send rate) of `sockperf tp` at ``mps`` messages/s (None: as fast as it can)."""
    rate = "max" if mps is None else str(mps)
    argv = ["sockperf", "tp", "-i", host, "-p", str(port), "-t", f"{max(1, round(seconds))}", "-m", "64"]
    out = proc.run([*argv, f"--mps={rate}"], timeout=seconds + 20)
    sent = _SENT.search(out)
    if sent is None:
        raise RuntimeError(f"sockperf tp: unexpected output: {out[-600:]}")
    time.sleep(0.2)  # what the subject still holds reaches the server (a bounded settle, not readiness)
    got, count = received(), int(sent.group(1))
    return (min(1.0, got / count) if count else 0.0), count / float(sent.group(2))


def measure_flood(subject: UdpSubject, workdir: Path, seconds: float) -> dict[str, float]:
    paced_ok = 0.0
    for mps in PACED_RATES:
        port = free_udp_port()
        with sockperf_server(port, workdir) as received, subject.serve("127.0.0.1", port, workdir) as (h, p):
            delivered, _ = flood(h, p, seconds, mps, received)
        if delivered < DELIVERED_WITHOUT_LOSS:
            break
        paced_ok = float(mps)
    port = free_udp_port()
    with sockperf_server(port, workdir) as received, subject.serve("127.0.0.1", port, workdir) as (h, p):
        delivered, rate = flood(h, p, seconds, None, received)
    return {
        "paced_ok_dps": paced_ok,
        "max_sent_dps": rate,
        "max_delivered_dps": rate * delivered,
        "max_loss_pct": (1 - delivered) * 100,
    }


# --- DNS: dnsperf to dnsmasq ------------------------------------------------------------------------------

NAMES = 50


@contextlib.contextmanager
def dnsmasq(workdir: Path) -> Iterator[int]:
    hosts = workdir / "bench.hosts"
    hosts.write_text("".join(f"10.77.0.{i} h{i}.bench.test\n" for i in range(1, NAMES + 1)))
    port = free_tcp_and_udp_port()
    binary = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
    argv = [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--local=/bench.test/",
        f"--addn-hosts={hosts}",
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        f"--port={port}",
        "--user=root",
        "--pid-file=",
        "--cache-size=1000",
        "--dns-forward-max=1000",
    ]
    with running(argv, port, workdir / "dnsmasq.stderr"):
        yield port


_QPS = re.compile(r"Queries per second:\s+([\d.]+)")
_LAT = re.compile(r"Average Latency \(s\):\s+([\d.]+)")
_LOST = re.compile(r"Queries lost:\s+(\d+) \(([\d.]+)%\)")


def dnsperf(host: str, port: int, seconds: float, workdir: Path) -> dict[str, float]:
    queries = workdir / "bench.queries"
    queries.write_text("".join(f"h{i}.bench.test A\n" for i in range(1, NAMES + 1)))
    argv = ["dnsperf", "-s", host, "-p", str(port), "-d", str(queries), "-l", f"{max(1, round(seconds))}"]
    out = proc.run([*argv, "-c", "4", "-t", "2"], timeout=seconds + 20)
    qps, lat, lost = _QPS.search(out), _LAT.search(out), _LOST.search(out)
    if qps is None or lat is None or lost is None:
        raise RuntimeError(f"dnsperf: unexpected output: {out[-600:]}")
    return {
        "qps": float(qps.group(1)),
        "latency_ms": float(lat.group(1)) * 1000,
        "lost_pct": float(lost.group(2)),
    }


# --- the run ---------------------------------------------------------------------------------------------


def measure(
    subject: UdpSubject, workload: str, workdir: Path, seconds: float, ports: dict[str, int]
) -> dict[str, float]:
    if workload == UDP_RTT:
        with subject.serve("127.0.0.1", ports["sockperf"], workdir) as (host, port):
            return pingpong(host, port, seconds)
    if workload == UDP_FLOOD:
        return measure_flood(subject, workdir, seconds)
    if workload == UDP_DNS:
        if "dnsmasq" not in ports:
            raise RuntimeError("dnsmasq did not start (see the run's log)")
        with subject.serve("127.0.0.1", ports["dnsmasq"], workdir) as (host, port):
            return dnsperf(host, port, seconds, workdir)
    raise ValueError(f"unknown workload {workload!r}")


def run_interleaved(
    subs: Sequence[UdpSubject],
    workloads: Sequence[str],
    reps: int,
    seconds: float,
    workdir: Path,
    log: Callable[[Record], None],
    rtt_reps: int | None = None,
) -> None:
    """`reps` repetitions of every workload, interleaved; udp_rtt gets `rtt_reps` (default `reps`)."""
    rtt_reps = reps if rtt_reps is None else max(reps, rtt_reps)
    with contextlib.ExitStack() as stack:
        ports: dict[str, int] = {}
        if UDP_RTT in workloads:
            ports["sockperf"] = free_udp_port()
            stack.enter_context(
                running(
                    ["sockperf", "sr", "-i", "127.0.0.1", "-p", str(ports["sockperf"])],
                    ports["sockperf"],
                    workdir / "sockperf-udp.stderr",
                )
            )
        if UDP_DNS in workloads:
            try:
                ports["dnsmasq"] = stack.enter_context(dnsmasq(workdir))
            except (RuntimeError, OSError, TimeoutError) as exc:  # each udp_dns record says so
                failed = str(exc)[-200:]
                print(f"bench: dnsmasq did not start: {failed}", file=sys.stderr)
        for rep in range(rtt_reps if UDP_RTT in workloads else reps):
            order = list(subs[rep % len(subs) :]) + list(subs[: rep % len(subs)])
            for workload in workloads:
                if rep >= reps and workload != UDP_RTT:
                    continue
                for subject in order:
                    if workload != UDP_RTT and not subject.floods:
                        continue
                    rec = Record(TOPOLOGY, workload, subject.name, rep)
                    try:
                        rec.values = measure(subject, workload, workdir, seconds, ports)
                    except (RuntimeError, OSError, subprocess.TimeoutExpired, TimeoutError) as exc:
                        rec.error = str(exc)[-300:]
                    log(rec)


# --- the report -----------------------------------------------------------------------------------------

Medians = dict[tuple[str, str, str], dict[str, float]]
METRICS = (
    (UDP_RTT, "rt_s", "64-byte request/response rate (round trips/s)", True),
    (UDP_RTT, "p50_us", "64-byte round trip p50 (µs)", False),
    (UDP_RTT, "p99_us", "64-byte round trip p99 (µs)", False),
    (UDP_FLOOD, "paced_ok_dps", "flood: highest paced rate delivered without loss (datagrams/s)", True),
    (UDP_FLOOD, "max_sent_dps", "flood at full speed: sent (datagrams/s)", True),
    (UDP_FLOOD, "max_delivered_dps", "flood at full speed: delivered (datagrams/s)", True),
    (UDP_FLOOD, "max_loss_pct", "flood at full speed: loss (%)", False),
    (UDP_DNS, "qps", "dnsperf to dnsmasq: queries/s", True),
    (UDP_DNS, "latency_ms", "dnsperf to dnsmasq: mean latency (ms)", False),
    (UDP_DNS, "lost_pct", "dnsperf to dnsmasq: queries lost (%)", False),
)
TARGETS = (
    ("request/response rate ≥ socat udp-listen,fork", "rt_s", "socat-udp-listen", 1.0, True),
    (f"request/response rate ≥ 5{X} socat udp-recvfrom,fork", "rt_s", "socat-udp-recvfrom", 5.0, True),
    ("round trip p50 ≤ socat udp-listen,fork", "p50_us", "socat-udp-listen", 1.0, False),
)


def _fmt(v: float | None) -> str:
    if v is None:
        return NONE
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _ratio(a: float | None, b: float | None) -> str:
    return NONE if a is None or not b else f"{a / b:.2f}{X}"


def report_lines(med: Medians, names: Sequence[str]) -> list[str]:
    """The UDP section of docs/benchmarks.md: results with ratios, then the issue's targets."""
    head = ["measure", *names, "relay ÷ socat udp-listen", "relay ÷ direct"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for workload, key, label, _ in METRICS:
        vals = {s: med.get((TOPOLOGY, workload, s), {}).get(key) for s in names}
        if all(v is None for v in vals.values()):
            continue
        cells = [label, *(_fmt(vals[s]) for s in names)]
        cells += [
            _ratio(vals.get("relay"), vals.get("socat-udp-listen")),
            _ratio(vals.get("relay"), vals.get("direct")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| target (issue 10) | measured | met |", "|---|---|---|"]
    for label, key, against, limit, at_least in TARGETS:
        mine = med.get((TOPOLOGY, UDP_RTT, "relay"), {}).get(key)
        ref = med.get((TOPOLOGY, UDP_RTT, against), {}).get(key)
        if mine is None or not ref:
            lines.append(f"| {label} | {NONE} | not measured |")
            continue
        ratio = mine / ref
        ok = (ratio >= limit) if at_least else (ratio <= limit)
        lines.append(f"| {label} | {ratio:.2f}{X} | {'yes' if ok else '**no**'} |")
    return lines


def describe() -> list[str]:
    """How the UDP figures are measured, for the report's method list."""
    return [
        "- **UDP** (issue 10): the relay `--ports L:Q/udp` (default loop); socat "
        "`udp-listen:L,fork,reuseaddr udp:127.0.0.1:Q` and `udp-recvfrom:L,fork udp:127.0.0.1:Q`; direct. "
        "Request/response: `sockperf ping-pong -m 64 --full-rtt` over UDP (one datagram in flight; rate = "
        f"round trips/s), {RTT_REPS}{X} the repetitions of the other workloads. Flood: `sockperf "
        "throughput -m 64 --mps=R` into a fresh `sockperf server` (4 MiB "
        "receive buffer), whose received count is read at its stop; paced R in "
        f"{', '.join(f'{r:,}' for r in PACED_RATES)} (the "
        f"highest with ≥ {DELIVERED_WITHOUT_LOSS:.1%} delivered), then `--mps=max`. Real client: "
        f"`dnsperf -c 4` to dnsmasq answering {NAMES} names from a hosts file. udp-recvfrom forks a process "
        "per datagram: it takes the request/response test only.",
    ]
