"""A Unix-socket target (issue 11): the relay forwarding a TCP port to a socket file, against socat as users
run it (`socat tcp-listen:L,fork,reuseaddr unix-connect:PATH`) and HAProxy (`server s /PATH`).

``python -m bench.unix`` runs it and writes its section into docs/benchmarks.md (between the markers
below, so `python -m bench` carries it over); ``--smoke`` runs every part for about a second.

sockperf and iperf3 cannot serve on a socket file, so the servers are socat and nginx, each listening on a
socket file and, for the same workloads over TCP (the ratios to compare with), on 127.0.0.1:

- unix_down / unix_up: one connection for S seconds, read (or written) 1 MiB at a time by this process;
  the server is `socat -b 1048576 -u OPEN:/dev/zero UNIX-LISTEN:PATH,fork` (or the reverse into
  /dev/null). Gbit/s. (Direct to the socket file this reaches about 25 Gbit/s here: the client is not
  the limit.)
- unix_rtt: `wrk -t1 -c1 --latency` of a 3-byte answer on one kept-alive connection: p50/p99 of the
  request's round trip (nginx's own time included, the same for every subject).
- unix_conns: `wrk -t1 -c16 -H 'Connection: close'`: one new relayed connection (and socket connect) per
  request; conn/s.

Each subject is started fresh for each measurement; subjects interleave and the order rotates between
repetitions, as in harness.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import proc
from bench.harness import Record
from bench.subjects import HAPROXY_CONF

REPO = Path(__file__).resolve().parent.parent
DOWN, UP, RTT, CONNS = "unix_down", "unix_up", "unix_rtt", "unix_conns"
ALL_WORKLOADS = (DOWN, UP, RTT, CONNS)
TARGETS = ("unix", "tcp")  # the target behind the subject: nginx's socket file, or its 127.0.0.1 port
SUBJECTS = ("relay", "socat", "haproxy")
BEGIN = "<!-- unix-socket-target: python -m bench.unix -->"
END = "<!-- /unix-socket-target -->"
X, NONE = "\u00d7", "\u2013"  # multiplication sign, en dash (as in bench/report.py's tables)

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
    sendfile on;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    server {{
        listen unix:{sock} backlog=4096;
        listen 127.0.0.1:{port} backlog=4096;
        root {d}/www;
        location = / {{ return 200 "ok\\n"; }}
    }}
}}
"""


@dataclass(frozen=True)
class Server:
    """One kind of server on a socket file and on 127.0.0.1:port."""

    sock: Path
    port: int


@dataclass(frozen=True)
class Servers:
    nginx: Server
    zero: Server  # sends zeros to whoever connects (unix_down)
    null: Server  # swallows what it is sent (unix_up)


def _wait_file(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)


@contextlib.contextmanager
def socat_server(workdir: Path, name: str, data: str) -> Iterator[Server]:
    """`socat -u DATA LISTEN` (zero) or `socat -u LISTEN DATA` (null), on a socket file and a TCP port."""
    target = Server(workdir / f"{name}.sock", proc.free_port())
    listens = (f"UNIX-LISTEN:{target.sock},fork", f"TCP-LISTEN:{target.port},fork,reuseaddr,bind=127.0.0.1")
    with contextlib.ExitStack() as stack:
        for listen, port in zip(listens, (None, target.port), strict=True):
            pair = [data, listen] if name == "zero" else [listen, data]
            stack.enter_context(proc.running(["socat", "-b", "1048576", "-u", *pair], port))
        _wait_file(target.sock)
        yield target


@contextlib.contextmanager
def servers(workdir: Path) -> Iterator[Servers]:
    with (
        nginx(workdir) as web,
        socat_server(workdir, "zero", "OPEN:/dev/zero") as zero,
        socat_server(workdir, "null", "OPEN:/dev/null,wronly") as null,
    ):
        yield Servers(web, zero, null)


@contextlib.contextmanager
def nginx(workdir: Path) -> Iterator[Server]:
    """nginx on a socket file and on 127.0.0.1, answering `/` with 3 bytes."""
    d = workdir / "nginx-unix"
    (d / "www").mkdir(parents=True, exist_ok=True)
    target = Server(d / "nginx.sock", proc.free_port())
    conf = d / "nginx.conf"
    conf.write_text(NGINX_CONF.format(d=d, sock=target.sock, port=target.port))
    argv = ["nginx", "-p", str(d), "-c", str(conf), "-e", str(d / "error.log")]
    with proc.running(argv, target.port, stderr_path=d / "stderr.log"):
        yield target


def argv(subject: str, listen: int, target: str, server: Server, workdir: Path, python: str) -> list[str]:
    """The subject's command line, forwarding 127.0.0.1:listen to the server's socket file or TCP port."""
    unix = target == "unix"
    if subject == "relay":
        ports = f"{listen}:unix:{server.sock}" if unix else f"{listen}:{server.port}"
        options = ("--target", "127.0.0.1", "--listen", "127.0.0.1", "--metrics", "off")
        return [python, "-m", "relay", "--ports", ports, *options]
    if subject == "socat":
        to = f"unix-connect:{server.sock}" if unix else f"tcp-connect:127.0.0.1:{server.port}"
        return ["socat", f"tcp-listen:{listen},fork,reuseaddr", to]
    if subject == "haproxy":
        conf = workdir / f"haproxy-unix-{listen}.cfg"
        upstream = str(server.sock) if unix else f"127.0.0.1:{server.port}"
        conf.write_text(HAPROXY_CONF.format(listen=listen, server=upstream))
        return ["haproxy", "-db", "-f", str(conf)]
    raise ValueError(f"unknown subject {subject!r}")


_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)
_RPS = re.compile(r"Requests/sec:\s*([\d.]+)")
_ERRS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_TIME = {"us": 1.0, "ms": 1000.0, "s": 1e6}


def _wrk(url: str, seconds: float, *extra: str) -> str:
    out = proc.run(
        ["wrk", "-t1", f"-d{max(1, round(seconds))}s", "--timeout", "2s", *extra, url], seconds + 15
    )
    errors = sum(int(x) for x in e.groups()) if (e := _ERRS.search(out)) else 0
    errors += int(n.group(1)) if (n := _NON2XX.search(out)) else 0
    if errors and "Connection: close" not in extra:
        raise RuntimeError(f"wrk: {errors} errors: {out[-400:]}")
    return out


def stream(host: str, port: int, seconds: float, *, send: bool) -> float:
    """Gbit/s over one connection: 1 MiB reads (or writes) for `seconds`."""
    buf = memoryview(bytearray(1 << 20))
    moved = 0
    with socket.create_connection((host, port), timeout=10) as sock:
        started = time.monotonic()
        end = started + seconds
        while time.monotonic() < end:
            if send:
                sock.sendall(buf)
                moved += len(buf)
            else:
                got = sock.recv_into(buf)
                if not got:
                    raise RuntimeError("the server closed the stream")
                moved += got
        took = time.monotonic() - started
    return moved * 8 / took / 1e9


def measure(workload: str, host: str, port: int, seconds: float) -> dict[str, float]:
    base = f"http://{host}:{port}"
    if workload in (DOWN, UP):
        return {"gbit_s": stream(host, port, seconds, send=workload == UP)}
    if workload == RTT:
        out = _wrk(f"{base}/", seconds, "-c1", "--latency")
        pct = {p: float(v) * _TIME[u] for p, v, u in _LATENCY.findall(out)}
        if "50" not in pct or "99" not in pct:
            raise RuntimeError(f"wrk: no latency distribution: {out[-400:]}")
        return {"p50_us": pct["50"], "p99_us": pct["99"]}
    if workload == CONNS:
        out = _wrk(f"{base}/", seconds, "-c16", "-H", "Connection: close")
        m = _RPS.search(out)
        if m is None:
            raise RuntimeError(f"wrk: no Requests/sec: {out[-400:]}")
        errors = sum(int(x) for x in e.groups()) if (e := _ERRS.search(out)) else 0
        return {"conn_s": float(m.group(1)), "errors": float(errors)}
    raise ValueError(f"unknown workload {workload!r}")


def run(
    subjects: Sequence[str], workloads: Sequence[str], reps: int, seconds: float, workdir: Path, python: str
) -> list[Record]:
    records: list[Record] = []
    with servers(workdir) as running:
        for rep in range(reps):
            order = list(subjects[rep % len(subjects) :]) + list(subjects[: rep % len(subjects)])
            for workload in workloads:
                for target in TARGETS:
                    for subject in order:
                        rec = Record(f"{target}-target", workload, subject, rep)
                        listen = proc.free_port()
                        try:
                            server = {DOWN: running.zero, UP: running.null}.get(workload, running.nginx)
                            command = argv(subject, listen, target, server, workdir, python)
                            with proc.running(command, listen, stderr_path=workdir / f"{subject}.stderr"):
                                rec.values = measure(workload, "127.0.0.1", listen, seconds)
                        except (RuntimeError, OSError, TimeoutError) as exc:
                            rec.error = str(exc)[-300:]
                        records.append(rec)
                        vals = " ".join(f"{k}={v:.4g}" for k, v in rec.values.items())
                        print(
                            f"  [{rec.topology} rep {rep}] {workload:16s} {subject:8s} {vals} {rec.error}",
                            file=sys.stderr,
                        )
    return records


ROWS = (
    (UP, "gbit_s", "throughput, 1 stream, client → server (Gbit/s)", True),
    (DOWN, "gbit_s", "throughput, 1 stream, server → client (Gbit/s)", True),
    (RTT, "p50_us", "HTTP round trip p50, kept-alive connection (µs)", False),
    (RTT, "p99_us", "HTTP round trip p99, kept-alive connection (µs)", False),
    (CONNS, "conn_s", "new connections (1 request each) (conn/s)", True),
)


def _median(
    records: Sequence[Record], topology: str, workload: str, subject: str, metric: str
) -> float | None:
    values = [
        r.values[metric]
        for r in records
        if not r.error and (r.topology, r.workload, r.subject) == (topology, workload, subject)
    ]
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def report(
    records: Sequence[Record], reps: int, seconds: float, smoke: bool, load: tuple[float, float] = (0.0, 0.0)
) -> list[str]:
    """The section for docs/benchmarks.md: socket-file target rows, with the same ratios over TCP. `load`
    is the 1-minute load average at the start and the end of the run: on a shared machine it says how far
    to trust the round-trip rows."""
    lines = [
        BEGIN,
        "## Unix-socket target (loopback)",
        "",
        f"Generated by `python -m bench.unix{' --smoke' if smoke else ''}` on {time.strftime('%Y-%m-%d')}: "
        f"{reps} repetitions of {seconds:g} s, subjects interleaved, medians shown. Load → subject on "
        "127.0.0.1 → a server on a socket file (the relay's `L:unix:PATH`, "
        "`socat tcp-listen:L,fork,reuseaddr unix-connect:PATH`, HAProxy `server s PATH`). The same "
        "workloads with the servers on 127.0.0.1 give "
        "the TCP ratios to compare with. sockperf and iperf3 cannot serve on a socket file: throughput is "
        "one connection read or written 1 MiB at a time against socat from /dev/zero or into /dev/null, "
        "the round trip an HTTP request to nginx on a kept-alive connection (nginx's time included for "
        "every subject), new connections wrk with `Connection: close` against nginx. Method: "
        "`bench/unix.py`. The throughput load is this Python client, not iperf3, sharing the 2 cores with "
        "the subject and the server: absolute figures sit below the TCP table's; compare the ratios. "
        f"Load average (1 min) at the start / end of the run: {load[0]:.1f} / {load[1]:.1f} on "
        f"{os.cpu_count()} cores.",
        "",
        "| measure | relay → socket | socat → socket | haproxy → socket | relay ÷ socat, socket | "
        "relay ÷ socat, TCP target |",
        "|---|---|---|---|---|---|",
    ]
    for workload, metric, label, _higher in ROWS:
        got = {s: _median(records, "unix-target", workload, s, metric) for s in SUBJECTS}
        relay, socat = got["relay"], got["socat"]
        tcp_relay = _median(records, "tcp-target", workload, "relay", metric)
        tcp_socat = _median(records, "tcp-target", workload, "socat", metric)
        ratio = f"{relay / socat:.2f}{X}" if relay and socat else NONE
        tcp_ratio = f"{tcp_relay / tcp_socat:.2f}{X}" if tcp_relay and tcp_socat else NONE
        lines.append(
            f"| {label} | {_fmt(relay)} | {_fmt(socat)} | {_fmt(got['haproxy'])} | {ratio} | {tcp_ratio} |"
        )
    failed = [r for r in records if r.error]
    lines += ["", f"Failed measurements: {len(failed)}."]
    lines += [
        f"- {r.topology} {r.workload} {r.subject} rep {r.rep}: `{r.error.strip()[:160]}`" for r in failed
    ]
    lines += ["", END]
    return lines


def merge(doc: Path, section: list[str], begin: str = BEGIN, end: str = END) -> None:
    """Put the section (between `begin` and `end`) into the report: in place of the last one, else before
    *How it is measured*."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = "\n".join(section)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif "## How it is measured" in text:
        head, rest = text.split("## How it is measured", 1)
        text = head + block + "\n\n## How it is measured" + rest
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)


def carried(doc: Path, begin: str = BEGIN, end: str = END) -> list[str]:
    """The section of an earlier run, for `python -m bench` to keep when it rewrites the report."""
    if not doc.exists():
        return []
    text = doc.read_text()
    if begin not in text or end not in text:
        return []
    return (begin + text.split(begin, 1)[1].split(end, 1)[0] + end).splitlines()


def main(argv_: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unix", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one repetition of 1 s")
    p.add_argument("--reps", type=int, help="repetitions (default 3; smoke 1)")
    p.add_argument("--seconds", type=float, help="length of each measurement (default 2; smoke 1)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv_)
    reps = args.reps or (1 if args.smoke else 3)
    seconds = args.seconds or (1.0 if args.smoke else 2.0)
    missing = [t for t in ("nginx", "wrk", "socat", "haproxy") if not __import__("shutil").which(t)]
    if missing:
        print(
            f"bench.unix: missing tools: {' '.join(missing)} (scripts/bench installs them)", file=sys.stderr
        )
        return 2
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="relay-bench-unix-") as tmp:
        records = run(SUBJECTS, ALL_WORKLOADS, reps, seconds, Path(tmp), args.python)
    merge(args.out, report(records, reps, seconds, args.smoke, (before, os.getloadavg()[0])))
    failed = sum(1 for r in records if r.error)
    print(f"bench.unix: wrote {args.out}; {len(records)} measurements, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
