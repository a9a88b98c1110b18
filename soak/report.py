"""The verdict on a run (pass conditions over the figures), the printed summary and docs/reliability.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from soak import faults
from soak.clients import STALL
from soak.ledger import CORRUPTED, EXPECTED, UNEXPECTED, VERIFIED

MiB = 1024 * 1024
FD_SLACK = 2  # descriptors an idle relay may hold more at the end than at the start
RSS_GROWTH = 1.25  # last loaded sample / first loaded sample, plus RSS_SLACK
RSS_SLACK = 8 * MiB
LOG_LINES_PER_MINUTE = 200  # a relay's log stays readable: repeated warnings are rate-limited
BLACKHOLE_STARTUP = 5.0  # seconds to listening for the relay whose resolver never answers
KINDS = (
    "small",
    "large",
    "slow reader",
    "request/response",
    "idle",
    "early reset",
    "garbage, reset",
    "garbage, FIN",
)
INJECTED = (faults.KILLED, faults.REFUSING, faults.SILENT, faults.RELOAD, faults.DESCRIPTORS)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def checks(fig: dict[str, Any]) -> list[Check]:
    v = fig["verdicts"]
    out = [
        Check("no corrupted transfer", v.get(CORRUPTED, 0) == 0, f"{v.get(CORRUPTED, 0)} corrupted"),
        Check(
            "no failure outside a fault window",
            v.get(UNEXPECTED, 0) == 0,
            f"{v.get(UNEXPECTED, 0)} unexpected, {v.get(EXPECTED, 0)} excused by a fault",
        ),
        Check(
            "the harness injected every fault as planned",
            not fig["problems"],
            "; ".join(fig["problems"]) or "yes",
        ),
    ]
    missing = [k for k in KINDS if fig["kinds"].get(k, {}).get(VERIFIED, 0) == 0]
    out.append(
        Check("every kind of traffic verified at least once", not missing, ", ".join(missing) or "yes")
    )
    absent = [f for f in INJECTED if fig["faults"].get(f, {}).get("injected", 0) == 0]
    killed = fig["faults"].get(faults.KILLED, {})
    if killed and killed.get("cut", 0) == 0:
        absent.append("no transfer was cut by a target kill")
    out.append(Check("every fault injected at least once", not absent, ", ".join(absent) or "yes"))
    for name, r in fig["relays"].items():
        out.append(
            Check(
                f"{name}: relay_connections_active back to 0",
                r["active_end"] == 0,
                f"{r['active_end']} after {r['active_wait_seconds']:.1f} s"
                + "".join(f", {route} {n}" for route, n in r["active_end_by_route"].items()),
            )
        )
        out.append(
            Check(
                f"{name}: ran to the end, exit 0 on SIGTERM",
                r["alive_at_end"] and r["exit_code"] == 0,
                f"alive {r['alive_at_end']}, exit {r['exit_code']} after {r['stop_seconds']:.2f} s",
            )
        )
        bound = LOG_LINES_PER_MINUTE * max(1.0, fig["elapsed_seconds"] / 60)
        out.append(
            Check(
                f"{name}: log not flooded",
                r["log_lines"] <= bound,
                f"{r['log_lines']} lines (bound {bound:.0f})",
            )
        )
        if r["end"] is not None:
            start, end = r["start"]["fds"], r["end"]["fds"]
            out.append(Check(f"{name}: open descriptors flat", end <= start + FD_SLACK, f"{start} → {end}"))
            first, last = r["first_loaded"]["rss_bytes"], r["last_loaded"]["rss_bytes"]
            out.append(
                Check(
                    f"{name}: RSS flat under load",
                    last <= first * RSS_GROWTH + RSS_SLACK,
                    f"{first / MiB:.1f} → {last / MiB:.1f} MiB",
                )
            )
    if "blackhole" in fig["relays"]:
        secs = fig["relays"]["blackhole"]["startup_seconds"]
        out.append(
            Check(
                "blackhole: listening without waiting for DNS",
                secs <= BLACKHOLE_STARTUP,
                f"{secs:.2f} s to listening (bound {BLACKHOLE_STARTUP:g} s)",
            )
        )
    answers = fig["readiness_during_descriptor_limit"]
    full = [a for phase, a in answers if phase == faults.SLOTS_FULL]
    out.append(
        Check(
            "fdlim: /readyz 503 while every connection slot is taken",
            bool(full) and all(a.startswith("503") for a in full),
            f"{sum(a.startswith('503') for a in full)} of {len(full)} answers were 503"
            + "".join(f"; {a[:120]}" for a in dict.fromkeys(a for a in full if not a.startswith("503"))),
        )
    )
    flooded = [a for phase, a in answers if phase == faults.SCRAPES_HELD]
    out.append(
        Check(
            "fdlim: /readyz never 200 while the metrics port is flooded too",
            not any(a.startswith("200") for a in flooded),
            f"{sum(a.startswith('200') for a in flooded)} of {len(flooded)} answers were 200",
        )
    )
    return out


def passed(fig: dict[str, Any]) -> bool:
    return all(c.ok for c in checks(fig))


def _mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def _rss(r: dict[str, Any]) -> str:
    """start → first loaded … last loaded → end (MiB)."""
    end = (r["end"] or {}).get("rss_bytes", 0)
    first, last = r["first_loaded"]["rss_bytes"], r["last_loaded"]["rss_bytes"]
    return f"{_mib(r['start']['rss_bytes'])} → {_mib(first)} … {_mib(last)} → {_mib(end)} MiB"


def summary(fig: dict[str, Any]) -> list[str]:
    """The figures as printed at the end of a run."""
    v = fig["verdicts"]
    wait = fig["longest_honest_wait"]
    lines = [
        f"soak: {fig['elapsed_seconds']:.0f} s of load, seed {fig['plan']['seed']}",
        f"  operations: {v.get(VERIFIED, 0)} verified ({fig['bytes_verified'] / MiB:.0f} MiB checked), "
        f"{v.get(CORRUPTED, 0)} corrupted, {v.get(EXPECTED, 0)} failed by a fault, "
        f"{v.get(UNEXPECTED, 0)} failed otherwise",
        f"  longest wait for an honest error after a fault: {_ms(wait['seconds'])} ({wait['fault'] or '-'}); "
        f"clients that gave up (silent target): {fig['gave_up']['count']}",
    ]
    for name, r in fig["relays"].items():
        lines.append(
            f"  relay {name} ({r['loop']}): start-up {r['startup_seconds']:.2f} s, RSS {_rss(r)}, "
            f"fds {r['start']['fds']} → {(r['end'] or {}).get('fds', '?')}, active at end {r['active_end']}, "
            f"exit {r['exit_code']}, {r['log_lines']} log lines"
        )
    for name, f in fig["faults"].items():
        lines.append(
            f"  fault {name}: {f['injected']} times, excused {f['excused']} ({f['cut']} cut in flight), "
            f"survived {f['survived']}, longest honest wait {_ms(f['longest_honest_wait'])}"
        )
    lines += [f"  errors {key}: {n}" for key, n in fig["errors"].items()]
    for verdict, examples in fig["examples"].items():
        lines += [f"  {verdict}: {e}" for e in examples[:5]]
    lines += [f"  note: {n}" for n in fig["notes"]]
    lines += [f"  {'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in checks(fig)]
    for name, r in fig["relays"].items():
        if r["log_tail"]:
            lines += [f"  relay {name} log (last lines):", *("    " + s for s in r["log_tail"].splitlines())]
    return lines


def table(head: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]


def conditions(results: Sequence[Check]) -> list[str]:
    """The pass-conditions table (the fault run's and the hostile mode's)."""
    return table(
        ("condition", "result", "figure"),
        [(c.name, "pass" if c.ok else "**FAIL**", c.detail) for c in results],
    )


def document(fig: dict[str, Any]) -> str:
    """docs/reliability.md from the figures of one run (with its command, date and machine)."""
    v = fig["verdicts"]
    ok = passed(fig)
    relays = fig["relays"]
    wait = fig["longest_honest_wait"]
    lines = [
        "# Reliability: the soak and fault run",
        "",
        f"Generated by `{fig['command']}` on {fig['date']}: "
        f"{fig['elapsed_seconds'] / 60:.1f} minutes of load while faults were injected, "
        f"seed {fig['plan']['seed']}. Result: **{'PASS' if ok else 'FAIL'}**.",
        "",
        "## Pass conditions",
        "",
        *conditions(checks(fig)),
        "",
        "## Transfers",
        "",
        f"{v.get(VERIFIED, 0):,} operations verified, {fig['bytes_verified'] / MiB:,.0f} MiB checked "
        f"byte for byte; {v.get(CORRUPTED, 0)} corrupted; {v.get(EXPECTED, 0):,} failed by an injected fault "
        f"(expected); {v.get(UNEXPECTED, 0)} failed otherwise. The longest a client waited for an honest "
        f"error (reset, end of stream or refusal) after a fault hit it: {_ms(wait['seconds'])} "
        f"({wait['fault'] or 'none'}). {fig['gave_up']['count']} clients of the silent "
        f"target gave up after their own {STALL:g} s timeout, as they must: the relay has no idle timeout "
        "by default and cannot tell a silent server from a slow one.",
        "",
        *table(
            ("operation", "verified", "failed by a fault", "failed otherwise", "corrupted"),
            [
                (k, *(f"{n.get(x, 0):,}" for x in (VERIFIED, EXPECTED, UNEXPECTED, CORRUPTED)))
                for k, n in fig["kinds"].items()
            ],
        ),
        "",
        "## Faults",
        "",
        *table(
            (
                "fault",
                "what it does",
                "injected",
                "failures it excused (cut in flight)",
                "verified through it",
                "longest honest wait",
            ),
            [
                (
                    name,
                    faults.DESCRIPTIONS[name],
                    f["injected"],
                    f"{f['excused']:,} ({f['cut']})",
                    f"{f['survived']:,}",
                    f"{f['longest_honest_wait'] * 1000:.0f} ms",
                )
                for name, f in fig["faults"].items()
            ],
        ),
        "",
        f"Slow readers: {faults.DESCRIPTIONS[faults.SLOW]}.",
        "",
    ]
    if "blackhole" in relays:
        t = fig["timing"]
        rel, direct = t.get("blackhole", {}), t.get("blackhole (direct)", {})
        first = t.get("blackhole (first connection)", {}).get("max_ms", 0)
        lines += [
            f"Resolver black hole: {faults.DESCRIPTIONS[faults.BLACKHOLE]}. That relay listened "
            f"{relays['blackhole']['startup_seconds']:.2f} s after it was started; its first connection "
            f"waited {first:.0f} ms for the first answer of the resolver chain, later small transfers "
            f"through it took {rel.get('mean_ms', 0):.1f} ms on average, "
            f"{rel.get('max_ms', 0):.1f} ms at most ({rel.get('verified', 0)} verified), the same transfer "
            "straight to the target "
            f"{direct.get('mean_ms', 0):.1f} ms, {direct.get('max_ms', 0):.1f} ms at most.",
            "",
        ]
    answers = sorted({(phase, a) for phase, a in fig["readiness_during_descriptor_limit"]})
    if answers:
        lines += ["`/readyz` of the descriptor-limited relay during the episodes (distinct answers):", ""]
        lines += [f"- {phase}: `{a}`" for phase, a in answers]
        lines.append("")
    lines += [
        "## The relays",
        "",
        *table(
            (
                "relay",
                "loop",
                "start to listening",
                "RSS start → loaded (first … last) → end",
                "descriptors start → end",
                "active at end",
                "exit on SIGTERM",
            ),
            [
                (
                    name,
                    r["loop"],
                    f"{r['startup_seconds']:.2f} s",
                    _rss(r),
                    f"{r['start']['fds']} → {(r['end'] or {}).get('fds', '?')}",
                    f"{r['active_end']} (after {r['active_wait_seconds']:.1f} s)",
                    f"{r['exit_code']} in {r['stop_seconds']:.2f} s",
                )
                for name, r in relays.items()
            ],
        ),
        "",
        "## How it runs",
        "",
        "- **Relays**: real `python -m relay --config FILE` processes. `main` forwards routes `bulk`, `rr`, "
        "`storm`, `crashy`, `flaky` and `hup-0..2` on 127.0.0.1; `fdlim` runs on the other event loop under "
        "a descriptor limit; `blackhole` runs in its own network namespace (root only). RSS and descriptors "
        "come from `/proc/PID/status` and `/proc/PID/fd` (at start, every 5 s under load, and at the end, "
        "idle); `relay_connections_active` is summed over routes from `/metrics` once the load has stopped.",
        "- **Targets**: asyncio servers in the harness on 127.0.0.1 (port 0, held by a placeholder socket "
        "so a target can stop and start on the same port), and one subprocess for `crashy`. A client sends "
        "a header, its upload and FIN; only then the target answers with the upload's length and sha256 and "
        "the reply, "
        "so every transfer is a half-close reply. Payloads are slices of a seeded random pool: each byte is "
        "checked on arrival.",
        "- **Load**: transfers (70 % up to 64 KiB each way, 20 % 0.25-4 MiB each way, 10 % slow readers), "
        "request/response connections (20-200 rounds), idle connections held 2-10 s between two rounds, and "
        "a storm of early resets (SO_LINGER 0 close 0-1 ms after connecting), garbage then reset, and "
        "garbage then FIN.",
        "- **Special operations**: *held* connections go through the descriptor-limited relay during an "
        "episode (those beyond its connection slots are turned away: failed by the fault); a *victim* is the "
        "upload in flight when the `crashy` target is killed. When the load stops, the silent target hangs "
        f"up on the connections it still holds ({fig.get('silent_hung_up', 0)} this run), as a real server "
        "eventually would: a client that half-closed and then gave up cannot be seen by a relay that has "
        "nothing to send it, so such a pair lasts until the target ends it (or `half_close_timeout`).",
        "- **Verdicts**: an operation is *verified* when every byte checked out, *corrupted* when any byte "
        "(or the target's sha256 of the upload) was wrong, *failed by a fault* when it failed and overlapped "
        "a window of a fault on its route (for a route removed by a reload: only connections opened while it "
        "was gone, or in the second before), else *failed otherwise*. A client gives up after "
        f"{STALL:g} s without progress.",
        "",
        "## Machine",
        "",
        *table(("", ""), fig["machine"]),
        "",
    ]
    if fig["notes"]:
        lines += ["## Notes", "", *(f"- {n}" for n in fig["notes"]), ""]
    return "\n".join(lines)
