"""Socket files at either end of a route: parsing from every source, the relay's guarantees through a
socket (half-close, early bytes, backpressure), the socket file's life (mode, stale, refused paths,
removal on stop), hints, metrics, readiness, reload, and real Redis and PostgreSQL servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import check, hints, socat
from relay.address import AddressError, HostPort, PortMap, UnixAddress, parse_port_item, parse_ports
from relay.cli import http_endpoint
from relay.config import Config, ConfigError, Route, load
from relay.listener import ListenError
from relay.server import Server
from tests.support import (
    Handler,
    RelayProcess,
    echo,
    exchange,
    free_port_block,
    scrape,
    tcp_server,
    tracked_server,
    value,
    wait_until,
)
from tests.test_lifecycle import readyz

Run = Callable[..., Any]


# --- parsing: port items, YAML routes, socat argv -------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5432:unix:/host/pg/.s.PGSQL.5432", (PortMap(5432, UnixAddress("/host/pg/.s.PGSQL.5432")),)),
        ("unix:/run/pg/.s.PGSQL.5432:5432", (PortMap(UnixAddress("/run/pg/.s.PGSQL.5432"), 5432),)),
        ("UNIX:/a/b:c/redis.sock:6379", (PortMap(UnixAddress("/a/b:c/redis.sock"), 6379),)),
        ("6379:unix:/run/x/udp", (PortMap(6379, UnixAddress("/run/x/udp")),)),  # a slash is no /udp
        (
            "5432:unix:/h/pg.sock 6379 unix:/s/r.sock:6379",
            (
                PortMap(5432, UnixAddress("/h/pg.sock")),
                PortMap(6379, 6379),
                PortMap(UnixAddress("/s/r.sock"), 6379),
            ),
        ),
    ],
)
def test_socket_file_port_items(text: str, expected: tuple[PortMap, ...]) -> None:
    assert parse_ports(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("unix:/run/x.sock", "'unix:/run/x.sock' has no target port; expected unix:PATH:TARGET_PORT"),
        ("unix:run/x.sock:5432", "'run/x.sock' is not an absolute socket file path"),
        ("unix:/run/:5432", "'/run/' names a directory, not a socket file"),
        ("unix:/run/x:0", "'0' is not a port number (1-65535); expected unix:PATH:TARGET_PORT"),
        ("5432-5433:unix:/x", "'5432-5433' is not a port number; expected LISTEN_PORT:unix:PATH"),
        ("5432:unix:x", "'unix:x' is not an absolute socket file path"),
        (f"5432:unix:/{'a' * 110}", "is too long for a socket file (111 bytes)"),
        ("5432:unix:/a 5432:unix:/b", "listen port 5432 appears twice"),
    ],
)
def test_socket_file_port_items_refused(text: str, message: str) -> None:
    with pytest.raises(AddressError) as err:
        parse_ports(text)
    assert message in str(err.value) and "\n" not in str(err.value)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40), st.sampled_from(["5432:unix:{}", "unix:{}:5432", "unix:{}", "5432:UNIX:{}"]))
def test_socket_file_items_give_maps_or_one_line_error(path: str, form: str) -> None:
    """Any text as the path: an absolute path of a socket file that fits, or one line quoting the item."""
    item = form.format(path)
    try:
        (pm,) = parse_port_item(item)
    except AddressError as err:
        assert "\n" not in str(err) and str(err).startswith(repr(item))
    else:
        end = pm.target if isinstance(pm.target, UnixAddress) else pm.listen
        assert isinstance(end, UnixAddress) and end.path.startswith("/") and end.path in item
        assert len(os.fsencode(end.path)) <= 107


def test_settings_from_env_give_socket_routes_with_names() -> None:
    config = load({}, {"RELAY_PORTS": "5432:unix:/host/pg/.s.PGSQL.5432 6379 unix:/shared/pg.sock:5432"})
    got = [(r.name, r.listen, r.target, r.target_port) for r in config.routes]
    assert got == [
        ("tcp/5432", (HostPort("127.0.0.1", 5432), HostPort("::1", 5432)), "unix:/host/pg/.s.PGSQL.5432", 0),
        ("tcp/6379", (HostPort("127.0.0.1", 6379), HostPort("::1", 6379)), "auto", 6379),
        ("unix/shared/pg.sock", (UnixAddress("/shared/pg.sock", 0o660),), "auto", 5432),
    ]
    assert config.routes[0].describe() == "127.0.0.1:5432, [::1]:5432 -> unix:/host/pg/.s.PGSQL.5432"
    assert config.routes[2].describe() == "unix:/shared/pg.sock -> auto:5432"


def test_yaml_socket_routes_and_modes(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "routes:\n"
        "  - {listen: 5432, target: 'unix:/host/pg/.s.PGSQL.5432'}\n"
        "  - {listen: 'unix:/s/a.sock', target: 'db:5432'}\n"
        "  - {listen: 'unix:/s/b.sock', target: 'db:5433', mode: 0666}\n"
        "  - {listen: 'unix:/s/c.sock', target: 'db:5434', mode: 600}\n"
        "  - {listen: 'unix:/s/d.sock', target: 'db:5435', mode: '0o640', name: d}\n"
        "  - {listen: 'unix:/s/e.sock', target: 'unix:/host/e.sock'}\n"
    )
    routes = load({}, {}, str(path)).routes
    assert [(r.name, r.listen[0], r.target, r.target_port) for r in routes] == [
        ("tcp/5432", HostPort("127.0.0.1", 5432), "unix:/host/pg/.s.PGSQL.5432", 0),
        ("unix/s/a.sock", UnixAddress("/s/a.sock", 0o660), "db", 5432),
        ("unix/s/b.sock", UnixAddress("/s/b.sock", 0o666), "db", 5433),
        ("unix/s/c.sock", UnixAddress("/s/c.sock", 0o600), "db", 5434),
        ("d", UnixAddress("/s/d.sock", 0o640), "db", 5435),
        ("unix/s/e.sock", UnixAddress("/s/e.sock", 0o660), "unix:/host/e.sock", 0),
    ]


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ("{listen: 'unix:/s/a.sock', target: db}", "'db' has no port; expected HOST:PORT"),
        ("{listen: 'unix:/s/a.sock', target: 'db:1', mode: 999}", "999 is not a file mode; expected octal"),
        ("{listen: 'unix:/s/a.sock', target: 'db:1', mode: '0800'}", "'0800' is not a file mode"),
        ("{listen: 5432, target: 'db:1', mode: 0600}", "mode applies to a socket file listener only"),
        ("{listen: 'unix:/s/a.sock', target: 'db:1', protocol: udp}", "a socket file carries a stream"),
        ("{listen: 53, target: 'unix:/s/dns.sock', protocol: udp}", "a socket file carries a stream"),
        ("{listen: 'unix:s/a.sock', target: 'db:1'}", "'unix:s/a.sock' is not an absolute socket file path"),
        (
            "{listen: 'unix:/s/a.sock', target: 'unix:/s/a.sock'}",
            "which is its own listen address unix:/s/a.sock",
        ),
    ],
)
def test_yaml_socket_routes_refused(tmp_path: Path, route: str, message: str) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(f"routes:\n  - {route}\n")
    with pytest.raises(ConfigError) as err:
        load({}, {}, str(path))
    assert message in str(err.value) and str(err.value).startswith(f"{path}:2: routes[0]")


def test_a_socket_file_as_the_host_says_where_it_goes() -> None:
    with pytest.raises(ConfigError) as err:
        load({}, {"RELAY_PORTS": "5432", "RELAY_TARGET": "unix:/host/pg.sock"})
    assert str(err.value).startswith("RELAY_TARGET: 'unix:/host/pg.sock' is a socket file")
    assert "LISTEN_PORT:unix:PATH in the ports" in str(err.value)


def test_one_socket_file_listened_on_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("routes:\n  - {listen: 'unix:/s/a.sock', target: 'db:1', name: one}\n")
    with pytest.raises(ConfigError, match=r"socket file /s/a\.sock is used twice"):
        load({}, {"RELAY_PORTS": "unix:/s/a.sock:5432"}, str(path))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["TCP-LISTEN:5432,fork,reuseaddr", "UNIX-CONNECT:/host/pg/.s.PGSQL.5432"],
            ("tcp/5432", "0.0.0.0:5432, [::1]:5432 -> unix:/host/pg/.s.PGSQL.5432"),
        ),
        (
            ["TCP-L:6379", "UNIX-CLIENT:/r/redis.sock"],
            ("tcp/6379", "0.0.0.0:6379, [::1]:6379 -> unix:/r/redis.sock"),
        ),
        (
            ["tcp-listen:6379,bind=127.0.0.1", "unix:/r/redis.sock"],
            ("tcp/6379", "127.0.0.1:6379 -> unix:/r/redis.sock"),
        ),
        (
            [
                "UNIX-LISTEN:/run/pg/.s.PGSQL.5432,fork,mode=0666,unlink-early",
                "TCP:host.docker.internal:5432",
            ],
            ("unix/run/pg/.s.PGSQL.5432", "unix:/run/pg/.s.PGSQL.5432 -> host.docker.internal:5432"),
        ),
        (["unix-l:/s/a.sock", "tcp6:[::1]:80"], ("unix/s/a.sock", "unix:/s/a.sock -> [::1]:80")),
        (
            ["UNIX-LISTEN:/s/a.sock", "UNIX-CONNECT:/h/b.sock"],
            ("unix/s/a.sock", "unix:/s/a.sock -> unix:/h/b.sock"),
        ),
    ],
)
def test_socat_argv_with_socket_files(argv: list[str], expected: tuple[str, str]) -> None:
    (route,) = load(socat.parse(argv).raw, {}).routes
    assert (route.name, route.describe()) == expected


def test_socat_unix_listen_mode_is_the_files_mode() -> None:
    (route,) = load(socat.parse(["UNIX-LISTEN:/s/a.sock,mode=0666", "TCP:db:1"]).raw, {}).routes
    assert route.listen == (UnixAddress("/s/a.sock", 0o666),)
    (route,) = load(socat.parse(["UNIX-LISTEN:/s/a.sock,fork", "TCP:db:1"]).raw, {}).routes
    assert route.listen == (UnixAddress("/s/a.sock", 0o660),)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["UNIX-LISTEN:/s/a.sock,bind=1.2.3.4", "TCP:db:1"],
            "option 'bind=1.2.3.4' is not supported on UNIX-LISTEN",
        ),
        (["UNIX-LISTEN:/s/a.sock,mode=9", "TCP:db:1"], "'9' is not a file mode"),
        (["UNIX-LISTEN:s/a.sock", "TCP:db:1"], "'s/a.sock' is not an absolute socket file path"),
        (["TCP-LISTEN:80", "UNIX-CONNECT:/s/a.sock,fork"], "option 'fork' is not supported on UNIX-CONNECT"),
        (["UDP-LISTEN:53", "UNIX-CONNECT:/s/dns.sock"], "a socket file carries a stream, not datagrams"),
        (["UNIX-CONNECT:/s/a.sock", "TCP:db:1"], "'UNIX-CONNECT' is not a supported listen address"),
        (["TCP-LISTEN:80", "UNIX-LISTEN:/s/a.sock"], "'UNIX-LISTEN' is not a supported connect address"),
    ],
)
def test_socat_argv_with_socket_files_refused(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(socat.parse(argv).raw, {})
    assert message in str(err.value) and "\n" not in str(err.value)


# --- in-process relays, on both loops -------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for socket files (tmp_path can pass sun_path's 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="relay-unix-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.asynccontextmanager
async def unix_server(handler: Handler, path: Path) -> AsyncIterator[Path]:
    """An asyncio stream server on a socket file; on exit its connections are aborted and awaited."""
    async with tracked_server(handler, lambda cb: asyncio.start_unix_server(cb, str(path))):
        yield path
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


@contextlib.asynccontextmanager
async def relay_of(*routes: Route, **settings: Any) -> AsyncIterator[Server]:
    settings.setdefault("drain_timeout", 1.0)
    settings.setdefault("metrics", None)
    server = Server(Config(routes=routes, **settings), endpoint=http_endpoint)
    await server.start()
    try:
        yield server
    finally:
        await server.drain()


def to_socket(path: Path, name: str = "to-socket") -> Route:
    return Route(name, (HostPort("127.0.0.1", 0),), f"unix:{path}", 0)


def from_socket(path: Path, port: int, mode: int = 0o660, name: str = "from-socket") -> Route:
    return Route(name, (UnixAddress(str(path), mode),), "127.0.0.1", port)


async def late_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read to EOF, then answer with the byte count and a digest: only a relay that passes the
    half-close on (and keeps the other direction open) delivers the answer."""
    import hashlib

    data = await reader.read(-1)
    writer.write(f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode())
    await writer.drain()


def _payload(size: int) -> bytes:
    return bytes(range(256)) * (size // 256)


def _answer(data: bytes) -> bytes:
    import hashlib

    return f"{len(data)} {hashlib.sha256(data).hexdigest()}".encode()


async def _send_half_close_read(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    writer.write(data)
    writer.write_eof()
    answer = await reader.read(-1)
    writer.close()
    return answer


def test_tcp_port_to_socket_file_half_close_and_backpressure(run: Run, sockdir: Path) -> None:
    """Steps: a server on a socket file answers only after the client's EOF; through the relay's TCP
    port, 8 MB then half-close arrive whole (backpressure bounds the relay, not the payload) and the
    late answer comes back; a client that speaks first and at once is delivered in order."""

    async def main() -> None:
        async with unix_server(late_reply, sockdir / "t.sock") as path, relay_of(to_socket(path)) as server:
            port = server.listeners[0].address.port
            payload = _payload(8 * 1024 * 1024)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await _send_half_close_read(reader, writer, payload) == _answer(payload)
            with socket.create_connection(("127.0.0.1", port)) as sock:  # bytes before the connect
                sock.sendall(b"early")
                answer = await asyncio.to_thread(exchange, sock, b"")
            assert answer == _answer(b"early")
            await wait_until(lambda: not server.connections)
            stats = server.stats["to-socket"]
            assert (stats.accepted, stats.closed["eof"], stats.bytes_c2t) == (2, 2, len(payload) + 5)

    run(main())


def test_a_socket_target_that_drops_unread_bytes_resets_the_client(run: Run, sockdir: Path) -> None:
    """Steps: the server behind the socket file closes while the client's bytes sit unread in its
    receive queue (a socket file's form of a reset: the relay's read fails with ECONNRESET); the client
    is reset too and the pair is counted as target_reset."""
    import threading

    path = sockdir / "t.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen()
    listener.settimeout(15)

    def drop() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.recv(1, socket.MSG_PEEK)  # the bytes have arrived; closed with all of them unread

    async def main() -> None:
        async with relay_of(to_socket(path)) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.listeners[0].address.port)
            writer.write(b"x" * 1000)
            with pytest.raises(ConnectionResetError):
                await reader.read(-1)
            writer.close()
            await wait_until(lambda: not server.connections)
            assert server.stats["to-socket"].closed["target_reset"] == 1

    worker = threading.Thread(target=drop, daemon=True)
    worker.start()
    try:
        run(main())
    finally:
        listener.close()
        worker.join(15)


def test_socket_file_to_tcp_port_with_mode_and_removal(run: Run, sockdir: Path) -> None:
    """Steps: the relay listens on a socket file (mode 0660, and 0666 on a second route) forwarding to a
    TCP server; the files are sockets with those modes; a client through the file gets the late answer
    after its half-close; after the drain both files are gone."""

    async def main() -> None:
        async with tcp_server(late_reply) as port:
            a, b = sockdir / "a.sock", sockdir / "b.sock"
            async with relay_of(from_socket(a, port), from_socket(b, port, 0o666, "b")) as server:
                for path, mode in ((a, 0o660), (b, 0o666)):
                    info = os.lstat(path)
                    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == mode
                payload = _payload(1024 * 1024)
                reader, writer = await asyncio.open_unix_connection(str(a))
                assert await _send_half_close_read(reader, writer, payload) == _answer(payload)
                await wait_until(lambda: not server.connections)
                assert server.stats["from-socket"].closed["eof"] == 1
            assert not a.exists() and not b.exists()

    run(main())


def test_drain_removes_the_socket_file_at_once_and_lets_a_connection_finish(run: Run, sockdir: Path) -> None:
    """Steps: a client is half-way through a request on the relay's socket file (the server answers only
    after its EOF); the drain starts: the file is gone at once (no new client can connect) while the
    open connection completes with its answer, and the drain ends without closing anything."""
    path = sockdir / "a.sock"

    async def main() -> None:
        async with tcp_server(late_reply) as port:
            server = Server(Config(routes=(from_socket(path, port),), metrics=None, drain_timeout=10.0))
            await server.start()
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(b"half")
            await wait_until(lambda: any(c.bytes_c2t == 4 for c in server.connections))  # relayed
            draining = asyncio.ensure_future(server.drain())
            await wait_until(lambda: server.draining)
            assert not path.exists()
            with pytest.raises(FileNotFoundError):
                await asyncio.open_unix_connection(str(path))
            writer.write(b" more")
            writer.write_eof()
            assert await reader.read(-1) == _answer(b"half more")
            writer.close()
            await draining
            assert server.stats["from-socket"].closed["eof"] == 1
            assert server.stats["from-socket"].closed["shutdown"] == 0

    run(main())


def test_a_stale_socket_file_is_replaced(run: Run, sockdir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Steps: a socket file nobody listens on (a killed run's) sits at the listen path; the relay
    replaces it, says so, and serves."""
    path = sockdir / "stale.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    path.chmod(0o600)  # told apart by its mode: the kernel may give the new file the same inode number

    async def main() -> None:
        async with tcp_server(echo) as port, relay_of(from_socket(path, port)):
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o660
            reader, writer = await asyncio.open_unix_connection(str(path))
            assert await _send_half_close_read(reader, writer, b"ping") == b"ping"

    with caplog.at_level(logging.INFO, logger="relay"):
        run(main())
    assert any(f"replaced the stale socket file {path}" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("kind", ["regular file", "directory", "live socket", "symbolic link"])
def test_anything_else_at_the_listen_path_is_refused_and_left(run: Run, sockdir: Path, kind: str) -> None:
    """Steps: a regular file, a directory, a socket someone listens on, or a link is at the listen path;
    start fails with one ListenError line naming it, and the thing at the path is untouched."""
    path = sockdir / "taken"
    live = socket.socket(socket.AF_UNIX)
    if kind == "regular file":
        path.write_bytes(b"precious")
    elif kind == "directory":
        path.mkdir()
    elif kind == "symbolic link":
        path.symlink_to(sockdir / "nowhere")
    else:
        live.bind(str(path))
        live.listen()
    before = os.lstat(path)

    async def main() -> None:
        server = Server(Config(routes=(from_socket(path, 1),), metrics=None))
        with pytest.raises(ListenError) as err:
            await server.start()
        message = str(err.value)
        assert "\n" not in message and str(path) in message
        if kind == "live socket":
            assert "another process listens on" in message
        else:
            assert f"is a {kind}, which the relay does not remove" in message

    try:
        run(main())
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
            before.st_ino,
            before.st_mode,
            before.st_mtime_ns,
        )
        if kind == "regular file":
            assert path.read_bytes() == b"precious"
    finally:
        live.close()


def test_a_missing_directory_is_one_line(run: Run, sockdir: Path) -> None:
    async def main() -> None:
        server = Server(Config(routes=(from_socket(sockdir / "no" / "a.sock", 1),), metrics=None))
        with pytest.raises(ListenError, match=r"the directory .*/no does not exist \(mount a volume there"):
            await server.start()

    run(main())


@pytest.mark.parametrize("case", ["missing", "refused"])
def test_socket_target_failures_are_counted_and_hinted(
    run: Run, sockdir: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: the target socket file does not exist (the host directory is not mounted), or is stale
    (nobody listens); a client is reset, the failure is counted by reason and the warning names the
    fix (the mount; the service being down)."""
    path = sockdir / "pg.sock"
    stale = socket.socket(socket.AF_UNIX)
    if case == "refused":
        stale.bind(str(path))
    hint = "mount the host's socket directory" if case == "missing" else "nothing accepts connections on it"

    async def main() -> None:
        async with relay_of(to_socket(path)) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.listeners[0].address.port)
            writer.write(b"hello")
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read(-1) == b""
            writer.close()
            await wait_until(lambda: not server.connections)
            stats = server.stats["to-socket"]
            assert (stats.connect_errors[case], stats.closed["connect_failed"]) == (1, 1)

    try:
        with caplog.at_level(logging.WARNING, logger="relay"):
            run(main())
    finally:
        stale.close()
    (line,) = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert f"to-socket: cannot connect to unix:{path} ({case}:" in line and hint in line


def test_a_full_backlog_is_waited_out_then_times_out(
    run: Run, sockdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: the target socket file's listen backlog is full (a server that does not accept; its one slot
    taken); a client through the relay waits while the relay asks again, and is served once the server
    accepts; with the slot taken again and never freed, the next client ends at the connect timeout,
    counted as `timeout` and hinted as a full backlog (not a firewall). Both loops: asyncio's own unix
    connect would take the EAGAIN for "in progress" and hand over a socket that never connected."""
    path = sockdir / "busy.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(0)  # Linux queues backlog + 1 connections: one slot
    listener.setblocking(False)
    held = [socket.socket(socket.AF_UNIX)]
    held[0].connect(str(path))  # takes the slot

    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with relay_of(to_socket(path), connect_timeout=0.5) as server:
            port = server.listeners[0].address.port
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"waited")
            await wait_until(lambda: len(server.connections) == 1)
            for _ in range(2):  # the first holder, then the relay's connect that was waiting for the slot
                conn, _ = await loop.sock_accept(listener)
                held.append(conn)
            conn.setblocking(False)
            got = b""
            while len(got) < 6 and (data := await loop.sock_recv(conn, 6 - len(got))):
                got += data
            assert got == b"waited"
            conn.close()
            writer.close()
            await wait_until(lambda: not server.connections)
            held.append(socket.socket(socket.AF_UNIX))
            held[-1].connect(str(path))  # the slot is taken again, for good
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read(-1) == b""
            writer.close()
            await wait_until(lambda: not server.connections)
            errors = server.stats["to-socket"].connect_errors
            assert (errors["timeout"], errors.total()) == (1, 1)

    try:
        with caplog.at_level(logging.WARNING, logger="relay"):
            run(main())
    finally:
        for sock in (*held, listener):
            sock.close()
    (line,) = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert "(timeout:" in line and "listen backlog stayed full" in line


def test_metrics_readiness_and_reload_of_socket_routes(run: Run, sockdir: Path) -> None:
    """Steps: a relay with a socket listener and a socket target serves /readyz 200 and labels its
    listener by path; a missing target is counted as `missing`; a reload that swaps the socket
    listener for another path removes the old file and makes the new one; the drain ends ready."""
    a, b, target = sockdir / "a.sock", sockdir / "b.sock", sockdir / "missing.sock"

    async def main() -> None:
        async with tcp_server(echo) as port:
            routes = [from_socket(a, port, name="sock"), to_socket(target)]
            server = Server(
                Config(routes=tuple(routes), metrics=HostPort("127.0.0.1", 0), drain_timeout=1.0),
                reload=lambda: Config(
                    routes=(from_socket(b, port, name="sock2"), routes[1]), metrics=HostPort("127.0.0.1", 0)
                ),
                endpoint=http_endpoint,
            )
            await server.start()
            try:
                assert server.health_address is not None
                assert await asyncio.to_thread(readyz, server.health_address.port) == 200
                reader, writer = await asyncio.open_connection("127.0.0.1", server.listeners[1].address.port)
                writer.write(b"x")
                with contextlib.suppress(ConnectionResetError):
                    await reader.read(-1)
                writer.close()
                await wait_until(lambda: not server.connections)
                samples = await scrape(server)
                assert value(samples, "relay_listener_up", route="sock", address=f"unix:{a}") == 1
                assert value(samples, "relay_connect_errors_total", route="to-socket", reason="missing") == 1
                await server.reload()
                assert not a.exists() and stat.S_ISSOCK(os.lstat(b).st_mode)
                reader, writer = await asyncio.open_unix_connection(str(b))
                assert await _send_half_close_read(reader, writer, b"after reload") == b"after reload"
            finally:
                await server.drain()
            assert not b.exists()

    run(main())


def test_max_connections_apply_to_a_socket_listener(run: Run, sockdir: Path) -> None:
    """Steps: max_connections 1; a second client on the socket file is closed at once while the first is
    open, and readiness names the full slots."""
    path = sockdir / "a.sock"

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)

    async def main() -> None:
        async with tcp_server(hold) as port, relay_of(from_socket(path, port), max_connections=1) as server:
            _, first = await asyncio.open_unix_connection(str(path))
            await wait_until(lambda: len(server.connections) == 1)
            reader, second = await asyncio.open_unix_connection(str(path))
            with contextlib.suppress(ConnectionResetError):
                assert await reader.read(-1) == b""
            assert server.stats["from-socket"].closed["limit"] == 1 and "slots" in server.problems
            first.close()
            second.close()
            await wait_until(lambda: not server.connections)

    run(main())


# --- a relay process: SIGTERM, relay check ---------------------------------------------------------------


def test_sigterm_removes_the_socket_file(sockdir: Path) -> None:
    """Steps: `relay run` listens on a socket file; it exists as a socket while the relay runs; SIGTERM:
    exit 0 and the file is gone."""
    path = sockdir / "pg.sock"
    port = free_port_block(1)
    with RelayProcess(
        ["--ports", f"unix:{path}:{port}", "--target", "127.0.0.1", "--metrics", "off"]
    ) as relay:
        relay.wait_for("ready")
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert relay.stop(signal.SIGTERM) == 0
    assert not path.exists()


SETPRIV = ["setpriv", "--reuid=10001", "--regid=10001", "--clear-groups"]
ROOT_REASON = "needs root (a socket file owned by root, and a check run as uid 10001)"


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason=ROOT_REASON)
def test_check_names_missing_denied_and_stale_sockets(sockdir: Path) -> None:
    """Steps: four socket targets: no file, a root-only socket (0600), a stale one and one owned by
    group 4242 (0660); `relay check` run as uid 10001 (the image's user) prints missing, denied and
    refused with their fixes (the mount; user:/group_add: with the socket's real uid and gid, read by
    stat, where it suggested placeholder ids before; the service is down) and exits 1."""
    sockdir.chmod(0o755)
    denied, stale, grouped = sockdir / "root.sock", sockdir / "stale.sock", sockdir / "group.sock"
    with (
        socket.socket(socket.AF_UNIX) as live,
        socket.socket(socket.AF_UNIX) as dead,
        socket.socket(socket.AF_UNIX) as shared,
    ):
        live.bind(str(denied))
        live.listen()
        denied.chmod(0o600)
        dead.bind(str(stale))
        stale.chmod(0o666)
        shared.bind(str(grouped))
        shared.listen()
        os.chown(grouped, 0, 4242)
        grouped.chmod(0o660)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        ports = f"7001:unix:{sockdir}/none.sock 7002:unix:{denied} 7003:unix:{stale} 7004:unix:{grouped}"
        result = subprocess.run(
            [*SETPRIV, sys.executable, "-m", "relay", "check", "--ports", ports, "--metrics", "off"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
            cwd=Path(__file__).parent.parent,
        )
    assert result.returncode == 1, result.stdout + result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines() if line.startswith("tcp/700")}
    assert " missing " in rows["tcp/7001"] and "mount the host's socket directory" in rows["tcp/7001"]
    assert " denied " in rows["tcp/7002"] and "the relay runs as uid 10001" in rows["tcp/7002"]
    assert "owned by uid 0, group 0 (mode 0600), writable by its owner only" in rows["tcp/7002"]
    assert 'user: "0:0"' in rows["tcp/7002"]
    assert " refused " in rows["tcp/7003"] and "nothing accepts connections on it" in rows["tcp/7003"]
    assert " denied " in rows["tcp/7004"] and "owned by uid 0, group 4242 (mode 0660)" in rows["tcp/7004"]
    assert 'group_add: ["4242"]' in rows["tcp/7004"]
    assert "0 of 4 target(s) answer" in result.stdout


def test_a_refusing_host_suggests_the_socket_route() -> None:
    """A refusal from the Docker host (not an address of the relay's own namespace) offers the socket
    route as the way around a service bound to 127.0.0.1, in the warning and in `relay check`."""
    host = ("192.0.2.1",)  # TEST-NET-1: never an address here; is_local only tries to bind it
    for text in (hints.for_failure("refused", "auto", host), check._cause("refused", "auto", host)):
        assert text is not None and "RELAY_PORTS=5432:unix:/host/postgresql/.s.PGSQL.5432" in text


# --- real servers: Redis and PostgreSQL from Debian --------------------------------------------------------

REDIS_REASON = "needs redis-server and redis-cli (Debian: redis-server redis-tools)"


@contextlib.contextmanager
def redis(sockdir: Path, *, port: int = 0, unixsocket: Path | None = None) -> Iterator[None]:
    """redis-server on 127.0.0.1:port (0: no TCP) and/or a socket file, no persistence; stopped on exit."""
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(sockdir), "--daemonize", "no", "--loglevel", "warning"]
    if unixsocket is not None:
        args += ["--unixsocket", str(unixsocket), "--unixsocketperm", "700"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ping = ["redis-cli", *(["-s", str(unixsocket)] if unixsocket else ["-p", str(port)]), "ping"]
        for _ in range(500):  # until it answers (bounded: 500 x the 10 ms wait below)
            if subprocess.run(ping, capture_output=True, text=True).stdout.strip() == "PONG":
                break
            if proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {proc.stdout.read() if proc.stdout else ''!r}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.01)
        else:
            raise AssertionError("redis-server never answered PING")
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


async def _cli(*args: str, stdin: bytes | None = None) -> str:
    """Run a client command on the side (the relay keeps serving on this loop); its output."""
    proc = await asyncio.create_subprocess_exec(
        *args,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin)
    assert proc.returncode == 0, (args, out)
    return out.decode()


@pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")), reason=REDIS_REASON)
def test_redis_on_a_socket_file_through_a_tcp_port(run: Run, sockdir: Path) -> None:
    """Steps: redis-server listens only on a socket file (no TCP port); redis-cli -p reaches it through
    the relay's TCP port: SET, GET, a 1 MB value, and a pipeline of 10,000 INCRs."""
    path = sockdir / "redis.sock"
    with redis(sockdir, unixsocket=path):

        async def main() -> None:
            async with relay_of(to_socket(path)) as server:
                cli = ("redis-cli", "-h", "127.0.0.1", "-p", str(server.listeners[0].address.port))
                assert (await _cli(*cli, "SET", "k", "through the socket")).strip() == "OK"
                assert (await _cli(*cli, "GET", "k")).strip() == "through the socket"
                big = _payload(1024 * 1024).hex().encode()  # 2 MB: more than one read each way
                assert (await _cli(*cli, "-x", "SET", "big", stdin=big)).strip() == "OK"
                assert (await _cli(*cli, "--no-raw", "STRLEN", "big")).strip() == f"(integer) {len(big)}"
                got = await _cli(*cli, "--raw", "GET", "big")
                assert got.rstrip("\n").encode() == big
                pipe = await asyncio.create_subprocess_exec(
                    *cli, "--pipe", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
                out, _ = await pipe.communicate(b"INCR n\r\n" * 10_000)
                assert pipe.returncode == 0 and b"errors: 0, replies: 10000" in out, out
                assert (await _cli(*cli, "GET", "n")).strip() == "10000"

        run(main(), timeout=60)


@pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")), reason=REDIS_REASON)
def test_redis_on_tcp_through_a_relay_socket_file(run: Run, sockdir: Path) -> None:
    """Steps: redis-server listens on 127.0.0.1 only; redis-cli -s reaches it through the relay's
    socket file: SET, GET, and a pipeline of 10,000 INCRs."""
    port = free_port_block(1)
    path = sockdir / "relay.sock"
    with redis(sockdir, port=port):

        async def main() -> None:
            async with relay_of(from_socket(path, port)):
                cli = ("redis-cli", "-s", str(path))
                assert (await _cli(*cli, "SET", "k", "through the relay's socket")).strip() == "OK"
                assert (await _cli(*cli, "GET", "k")).strip() == "through the relay's socket"
                pipe = await asyncio.create_subprocess_exec(
                    *cli, "--pipe", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
                )
                out, _ = await pipe.communicate(b"INCR n\r\n" * 10_000)
                assert pipe.returncode == 0 and b"errors: 0, replies: 10000" in out, out

        run(main(), timeout=60)


PG_BIN = Path("/usr/lib/postgresql")
PG_REASON = "needs root and Debian's postgresql (initdb, pg_ctl, psql, pgbench)"


def _pg_bin() -> Path | None:
    versions = sorted(PG_BIN.glob("*/bin/initdb")) if PG_BIN.is_dir() else []
    return versions[-1].parent if versions else None


@pytest.fixture(scope="module")
def postgres() -> Iterator[Path]:
    """A throwaway cluster owned by the `postgres` user in a temp dir: no TCP (listen_addresses=''),
    its socket in that dir. Yields the socket file's path. Stopped and removed on exit."""
    bin_dir = _pg_bin()
    if (
        os.geteuid() != 0
        or bin_dir is None
        or shutil.which("runuser") is None
        or shutil.which("pgbench") is None
    ):
        pytest.skip(PG_REASON)
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip(PG_REASON + "; no postgres user")
    top = Path(tempfile.mkdtemp(prefix="relay-pg-", dir="/tmp"))
    data, sock = top / "data", top / "run"
    shutil.chown(top, "postgres", "postgres")
    as_pg = ["runuser", "-u", "postgres", "--"]

    def pg(*args: str) -> None:
        result = subprocess.run([*as_pg, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr

    try:
        pg("mkdir", "-m", "0755", str(sock))
        pg(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
        options = (
            f"-c listen_addresses='' -c unix_socket_directories='{sock}' -c fsync=off -c max_connections=40"
        )
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(top / "log"), "-w", "start")
        try:
            yield sock / ".s.PGSQL.5432"
        finally:
            pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_postgresql_on_its_socket_only_through_a_tcp_port(run: Run, postgres: Path) -> None:
    """Steps: PostgreSQL listens on its socket file only; psql -h 127.0.0.1 -p RELAY_PORT runs a query
    through the relay; pgbench -i, then pgbench -T 3 with 4 clients: 0 failed transactions."""

    async def main() -> None:
        async with relay_of(to_socket(postgres)) as server:
            port = str(server.listeners[0].address.port)
            base = ("-h", "127.0.0.1", "-p", port, "-U", "postgres")
            out = await _cli("psql", *base, "-At", "-c", "select 'via relay', inet_client_addr() is null")
            assert out.strip() == "via relay|t"  # a socket client: the server saw no TCP peer
            await _cli("pgbench", *base, "-i", "-q", "-s", "1", "postgres")
            out = await _cli("pgbench", *base, "-T", "3", "-c", "4", "-j", "2", "postgres")
            assert "number of failed transactions: 0" in out, out
            processed = int(out.split("number of transactions actually processed: ")[1].split()[0])
            assert processed > 0
            await wait_until(lambda: not server.connections)
            assert server.stats["to-socket"].connect_errors.total() == 0

    run(main(), timeout=90)


def test_the_benchmark_section_is_merged_once_and_carried(tmp_path: Path) -> None:
    """bench/unix.py writes its section before *How it is measured*, replaces it on the next run, and
    `python -m bench` (which rewrites the report) gets it back from `carried`."""
    from bench import unix

    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n## Loopback\n\nrows\n\n## How it is measured\n\n- how\n")
    unix.merge(doc, [unix.BEGIN, "## Unix-socket target (loopback)", "first", unix.END])
    unix.merge(doc, [unix.BEGIN, "## Unix-socket target (loopback)", "second", unix.END])
    text = doc.read_text()
    assert text.count(unix.BEGIN) == 1 and "first" not in text and "second" in text
    assert text.index("second") < text.index("## How it is measured") and text.startswith("# Benchmarks")
    assert unix.carried(doc) == [unix.BEGIN, "## Unix-socket target (loopback)", "second", unix.END]
    assert unix.carried(tmp_path / "none.md") == []
