"""In-process relays and target servers on port 0, for the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from relay.access import Allow
from relay.address import HostPort
from relay.cli import http_endpoint
from relay.config import Config, Route
from relay.server import Server
from relay.tls import ListenTLS, TargetTLS

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@contextlib.asynccontextmanager
async def relay(
    target_port: int,
    *,
    listen: tuple[str, ...] = ("127.0.0.1",),
    target: str = "127.0.0.1",
    protocol: str = "tcp",
    name: str = "test",
    tls: ListenTLS | None = None,
    target_tls: TargetTLS | None = None,
    allow: Allow | None = None,
    **settings: Any,
) -> AsyncIterator[Server]:
    """A relay with one route `name` from `listen` (port 0) to target:target_port, with TLS on its listen
    side and towards its target and an allow list when given; drained on exit."""
    listen_at = tuple(HostPort(host, 0) for host in listen)
    route = Route(name, listen_at, target, target_port, protocol, tls, target_tls, allow=allow)
    settings.setdefault("drain_timeout", 1.0)
    settings.setdefault("metrics", None)
    server = Server(Config(routes=(route,), **settings), endpoint=http_endpoint)
    await server.start()
    try:
        yield server
    finally:
        await server.drain()


def port_of(server: Server) -> int:
    return server.listeners[0].address.port


@contextlib.asynccontextmanager
async def tracked_server(
    handler: Handler, start: Callable[[Handler], Awaitable[asyncio.Server]]
) -> AsyncIterator[asyncio.Server]:
    """A stream server made by `start(callback)`; on exit every open connection is aborted and its
    handler awaited."""
    open_writers: set[asyncio.StreamWriter] = set()
    done: set[asyncio.Future[None]] = set()

    async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.add(writer)
        finished = asyncio.get_running_loop().create_future()
        done.add(finished)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            open_writers.discard(writer)
            finished.set_result(None)

    server = await start(tracked)
    try:
        yield server
    finally:
        server.close()
        for writer in list(open_writers):
            writer.transport.abort()
        if done:
            await asyncio.wait(done, timeout=5)
        await server.wait_closed()


@contextlib.asynccontextmanager
async def tcp_server(handler: Handler, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[int]:
    """An asyncio stream server on host:port (0: any free port); yields the port."""
    async with tracked_server(handler, lambda cb: asyncio.start_server(cb, host, port)) as server:
        yield server.sockets[0].getsockname()[1]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Echo until EOF, then close."""
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


def unused_port() -> int:
    """A port nobody listens on (bound then released, so connecting is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def read_all(reader: asyncio.StreamReader) -> bytes:
    return await reader.read(-1)


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a condition on the relay's state, checking every 10 ms, failing after `timeout`."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def http_get(address: HostPort, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(address.host, address.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
    response = await read_all(reader)
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def scrape(server: Server) -> Samples:
    """The relay's /metrics, parsed the way Prometheus parses it: (name, labels) -> value."""
    assert server.health_address is not None
    return await scrape_at(server.health_address)


async def scrape_at(address: HostPort) -> Samples:
    """/metrics of a relay (in this process or not) at `address`, parsed as scrape() does."""
    status, body = await http_get(address, "/metrics")
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def free_port_block(count: int, after: int = 0, *, ipv6: bool = True) -> int:
    """The first of `count` consecutive ports above `after`, free on 127.0.0.1 and ::1 (unless `ipv6` is
    false: thousands of ports, for a relay listening on 127.0.0.1 only) right now.

    Searched below the kernel's ephemeral range, so busy outgoing connections elsewhere on the machine
    cannot take the ports between this check and the test's bind.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as fh:
            ephemeral = int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    low, high = max(after + 1, 10000), ephemeral - count
    span = max(high - low, 1)
    offset = (os.getpid() * 101) % span
    families = [(socket.AF_INET, "127.0.0.1")]
    if ipv6 and has_ipv6_loopback():
        families.append((socket.AF_INET6, "::1"))
    base, tried = low + offset, 0
    while tried < span:
        if base > high:
            base = low
        socks: list[socket.socket] = []
        port = base
        try:
            for port in range(base, base + count):
                for fam, host in families:
                    sock = socket.socket(fam, socket.SOCK_STREAM)
                    socks.append(sock)
                    sock.bind((host, port))
            return base
        except OSError:
            tried += port - base + 1
            base = port + 1  # every block holding the busy port would fail too
        finally:
            for sock in socks:
                sock.close()
    raise RuntimeError("no block of free ports found")


def relay_args(listen: int, target: int, *extra: str) -> list[str]:
    """Command-line arguments for a relay from 127.0.0.1/::1:listen to 127.0.0.1:target, no metrics."""
    return ["--ports", f"{listen}:{target}", "--target", "127.0.0.1", "--metrics", "off", *extra]


class LineProcess:
    """A child process whose output (stdout and stderr together) a thread collects line by line.

    A context manager: on exit the process is killed and reaped, whatever happened.
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None, **popen: Any) -> None:
        import subprocess
        import threading

        self.argv = argv
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            **popen,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def mark(self) -> int:
        """How many lines so far: pass it as wait_for's `since` to look only at later lines."""
        with self._changed:
            return len(self.lines)

    def wait_for(self, text: str, timeout: float = 10.0, since: int = 0) -> str:
        """The first line (from line `since` on) containing `text`; fails if the process ends or the time
        runs out first."""

        def found() -> str | None:
            return next((line for line in self.lines[since:] if text in line), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or not self._reader.is_alive(), timeout)
            line = found()
        if line is None:
            state = "exited" if self.proc.poll() is not None else "still running"
            raise AssertionError(
                f"{self.argv[:4]} ({state}) never printed {text!r}; output:\n{self.output()}"
            )
        return line

    def stop(self, sig: int | None = None, timeout: float = 10.0) -> int:
        """Send SIGTERM (or `sig`) and return the exit code; fails if the process ignores it."""
        import signal
        import subprocess

        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.argv[:4]} ignored the signal for {timeout} s; output:\n{self.output()}"
            ) from None
        self._reader.join(timeout)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._reader.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> LineProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


class RelayProcess(LineProcess):
    """`python -m relay ARGS`, with no RELAY_* or PORTS variables from the test's own environment."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, **popen: Any) -> None:
        import sys

        clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k != "PORTS"}
        super().__init__([sys.executable, "-m", "relay", *args], {**clean, **(env or {})}, **popen)


def connect_when_ready(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """Connect, retrying while refused (the process is still starting), for at most `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def expect_reset(sock: socket.socket, payload: bytes) -> None:
    """Send, then read: the relay must reset the connection (a failed connect), not close it cleanly."""
    with sock:
        try:
            sock.sendall(payload)
            data = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return
    raise AssertionError(f"the connection ended cleanly after {data!r}; expected a reset")


def exchange(sock: socket.socket, payload: bytes) -> bytes:
    """Send everything, half-close, read until EOF."""
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def alias_bomb(depth: int, key: str = "target") -> str:
    """`key:` holding nine lists of nine aliases of the list before: 9**depth strings from ~30 bytes a
    level (depth 7: 290 bytes; expanded by the error message, 250 MB on main)."""
    items = ['&a ["x","x","x","x","x","x","x","x","x"]']
    for level in range(1, depth + 1):
        name, before = f"a{level}", "a" if level == 1 else f"a{level - 1}"
        items.append(f"&{name} [" + ",".join([f"*{before}"] * 9) + "]")
    return f"ports: '80'\n{key}: [" + ", ".join(items) + "]\n"
