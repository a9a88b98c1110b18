"""Render a run: the machine, tables of medians with ratios, the targets, and a chart."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import harness

Medians = dict[tuple[str, str, str], dict[str, float]]
X = "\u00d7"  # multiplication sign
NONE = "\u2013"  # en dash: not measured


@dataclass(frozen=True)
class Metric:
    workload: str
    key: str
    label: str
    unit: str
    higher_is_better: bool


METRICS = (
    Metric(harness.THROUGHPUT_UP, "gbit_s", "throughput, 1 stream, client → server", "Gbit/s", True),
    Metric(harness.THROUGHPUT_DOWN, "gbit_s", "throughput, 1 stream, server → client", "Gbit/s", True),
    Metric(harness.THROUGHPUT_8, "gbit_s", "throughput, 8 streams", "Gbit/s", True),
    Metric(harness.RTT, "p50_us", "64-byte round trip p50", "µs", False),
    Metric(harness.RTT, "p99_us", "64-byte round trip p99", "µs", False),
    Metric(harness.CONNS, "conn_s", "new connections (1 request each)", "conn/s", True),
    Metric("memory", "rss_per_conn_bytes", "RSS per held connection", "bytes", False),
    Metric("memory", "pss_per_conn_bytes", "PSS per held connection", "bytes", False),
    Metric("startup", "seconds", "start to listening", "ms", False),
)


def _cmd(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    return (out.stdout + out.stderr).strip()


def _first(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    return m.group(1) if m else text.splitlines()[0] if text else "?"


def machine(python: str) -> list[tuple[str, str]]:
    cpu = "?"
    try:
        cpu = _first(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        pass
    mem = "?"
    try:
        kb = int(_first(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()))
        mem = f"{kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError):
        pass
    distro = "?"
    try:
        distro = _first(r'PRETTY_NAME="(.+)"', Path("/etc/os-release").read_text())
    except OSError:
        pass
    code = "import sys, uvloop; print(sys.version.split()[0], uvloop.__version__)"
    pyver = _cmd([python, "-c", code]).split()
    repo = str(Path(__file__).resolve().parent.parent)
    commit = _cmd(["git", "-C", repo, "log", "-1", "--format=%h (%cs)"])
    dirty = _cmd(["git", "-C", repo, "status", "--porcelain", "relay"])
    return [
        ("relay", f"commit {commit.splitlines()[0] if commit else '?'}{' + local changes' if dirty else ''}"),
        ("CPU", f"{os.cpu_count()} cores, {cpu}"),
        ("memory", mem),
        ("kernel", f"{platform.system()} {platform.release()}"),
        ("distribution", distro),
        ("Python", pyver[0] if pyver else "?"),
        ("uvloop", pyver[1] if len(pyver) > 1 else "?"),
        ("socat", _first(r"socat version (\S+)", _cmd(["socat", "-V"]))),
        ("HAProxy", _first(r"HAProxy version (\S+)", _cmd(["haproxy", "-v"]))),
        ("iperf3", _first(r"iperf (\S+)", _cmd(["iperf3", "--version"]))),
        ("sockperf", _first(r"version #?(\S+)", _cmd(["sockperf", "--version"]))),
        ("wrk", _first(r"wrk (\S+)", _cmd(["wrk", "-v"]))),
        ("nginx", _first(r"nginx/(\S+)", _cmd(["nginx", "-v"]))),
    ]


def _fmt(metric: Metric, v: float | None) -> str:
    if v is None:
        return NONE
    if metric.unit == "ms":
        return f"{v * 1000:.0f}"
    if metric.unit == "bytes":
        return f"{v / 1024:.1f} KiB" if v < 1024 * 1024 else f"{v / 1024 / 1024:.1f} MiB"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return NONE
    r = a / b
    return f"{r:.2f}{X}" if r >= 0.01 else f"{r:.1e}{X}"


def results_table(med: Medians, topology: str, subjects: Sequence[str], main: str = "relay") -> list[str]:
    head = ["measure", *subjects, f"{main} ÷ socat", f"{main} ÷ haproxy", f"{main} ÷ direct"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METRICS:
        vals = {s: med.get((topology, m.workload, s), {}).get(m.key) for s in subjects}
        if m.key == "pss_per_conn_bytes":  # only telling for a process per connection (socat)
            vals = {
                s: v if med.get((topology, m.workload, s), {}).get("processes", 1) > 1 else None
                for s, v in vals.items()
            }
        if all(v is None for v in vals.values()):
            continue
        cells = [
            f"{m.label} ({m.unit})",
            *(_fmt(m, vals[s]) for s in subjects),
            _ratio(vals.get(main), vals.get("socat")),
            _ratio(vals.get(main), vals.get("haproxy")),
            _ratio(vals.get(main), vals.get("direct")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


@dataclass(frozen=True)
class Target:
    label: str
    workload: str
    key: str
    against: str  # socat | haproxy | direct | absolute
    limit: float
    at_least: bool
    topology: str = "loopback"


# Issue 13's targets (issue 5's, met in its run, are the looser forms of the same rows).
TARGETS = (
    Target(f"new connections/s ≥ 1.0{X} HAProxy", harness.CONNS, "conn_s", "haproxy", 1.0, True),
    Target(f"new connections/s ≥ 3{X} socat", harness.CONNS, "conn_s", "socat", 3.0, True),
    Target(f"64-byte RTT p50 ≤ 0.95{X} socat, loopback", harness.RTT, "p50_us", "socat", 0.95, False),
    Target(f"64-byte RTT p99 ≤ 1.0{X} socat, loopback", harness.RTT, "p99_us", "socat", 1.0, False),
    Target(
        f"64-byte RTT p50 ≤ 0.95{X} socat, namespace", harness.RTT, "p50_us", "socat", 0.95, False, "netns"
    ),
    Target(f"64-byte RTT p99 ≤ 1.0{X} socat, namespace", harness.RTT, "p99_us", "socat", 1.0, False, "netns"),
    Target(
        f"throughput 1 stream up ≥ 2.9{X} socat (≈3{X})", harness.THROUGHPUT_UP, "gbit_s", "socat", 2.9, True
    ),
    Target(
        f"throughput 1 stream down ≥ 2.9{X} socat (≈3{X})",
        harness.THROUGHPUT_DOWN,
        "gbit_s",
        "socat",
        2.9,
        True,
    ),
    Target(f"throughput 1 stream up ≥ 0.63{X} direct", harness.THROUGHPUT_UP, "gbit_s", "direct", 0.63, True),
    Target(
        f"throughput 1 stream down ≥ 0.63{X} direct", harness.THROUGHPUT_DOWN, "gbit_s", "direct", 0.63, True
    ),
    Target("RSS per held connection ≤ 4 KB", "memory", "rss_per_conn_bytes", "absolute", 4000, False),
    Target("start to listening ≤ 250 ms", "startup", "seconds", "absolute", 0.25, False),
)


def targets_table(med: Medians, main: str = "relay") -> tuple[list[str], int]:
    lines = ["| target | measured | met |", "|---|---|---|"]
    missed = 0
    for t in TARGETS:
        topology = t.topology
        v = med.get((topology, t.workload, main), {}).get(t.key)
        if t.against == "absolute":
            ratio = v
            shown = NONE if v is None else (f"{v * 1000:.0f} ms" if t.key == "seconds" else f"{v:,.0f} B")
        else:
            ref = med.get((topology, t.workload, t.against), {}).get(t.key)
            ratio = None if v is None or not ref else v / ref
            shown = NONE if ratio is None else f"{ratio:.2f}{X}"
        if ratio is None:
            ok = "not measured"
        elif (ratio >= t.limit) if t.at_least else (ratio <= t.limit):
            ok = "yes"
        else:
            ok = (
                f"**no** ({ratio / t.limit:.0%} of the target)"
                if t.at_least
                else f"**no** ({ratio / t.limit:.2f}{X} the limit)"
            )
            missed += 1
        lines.append(f"| {t.label} | {shown} | {ok} |")
    return lines, missed


def chart(med: Medians, subjects: Sequence[str], path: Path) -> bool:
    """Six panels of medians; False when matplotlib is not installed (the ``bench`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [
        (
            "loopback: throughput (Gbit/s)",
            "loopback",
            [
                (harness.THROUGHPUT_UP, "gbit_s", "1 up"),
                (harness.THROUGHPUT_DOWN, "gbit_s", "1 down"),
                (harness.THROUGHPUT_8, "gbit_s", "8 streams"),
            ],
            False,
        ),
        (
            "loopback: 64-byte round trip (µs)",
            "loopback",
            [(harness.RTT, "p50_us", "p50"), (harness.RTT, "p99_us", "p99")],
            False,
        ),
        ("loopback: new connections/s", "loopback", [(harness.CONNS, "conn_s", "conn/s")], False),
        (
            "memory per held connection (bytes, log)",
            "loopback",
            [("memory", "rss_per_conn_bytes", "RSS")],
            True,
        ),
        (
            "veth + namespace: throughput (Gbit/s)",
            "netns",
            [(harness.THROUGHPUT_UP, "gbit_s", "1 up"), (harness.THROUGHPUT_DOWN, "gbit_s", "1 down")],
            False,
        ),
        (
            "veth + namespace: 64-byte round trip (µs)",
            "netns",
            [(harness.RTT, "p50_us", "p50"), (harness.RTT, "p99_us", "p99")],
            False,
        ),
    ]
    colors = {"relay": "#1f77b4", "socat": "#d62728", "haproxy": "#2ca02c", "direct": "#7f7f7f"}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (title, topo, groups, log) in zip(axes.flat, panels, strict=True):
        width = 0.8 / max(1, len(subjects))
        any_bar = False
        for i, s in enumerate(subjects):
            xs, ys = [], []
            for j, (wl, key, _) in enumerate(groups):
                v = med.get((topo, wl, s), {}).get(key)
                if v is not None and v > 0:
                    xs.append(j + (i - (len(subjects) - 1) / 2) * width)
                    ys.append(v)
            if xs:
                any_bar = True
                ax.bar(xs, ys, width, label=s, color=colors.get(s))
        ax.set_title(title, fontsize=10)
        ax.set_xticks(range(len(groups)), [g[2] for g in groups])
        if log and any_bar:
            ax.set_yscale("log")
        if not any_bar:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(subjects), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True
