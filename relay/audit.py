"""The periodic audit: a safety net under the pair's own bookkeeping, and the descriptor headroom.

Rules:
1. A pair is finished by its own events (connection.py rule 3); the audit only catches what a loop bug
   would leave behind: a pair whose sockets are both gone and whose connect is over, seen so at two
   audits in a row (AUDIT_SECONDS apart, so a close still in flight is never mistaken for a leak).
   Such a pair is finished, counted (`relay_connections_reaped_total`) and logged.
2. A side that sent FIN is not read any more, so its later reset is never reported by the loop; the
   audit asks the kernel (TCP_INFO) about such sides and closes the pair as that side's reset. Without
   this, a client that half-closed and then gave up would hold a slot while its target stays silent.
3. "Out of descriptors" (set when a socket could not be made for lack of one: accept, target connect or
   UDP session; Shared.out_of_descriptors) is cleared once the process has headroom again, whether or
   not a client came since: readiness must not stay false on its own, or an orchestrator would keep
   traffic away for good.
4. Nothing here runs per connection; one walk of the live pairs every AUDIT_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource

from relay.connection import FD_PROBLEM, Connection, Shared

log = logging.getLogger("relay")

AUDIT_SECONDS = 10.0


def open_descriptors() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listing it
    except OSError:
        return None


def fd_headroom(reserve: int) -> bool:
    """True when the process could open `reserve` more descriptors now (unknown counts as yes)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    used = open_descriptors()
    return soft == resource.RLIM_INFINITY or used is None or used + reserve <= soft


class Audit:
    def __init__(self, shared: Shared, *, reserve: int, interval: float = AUDIT_SECONDS) -> None:
        self.shared = shared
        self.reserve = reserve
        self.interval = interval
        self._suspects: set[Connection] = set()
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _tick(self) -> None:
        self.run()
        self.start()

    def run(self) -> int:
        """One audit; returns how many pairs it finished."""
        stuck = set()
        for conn in list(self.shared.connections):
            if conn.stuck():
                stuck.add(conn)
            else:
                conn.close_if_peer_gone()  # rule 2
        reaped = stuck & self._suspects
        for conn in reaped:
            conn.reap()
        self._suspects = stuck - reaped
        if reaped:
            self.shared.warnings.warning(
                "reaped",
                f"finished {len(reaped)} connection(s) whose sockets were both gone but never reported "
                "closed (an event-loop bug; counted in relay_connections_reaped_total, please report it)",
            )
        if FD_PROBLEM in self.shared.problems and fd_headroom(self.reserve):
            del self.shared.problems[FD_PROBLEM]
            log.info("descriptors available again: accepting new connections")
        return len(reaped)
