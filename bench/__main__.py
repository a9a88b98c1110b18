"""The benchmark of issue 5: ``python -m bench`` (``scripts/bench`` installs the tools first).

Compares the relay with socat as users run it, HAProxy in mode tcp and a direct connection, in one
run, interleaved, repeated, and writes the medians with ratios, the targets and a chart to
``docs/benchmarks.md`` and ``docs/benchmarks.png`` (``--out`` elsewhere). ``--smoke`` runs every part
for about a second, for CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import harness, netns, proc, report, subjects, tls, udp, unix
from bench.subjects import Subject

REPO = Path(__file__).resolve().parent.parent
TOOLS = ("socat", "haproxy", "iperf3", "sockperf", "wrk", "nginx")
SUBJECTS = {s.name: s for s in (subjects.RELAY, subjects.SOCAT, subjects.HAPROXY, subjects.DIRECT)}
NETNS_WORKLOADS = (harness.THROUGHPUT_UP, harness.THROUGHPUT_DOWN, harness.RTT)


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def relay_available(python: str) -> str:
    """Empty when ``python -m relay --help`` works, else why not."""
    try:
        r = subprocess.run([python, "-m", "relay", "--help"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return "" if r.returncode == 0 else (r.stderr.decode(errors="replace").strip().splitlines() or ["?"])[-1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="about a second per measurement, one repetition (CI)")
    p.add_argument("--reps", type=int, help="repetitions (default 4; smoke 1)")
    p.add_argument("--seconds", type=float, help="length of each measurement (default 2; smoke 1)")
    p.add_argument("--subjects", default="relay,socat,haproxy,direct", help="comma list")
    p.add_argument(
        "--workloads",
        help="comma list (default all; smoke throughput_up,rtt,conns); none: UDP workloads only",
    )
    p.add_argument("--memory-connections", type=int, help="held connections (default 5000; smoke 100)")
    p.add_argument("--no-netns", action="store_true", help="skip the namespace + veth topology")
    p.add_argument(
        "--udp-workloads",
        help=f"UDP workloads, comma list, or none (default {','.join(udp.ALL_WORKLOADS)}; smoke udp_rtt)",
    )
    p.add_argument("--out", type=Path, default=REPO / "docs", help="where benchmarks.md/.png go")
    p.add_argument("--python", default=sys.executable, help="interpreter that runs the relay")
    p.add_argument(
        "--before",
        metavar="PYTHON",
        help="also measure the relay run by this interpreter (a wrapper that starts it in an earlier "
        "checkout) as subject relay-before, in the same run",
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="RAW.jsonl",
        help="measure nothing: rewrite the report from the raw records of an earlier run",
    )
    args = p.parse_args(argv)
    args.reps = args.reps or (1 if args.smoke else 4)
    args.seconds = args.seconds or (1.0 if args.smoke else 2.0)
    args.memory_connections = args.memory_connections or (100 if args.smoke else 5000)
    smoke_workloads = (harness.THROUGHPUT_UP, harness.RTT, harness.CONNS)
    args.workloads = args.workloads or ",".join(smoke_workloads if args.smoke else harness.ALL_WORKLOADS)
    if args.udp_workloads is None:
        args.udp_workloads = udp.UDP_RTT if args.smoke else ",".join(udp.ALL_WORKLOADS)
    if args.udp_workloads == "none":
        args.udp_workloads = ""
    return args


def rerender(args: argparse.Namespace) -> int:
    meta = json.loads(args.render.with_suffix(".meta.json").read_text())
    for key in ("smoke", "reps", "seconds", "memory_connections"):
        setattr(args, key, meta[key])
    args.udp_subjects = meta.get("udp_subjects", [])
    records = [harness.Record(**json.loads(line)) for line in args.render.read_text().splitlines() if line]
    machine = [(str(k), str(v)) for k, v in meta.get("machine", [])] or report.machine(args.python)
    write_report(records, meta["subjects"], args, meta["elapsed"], meta["notes"], machine)
    return 0


def write_report(
    records: list[harness.Record],
    names: list[str],
    args: argparse.Namespace,
    elapsed: float,
    notes: list[str],
    machine: list[tuple[str, str]],
) -> bool:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks.md").write_text(render(records, names, args, elapsed, notes, machine))
    return report.chart(harness.medians(records), names, args.out / "benchmarks.png")


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds every `with`: processes stopped, namespaces deleted


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return rerender(args)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)  # also when started in the background (SIGINT ignored)
    if missing := missing_tools():
        print(f"bench: missing tools: {' '.join(missing)} (scripts/bench installs them)", file=sys.stderr)
        return 2
    notes: list[str] = []
    names = [n for n in args.subjects.split(",") if n]
    if "relay" in names and (why := relay_available(args.python)):
        print(f"bench: relay not runnable ({why}); leaving it out", file=sys.stderr)
        notes.append(f"The relay was not runnable ({why}) and is left out.")
        names.remove("relay")
    subs: list[Subject] = []
    for n in names:
        if n not in SUBJECTS:
            print(f"bench: unknown subject {n!r}; expected some of {', '.join(SUBJECTS)}", file=sys.stderr)
            return 2
        s = SUBJECTS[n]
        subs.append(dataclasses.replace(s, python=args.python))
    if args.before:
        subs.append(dataclasses.replace(subjects.RELAY, name="relay-before", python=args.before))
    workloads = [w for w in args.workloads.split(",") if w and w != "none"]  # none: UDP only
    started = time.time()
    load_before = os.getloadavg()[0]  # other work on the machine moves every figure: say how much
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    records: list[harness.Record] = []
    machine = report.machine(args.python)  # at the start: the commit measured

    def log(r: harness.Record) -> None:
        harness.echo(r)
        records.append(r)
        with raw.open("a") as f:
            f.write(json.dumps(harness.record_json(r)) + "\n")

    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        workdir = Path(tmp)
        print(
            f"bench: loopback, {len(subs)} subjects, {len(workloads)} workloads, {args.reps} reps",
            file=sys.stderr,
        )
        harness.run_interleaved(subs, workloads, harness.LOOPBACK, args.reps, args.seconds, workdir, log)
        udp_workloads = [w for w in args.udp_workloads.split(",") if w]
        args.udp_subjects = []
        if udp_workloads and (missing_udp := udp.missing_tools(udp_workloads)):
            notes.append(f"UDP workloads not run: missing {' '.join(missing_udp)}.")
        elif udp_workloads:
            # Smoke: prove the UDP path works; the comparison with socat is for full runs.
            udp_subs = udp.subjects([n for n in names if n != "socat" or not args.smoke], args.python)
            args.udp_subjects = [s.name for s in udp_subs]
            print(f"bench: UDP, {len(udp_subs)} subjects, {len(udp_workloads)} workloads", file=sys.stderr)
            rtt_reps = args.reps if args.smoke else args.reps * udp.RTT_REPS
            udp.run_interleaved(udp_subs, udp_workloads, args.reps, args.seconds, workdir, log, rtt_reps)
        relaying = [s for s in subs if s.relays] if workloads else []
        for s in relaying:
            log(harness.measure_startup(s, workdir, 2 if args.smoke else 7))
        for s in relaying:
            log(harness.measure_memory(s, workdir, min(args.memory_connections, s.memory_connections)))
        nw = [w for w in workloads if w in NETNS_WORKLOADS]
        if args.no_netns or not nw:
            notes.append("The namespace + veth topology was not run (--no-netns).")
        elif why := netns.available():
            print(f"bench: skipping the namespace topology: {why}", file=sys.stderr)
            notes.append(f"The namespace + veth topology was not run: {why}.")
        else:
            print("bench: namespace + veth topology", file=sys.stderr)
            ns_subs = subs
            if args.smoke:  # prove the topology works; the comparison is for full runs
                ns_subs = [s for s in subs if s.name in ("relay", "direct")] or subs
                nw = nw[:1]
            with netns.veth_topology() as topo:
                harness.run_interleaved(ns_subs, nw, topo, args.reps, args.seconds, workdir, log)
    elapsed = time.time() - started
    notes.append(
        f"Load average (1 min) on {os.cpu_count()} cores: {load_before:.2f} at the start of the run, "
        f"{os.getloadavg()[0]:.2f} at the end (the run itself keeps about 2 busy)."
    )
    errors = [r for r in records if r.error]
    if left := proc.leftovers():
        print(f"bench: processes left running: {left}", file=sys.stderr)
        errors.append(harness.Record("-", "cleanup", "-", 0, error=f"left running: {left}"))
    meta = {
        "smoke": args.smoke,
        "reps": args.reps,
        "seconds": args.seconds,
        "memory_connections": args.memory_connections,
        "elapsed": elapsed,
        "notes": notes,
        "subjects": [s.name for s in subs],
        "udp_subjects": args.udp_subjects,
        "machine": machine,
    }
    raw.with_suffix(".meta.json").write_text(json.dumps(meta))
    drew = write_report(records, [s.name for s in subs], args, elapsed, notes, machine)
    print(
        f"bench: wrote {args.out / 'benchmarks.md'}{' and benchmarks.png' if drew else ''}; raw {raw}; "
        f"{len(records)} measurements, {len(errors)} failed, {elapsed:.0f} s",
        file=sys.stderr,
    )
    return 1 if errors else 0


def render(
    records: list[harness.Record],
    names: list[str],
    args: argparse.Namespace,
    elapsed: float,
    notes: list[str],
    machine: list[tuple[str, str]],
) -> str:
    med = harness.medians(records)
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `scripts/bench{' --smoke' if args.smoke else ''}` on {time.strftime('%Y-%m-%d')} "
        f"in {elapsed / 60:.1f} minutes: {args.reps} repetitions of {args.seconds:g} s per measurement, "
        "subjects interleaved (the order rotates each repetition), medians shown.",
        "",
        "![benchmark chart](benchmarks.png)",
        "",
    ]
    if "relay" in names:
        targets, missed = report.targets_table(med)
        lines += [
            "## Targets (issue 13, ratios from this run)",
            "",
            *targets,
            "",
            (
                f"{missed} target(s) missed; what was tried, with numbers, and where the time goes are under "
                "*Speed work* below."
                if missed
                else "Every target met."
            ),
            "",
        ]
    lines += [
        "## Loopback",
        "",
        "Load → subject → server, all on 127.0.0.1.",
        "",
        *report.results_table(med, "loopback", names),
        "",
    ]
    if any(r.topology == udp.TOPOLOGY for r in records):
        udp_names = [n for n in getattr(args, "udp_subjects", []) if any(r.subject == n for r in records)]
        lines += [
            "## UDP (loopback)",
            "",
            "Load → subject → server over UDP, all on 127.0.0.1 (issue 10). Medians; ratios are the relay's.",
            "",
            *udp.report_lines(med, udp_names),
            "",
        ]
    if any(r.topology == "netns" for r in records):
        lines += [
            "## Sidecar topology: namespace + veth",
            "",
            'Load and subject in an "app" network namespace, the server in another across a veth '
            f"pair ({netns.APP_ADDR} → {netns.HOST_ADDR}, MTU 1500), as in the sidecar tests.",
            "",
            *report.results_table(med, "netns", names),
            "",
        ]
    # The Unix-socket target section (python -m bench.unix, issue 11) is measured apart: kept as it was.
    if kept := unix.carried(args.out / "benchmarks.md"):
        lines += [*kept, ""]
    # So is the TLS section (python -m bench.tls, issue 18).
    if kept := unix.carried(args.out / "benchmarks.md", tls.BEGIN, tls.END):
        lines += [*kept, ""]
    lines += [
        "## How it is measured",
        "",
        "- **subjects**: the relay (`python -m relay --ports L:Q --target 127.0.0.1 --listen 127.0.0.1 "
        "--metrics off`); socat as users run it "
        "(`socat tcp-listen:L,fork,reuseaddr tcp-connect:127.0.0.1:Q`, default 8 KiB buffer); "
        "HAProxy 'mode tcp', one frontend and one server, default threads; direct "
        "(the load connects to the server itself: the limit). Each is started fresh for each measurement.",
        "- **throughput**: `iperf3 -t S` (client → server), `-R` (server → client), `-P 8`; goodput at the "
        "receiver.",
        "- **round trip**: `sockperf ping-pong --tcp -m 64 --full-rtt`, percentiles of the full round trip.",
        "- **new connections**: `wrk -t1 -c16 -H 'Connection: close'` against nginx (`return 200`): every "
        "request is a new relayed connection.",
        f"- **memory**: RSS of the subject's process tree idle, then with {args.memory_connections} "
        "connections held open (each carried one echoed byte), divided by the connections. socat forks a "
        f"process per connection, so it holds {subjects.SOCAT.memory_connections} and its RSS sums every "
        "child (shared pages counted in each); PSS shares them out.",
        "- **start to listening**: spawn → the port is in LISTEN (netlink sock_diag), median of several.",
        *udp.describe(),
        "- Raw records of each run: `bench/results/*.jsonl` (not committed).",
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine),
        "",
    ]
    for name in ("SPEED.md", "FINDINGS.md"):  # speed work (issue 13), pump experiments: kept by hand
        findings = REPO / "bench" / "experiments" / name
        if findings.exists():
            lines += [findings.read_text().rstrip(), ""]
    if notes:
        lines += ["## Notes", "", *(f"- {n}" for n in notes), ""]
    failed = [r for r in records if r.error]
    if failed:
        lines += [
            "## Failed measurements",
            "",
            *(
                f"- {r.topology} {r.workload} {r.subject} rep {r.rep}: `{r.error.strip()[:200]}`"
                for r in failed
            ),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
