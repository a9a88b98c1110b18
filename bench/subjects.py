"""What is measured: the relay, socat as users run it, HAProxy in mode tcp, direct, prototypes.

A subject listens on 127.0.0.1:LISTEN and forwards to HOST:PORT; ``direct`` starts nothing and the
load connects to HOST:PORT itself.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import proc

REPO = Path(__file__).resolve().parent.parent

HAPROXY_CONF = """\
global
    maxconn 9000
defaults
    mode tcp
    maxconn 9000
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend relay
    bind 127.0.0.1:{listen}
    default_backend target
backend target
    server target {server}
"""


@dataclass(frozen=True)
class Subject:
    name: str
    kind: str  # relay | socat | haproxy | direct | proto
    python: str = sys.executable
    options: tuple[str, ...] = ()  # extra argv (relay, prototypes)
    env: tuple[tuple[str, str], ...] = ()
    memory_connections: int = 5000  # socat forks a process per connection: it gets fewer
    memory_parallel: int = 64  # connections opened at once (socat listens with a backlog of 5)
    label: str = field(default="", compare=False)

    @property
    def relays(self) -> bool:
        return self.kind != "direct"

    def argv(self, listen: int, host: str, port: int, workdir: Path) -> list[str]:
        if self.kind == "relay":
            env = [f"{k}={v}" for k, v in self.env]
            return [
                *(["env", *env] if env else []),
                self.python,
                "-m",
                "relay",
                "--ports",
                f"{listen}:{port}",
                "--target",
                host,
                "--listen",
                "127.0.0.1",
                "--metrics",
                "off",
                *self.options,
            ]
        if self.kind == "socat":
            return ["socat", f"tcp-listen:{listen},fork,reuseaddr", f"tcp-connect:{host}:{port}"]
        if self.kind == "haproxy":
            conf = workdir / f"haproxy-{listen}.cfg"
            conf.write_text(HAPROXY_CONF.format(listen=listen, server=f"{host}:{port}"))
            return ["haproxy", "-db", "-f", str(conf)]
        if self.kind == "proto":
            return [
                self.python,
                str(REPO / "bench" / "experiments" / "pumps.py"),
                "--listen",
                str(listen),
                "--target",
                str(port),
                "--target-host",
                host,
                *self.options,
            ]
        raise ValueError(f"{self.kind!r} starts no process")

    @contextlib.contextmanager
    def serve(
        self, host: str, port: int, workdir: Path, prefix: Sequence[str] = ()
    ) -> Iterator[tuple[str, int, int | None]]:
        """Yield (host, port) to point the load at, and the subject's pid (None for direct)."""
        if not self.relays:
            yield host, port, None
            return
        listen = proc.free_port()
        argv = [*prefix, *self.argv(listen, host, port, workdir)]
        with proc.running(argv, listen, stderr_path=workdir / f"{self.name}.stderr") as p:
            yield "127.0.0.1", listen, p.pid


RELAY = Subject("relay", "relay", options=("--max-connections", "20000"))
SOCAT = Subject("socat", "socat", memory_connections=200, memory_parallel=4)
HAPROXY = Subject("haproxy", "haproxy")
DIRECT = Subject("direct", "direct")


def prototype(
    design: str, loop: str, bufsize: int = 256 * 1024, high: int = 256 * 1024, low: int = 64 * 1024
) -> Subject:
    parts = [design, loop]
    if design == "buffered":
        parts.append(f"buf{bufsize // 1024}k")
    if design == "splice":
        parts.append(f"pipe{bufsize // 1024}k")
    else:
        parts.append(f"hw{high // 1024}k")
    name = "-".join(parts)
    opts = (
        "--design",
        design,
        "--loop",
        loop,
        "--bufsize",
        str(bufsize),
        "--high",
        str(high),
        "--low",
        str(low),
    )
    return Subject(name, "proto", options=opts)
