"""The soak's short form in CI (``python -m soak --seconds 45``), and the verdict rules it stands on.

The short form is not a timed test: it runs real relays under load and faults and asserts the pass
conditions the harness reports in its JSON (0 corrupted, 0 unexpected failures, connections back to 0,
flat descriptors and RSS, every fault injected), and that it leaves no process or namespace behind.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench import proc
from soak import wire
from soak.ledger import CORRUPTED, EXPECTED, UNEXPECTED, VERIFIED, Ledger, Result

REPO = Path(__file__).resolve().parent.parent
SECONDS = 45


def _namespaces() -> set[str]:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@pytest.mark.timeout(SECONDS + 120)
def test_soak_short_form(tmp_path: Path) -> None:
    """Steps: run the harness for 45 s with its JSON output; it exits 0 exactly when every pass
    condition holds; each condition holds (the message quotes the figure); every kind of traffic and
    every fault ran; afterwards no process it started runs and its namespaces and /etc/netns are gone."""
    run_id = f"soak-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    figures = tmp_path / "soak.json"
    child = subprocess.Popen(
        [sys.executable, "-m", "soak", "--seconds", str(SECONDS), "--json", str(figures)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, proc.RUN_ENV: run_id},
    )
    try:
        output, _ = child.communicate(timeout=SECONDS + 100)
    finally:
        proc.stop(child)  # type: ignore[arg-type]  # the same Popen API, text mode
    tag = f"rb{child.pid % 100000}"
    assert proc.leftovers(run_id) == [], "the soak left processes behind"
    assert not {f"{tag}-app", f"{tag}-host"} & _namespaces(), "the soak left its namespaces behind"
    assert not (Path("/etc/netns") / f"{tag}-app").exists()
    assert figures.exists(), f"the soak wrote no figures (exit {child.returncode}):\n{output[-4000:]}"
    fig = json.loads(figures.read_text())
    failed = [f"{c['name']}: {c['detail']}" for c in fig["checks"] if not c["ok"]]
    assert not failed, "\n".join(failed) + "\n" + output[-4000:]
    assert child.returncode == 0, output[-4000:]
    assert fig["verdicts"].get(CORRUPTED, 0) == 0
    assert fig["verdicts"].get(UNEXPECTED, 0) == 0
    assert fig["verdicts"][VERIFIED] > 1000 and fig["bytes_verified"] > 0
    assert all(r["active_end"] == 0 for r in fig["relays"].values())
    if os.geteuid() == 0:
        assert "blackhole" in fig["relays"], fig["notes"]


# --- the rules behind the verdicts (no sockets) ----------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _ledger_with_windows() -> Ledger:
    """Route a: a fault window 10-20 s. Route b: a reload window (new connections only) 30-40 s."""
    clock = Clock()
    ledger = Ledger(clock=clock)
    clock.now = 10
    fault = ledger.open("target killed", {"a"})
    clock.now = 20
    ledger.close(fault)
    clock.now = 30
    reload = ledger.open("route removed", {"b"}, new_only=True)
    clock.now = 40
    ledger.close(reload)
    return ledger


@pytest.mark.parametrize(
    ("route", "start", "end", "error", "corrupt", "verdict"),
    [
        ("a", 1, 2, "", "", VERIFIED),
        ("a", 12, 13, "", "", VERIFIED),  # survived the fault
        ("a", 5, 11, "reset", "", EXPECTED),  # cut in flight
        ("a", 15, 16, "refused", "", EXPECTED),
        ("a", 19, 25, "timeout", "", EXPECTED),  # started inside, gave up after
        ("a", 21, 22, "reset", "", UNEXPECTED),  # after the window
        ("a", 1, 5, "eof", "", UNEXPECTED),  # before the window
        ("c", 12, 13, "reset", "", UNEXPECTED),  # another route
        ("a", 12, 13, "reset", "byte 7 is wrong", CORRUPTED),  # a fault never excuses a wrong byte
        ("a", 12, 13, "", "byte 7 is wrong", CORRUPTED),
        ("b", 35, 36, "refused", "", EXPECTED),  # opened while the route was gone
        ("b", 29.5, 31, "reset", "", EXPECTED),  # in the closing listener's backlog
        ("b", 20, 35, "reset", "", UNEXPECTED),  # was running: a reload must not cut it
    ],
)
def test_verdicts(route: str, start: float, end: float, error: str, corrupt: str, verdict: str) -> None:
    ledger = _ledger_with_windows()
    ledger.started(route)
    assert ledger.add(Result("small", route, start, end, error, corrupt)) == verdict
    assert ledger.inflight[route] == 0


def test_honest_wait_counts_from_the_fault() -> None:
    """A transfer running before the fault waited from the fault's start; one that gave up is not
    an honest error and is counted apart."""
    ledger = _ledger_with_windows()
    ledger.add(Result("small", "a", 5, 10.25, "reset"))
    ledger.add(Result("small", "a", 15, 15.5, "refused"))
    ledger.add(Result("small", "a", 15, 25, "timeout"))
    assert ledger.honest_wait == (0.5, "target killed")
    assert ledger.gave_up == (1, 10)
    assert ledger.faults["target killed"].cut == 1


def test_expect_finds_the_first_wrong_byte() -> None:
    rng = random.Random(3)
    for _ in range(20):
        seed, length = rng.randrange(wire.POOL_SIZE), rng.randint(1, 3 * wire.POOL_SIZE)
        data = bytearray(b"".join(wire.pattern(seed, length)))
        good = wire.Expect(seed, length)
        for i in range(0, length, 70_001):
            good.feed(bytes(data[i : i + 70_001]))
        assert good.complete
        bad_at = rng.randrange(length)
        data[bad_at] ^= 0x01
        bad = wire.Expect(seed, length)
        bad.feed(bytes(data))
        assert bad.bad_at == bad_at and not bad.complete
    short = wire.Expect(5, 10)
    short.feed(b"".join(wire.pattern(5, 9)))
    assert not short.complete and short.bad_at is None
    long = wire.Expect(5, 10)
    long.feed(b"".join(wire.pattern(5, 11)))
    assert long.bad_at == 10


def test_a_failure_is_credited_to_the_first_fault_that_hit_it() -> None:
    """A client that started inside a silent-target window and gave up during the next window of the
    same route is counted against the silent target."""
    clock = Clock()
    ledger = Ledger(clock=clock)
    for start, end, fault in ((10, 12, "silent"), (15, 17, "refusing")):
        clock.now = start
        window = ledger.open(fault, {"a"})
        clock.now = end
        ledger.close(window)
    assert ledger.add(Result("small", "a", 11, 21, "timeout")) == EXPECTED
    assert (ledger.faults["silent"].excused, ledger.faults["refusing"].excused) == (1, 0)


HOSTILE_SECONDS = 21


@pytest.mark.timeout(HOSTILE_SECONDS + 90)
def test_hostile_mode_short_form(tmp_path: Path) -> None:
    """Steps: the hostile mode for 21 s (every kind of turn at least once: slow readers, slowloris on
    the metrics port, a scrape storm, a UDP flood, a SIGHUP with an alias bomb); it exits 0, every
    condition in its table says pass, and it leaves no process behind."""
    run_id = f"hostile-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(
        [sys.executable, "-m", "soak", "--hostile", "--seconds", str(HOSTILE_SECONDS)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HOSTILE_SECONDS + 80,
        env={**os.environ, proc.RUN_ENV: run_id},
    )
    assert proc.leftovers(run_id) == [], "the hostile mode left processes behind"
    rows = [line for line in out.stderr.splitlines() if line.startswith("| ") and "condition" not in line]
    assert len(rows) >= 10, out.stderr[-3000:]
    failed = [row for row in rows if "| pass |" not in row]
    assert not failed and out.returncode == 0, "\n".join(failed) + "\n" + out.stderr[-3000:]
