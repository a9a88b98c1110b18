"""The HTTP endpoint on the metrics address: /healthz, /readyz and /metrics, a view of the relay's state.

It runs on the relay's own loop and reads the state through view.State; server.py does not import it
(cli.py hands the server this class as its endpoint). Rules:
1. Health is answered at once: a complete /healthz or /readyz request is answered in the callback that
   read it, never behind a scrape (metrics.py renders in slices; other scrapers share one render).
2. A client has HEADER_TIMEOUT from connecting to send its whole request head, and SEND_TIMEOUT to take
   each part of the answer; otherwise it is closed (`timeout`, `slow`).
3. At most MAX_CLIENTS clients are held (their descriptors come out of the relay's reserve). One more
   closes the longest-held client (`evicted`), not the newcomer: sockets a neighbour holds open only get
   themselves closed, they cannot lock the orchestrator's probe out.
4. Every client closed that way is counted (relay_http_clients_closed_total) and logged at a limited rate.
Nothing a client sends can stop the relay: anything malformed gets a 400 and the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
from typing import cast

from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR, CollectorRegistry, generate_latest

from relay.address import HostPort
from relay.logs import RateLimited
from relay.metrics import CONTENT_TYPE, Metrics, counter
from relay.view import State, readiness

MAX_REQUEST = 8192
HEADER_TIMEOUT = 1.0  # a prober or scraper sends its request head with the connection's first packet
SEND_TIMEOUT = 10.0  # without taking any of the answer
MAX_CLIENTS = 16
CLOSE_REASONS = ("timeout", "evicted", "slow")
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}
WHY = {
    "timeout": f"sent no complete request within {HEADER_TIMEOUT:g}s",
    "evicted": f"was the longest held of {MAX_CLIENTS} clients when another connected",
    "slow": f"took none of its answer for {SEND_TIMEOUT:g}s",
}


class HealthServer:
    """The endpoint: created by the server (as its endpoint factory) with the server's state."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.closed = dict.fromkeys(CLOSE_REASONS, 0)
        self.metrics = Metrics(state, (self._own_metrics,), (_process_metrics,))
        self.address: HostPort | None = None
        self._http: asyncio.Server | None = None
        self._clients: dict[Client, None] = {}  # held now, oldest first
        self._tasks: set[asyncio.Task[None]] = set()  # /metrics answers being sent
        self._warnings = RateLimited()

    async def start(self, address: HostPort) -> HostPort:
        loop = asyncio.get_running_loop()
        self._http = await loop.create_server(
            lambda: Client(self), address.host, address.port, reuse_address=True
        )
        self.address = HostPort(address.host, self._http.sockets[0].getsockname()[1])
        return self.address

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
        for client in list(self._clients):
            client.transport.abort()
        self._clients.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=1.0)

    # --- clients ---------------------------------------------------------------------------------------

    def admit(self, client: Client) -> None:
        """Rule 3: hold the newcomer; past MAX_CLIENTS, close the longest-held client."""
        while len(self._clients) >= MAX_CLIENTS:
            oldest = next(iter(self._clients))
            self.drop(oldest, "evicted")
        self._clients[client] = None

    def forget(self, client: Client) -> None:
        self._clients.pop(client, None)

    def drop(self, client: Client, reason: str) -> None:
        """Close a client that broke rule 2 or 3; counted and logged at a limited rate."""
        if client not in self._clients:
            return  # already closed
        self.forget(client)
        client.transport.abort()
        self.closed[reason] += 1
        self._warnings.warning(
            f"http:{reason}",
            f"metrics and health on {self.address}: closed a client from {client.peer} that {WHY[reason]} "
            "(a slow or idle client, or a neighbour holding sockets open; relay_http_clients_closed_total "
            "counts them)",
        )

    def answer_metrics(self, client: Client) -> None:
        task = asyncio.ensure_future(self._send_metrics(client))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_metrics(self, client: Client) -> None:
        await client.send(200, CONTENT_TYPE, await self.metrics.render())

    def respond(self, head: bytes) -> tuple[int, str, bytes] | None:
        """The answer to a request head; None for /metrics (answered by a task, rule 1)."""
        if len(head) > MAX_REQUEST:
            return 400, "text/plain", b"request too large\n"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"only GET\n"
        if target == b"/metrics":
            return None
        if target == b"/healthz":
            return 200, "application/json", b'{"status": "alive"}\n'
        if target == b"/readyz":
            ready, body = readiness(self.state)
            return (200 if ready else 503), "application/json", json.dumps(body).encode() + b"\n"
        return 404, "text/plain", b"try /metrics, /healthz or /readyz\n"

    def _own_metrics(self) -> str:
        return counter(
            "relay_http_clients_closed_total",
            "Clients of the metrics and health port closed without an answer: timeout (no complete request "
            f"within {HEADER_TIMEOUT:g}s), evicted (the longest held of {MAX_CLIENTS}, to make room), slow "
            f"(took none of the answer for {SEND_TIMEOUT:g}s)",
            "reason",
            self.closed,
        )


_PROCESS = CollectorRegistry(auto_describe=True)
_PROCESS.register(PROCESS_COLLECTOR)
_PROCESS.register(PLATFORM_COLLECTOR)


def _process_metrics() -> str:
    """process_* and python_info from prometheus_client: a handful of series read from /proc."""
    return generate_latest(_PROCESS).decode()


class Client(asyncio.Protocol):
    """One HTTP client: one request, one answer, then closed (Connection: close)."""

    def __init__(self, endpoint: HealthServer) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport
        self.peer = "?"
        self._head = bytearray()
        self._answered = False
        self._timer: asyncio.TimerHandle | None = None
        self._writable: asyncio.Future[None] | None = None  # set while the transport is paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = str(HostPort(peer[0], peer[1]))
        self.endpoint.admit(self)
        self._timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._expire, "timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint.forget(self)
        self._stop_timer()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)  # the sender sees the transport closing and stops

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return  # anything after the request head (a body, a pipelined request) is ignored
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 and len(self._head) <= MAX_REQUEST:
            return
        self._answered = True
        self._stop_timer()
        answer = self.endpoint.respond(bytes(self._head[: end + 4] if end >= 0 else self._head))
        if answer is None:
            self.endpoint.answer_metrics(self)
        else:
            self.transport.write(_head(*answer[:2], len(answer[2])) + answer[2])
            self.transport.close()

    def eof_received(self) -> bool:
        return self._answered  # a client that half-closes after its request still gets its answer

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()
        self._timer = asyncio.get_running_loop().call_later(SEND_TIMEOUT, self._expire, "slow")

    def resume_writing(self) -> None:
        self._stop_timer()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    async def send(self, status: int, ctype: str, parts: list[bytes]) -> None:
        """Write the answer a part at a time, waiting while the client has not taken the last one."""
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(_head(status, ctype, sum(len(part) for part in parts)))
        for part in parts:
            if self._writable is not None:
                await self._writable
            if transport.is_closing():
                return
            transport.write(part)
        transport.close()

    def _expire(self, reason: str) -> None:
        self._timer = None
        self.endpoint.drop(self, reason)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _head(status: int, ctype: str, length: int) -> bytes:
    return (
        f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()
