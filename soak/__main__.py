"""The soak and fault run of issue 8: ``python -m soak`` (``scripts/soak`` bootstraps first).

Drives verified traffic through real relay processes for a bounded time while injecting faults, prints
the figures, exits 1 when a pass condition fails (2 on bad arguments), and with ``--write-doc`` writes
docs/reliability.md. ``--json FILE`` saves the figures for tests and tools.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from bench import proc
from bench import report as bench_report
from soak import hostile, report
from soak.run import Plan, SoakError, soak

REPO = Path(__file__).resolve().parent.parent
MACHINE_KEYS = ("relay", "CPU", "memory", "kernel", "distribution", "Python", "uvloop")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"soak: error: {message}; see python -m soak --help", file=sys.stderr)
        sys.exit(2)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 24 * 60:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length; expected a number above 0, at most 1440")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m soak", description=(__doc__ or "").splitlines()[0])
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--seconds", type=_positive, help="length of the load (default 60: the CI short form)"
    )
    length.add_argument("--minutes", type=_positive, help="length of the load in minutes, for long runs")
    p.add_argument("--seed", type=int, default=1, help="seed of every random choice (default 1)")
    p.add_argument(
        "--loop", choices=("auto", "asyncio", "uvloop"), default="auto", help="loop of the main relay"
    )
    p.add_argument("--no-blackhole", action="store_true", help="skip the resolver black hole (needs root)")
    p.add_argument(
        "--hostile",
        action="store_true",
        help="hostile mode: one relay, verified traffic, a hostile neighbour taking turns (soak/hostile.py)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write the figures as JSON")
    p.add_argument("--write-doc", action="store_true", help="write docs/reliability.md (or --doc)")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "reliability.md", help=argparse.SUPPRESS)
    p.add_argument("--keep", action="store_true", help="keep the work directory (configs, relay logs)")
    p.add_argument(
        "--render",
        type=Path,
        metavar="FIGURES.json",
        help="run nothing: write the document from the figures (--json) of an earlier run",
    )
    args = p.parse_args(argv)
    args.length = args.minutes * 60 if args.minutes else (args.seconds or 60.0)
    return args


def _stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds every `with`: processes stopped, namespaces deleted


def _command(args: argparse.Namespace) -> str:
    """The command that reproduces the run (output options left out), for the document."""
    length = f"--minutes {args.minutes:g}" if args.minutes else f"--seconds {args.length:g}"
    parts = ["scripts/soak", length, f"--seed {args.seed}"]
    parts += [f"--loop {args.loop}"] if args.loop != "auto" else []
    parts += ["--no-blackhole"] if args.no_blackhole else []
    parts += ["--hostile"] if args.hostile else []
    return " ".join([*parts, "--write-doc"])


def _write_doc(fig: dict[str, Any], path: Path) -> None:
    """The fault run's part of the document; the hostile mode's part and the figures below it stay."""
    old = path.read_text() if path.exists() else ""
    kept = ""
    for mark in (hostile.HOSTILE_MARK, hostile.FIGURES_MARK):
        if mark in old:
            kept = mark + old.split(mark, 1)[1]
            break
    path.write_text(report.document(fig) + ("\n" + kept if kept else ""))
    print(f"soak: wrote {path}", file=sys.stderr)


def _hostile(args: argparse.Namespace) -> int:
    print(f"soak: hostile mode, {args.length:g} s, seed {args.seed}", file=sys.stderr, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="relay-soak-hostile-"))
    try:
        result = asyncio.run(hostile.run(args.length, args.seed, workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results = hostile.checks(result)
    if left := proc.leftovers():
        results.append(report.Check("no process left running", False, str(left)))
    print("\n".join(report.conditions(results)), file=sys.stderr)
    ok = all(c.ok for c in results)
    if not ok:
        print(result["log_tail"], file=sys.stderr)
    if args.write_doc:
        date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        hostile.write_section(args.doc, hostile.section(result, results, _command(args), date))
        print(f"soak: wrote {args.doc}", file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        _write_doc(json.loads(args.render.read_text()), args.doc)
        return 0
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.hostile:
        return _hostile(args)
    plan = Plan(seconds=args.length, seed=args.seed, loop=args.loop, blackhole=not args.no_blackhole)
    machine = [(k, v) for k, v in dict(bench_report.machine(sys.executable)).items() if k in MACHINE_KEYS]
    print(f"soak: {args.length:g} s of load, seed {args.seed}", file=sys.stderr, flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="relay-soak-"))
    try:
        with contextlib.ExitStack() as stack:
            fig = asyncio.run(soak(plan, workdir, stack))
    except SoakError as err:
        print(f"soak: error: {err}", file=sys.stderr)
        return 1
    except asyncio.CancelledError:  # SIGINT/SIGTERM while the load ran (soak.run.soak)
        print("soak: interrupted; every process and namespace it started is gone", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"soak: work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if left := proc.leftovers():
        fig["problems"].append(f"processes left running: {left}")
    fig["command"] = _command(args)
    fig["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    fig["machine"] = machine
    fig["checks"] = [dataclasses.asdict(c) for c in report.checks(fig)]
    fig["passed"] = report.passed(fig)
    print("\n".join(report.summary(fig)), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1))
    if args.write_doc:
        _write_doc(fig, args.doc)
    return 0 if fig["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
