"""Run workloads against subjects: one run, interleaved, repeated; medians summarise.

Each repetition runs every workload against every subject, the subject order rotating between
repetitions, so slow drift of a shared machine spreads over all subjects alike. A subject is started
fresh for each measurement and killed right after.
"""

from __future__ import annotations

import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import loads, proc
from bench.subjects import Subject

THROUGHPUT_UP = "throughput_up"
THROUGHPUT_DOWN = "throughput_down"
THROUGHPUT_8 = "throughput_8"
RTT = "rtt"
CONNS = "conns"
ALL_WORKLOADS = (THROUGHPUT_UP, THROUGHPUT_DOWN, THROUGHPUT_8, RTT, CONNS)


@dataclass(frozen=True)
class Topology:
    """Where the load, the subject and the servers run. ``prefix`` runs a command in a namespace."""

    name: str
    server_host: str = "127.0.0.1"
    server_prefix: tuple[str, ...] = ()
    client_prefix: tuple[str, ...] = ()


LOOPBACK = Topology("loopback")


@dataclass
class Record:
    topology: str
    workload: str
    subject: str
    rep: int
    values: dict[str, float] = field(default_factory=dict)
    error: str = ""


@dataclass
class Servers:
    iperf3: int = 0
    sockperf: int = 0
    nginx: int = 0


@contextlib.contextmanager
def servers(topo: Topology, workdir: Path, workloads: Sequence[str]) -> Iterator[Servers]:
    ports = Servers()
    with contextlib.ExitStack() as stack:
        host, pre = topo.server_host, topo.server_prefix
        if {THROUGHPUT_UP, THROUGHPUT_DOWN, THROUGHPUT_8} & set(workloads):
            ports.iperf3 = proc.free_port()
            stack.enter_context(loads.iperf3_server(host, ports.iperf3, pre))
        if RTT in workloads:
            ports.sockperf = proc.free_port()
            stack.enter_context(loads.sockperf_server(host, ports.sockperf, pre))
        if CONNS in workloads:
            ports.nginx = proc.free_port()
            stack.enter_context(loads.nginx_server(host, ports.nginx, workdir, pre))
        yield ports


def measure(
    subject: Subject, workload: str, topo: Topology, ports: Servers, workdir: Path, seconds: float
) -> dict[str, float]:
    pre = topo.client_prefix
    target = {RTT: ports.sockperf, CONNS: ports.nginx}.get(workload, ports.iperf3)
    with subject.serve(topo.server_host, target, workdir, pre) as (host, port, _pid):
        if workload == THROUGHPUT_UP:
            return {"gbit_s": loads.iperf3(host, port, seconds, prefix=pre)}
        if workload == THROUGHPUT_DOWN:
            return {"gbit_s": loads.iperf3(host, port, seconds, reverse=True, prefix=pre)}
        if workload == THROUGHPUT_8:
            return {"gbit_s": loads.iperf3(host, port, seconds, streams=8, prefix=pre)}
        if workload == RTT:
            p50, p99 = loads.sockperf_pingpong(host, port, seconds, prefix=pre)
            return {"p50_us": p50, "p99_us": p99}
        if workload == CONNS:
            r = loads.wrk_close(host, port, seconds, prefix=pre)
            return {"conn_s": r.rps, "errors": float(r.errors)}
    raise ValueError(f"unknown workload {workload!r}")


def run_interleaved(
    subjects: Sequence[Subject],
    workloads: Sequence[str],
    topo: Topology,
    reps: int,
    seconds: float,
    workdir: Path,
    log: Callable[[Record], None],
) -> list[Record]:
    records: list[Record] = []
    with servers(topo, workdir, workloads) as ports:
        for rep in range(reps):
            order = list(subjects[rep % len(subjects) :]) + list(subjects[: rep % len(subjects)])
            for workload in workloads:
                for subject in order:
                    rec = Record(topo.name, workload, subject.name, rep)
                    try:
                        rec.values = measure(subject, workload, topo, ports, workdir, seconds)
                    except (RuntimeError, OSError, subprocess.TimeoutExpired, TimeoutError) as exc:
                        rec.error = str(exc)[-300:]
                    records.append(rec)
                    log(rec)
    return records


def measure_memory(subject: Subject, workdir: Path, count: int | None = None) -> Record:
    """RSS of the subject's process tree while ``count`` relayed connections are held."""
    n = count if count is not None else subject.memory_connections
    rec = Record("loopback", "memory", subject.name, 0)
    target = proc.free_port()
    try:
        with subject.serve("127.0.0.1", target, workdir) as (host, port, pid):
            assert pid is not None
            base, held = loads.hold(pid, (host, port), target, n, subject.memory_parallel)
        if held.connections == 0:
            raise RuntimeError("no connection held")
        rec.values = {
            "connections": float(held.connections),
            "rss_base_bytes": float(base.rss_bytes),
            "rss_bytes": float(held.rss_bytes),
            "rss_per_conn_bytes": (held.rss_bytes - base.rss_bytes) / held.connections,
            "pss_per_conn_bytes": (held.pss_bytes - base.pss_bytes) / held.connections,
            "processes": float(held.processes),
        }
    except (RuntimeError, OSError, subprocess.TimeoutExpired, TimeoutError) as exc:
        rec.error = str(exc)[-300:]
    return rec


def measure_startup(subject: Subject, workdir: Path, reps: int) -> Record:
    """Seconds from spawning the subject to its port listening (median of ``reps``)."""
    rec = Record("loopback", "startup", subject.name, 0)
    times: list[float] = []
    try:
        for _ in range(reps):
            listen = proc.free_port()
            start = time.monotonic()
            p = proc.popen(subject.argv(listen, "127.0.0.1", proc.free_port(), workdir))
            try:
                proc.wait_listening(p, listen, timeout=10)
                times.append(time.monotonic() - start)
            finally:
                proc.stop(p)
        rec.values = {"seconds": statistics.median(times), "min_seconds": min(times)}
    except (RuntimeError, OSError, TimeoutError) as exc:
        rec.error = str(exc)[-300:]
    return rec


def medians(records: Sequence[Record]) -> dict[tuple[str, str, str], dict[str, float]]:
    """(topology, workload, subject) -> metric -> median over repetitions (errors left out)."""
    groups: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for r in records:
        if not r.error:
            groups.setdefault((r.topology, r.workload, r.subject), []).append(r.values)
    out: dict[tuple[str, str, str], dict[str, float]] = {}
    for key, vals in groups.items():
        out[key] = {m: statistics.median(v[m] for v in vals) for m in vals[0]}
        out[key]["n"] = float(len(vals))
    return out


def record_json(r: Record) -> dict[str, Any]:
    return asdict(r)


def echo(r: Record) -> None:
    vals = " ".join(f"{k}={v:.4g}" for k, v in r.values.items())
    err = f" ERROR {r.error}" if r.error else ""
    line = f"  [{r.topology} rep {r.rep}] {r.workload:16s} {r.subject:32s} {vals}{err}"
    print(line, file=sys.stderr, flush=True)
