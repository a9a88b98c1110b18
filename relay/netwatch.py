"""The app watch: follow the app container when it starts again (Docker's `network_mode: "service:app"`).

When the app container starts again it gets a new network namespace; the relay, left in the old one with
only `lo`, can never serve the app again. Nothing inside the old namespace can reach the new one, but
Docker's restart policy starts an exited `container:` sidecar in the app's *current* namespace.

Rules:
1. Exit when the app has started again, and only then. Docker rewrites the app's /etc/hostname, which
   the relay shares, at each start of the app, 0.3-0.8 s before the app runs and while the engine holds
   the app's lock (moby's containerStart); the restart of a relay that exits then (code 75) checks that
   the app runs under the same lock, so it waits for that start and joins the new namespace. Remember
   (inode, mtime_ns, size) at start; a change is a new start of the app.
2. Never exit for lost interfaces alone: after `docker stop app` the app is not running, Docker's single
   restart attempt would fail ("cannot join network of a non running container") and the relay would
   stay exited for good. Instead report "stranded" (every non-`lo` interface seen at start gone and no
   default route): logged once, in /readyz (503) and metrics; cleared when it recovers.
3. A link count of 0 means the app container was removed: Docker cannot restart the relay into it, so
   exiting would only hide the message. Say so with the fix, and stay (reported like stranded).
4. `auto` watches only in a Docker container (`/.dockerenv` and /etc/hostname bind-mounted into it),
   never under Kubernetes or in a Podman pod, where the pod owns the namespace; `on` forces it.
5. One stat per poll (plus an interface listing, and the route files only when every interface seen at
   start is gone), on the relay's loop; nothing on the data path.

The decisions are plain functions over values (stat stamps, interface sets, route file text), so the
tests drive them with tables; `AppWatch` only reads the files and acts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger("relay")

HOSTNAME_FILE = "/etc/hostname"
POLL_INTERVAL = 0.5
APP_RESTARTED = "app restarted"  # the server's exit reason; the CLI turns it into exit code 75
STRANDED = "stranded"
APP_REMOVED = "app_removed"
# Once the app was recreated, only recreating the relay itself helps: `up -d --always-recreate-deps` does
# nothing then (Compose 1.29, tests/docker/run.sh). "relay" stands for the relay service's name.
RECREATE = "docker compose up -d --force-recreate relay (with your relay service's name)"

Mode = Literal["auto", "on", "off"]
Change = Literal["same", "restarted", "removed"]

RTF_UP, RTF_REJECT = 0x0001, 0x0200


@dataclass(frozen=True, slots=True)
class Stamp:
    """What identifies one writing of the hostname file (and whether it still has a name)."""

    inode: int
    mtime_ns: int
    size: int
    links: int

    @classmethod
    def read(cls, path: str) -> Stamp:
        st = os.stat(path)
        return cls(st.st_ino, st.st_mtime_ns, st.st_size, st.st_nlink)


# --- decisions (pure) ---------------------------------------------------------------------------------


def compare(start: Stamp, now: Stamp) -> Change:
    """`removed` when the file has no links left (the container is gone); `restarted` when Docker wrote
    it again; else `same`."""
    if now.links == 0:
        return "removed"
    if (now.inode, now.mtime_ns, now.size) != (start.inode, start.mtime_ns, start.size):
        return "restarted"
    return "same"


def has_default_route(route_v4: str, route_v6: str) -> bool:
    """A usable default route in /proc/net/route or /proc/net/ipv6_route text (not `lo`'s reject routes)."""
    for line in route_v4.splitlines()[1:]:
        fields = line.split()  # Iface Destination Gateway Flags RefCnt Use Metric Mask ...
        default = len(fields) >= 8 and fields[1] == fields[7] == "00000000" and fields[0] != "lo"
        if default and _flags(fields[3]) & RTF_UP:
            return True
    for line in route_v6.splitlines():
        # destination, its prefix length, source, its length, next hop, metric, refs, use, flags, device
        fields = line.split()
        if len(fields) >= 10 and fields[1] == "00" and not fields[0].strip("0"):
            flags = _flags(fields[8])
            if flags & RTF_UP and not flags & RTF_REJECT and fields[9] != "lo":
                return True
    return False


def _flags(text: str) -> int:
    try:
        return int(text, 16)
    except ValueError:
        return 0


def is_stranded(start: frozenset[str], now: frozenset[str], default_route: bool) -> bool:
    """Every non-`lo` interface seen at start is gone and there is no default route. A namespace that
    had none at start (`--network none`) is never stranded: there was nothing to lose."""
    had = start - {"lo"}
    return bool(had) and not (had & now) and not default_route


def bind_mounted(mountinfo: str, path: str = HOSTNAME_FILE) -> bool:
    """Whether `path` is a mount point in /proc/self/mountinfo text (field 5; spaces escaped as \\040)."""
    escaped = path.replace(" ", "\\040")
    return any(len(f) > 4 and f[4] == escaped for f in (line.split() for line in mountinfo.splitlines()))


def decide(
    mode: Mode, environ: Mapping[str, str], exists: Callable[[str], bool], mountinfo: Callable[[], str]
) -> str | None:
    """None when the watch should run, else why not (for the log). `on` and `off` are taken as given.

    `auto` asks for both Docker marks: /.dockerenv alone is also in containers whose /etc/hostname is
    their own image's (and Kubernetes on dockershim creates it, hence the KUBERNETES_SERVICE_HOST
    check, which Kubernetes sets in every container); a bind-mounted /etc/hostname alone is also
    containerd's and CRI-O's."""
    if mode == "off":
        return "off (app_watch: off)"
    if mode == "on":
        return None
    if "KUBERNETES_SERVICE_HOST" in environ:
        return "off under Kubernetes: the pod owns the network namespace"
    if exists("/run/.containerenv"):
        return "off under Podman: the pod or container owns the network namespace"
    if not exists("/.dockerenv"):
        return "off: not in a Docker container (no /.dockerenv)"
    if not bind_mounted(mountinfo()):
        return f"off: {HOSTNAME_FILE} is not mounted by Docker"
    return None


# --- the watch -------------------------------------------------------------------------------------------


def read_interfaces() -> frozenset[str]:
    return frozenset(name for _, name in socket.if_nameindex())


def read_routes() -> tuple[str, str]:
    texts = []
    for path in ("/proc/net/route", "/proc/net/ipv6_route"):
        try:
            with open(path, encoding="ascii", errors="replace") as fh:
                texts.append(fh.read())
        except OSError:
            texts.append("")
    return texts[0], texts[1]


def read_mountinfo() -> str:
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


class AppWatch:
    """Polls the hostname file and the interfaces; calls `on_restart` once when the app started again,
    and keeps `problems[STRANDED]` / `problems[APP_REMOVED]` set while they hold.

    `hostname`, `stat`, `interfaces` and `routes` are injectable for tests only.
    """

    def __init__(
        self,
        problems: dict[str, str],
        on_restart: Callable[[], None],
        *,
        hostname: str = HOSTNAME_FILE,
        interval: float = POLL_INTERVAL,
        stat: Callable[[str], Stamp] = Stamp.read,
        interfaces: Callable[[], Iterable[str]] = read_interfaces,
        routes: Callable[[], tuple[str, str]] = read_routes,
    ) -> None:
        self.problems = problems
        self.on_restart = on_restart
        self.hostname = hostname
        self.interval = interval
        self._stat = stat
        self._interfaces = interfaces
        self._routes = routes
        self.start_stamp: Stamp | None = None
        self.start_interfaces: frozenset[str] = frozenset()
        self.restarted = False
        self._failed_stat: str | None = None

    def remember(self) -> bool:
        """Take the start state; False (and a warning) when the hostname file cannot be read."""
        try:
            self.start_stamp = self._stat(self.hostname)
        except OSError as err:
            log.warning(
                "app watch: cannot read %s (%s); the relay will not follow app restarts",
                self.hostname,
                err.strerror,
            )
            return False
        self.start_interfaces = self._read_interfaces()
        return True

    @property
    def stranded(self) -> bool:
        return STRANDED in self.problems

    async def run(self) -> None:
        """Poll until the app restarted (then return) or the task is cancelled. A timer, not an event:
        nothing notifies a process of a file rewritten by another namespace without privileges."""
        while not self.restarted:
            await asyncio.sleep(self.interval)
            self.poll()

    def poll(self) -> None:
        if self.start_stamp is None or self.restarted:
            return
        change = self._hostname_change()
        if change == "restarted":
            self.restarted = True
            log.warning(
                "app restarted: %s changed, so the app container started again in a new network namespace "
                "and this relay is left in the old one; exit code 75: Docker's restart policy "
                "(restart: unless-stopped) starts the relay again in the app's new namespace",
                self.hostname,
            )
            self.on_restart()
            return
        if change == "removed" and APP_REMOVED not in self.problems:
            self.problems[APP_REMOVED] = (
                f"app container removed: the relay cannot follow it; recreate the relay: {RECREATE}"
            )
            log.error(
                "app container removed: %s has no links left, so the app container was removed or "
                "recreated and Docker cannot restart the relay into the new one; this relay stays in a "
                "namespace nobody uses. Fix: %s",
                self.hostname,
                RECREATE,
            )
        self._check_stranded()

    def _hostname_change(self) -> Change:
        assert self.start_stamp is not None
        try:
            now = self._stat(self.hostname)
        except OSError as err:
            if self._failed_stat != err.strerror:
                self._failed_stat = err.strerror
                log.warning("app watch: cannot read %s (%s)", self.hostname, err.strerror)
            return "same"
        self._failed_stat = None
        return compare(self.start_stamp, now)

    def _check_stranded(self) -> None:
        now = self._read_interfaces()
        had = self.start_interfaces - {"lo"}
        # The route files are read only once every interface seen at start is gone.
        stranded = is_stranded(self.start_interfaces, now, False) and not self._default_route()
        if stranded and not self.stranded:
            self.problems[STRANDED] = (
                f"stranded: the network interfaces ({', '.join(sorted(had))}) and the default route are "
                "gone; waiting for the app container to start again"
            )
            log.error(
                "stranded: this network namespace lost every interface it had at start (%s) and its "
                "default route: the app container stopped, and the relay cannot reach the host. Waiting "
                "for the app to start again (%s changes), then exiting so that Docker's restart policy "
                "starts the relay in the app's new namespace; /readyz answers 503 meanwhile",
                ", ".join(sorted(had)),
                self.hostname,
            )
        elif not stranded and self.stranded:
            del self.problems[STRANDED]
            log.warning("no longer stranded: network interfaces %s are back", ", ".join(sorted(now - {"lo"})))

    def _read_interfaces(self) -> frozenset[str]:
        try:
            return frozenset(self._interfaces())
        except OSError:
            return frozenset()

    def _default_route(self) -> bool:
        return has_default_route(*self._routes())


def start_watch(
    mode: Mode,
    problems: dict[str, str],
    on_restart: Callable[[], None],
    *,
    hostname: str = HOSTNAME_FILE,
    environ: Mapping[str, str] | None = None,
) -> AppWatch | None:
    """The watch with its start state taken, or None (logged) when it should not or cannot run."""
    why_not = decide(mode, os.environ if environ is None else environ, os.path.exists, read_mountinfo)
    if why_not is not None:
        log.info("app watch: %s", why_not)
        return None
    watch = AppWatch(problems, on_restart, hostname=hostname)
    if not watch.remember():
        return None
    log.info(
        "app watch: on: when the app container starts again (%s changes) the relay exits with code 75, "
        "so that Docker's restart policy starts it in the app's new network namespace",
        hostname,
    )
    return watch
