"""The small HTTP server for /metrics, /healthz and /readyz, and the `relay healthcheck` command.

It runs on the relay's own event loop (no thread), so a scrape reads counters between callbacks and
never sees them half-updated. Requests are bounded in size and time; anything malformed gets a 400
and the connection is closed. Nothing a client sends can stop the relay.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import sys
from typing import TYPE_CHECKING

from prometheus_client import PLATFORM_COLLECTOR, PROCESS_COLLECTOR

from relay.address import HostPort
from relay.config import Config
from relay.metrics import CONTENT_TYPE, exposition, registry_for

if TYPE_CHECKING:
    from relay.server import Server

log = logging.getLogger("relay")

MAX_REQUEST = 8192
REQUEST_TIMEOUT = 5.0
# Scrapers and probes at once; more are closed at once, so that slow or stuck HTTP clients cannot eat
# the descriptors kept in reserve for the relay itself (server.FD_RESERVE).
MAX_CLIENTS = 8
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


def readiness(server: Server) -> tuple[bool, dict[str, object]]:
    """Ready when not draining, every configured address of every route is listening, and nothing in
    `server.problems` says new connections would fail (slots or descriptors exhausted, stranded ...)."""
    routes: dict[str, object] = {}
    problems = sorted(server.problems.values())
    ready = not server.draining and bool(server.routes) and not problems
    for route, active in server.routes.items():
        listening = [str(lst.address) for lst in active.listeners]
        complete = len(active.listeners) >= len({hp.host for hp in route.listen} - server.skipped_hosts)
        ready = ready and complete
        routes[route.name] = {"listening": listening, "ready": complete and not server.draining}
    status = "ready" if ready else ("draining" if server.draining else "not ready")
    body: dict[str, object] = {"status": status, "routes": routes}
    if problems:
        body["reasons"] = problems
    return ready, body


class HealthServer:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.registry = registry_for(server, (PROCESS_COLLECTOR, PLATFORM_COLLECTOR))
        self._http: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self, address: HostPort) -> HostPort:
        self._http = await asyncio.start_server(self._client, address.host, address.port, reuse_address=True)
        port = self._http.sockets[0].getsockname()[1]
        return HostPort(address.host, port)

    async def close(self) -> None:
        if self._http is not None:
            self._http.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(self._clients, timeout=1.0)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._clients) >= MAX_CLIENTS:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                status, ctype, body = self._respond(head)
                writer.write(
                    f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a client that is slow, too long-winded or gone gets no answer
        finally:
            self._clients.discard(task)
            writer.close()

    def _respond(self, head: bytes) -> tuple[int, str, bytes]:
        if len(head) > MAX_REQUEST:
            return 400, "text/plain", b"request too large\n"
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return 400, "text/plain", b"bad request\n"
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, "text/plain", b"only GET\n"
        if target == b"/metrics":
            return 200, CONTENT_TYPE, exposition(self.registry)
        if target == b"/healthz":
            return 200, "application/json", b'{"status": "alive"}\n'
        if target == b"/readyz":
            ready, body = readiness(self.server)
            return (200 if ready else 503), "application/json", json.dumps(body).encode() + b"\n"
        return 404, "text/plain", b"try /metrics, /healthz or /readyz\n"


def healthcheck(config: Config, timeout: float = 3.0) -> int:
    """`relay healthcheck`: 0 when /readyz answers 200, 1 otherwise (for Docker's HEALTHCHECK)."""
    if config.metrics is None:
        print("relay: healthcheck: the health endpoint is off (RELAY_METRICS=off)", file=sys.stderr)
        return 1
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(config.metrics.host, config.metrics.host)
    conn = http.client.HTTPConnection(host, config.metrics.port, timeout=timeout)
    try:
        conn.request("GET", "/readyz")
        response = conn.getresponse()
        body = response.read().decode(errors="replace").strip()
    except OSError as err:
        print(f"relay: healthcheck: {HostPort(host, config.metrics.port)}: {err}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(OSError):
            conn.close()
    print(body)
    return 0 if response.status == 200 else 1
