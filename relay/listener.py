"""Listening sockets: one per (address, port), SO_REUSEADDR, a large backlog, IPv6-only for v6.

IPv6 sockets are v6-only so that 0.0.0.0 and :: (or 127.0.0.1 and ::1) on one port never clash.
When the kernel has no IPv6 (a container started with it disabled), ::1 is skipped with one info line.
Port 0 binds an ephemeral port; the other addresses of the same route then take that same port.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from relay.address import HostPort
from relay.config import Route

log = logging.getLogger("relay")

NO_IPV6 = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)


class ListenError(Exception):
    """A listen address that cannot be bound; the message names it (exit code 1)."""


@dataclass(slots=True)
class Listener:
    route: Route
    address: HostPort  # as bound: the real port when 0 was asked for
    server: asyncio.AbstractServer

    def close(self) -> None:
        self.server.close()


def bind(host: str, port: int, *, backlog: int, reuseport: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


async def open_route(
    route: Route,
    factory: Callable[[], asyncio.BaseProtocol],
    *,
    backlog: int,
    reuseport: bool,
    skipped: set[str],
) -> list[Listener]:
    """Listen on every address of the route; on failure close what was opened and raise ListenError.

    Addresses left out because the kernel lacks IPv6 are added to `skipped`.
    """
    loop = asyncio.get_running_loop()
    listeners: list[Listener] = []
    chosen_port = 0
    try:
        for want in route.listen:
            port = want.port or chosen_port
            try:
                sock = bind(want.host, port, backlog=backlog, reuseport=reuseport)
            except OSError as err:
                if want.host == "::1" and err.errno in NO_IPV6:
                    log.info("%s: IPv6 is not available here; not listening on [::1]:%d", route.name, port)
                    skipped.add(want.host)
                    continue
                raise ListenError(
                    f"cannot listen on {HostPort(want.host, port)} for {route.name}: {bind_error(err)}"
                ) from None
            bound = HostPort(want.host, sock.getsockname()[1])
            chosen_port = chosen_port or bound.port
            server = await loop.create_server(factory, sock=sock, backlog=backlog)
            listeners.append(Listener(route, bound, server))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    if not listeners:
        raise ListenError(f"{route.name}: no address to listen on ({route.describe()})")
    return listeners


def bind_error(err: OSError) -> str:
    if err.errno == errno.EADDRINUSE:
        return "address already in use (another process listens on this port)"
    if err.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if err.errno == errno.EADDRNOTAVAIL:
        return "this address is not on any interface here"
    return err.strerror or str(err)
