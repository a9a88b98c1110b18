"""Pump experiments: every prototype variant against socat, HAProxy and direct, interleaved.

``python -m bench.experiments.run [--reps 3] [--seconds 2] [--only NAME,...] [--skip-memory]``
Writes raw records to ``bench/results/experiments-<time>.jsonl`` and prints a table of medians.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench import harness, netns, subjects
from bench.subjects import Subject

KiB = 1024


def variants() -> list[Subject]:
    out = [subjects.DIRECT, subjects.SOCAT, subjects.HAPROXY]
    for loop in ("uvloop", "asyncio"):
        for high, low in ((64 * KiB, 16 * KiB), (256 * KiB, 64 * KiB)):
            out.append(subjects.prototype("protocol", loop, high=high, low=low))
        for buf in (64 * KiB, 256 * KiB):
            out.append(subjects.prototype("buffered", loop, bufsize=buf))
        for pipe in (64 * KiB, 256 * KiB, 1024 * KiB):
            out.append(subjects.prototype("splice", loop, bufsize=pipe))
    return out


def focus() -> list[Subject]:
    """The front runners of a first full sweep, with the relay itself."""
    return [
        subjects.DIRECT,
        subjects.SOCAT,
        subjects.HAPROXY,
        subjects.RELAY,
        subjects.prototype("protocol", "uvloop", high=64 * KiB, low=16 * KiB),
        subjects.prototype("protocol", "uvloop"),
        subjects.prototype("buffered", "uvloop", bufsize=256 * KiB),
        subjects.prototype("splice", "uvloop", bufsize=64 * KiB),
        subjects.prototype("splice", "uvloop", bufsize=256 * KiB),
        subjects.prototype("protocol", "asyncio"),
        subjects.prototype("splice", "asyncio", bufsize=256 * KiB),
    ]


NETNS_SUBJECTS = (
    "direct",
    "socat",
    "haproxy",
    "relay",
    "protocol-uvloop-hw256k",
    "buffered-uvloop-buf256k-hw256k",
    "splice-uvloop-pipe256k",
)


def table(records: list[harness.Record], topology: str = "loopback") -> str:
    med = harness.medians(records)
    names = list(dict.fromkeys(r.subject for r in records if r.topology == topology))
    cols = [
        ("throughput_up", "gbit_s", "up Gb/s"),
        ("throughput_down", "gbit_s", "down Gb/s"),
        ("throughput_8", "gbit_s", "8x Gb/s"),
        ("rtt", "p50_us", "p50 us"),
        ("rtt", "p99_us", "p99 us"),
        ("conns", "conn_s", "conn/s"),
        ("memory", "rss_per_conn_bytes", "B/conn"),
        ("startup", "seconds", "start ms"),
    ]
    lines = ["| subject | " + " | ".join(c[2] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in names:
        cells = []
        for wl, metric, _ in cols:
            v = med.get((topology, wl, name), {}).get(metric)
            if v is None:
                cells.append("")
            elif metric == "seconds":
                cells.append(f"{v * 1000:.0f}")
            else:
                cells.append(f"{v:.3g}" if v < 1000 else f"{v:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--only", default="", help="comma list of subject names")
    p.add_argument("--workloads", default=",".join(harness.ALL_WORKLOADS))
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--focus", action="store_true", help="the front runners and the relay, not every variant")
    p.add_argument("--netns", action="store_true", help="also throughput and RTT across a veth pair")
    p.add_argument("--memory-connections", type=int, default=5000)
    args = p.parse_args()
    subs = focus() if args.focus else variants()
    if args.only:
        wanted = args.only.split(",")
        subs = [s for s in subs if s.name in wanted or s.name.split("-")[0] in wanted]
    out_dir = Path(__file__).resolve().parent.parent / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"experiments-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    records: list[harness.Record] = []

    def log(r: harness.Record) -> None:
        harness.echo(r)
        with out.open("a") as f:
            f.write(json.dumps(harness.record_json(r)) + "\n")

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        workdir = Path(tmp)
        records += harness.run_interleaved(
            subs, args.workloads.split(","), harness.LOOPBACK, args.reps, args.seconds, workdir, log
        )
        for s in subs:
            if not s.relays:
                continue
            rec = harness.measure_startup(s, workdir, 5)
            log(rec)
            records.append(rec)
            if not args.skip_memory:
                n = min(s.memory_connections, args.memory_connections)
                rec = harness.measure_memory(s, workdir, n)
                log(rec)
                records.append(rec)
        if args.netns and not netns.available():
            ns_subs = [s for s in subs if s.name in NETNS_SUBJECTS]
            with netns.veth_topology() as topo:
                records += harness.run_interleaved(
                    ns_subs,
                    [harness.THROUGHPUT_UP, harness.THROUGHPUT_DOWN, harness.RTT],
                    topo,
                    args.reps,
                    args.seconds,
                    workdir,
                    log,
                )
    print(table(records))
    if args.netns:
        print(table(records, "netns"))
    print(f"raw records: {out}")


if __name__ == "__main__":
    main()
