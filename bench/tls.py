"""TLS termination (issue 18): the relay, socat and HAProxy each terminate TLS on 127.0.0.1 and forward in
plain text to a local server; throughput over one TLS connection and new TLS connections per second.

``python -m bench.tls`` runs it and writes its section into docs/benchmarks.md (between the markers below,
which `python -m bench` carries over); ``--smoke`` runs every part for about a second.

- tls_down / tls_up: one TLS connection for S seconds, read (or written) 1 MiB at a time by this process
  (Python's ssl: OpenSSL), against `socat -u OPEN:/dev/zero TCP-LISTEN` (or the reverse into /dev/null)
  behind the subject. Gbit/s. The client decrypts (or encrypts) in the same 2 cores as the subject.
- tls_conns: `wrk -t1 -c16 -H 'Connection: close' https://...` against nginx behind the subject: one TLS
  handshake (ECDSA P-256 certificate, no session resumption) and one relayed connection per request.

The subjects, as users run them:
- relay: `python -m relay --ports L:P --target 127.0.0.1 --listen 127.0.0.1 --metrics off --tls cert=,key=`
- socat: `socat openssl-listen:L,fork,reuseaddr,cert=,key=,verify=0 tcp-connect:127.0.0.1:P`
- HAProxy: `bind 127.0.0.1:L ssl crt PEM` in mode tcp (bench/subjects.py's config).

Each subject is started fresh for each measurement; subjects interleave and the order rotates between
repetitions, as in harness.py and bench/unix.py (whose servers and wrk helper this reuses).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench import proc, unix
from bench.harness import Record
from bench.subjects import HAPROXY_CONF

REPO = Path(__file__).resolve().parent.parent
DOWN, UP, CONNS = "tls_down", "tls_up", "tls_conns"
ALL_WORKLOADS = (DOWN, UP, CONNS)
SUBJECTS = ("relay", "socat", "haproxy")
BEGIN = "<!-- tls-termination: python -m bench.tls -->"
END = "<!-- /tls-termination -->"


def make_cert(workdir: Path) -> tuple[Path, Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1: (cert, key, both in one file for HAProxy)."""
    cert, key, both = workdir / "tls.crt", workdir / "tls.key", workdir / "tls.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, key, both


def argv(
    subject: str, listen: int, port: int, pems: tuple[Path, Path, Path], workdir: Path, python: str
) -> list[str]:
    """The subject's command line: TLS on 127.0.0.1:listen, plain text to 127.0.0.1:port."""
    cert, key, both = pems
    if subject == "relay":
        options = ("--target", "127.0.0.1", "--listen", "127.0.0.1", "--metrics", "off")
        return [
            python,
            "-m",
            "relay",
            "--ports",
            f"{listen}:{port}",
            *options,
            "--tls",
            f"cert={cert},key={key}",
        ]
    if subject == "socat":
        tls = f"openssl-listen:{listen},fork,reuseaddr,cert={cert},key={key},verify=0"
        return ["socat", tls, f"tcp-connect:127.0.0.1:{port}"]
    if subject == "haproxy":
        conf = workdir / f"haproxy-tls-{listen}.cfg"
        text = HAPROXY_CONF.format(listen=listen, server=f"127.0.0.1:{port}")
        conf.write_text(text.replace(f"bind 127.0.0.1:{listen}", f"bind 127.0.0.1:{listen} ssl crt {both}"))
        return ["haproxy", "-db", "-f", str(conf)]
    raise ValueError(f"unknown subject {subject!r}")


def tls_stream(port: int, seconds: float, context: ssl.SSLContext, *, send: bool) -> float:
    """Gbit/s over one TLS connection: 1 MiB reads (or writes) for `seconds`."""
    buf = memoryview(bytearray(1 << 20))
    moved = 0
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
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


def measure(workload: str, port: int, seconds: float, context: ssl.SSLContext) -> dict[str, float]:
    if workload in (DOWN, UP):
        return {"gbit_s": tls_stream(port, seconds, context, send=workload == UP)}
    if workload == CONNS:
        out = unix._wrk(f"https://127.0.0.1:{port}/", seconds, "-c16", "-H", "Connection: close")
        m = unix._RPS.search(out)
        if m is None:
            raise RuntimeError(f"wrk: no Requests/sec: {out[-400:]}")
        return {"conn_s": float(m.group(1))}
    raise ValueError(f"unknown workload {workload!r}")


def run(
    subjects: Sequence[str], workloads: Sequence[str], reps: int, seconds: float, workdir: Path, python: str
) -> list[Record]:
    pems = make_cert(workdir)
    context = ssl.create_default_context(cafile=str(pems[0]))
    records: list[Record] = []
    with unix.servers(workdir) as running:
        for rep in range(reps):
            order = list(subjects[rep % len(subjects) :]) + list(subjects[: rep % len(subjects)])
            for workload in workloads:
                server = {DOWN: running.zero, UP: running.null}.get(workload, running.nginx)
                for subject in order:
                    rec = Record("tls", workload, subject, rep)
                    listen = proc.free_port()
                    try:
                        command = argv(subject, listen, server.port, pems, workdir, python)
                        with proc.running(command, listen, stderr_path=workdir / f"{subject}.stderr"):
                            rec.values = measure(workload, listen, seconds, context)
                    except (RuntimeError, OSError, TimeoutError) as exc:
                        rec.error = str(exc)[-300:]
                    records.append(rec)
                    vals = " ".join(f"{k}={v:.4g}" for k, v in rec.values.items())
                    print(
                        f"  [tls rep {rep}] {workload:10s} {subject:8s} {vals} {rec.error}", file=sys.stderr
                    )
    return records


ROWS = (
    (UP, "gbit_s", "TLS throughput, 1 connection, client → server (Gbit/s)"),
    (DOWN, "gbit_s", "TLS throughput, 1 connection, server → client (Gbit/s)"),
    (CONNS, "conn_s", "new TLS connections (a handshake and 1 request each) (conn/s)"),
)


def report(
    records: Sequence[Record], reps: int, seconds: float, smoke: bool, load: tuple[float, float]
) -> list[str]:
    def median(workload: str, subject: str, metric: str) -> float | None:
        values = [
            r.values[metric]
            for r in records
            if not r.error and (r.workload, r.subject) == (workload, subject)
        ]
        return statistics.median(values) if values else None

    lines = [
        BEGIN,
        "## TLS termination (loopback)",
        "",
        f"Generated by `python -m bench.tls{' --smoke' if smoke else ''}` on {time.strftime('%Y-%m-%d')}: "
        f"{reps} repetitions of {seconds:g} s, subjects interleaved, medians shown. Load → subject "
        "terminating TLS on 127.0.0.1 → a plain server on 127.0.0.1 (the relay's `--tls cert=,key=`, "
        "`socat openssl-listen:L,fork,reuseaddr,cert=,key=,verify=0 tcp-connect:…`, "
        "HAProxy `bind … ssl crt`). "
        "ECDSA P-256 certificate, TLS 1.3. Throughput: this Python client (OpenSSL) over one connection "
        "against socat from /dev/zero or into /dev/null; new connections: wrk over https with "
        "`Connection: close` against nginx. Method: `bench/tls.py`. The machine is shared (2 cores, other "
        f"work running): load average (1 min) at the start / end {load[0]:.1f} / {load[1]:.1f}; compare "
        "the ratios within this run, not the absolute figures across runs.",
        "",
        "| measure | relay | socat | haproxy | relay ÷ socat | relay ÷ haproxy |",
        "|---|---|---|---|---|---|",
    ]
    for workload, metric, label in ROWS:
        got = {s: median(workload, s, metric) for s in SUBJECTS}
        relay, socat, haproxy = got["relay"], got["socat"], got["haproxy"]
        by_socat = f"{relay / socat:.2f}{unix.X}" if relay and socat else unix.NONE
        by_haproxy = f"{relay / haproxy:.2f}{unix.X}" if relay and haproxy else unix.NONE
        figures = " | ".join(unix._fmt(v) for v in (relay, socat, haproxy))
        lines.append(f"| {label} | {figures} | {by_socat} | {by_haproxy} |")
    failed = [r for r in records if r.error]
    lines += ["", f"Failed measurements: {len(failed)}."]
    lines += [f"- {r.workload} {r.subject} rep {r.rep}: `{r.error.strip()[:160]}`" for r in failed]
    lines += ["", END]
    return lines


def main(argv_: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tls", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="one repetition of 1 s")
    p.add_argument("--reps", type=int, help="repetitions (default 3; smoke 1)")
    p.add_argument("--seconds", type=float, help="length of each measurement (default 2; smoke 1)")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    p.add_argument("--python", default=sys.executable)
    args = p.parse_args(argv_)
    reps = args.reps or (1 if args.smoke else 3)
    seconds = args.seconds or (1.0 if args.smoke else 2.0)
    missing = [t for t in ("openssl", "nginx", "wrk", "socat", "haproxy") if not shutil.which(t)]
    if missing:
        print(f"bench.tls: missing tools: {' '.join(missing)} (scripts/bench installs them)", file=sys.stderr)
        return 2
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="relay-bench-tls-") as tmp:
        records = run(SUBJECTS, ALL_WORKLOADS, reps, seconds, Path(tmp), args.python)
    unix.merge(args.out, report(records, reps, seconds, args.smoke, (before, os.getloadavg()[0])), BEGIN, END)
    failed = sum(1 for r in records if r.error)
    print(f"bench.tls: wrote {args.out}; {len(records)} measurements, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
