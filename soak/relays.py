"""The relays under test: real ``python -m relay --config FILE`` processes, their config, metrics and /proc.

Each relay gets a YAML file written here; a reload rewrites it (atomically) and sends SIGHUP, as an
operator would. Processes start through bench.proc (own session, tagged for leftover checks, always
killed); settings from the soak's own environment (RELAY_*, PORTS, DOCKER_HOST) are removed so the
file alone configures the relay.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import proc
from soak.clients import Dial, dial_loopback, within


@dataclass(frozen=True)
class RouteSpec:
    name: str
    listen_port: int
    target: str  # a host, or auto
    target_port: int
    listen_host: str = "127.0.0.1"


@dataclass(frozen=True)
class Sample:
    at: float
    rss_bytes: int
    fds: int


def config_text(routes: Sequence[RouteSpec], metrics: tuple[str, int], loop: str) -> str:
    lines = [
        f"metrics: {metrics[0]}:{metrics[1]}",
        f"loop: {loop}",
        "log_level: info",
        "drain_timeout: 5s",
        "routes:",
    ]
    for r in routes:
        lines += [
            f"  - name: {r.name}",
            f"    listen: {r.listen_host}:{r.listen_port}",
            f'    target: "{r.target}:{r.target_port}"',
        ]
    return "\n".join(lines) + "\n"


def effective_loop(name: str) -> str:
    """The loop a relay started with `loop: name` runs on (auto: uvloop when installed), as the relay
    picks it (relay.cli.loop_factory) with the same interpreter."""
    if name == "auto":
        return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    return name


def _clean_env() -> list[str]:
    drop = [
        k
        for k in os.environ
        if (k.startswith("RELAY_") and k != proc.RUN_ENV) or k in ("PORTS", "DOCKER_HOST")
    ]
    return ["env", *(f"--unset={k}" for k in sorted(drop))]


class RelayProcess:
    """One relay process. `prefix` runs it inside something (``ip netns exec NS``, ``prlimit ...``)."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        routes: Sequence[RouteSpec],
        *,
        metrics: tuple[str, int],
        loop: str,
        prefix: Sequence[str] = (),
        dial: Dial = dial_loopback,
    ) -> None:
        self.name = name
        self.routes = list(routes)
        self.metrics = metrics
        self.loop = loop
        self.prefix = list(prefix)
        self.dial = dial
        self.config = workdir / f"relay-{name}.yaml"
        self.log = workdir / f"relay-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0
        self.samples: list[Sample] = []
        self.exit: tuple[int | None, float] = (None, 0.0)  # code and seconds, after stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write(self) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(config_text(self.routes, self.metrics, self.loop))
        os.replace(tmp, self.config)

    def start(self, timeout: float = 30.0) -> None:
        """Start and wait until every route and the metrics port listen; `startup_seconds` is how long."""
        self._write()
        argv = [*self.prefix, *_clean_env(), sys.executable, "-m", "relay", "--config", str(self.config)]
        started = time.monotonic()
        self.proc = proc.popen(argv, stderr_path=self.log)
        deadline = started + timeout
        for port in [r.listen_port for r in self.routes] + [self.metrics[1]]:
            proc.wait_listening(self.proc, port, max(deadline - time.monotonic(), 0.1))
        self.startup_seconds = time.monotonic() - started

    def reload(self, routes: Sequence[RouteSpec]) -> None:
        self.routes = list(routes)
        self._write()
        os.kill(self.pid, signal.SIGHUP)

    def listening(self) -> set[int]:
        return proc.listening_ports(self.pid)

    def sample(self) -> Sample:
        rss = proc.tree_memory(self.pid)[0]
        try:
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            fds = -1
        s = Sample(time.monotonic(), rss, fds)
        self.samples.append(s)
        return s

    async def get(self, path: str) -> tuple[int, str]:
        """GET http://metrics/path: (status, body)."""
        reader, writer = await within(self.dial(*self.metrics))
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n".encode())
            raw = await within(reader.read(-1))
        finally:
            writer.close()
        head, _, body = raw.decode(errors="replace").partition("\r\n\r\n")
        if not head.startswith("HTTP/"):
            raise EOFError(f"no HTTP answer from {self.name}'s {path}: {raw[:60]!r}")
        return int(head.split()[1]), body

    async def active(self) -> dict[str, int]:
        """relay_connections_active of every route that has any."""
        _, body = await self.get("/metrics")
        found: dict[str, int] = {}
        for line in body.splitlines():
            if line.startswith("relay_connections_active{"):
                labels, value = line.rsplit(" ", 1)
                if count := round(float(value)):
                    found[labels.split('route="', 1)[1].split('"', 1)[0]] = count
        return found

    async def wait_idle(self, timeout: float) -> tuple[int, dict[str, int], float]:
        """Poll /metrics until no connection is active or `timeout` passes: (total, by route, seconds);
        a total of -1 means /metrics did not answer."""
        start = time.monotonic()
        while True:
            try:
                by_route = await self.active()
                total = sum(by_route.values())
            except (OSError, EOFError, ValueError, IndexError):
                by_route, total = {}, -1
            waited = time.monotonic() - start
            if total == 0 or waited > timeout:
                return total, by_route, waited
            await asyncio.sleep(0.2)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM; record the exit code and how long it took (None: it had to be killed)."""
        if self.proc is None:
            return
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        self.exit = (code, time.monotonic() - start)
        self.close()

    def close(self) -> None:
        if self.proc is not None:
            proc.stop(self.proc)

    def log_lines(self) -> int:
        try:
            with self.log.open("rb") as fh:
                return sum(1 for _ in fh)
        except OSError:
            return 0

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
