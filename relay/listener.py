"""Listening sockets: one per (address, port), SO_REUSEADDR, a large backlog, IPv6-only for v6.

IPv6 sockets are v6-only so that 0.0.0.0 and :: (or 127.0.0.1 and ::1) on one port never clash, unless
ipv6only is off (socat's TCP6-LISTEN): [::] then serves IPv4 clients too, as ::ffff:a.b.c.d.
When the kernel has no IPv6 (a container started with it disabled), ::1 is skipped with one info line.
Port 0 binds an ephemeral port; the other addresses of the same route then take that same port.

Rules of the accept loop (ours, not the event loop's):
1. Out of descriptors, a waiting client is reset at once and reported (`on_fd_limit`), never left to
   guess. The loops' own accept loops do not tell: asyncio only logs through its exception handler and
   leaves the client waiting; uvloop (libuv) silently accepts and closes it. One descriptor is held in
   reserve for this: released to accept the client, then taken again.
2. At most ACCEPT_BATCH accepts per wake-up, so a flood of new clients cannot starve the open ones.
3. Every accepted socket is given to the route's `take` in a task of its own, which owns it from then
   on: it makes the transport (or closes the socket) and goes on with the connection's work in the same
   task. The listener tracks these tasks and never cancels them (a cancelled hand-over would orphan its
   socket); the connection may, once its transport exists.

Socket files (a UnixAddress in a route's listen addresses) use the same Listener and accept loop:
4. The file is made with the asked mode (the umask is set for the bind, so it never exists with other
   permissions). A socket file nobody listens on (left by a killed run: connecting is refused) is
   replaced; anything else at the path (a regular file, a directory, a link, a live socket) is never
   removed: ListenError.
5. Closing the listener removes the file, if it is still the one this listener made.

6. A route with `allow` (relay/access.py) checks each accepted client before anything else: one the
   list does not admit (by address; on a socket file, by the peer's uid) is reset at once, before any
   connect to the target, and reported (`on_denied`, which counts and logs at a limited rate).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from relay.access import peer_uid
from relay.address import HostPort, UnixAddress
from relay.config import Route
from relay.pump import LINGER_RST

log = logging.getLogger("relay")

NO_IPV6 = (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT)
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
ACCEPT_BATCH = 64
RETRY_SECONDS = 0.1  # pause accepting this long when even the reserve descriptor is gone
FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISLNK, "a symbolic link"),
    (stat.S_ISREG, "a regular file"),
)


class ListenError(Exception):
    """A listen address that cannot be bound; the message names it (exit code 1)."""


class Reserve:
    """One descriptor kept open so that a client can still be accepted (and reset) when the process is
    out of descriptors."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.take()

    def take(self) -> bool:
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def release(self) -> bool:
        if self._fd is None:
            return False
        os.close(self._fd)
        self._fd = None
        return True

    def close(self) -> None:
        self.release()


@dataclass(slots=True, eq=False)
class Listener:
    route: Route
    address: HostPort | UnixAddress  # as bound: the real port when 0 was asked for
    sock: socket.socket
    take: Callable[[socket.socket], Coroutine[Any, Any, None]]
    on_fd_limit: Callable[[OSError], None]
    reserve: Reserve
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    _handing: set[asyncio.Task[None]] = field(default_factory=set)
    _retry: asyncio.TimerHandle | None = None
    closed: bool = False
    socket_file: tuple[str, int, int] | None = None  # (path, st_dev, st_ino) of the file bound (rule 5)
    on_denied: Callable[[str], None] | None = None  # a client the route's allow refused (rule 6)
    _kind: tuple[int, int] = (0, 0)  # the family and type of accepted sockets, as plain ints

    def __post_init__(self) -> None:
        self._kind = (int(self.sock.family), int(self.sock.type))

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._retry is not None:
            self._retry.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        if self.socket_file is not None:
            remove_socket_file(*self.socket_file)

    def _accept(self) -> None:
        loop, take, (family, kind) = self.loop, self.take, self._kind
        for _ in range(ACCEPT_BATCH):  # rule 2
            try:
                # accept() without its wrapper, which spends ~4 µs of its ~9 turning the family and
                # type into enums for the new socket (issue 13, docs/benchmarks.md).
                fd, peer = self.sock._accept()  # type: ignore[attr-defined]  # CPython's own, under accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as err:
                if err.errno in OUT_OF_DESCRIPTORS:
                    self._out_of_descriptors(err)
                else:
                    log.warning("%s: accept on %s failed: %s", self.route.name, self.address, err)
                    self._pause()
                return
            conn = socket.socket(family, kind, 0, fd)  # both loops make it non-blocking when they take it
            if self.route.allow is not None and not self._admitted(conn, peer):
                continue
            task = loop.create_task(take(conn))
            self._handing.add(task)
            task.add_done_callback(self._handing.discard)

    def _admitted(self, conn: socket.socket, peer: Any) -> bool:
        """Rule 6: the route's allow admits the peer's address (a socket file: its uid); else reset."""
        allow = self.route.allow
        assert allow is not None
        if isinstance(peer, tuple):
            who, ok = peer[0], allow.admits(peer[0])
        else:
            uid = peer_uid(conn)
            who, ok = f"uid {uid}", uid is not None and allow.admits_uid(uid)
        if ok:
            return True
        with conn:
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            except OSError:
                pass  # it reset already; closing is all there is to do
        if self.on_denied is not None:
            self.on_denied(who)
        return False

    def _out_of_descriptors(self, err: OSError) -> None:
        """Rule 1: accept the waiting client on the reserve descriptor and reset it, one per call."""
        if not self.reserve.release():
            self._pause()
            return
        try:
            conn, _ = self.sock.accept()
        except OSError:
            conn = None
        self.reserve.take()
        if conn is not None:
            with conn:
                try:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                except OSError:
                    pass  # it reset already; closing is all there is to do
            self.on_fd_limit(err)
        if not self.reserve.take():
            self._pause()

    def _pause(self) -> None:
        """Stop watching the socket for RETRY_SECONDS (clients wait in the backlog meanwhile)."""
        if self._retry is None and not self.closed:
            self.loop.remove_reader(self.sock.fileno())
            self._retry = self.loop.call_later(RETRY_SECONDS, self._resume)

    def _resume(self) -> None:
        self._retry = None
        if not self.closed:
            self.reserve.take()
            self.start()


def bind(host: str, port: int, *, backlog: int, reuseport: bool, ipv6only: bool = True) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(ipv6only))
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_route(
    route: Route,
    take: Callable[[socket.socket], Coroutine[Any, Any, None]],
    *,
    backlog: int,
    reuseport: bool,
    skipped: set[str],
    on_fd_limit: Callable[[OSError], None],
    reserve: Reserve,
    on_denied: Callable[[str], None] | None = None,
    ipv6only: bool = True,
) -> list[Listener]:
    """Listen on every address of the route; on failure close what was opened and raise ListenError.

    Addresses left out because the kernel lacks IPv6 are added to `skipped`.
    """
    listeners: list[Listener] = []
    chosen_port = 0
    try:
        for want in route.listen:
            if isinstance(want, UnixAddress):
                sock, socket_file = bind_unix(route, want, backlog=backlog)
                listener = Listener(
                    route,
                    want,
                    sock,
                    take,
                    on_fd_limit,
                    reserve,
                    socket_file=socket_file,
                    on_denied=on_denied,
                )
                listener.start()
                listeners.append(listener)
                continue
            port = want.port or chosen_port
            try:
                sock = bind(want.host, port, backlog=backlog, reuseport=reuseport, ipv6only=ipv6only)
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
            listener = Listener(route, bound, sock, take, on_fd_limit, reserve, on_denied=on_denied)
            listener.start()
            listeners.append(listener)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    if not listeners:
        raise ListenError(f"{route.name}: no address to listen on ({route.describe()})")
    return listeners


def bind_unix(
    route: Route, address: UnixAddress, *, backlog: int
) -> tuple[socket.socket, tuple[str, int, int]]:
    """Listen on a socket file made with `address.mode` (rule 4); returns the socket and the file's
    identity for its removal (rule 5)."""
    path = address.path
    where = f"cannot listen on {address} for {route.name}"
    _clear_stale(path, where, route.name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        umask = os.umask(0o777 & ~address.mode)  # the file is born with the asked mode: no chmod window
        try:
            sock.bind(path)
        finally:
            os.umask(umask)
        made = os.lstat(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as err:
        sock.close()
        raise ListenError(f"{where}: {_unix_bind_error(err, path)}") from None
    except BaseException:
        sock.close()
        raise
    return sock, (path, made.st_dev, made.st_ino)


def _clear_stale(path: str, where: str, name: str) -> None:
    """Remove a socket file nobody listens on; refuse anything else at the path (rule 4)."""
    try:
        found = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise ListenError(f"{where}: {_unix_bind_error(err, path)}") from None
    if not stat.S_ISSOCK(found.st_mode):
        kind = next((what for test, what in FILE_KINDS if test(found.st_mode)), "not a socket")
        raise ListenError(
            f"{where}: {path} is {kind}, which the relay does not remove; expected a free path or a stale "
            "socket file (remove it or choose another path)"
        )
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except ConnectionRefusedError:  # a socket file nobody listens on: left by a killed run
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                raise ListenError(f"{where}: cannot remove the stale socket file: {err.strerror}") from None
            log.info("%s: replaced the stale socket file %s (nothing listened on it)", name, path)
            return
        except BlockingIOError:
            pass  # its backlog is full: someone listens
        except OSError as err:
            raise ListenError(f"{where}: cannot tell whether {path} is in use: {err.strerror}") from None
    raise ListenError(
        f"{where}: another process listens on {path}; expected a free path (stop that process or choose "
        "another path)"
    )


def remove_socket_file(path: str, dev: int, ino: int) -> None:
    """Remove the socket file this listener made, unless something else has taken its path since."""
    try:
        found = os.lstat(path)
        if (found.st_dev, found.st_ino) == (dev, ino):
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("cannot remove the socket file %s: %s", path, err.strerror)


def _unix_bind_error(err: OSError, path: str) -> str:
    directory = os.path.dirname(path) or "/"
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return f"the directory {directory} does not exist (mount a volume there, shared with the app)"
    if err.errno in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied in {directory} (the relay runs as uid 10001: the directory must be writable "
            "by it, e.g. a named volume or a host directory owned by 10001)"
        )
    if err.errno == errno.EROFS:
        return f"{directory} is on a read-only file system (put the socket in a mounted volume)"
    if err.errno == errno.EADDRINUSE:
        return f"{path} appeared meanwhile (another process listens on it)"
    return err.strerror or str(err)


def bind_error(err: OSError) -> str:
    if err.errno == errno.EADDRINUSE:
        return "address already in use (another process listens on this port)"
    if err.errno == errno.EACCES:
        return "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if err.errno == errno.EADDRNOTAVAIL:
        return "this address is not on any interface here"
    return err.strerror or str(err)
