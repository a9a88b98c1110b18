"""What the process may use: the container's memory limit, its OOM history, and giving memory back.

Read from the cgroup the relay runs in (v2: memory.max, memory.events; v1: memory.limit_in_bytes,
memory.oom_control). Inside a container the cgroup namespace makes that /sys/fs/cgroup itself; on a
host it is the path /proc/self/cgroup names. Everything here is best effort: a file that cannot be
read means "unknown", never an error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("relay")

CGROUP_ROOT = Path("/sys/fs/cgroup")
NO_LIMIT = 1 << 60  # v1 writes "no limit" as a page-rounded LONG_MAX
MIB = 1024 * 1024
# The buffered-bytes budget (budget.py) without a limit, and its share of a limit: the rest is the
# interpreter (~25 MiB), per-connection objects (~3 KB each) and the allocator's slack.
DEFAULT_BUDGET = 64 * MIB
BUDGET_SHARE = 4
MIN_BUDGET = 4 * MIB
BASE = 48 * MIB  # what a limit should give the relay beside its budget: interpreter, objects, slack


@dataclass(frozen=True, slots=True)
class Cgroup:
    version: int  # 1 or 2
    path: Path  # the memory controller's folder of this process
    limit: int | None  # bytes, None when unlimited

    def oom_kills(self) -> int:
        """Processes the kernel killed in this cgroup for lack of memory (0 when unknown)."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (self.path / name).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0


def _own_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(v1 memory path, v2 path) of this process from /proc/self/cgroup's text."""
    v1 = v2 = None
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _read_limit(file: Path) -> int | None:
    text = file.read_text().strip()
    if text == "max":
        return None
    value = int(text)
    return None if value >= NO_LIMIT else value


def find_cgroup(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> Cgroup | None:
    """The memory cgroup of this process, trying its own path first, then the namespace's root."""
    try:
        v1, v2 = _own_paths(proc_cgroup.read_text())
    except (OSError, ValueError):
        v1 = v2 = None
    # v1 mounts the controller at memory/, v2 at the root.
    for version, base, name, own in (
        (1, root / "memory", "memory.limit_in_bytes", v1),
        (2, root, "memory.max", v2),
    ):
        for path in (own, "/"):
            if path is None:
                continue
            folder = base / path.lstrip("/")
            try:
                return Cgroup(version, folder, _read_limit(folder / name))
            except (OSError, ValueError):
                continue
    return None


def default_budget(limit: int | None) -> int:
    """A quarter of the container's limit (32 MiB of 128 MiB), DEFAULT_BUDGET without one."""
    if limit is None:
        return DEFAULT_BUDGET
    return max(MIN_BUDGET, min(DEFAULT_BUDGET, limit // BUDGET_SHARE))


def mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB" if n >= 10 * MIB else f"{n / MIB:.1f} MiB"


def report_at_start(cgroup: Cgroup | None, budget: int) -> None:
    """One line on the limit and budget; a WARNING when this cgroup has seen an OOM kill (the only
    trace a kill leaves is a new start, so say it then)."""
    if cgroup is None or cgroup.limit is None:
        log.info("memory: no container limit found; at most %s buffered for slow receivers", mib(budget))
        return
    log.info(
        "memory: container limit %s (cgroup v%d); at most %s buffered for slow receivers",
        mib(cgroup.limit),
        cgroup.version,
        mib(budget),
    )
    kills = cgroup.oom_kills()
    if kills:
        log.warning(
            "memory: this container's cgroup has seen %d OOM kill(s) under its %s limit; the relay "
            "buffers at most %s for slow receivers (memory_budget), so raise the limit to at least "
            "%s plus 0.03 MiB per connection, or lower memory_budget",
            kills,
            mib(cgroup.limit),
            mib(budget),
            mib(budget + BASE),
        )


def _malloc_trim(library: str | None) -> Callable[[int], int] | None:
    if library is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(library).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


class Trimmer:
    """glibc's malloc_trim(0): give freed heap pages back to the kernel after a burst of buffering.

    Without it, the arena keeps the high-water mark of buffered bytes for good (66 MiB after 100
    stalled clients left, issue 17). A no-op where glibc is not the allocator (musl, macOS).
    """

    def __init__(self) -> None:
        # libc.so.6 by name first: the distroless image has no ldconfig for find_library to ask, and
        # find_library runs a subprocess, which start-up should pay only where the name is different.
        self._trim = _malloc_trim("libc.so.6") or _malloc_trim(ctypes.util.find_library("c"))

    def __call__(self) -> None:
        if self._trim is not None:
            self._trim(0)
