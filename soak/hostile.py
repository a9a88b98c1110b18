"""The soak's hostile mode (issue 17): ``python -m soak --hostile`` (``scripts/soak --hostile``).

One relay carries verified traffic (the soak's transfers and exchanges, every byte checked, and a UDP
client on 127.0.0.2 whose every datagram must come back) while a hostile neighbour takes turns at what
issue 17 found, one episode of EPISODE seconds after another until the time is up:

- slow readers: 64 clients ask the target for a 4 MiB reply and never read it;
- slowloris: 40 sockets on the metrics port each send half a request and hold it;
- scrape storm: 8 scrapers fetch /metrics back to back;
- UDP flood: 600 source ports send a datagram each, past max_udp_sessions (256);
- SIGHUP bomb: the config file becomes a 290-byte YAML alias bomb, SIGHUP; then the file is put back.

Unlike the fault run, no episode opens a ledger window: the neighbour may not cost an honest client a
single failure. /readyz is asked every PROBE seconds and must answer 200 within 1 s every time.

Rules: everything started is stopped in a finally (the relay through bench.proc, which kills its
process group); each episode ends within its time and leaves nothing open; the relay's sockets carry
`socket_buffer: 64KiB`, so the stalled replies wait in the relay (where its memory budget of 4 MiB,
set low here, bounds them) and not in this machine's kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from soak import clients, traffic, wire
from soak.ledger import CORRUPTED, UNEXPECTED, VERIFIED, Ledger
from soak.relays import RelayProcess, RouteSpec, config_text
from soak.report import Check, conditions
from soak.targets import Target
from tests.support import alias_bomb, free_port_block

EPISODE = 3.0
GAP = 1.0
PROBE = 0.5
BUDGET = 4 * 1024 * 1024
STALLED, STALLED_REPLY = 64, 4 * 1024 * 1024
SLOWLORIS = 40
SCRAPERS = 8
FLOOD_PORTS, UDP_SESSIONS = 600, 256
VICTIM = "127.0.0.2"
HOSTILE_MARK = "<!-- hostile: written by scripts/soak --hostile --write-doc -->"
FIGURES_MARK = "<!-- figures: written by hand from the commands they name -->"


class HostileRelay(RelayProcess):
    """The relay under attack: the soak's TCP route plus a UDP route, a small budget and socket buffers."""

    def __init__(self, workdir: Path, bulk: RouteSpec, udp: RouteSpec, metrics: tuple[str, int]) -> None:
        super().__init__("hostile", workdir, [bulk], metrics=metrics, loop="auto")
        self.udp = udp

    def text(self) -> str:
        return config_text(self.routes, self.metrics, self.loop) + "".join(
            (
                f"  - name: {self.udp.name}\n",
                f"    listen: {self.udp.listen_host}:{self.udp.listen_port}\n",
                "    protocol: udp\n",
                f'    target: "{self.udp.target}:{self.udp.target_port}"\n',
                f"memory_budget: {BUDGET}\n",
                "socket_buffer: 64KiB\n",
                f"max_udp_sessions: {UDP_SESSIONS}\n",
                "app_watch: off\n",
            )
        )

    def _write(self) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(self.text())
        os.replace(tmp, self.config)

    async def metric(self, name: str) -> float:
        _, body = await self.get("/metrics")
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return -1.0


@dataclass
class Figures:
    episodes: dict[str, int] = field(default_factory=dict)
    probes: list[float] = field(default_factory=list)  # seconds to a 200 from /readyz
    probe_failures: list[str] = field(default_factory=list)
    udp_sent: int = 0
    udp_back: int = 0
    udp_flood_sent: int = 0
    udp_flood_back: int = 0
    buffered_max: float = 0.0
    budget_reached: float = 0.0
    scrapes: int = 0
    scrape_seconds: list[float] = field(default_factory=list)
    bombs_refused: int = 0
    bombs_sent: int = 0
    rss: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


class Victim(asyncio.DatagramProtocol):
    """The honest UDP client: numbered datagrams from 127.0.0.2, counted when they come back."""

    def __init__(self) -> None:
        self.back: set[int] = set()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.back.add(int(data))


async def _victim(port: int, fig: Figures, flooding: asyncio.Event, stop_at: float) -> None:
    loop = asyncio.get_running_loop()
    transport, victim = await loop.create_datagram_endpoint(Victim, local_addr=(VICTIM, 0))
    during: set[int] = set()
    n = 0
    try:
        while time.monotonic() < stop_at:
            n += 1
            if flooding.is_set():
                during.add(n)
            transport.sendto(str(n).encode(), ("127.0.0.1", port))
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the last answers
    finally:
        transport.close()
    fig.udp_sent, fig.udp_back = n, len(victim.back)
    fig.udp_flood_sent, fig.udp_flood_back = len(during), len(during & victim.back)


async def _probe(relay: HostileRelay, fig: Figures, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        start = time.monotonic()
        try:
            status, body = await asyncio.wait_for(relay.get("/readyz"), 1.0)
            took = time.monotonic() - start
            if status == 200:
                fig.probes.append(took)
            else:
                fig.probe_failures.append(f"{status} {' '.join(body.split())[:120]}")
        except (TimeoutError, OSError, EOFError, asyncio.IncompleteReadError) as err:
            fig.probe_failures.append(f"no 200 within 1 s: {type(err).__name__}")
        fig.rss.append(relay.sample().rss_bytes)
        await asyncio.sleep(max(0.0, PROBE - (time.monotonic() - start)))


# --- the episodes ------------------------------------------------------------------------------------


async def slow_readers(relay: HostileRelay, address: tuple[str, int], fig: Figures) -> None:
    held: list[asyncio.StreamWriter] = []
    try:
        for n in range(STALLED):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, address)
            _, writer = await asyncio.open_connection(sock=sock)
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            writer.write(wire.HEADER.pack(wire.MAGIC, wire.TRANSFER, STALLED_REPLY, n))
            writer.write_eof()
            held.append(writer)
        end = time.monotonic() + EPISODE
        while time.monotonic() < end:
            await asyncio.sleep(0.25)
            fig.buffered_max = max(fig.buffered_max, await relay.metric("relay_buffered_bytes"))
        fig.budget_reached = await relay.metric("relay_memory_budget_reached_total")
    finally:
        for writer in held:
            writer.transport.abort()


async def slowloris(relay: HostileRelay, address: tuple[str, int], fig: Figures) -> None:
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(SLOWLORIS):
            _, writer = await clients.within(relay.dial(*relay.metrics))
            writer.write(b"GET /readyz HTTP/1.1\r\nHost: soak\r\n")  # and never the blank line
            held.append(writer)
        await asyncio.sleep(EPISODE)
    finally:
        for writer in held:
            writer.transport.abort()


async def scrape_storm(relay: HostileRelay, address: tuple[str, int], fig: Figures) -> None:
    end = time.monotonic() + EPISODE

    async def scraper() -> None:
        while time.monotonic() < end:
            start = time.monotonic()
            status, _ = await relay.get("/metrics")
            if status == 200:
                fig.scrapes += 1
                fig.scrape_seconds.append(time.monotonic() - start)

    await asyncio.gather(*(scraper() for _ in range(SCRAPERS)))


async def udp_flood(relay: HostileRelay, address: tuple[str, int], fig: Figures) -> None:
    socks = []
    try:
        for _ in range(FLOOD_PORTS):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
            with contextlib.suppress(BlockingIOError):
                sock.sendto(b"flood", ("127.0.0.1", relay.udp.listen_port))
        await asyncio.sleep(EPISODE)
    finally:
        for sock in socks:
            sock.close()


async def hup_bomb(relay: HostileRelay, address: tuple[str, int], fig: Figures) -> None:
    mark = relay.log_lines()
    relay.config.write_text(alias_bomb(7))
    fig.bombs_sent += 1
    os.kill(relay.pid, signal.SIGHUP)
    try:
        end = time.monotonic() + EPISODE
        while time.monotonic() < end:
            await asyncio.sleep(0.1)
            lines = relay.log.read_text(errors="replace").splitlines()[mark:]
            if any("reload failed" in line and "aliases" in line for line in lines):
                fig.bombs_refused += 1
                return
        fig.problems.append("a SIGHUP with an alias bomb logged no 'reload failed' line within 3 s")
    finally:
        relay.reload(relay.routes)  # the good file back, and a SIGHUP that reads it


EPISODES = {
    "slow readers": slow_readers,
    "slowloris on the metrics port": slowloris,
    "scrape storm": scrape_storm,
    "UDP flood": udp_flood,
    "SIGHUP with an alias bomb": hup_bomb,
}


async def _neighbour(
    relay: HostileRelay, address: tuple[str, int], fig: Figures, flooding: asyncio.Event, stop_at: float
) -> None:
    names = list(EPISODES)
    turn = 0
    while time.monotonic() + EPISODE + GAP < stop_at:
        name = names[turn % len(names)]
        turn += 1
        if name == "UDP flood":
            flooding.set()
        try:
            await EPISODES[name](relay, address, fig)
        except (OSError, EOFError, asyncio.IncompleteReadError) as err:
            fig.problems.append(f"{name}: the neighbour's own step failed: {type(err).__name__}: {err}")
        finally:
            flooding.clear()
        fig.episodes[name] = fig.episodes.get(name, 0) + 1
        await asyncio.sleep(GAP)


async def run(seconds: float, seed: int, workdir: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    target = Target("bulk")
    loop = asyncio.get_running_loop()
    echo, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    base = free_port_block(3, ipv6=False)
    bulk = RouteSpec("bulk", base, "127.0.0.1", target.port)
    udp = RouteSpec("udp", base + 1, "127.0.0.1", echo.get_extra_info("sockname")[1])
    relay = HostileRelay(workdir, bulk, udp, ("127.0.0.1", base + 2))
    ledger, fig = Ledger(), Figures()
    try:
        await target.start()
        await asyncio.to_thread(relay.start)
        idle_rss = relay.sample().rss_bytes
        address = ("127.0.0.1", bulk.listen_port)
        stop_at = time.monotonic() + seconds
        flooding = asyncio.Event()
        mixes = [traffic.transfers({"bulk": address}, [(1, "bulk")])] * 4 + [
            traffic.exchanges("bulk", address)
        ] * 2
        workers = [traffic.worker(mix, random.Random(rng.random()), ledger, stop_at) for mix in mixes]
        await asyncio.gather(
            *workers,
            _victim(udp.listen_port, fig, flooding, stop_at),
            _probe(relay, fig, stop_at),
            _neighbour(relay, address, fig, flooding, stop_at),
        )
        idle, _, waited = await relay.wait_idle(10.0)
        after_rss = relay.sample().rss_bytes
        alive = relay.alive
        relay.stop()
    finally:
        relay.close()
        await target.close()
        echo.close()
    return {
        "seconds": seconds,
        "seed": seed,
        "verdicts": dict(ledger.verdicts),
        "examples": ledger.examples,
        "bytes_verified": ledger.bytes_verified,
        "figures": fig,
        "idle_rss": idle_rss,
        "after_rss": after_rss,
        "active_after": idle,
        "active_wait": waited,
        "alive": alive,
        "exit": relay.exit,
        "log_tail": relay.log_tail(20),
    }


def checks(r: dict[str, Any]) -> list[Check]:
    fig: Figures = r["figures"]
    v = r["verdicts"]
    mib = 1024 * 1024
    peak = max(fig.rss, default=0)
    bound = r["idle_rss"] + 2 * BUDGET + 16 * mib  # the budget, pinned reads, the bursts' own objects
    probe_max = max(fig.probes, default=0.0)
    every = set(fig.episodes) == set(EPISODES)
    flood_share = fig.udp_flood_back / max(1, fig.udp_flood_sent)
    return [
        Check(
            "the neighbour took every kind of turn",
            every,
            ", ".join(f"{k} x{n}" for k, n in fig.episodes.items()),
        ),
        Check("no corrupted transfer", not v.get(CORRUPTED), f"{v.get(CORRUPTED, 0)} corrupted"),
        Check(
            "no honest operation failed",
            not v.get(UNEXPECTED) and v.get(VERIFIED, 0) > 0,
            f"{v.get(VERIFIED, 0)} verified, {v.get(UNEXPECTED, 0)} failed, "
            f"{r['bytes_verified'] / mib:.0f} MiB checked",
        ),
        Check(
            "/readyz: 200 within 1 s at every probe",
            not fig.probe_failures and bool(fig.probes),
            f"{len(fig.probes)} of {len(fig.probes) + len(fig.probe_failures)}; "
            f"slowest {probe_max * 1000:.0f} ms"
            + (f"; {fig.probe_failures[0]}" if fig.probe_failures else ""),
        ),
        Check(
            "UDP: the honest client's datagrams come back during floods (90 % at least)",
            fig.udp_flood_sent > 0 and flood_share >= 0.9,
            f"{fig.udp_flood_back} of {fig.udp_flood_sent} during floods; "
            f"{fig.udp_back} of {fig.udp_sent} in all",
        ),
        Check(
            "slow readers: the budget held them; memory bounded",
            fig.budget_reached >= 1 and peak <= bound,
            f"relay_buffered_bytes up to {fig.buffered_max / mib:.1f} MiB (budget {BUDGET / mib:.0f} MiB); "
            f"RSS {r['idle_rss'] / mib:.1f} → peak {peak / mib:.1f} (bound {bound / mib:.1f}) → "
            f"{r['after_rss'] / mib:.1f} MiB after",
        ),
        Check(
            "every SIGHUP bomb refused, the running config kept",
            fig.bombs_sent > 0 and fig.bombs_refused == fig.bombs_sent,
            f"{fig.bombs_refused} of {fig.bombs_sent}",
        ),
        Check(
            "scrapes answered throughout the storm",
            fig.scrapes > 0,
            f"{fig.scrapes} scrapes, median {statistics.median(fig.scrape_seconds or [0]) * 1000:.1f} ms",
        ),
        Check(
            "connections back to 0, exit 0 on SIGTERM",
            r["alive"] and r["active_after"] == 0 and r["exit"][0] == 0,
            f"alive {r['alive']}, {r['active_after']} active after {r['active_wait']:.1f} s, "
            f"exit {r['exit'][0]} after {r['exit'][1]:.2f} s",
        ),
        Check("the harness did all it planned", not fig.problems, "; ".join(fig.problems) or "yes"),
    ]


def section(r: dict[str, Any], results: list[Check], command: str, date: str) -> str:
    ok = all(c.ok for c in results)
    lines = [
        HOSTILE_MARK,
        "## Hostile mode",
        "",
        f"Generated by `{command}` on {date}: {r['seconds']:.0f} s of verified traffic through one relay "
        f"while a hostile neighbour took turns, {EPISODE:g} s each. Result: **{'PASS' if ok else 'FAIL'}**.",
        "",
        *conditions(results),
        "",
        "The turns: " + "; ".join(f"**{name}**" for name in EPISODES) + " (soak/hostile.py says how each is "
        "done). No turn opens a fault window: an honest client's failure at any time fails the run.",
        "",
    ]
    return "\n".join(lines)


def write_section(doc: Path, text: str) -> None:
    """Put `text` between HOSTILE_MARK and FIGURES_MARK of `doc`, keeping what is before and after."""
    old = doc.read_text() if doc.exists() else ""
    head = old.split(HOSTILE_MARK, 1)[0].split(FIGURES_MARK, 1)[0].rstrip("\n")
    tail = FIGURES_MARK + old.split(FIGURES_MARK, 1)[1] if FIGURES_MARK in old else ""
    doc.write_text("\n\n".join(part for part in (head, text.rstrip("\n"), tail.rstrip("\n")) if part) + "\n")
