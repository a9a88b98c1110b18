"""Load generators (iperf3, sockperf, wrk, bench.hold) and the servers they talk to.

Every tool runs with a duration and a timeout and is killed when that passes; ``prefix`` is
prepended to a command to run it in a network namespace (``ip netns exec NAME``).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import proc

Prefix = Sequence[str]


# ----------------------------------------------------------------------------------- servers


@contextlib.contextmanager
def iperf3_server(host: str, port: int, prefix: Prefix = ()) -> Iterator[None]:
    with proc.running([*prefix, "iperf3", "-s", "-B", host, "-p", str(port)], port):
        yield


@contextlib.contextmanager
def sockperf_server(host: str, port: int, prefix: Prefix = ()) -> Iterator[None]:
    with proc.running([*prefix, "sockperf", "sr", "--tcp", "-i", host, "-p", str(port)], port):
        yield


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000;
    server {{
        listen {host}:{port} backlog=4096 reuseport;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_server(host: str, port: int, workdir: Path, prefix: Prefix = ()) -> Iterator[None]:
    d = workdir / f"nginx-{port}"
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, host=host, port=port))
    argv = [*prefix, "nginx", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")]
    with proc.running(argv, port, stderr_path=d / "stderr.log"):
        yield


# ------------------------------------------------------------------------------------- loads


def iperf3(
    host: str, port: int, seconds: float, *, reverse: bool = False, streams: int = 1, prefix: Prefix = ()
) -> float:
    """Goodput in Gbit/s measured at the receiver."""
    argv = [*prefix, "iperf3", "-c", host, "-p", str(port), "-t", f"{seconds:g}", "-J", "-P", str(streams)]
    if reverse:
        argv.append("-R")
    out = proc.run(argv, timeout=seconds + 15)
    data = json.loads(out)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


_PCT = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")


def sockperf_pingpong(
    host: str, port: int, seconds: float, size: int = 64, prefix: Prefix = ()
) -> tuple[float, float]:
    """(p50, p99) round-trip time in microseconds for ``size``-byte messages over TCP."""
    argv = [
        *prefix,
        "sockperf",
        "pp",
        "--tcp",
        "-i",
        host,
        "-p",
        str(port),
        "-t",
        f"{max(1, round(seconds))}",
        "-m",
        str(size),
        "--full-rtt",
    ]
    out = proc.run(argv, timeout=seconds + 15)
    pct = {float(k): float(v) for k, v in _PCT.findall(out)}
    if 50.0 not in pct or 99.0 not in pct:
        raise RuntimeError(f"sockperf: no percentiles in output: {out[-800:]}")
    return pct[50.0], pct[99.0]


@dataclass(frozen=True)
class WrkResult:
    rps: float
    errors: int
    requests: int


_RPS = re.compile(r"Requests/sec:\s*([\d.]+)")
_REQS = re.compile(r"(\d+) requests in")
_ERRS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk_close(host: str, port: int, seconds: float, conns: int = 16, prefix: Prefix = ()) -> WrkResult:
    """Requests/s with ``Connection: close``: one new relayed connection per request."""
    argv = [
        *prefix,
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "2s",
        "-H",
        "Connection: close",
        f"http://{host}:{port}/",
    ]
    out = proc.run(argv, timeout=seconds + 15)
    m = _RPS.search(out)
    r = _REQS.search(out)
    if m is None or r is None:
        raise RuntimeError(f"wrk: unexpected output: {out[-800:]}")
    errors = sum(int(x) for x in e.groups()) if (e := _ERRS.search(out)) else 0
    errors += int(n.group(1)) if (n := _NON2XX.search(out)) else 0
    return WrkResult(float(m.group(1)), errors, int(r.group(1)))


@dataclass(frozen=True)
class Held:
    connections: int
    rss_bytes: int
    pss_bytes: int
    processes: int


def hold(
    subject_pid: int,
    connect: tuple[str, int],
    server_port: int,
    count: int,
    parallel: int = 64,
    timeout: float = 120.0,
) -> tuple[Held, Held]:
    """Memory of the subject's process tree before and while ``count`` relayed connections are held.

    ``bench.hold`` (a separate process) runs the echo server on ``server_port`` and opens ``count``
    connections to ``connect``, each carrying one echoed byte.
    """
    base = proc.tree_memory(subject_pid)
    argv = [
        sys.executable,
        "-m",
        "bench.hold",
        "--connect",
        f"{connect[0]}:{connect[1]}",
        "--server-port",
        str(server_port),
        "--count",
        str(count),
        "--parallel",
        str(parallel),
        "--max-seconds",
        f"{timeout:g}",
    ]
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a full pipe would block the child
        p = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
            env=proc.ENV,
        )
        try:
            assert p.stdout is not None
            line = p.stdout.readline().decode().strip()  # bench.hold bounds its own run time
            if not line.startswith("held "):
                p.wait(5)
                err.seek(0)
                raise RuntimeError(f"bench.hold: {line!r} {err.read().decode(errors='replace')[-500:]}")
            held = int(line.split()[1])
            time.sleep(0.5)  # let the subject settle (allocator, forked children) before reading
            rss, pss, n = proc.tree_memory(subject_pid)
        finally:
            proc.stop(p)
    return Held(0, *base), Held(held, rss, pss, n)
