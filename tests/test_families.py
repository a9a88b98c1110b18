"""Listen families and privileges, end to end on both loops: socat's dual-stack TCP6-LISTEN/UDP6-LISTEN
reached by an IPv4 client, ipv6only=1 keeping them IPv6-only, and su= dropping root after binding."""

from __future__ import annotations

import os
import pwd
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import LOOPS
from tests.support import RelayProcess, connect_when_ready, exchange, has_ipv6_loopback

pytestmark = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")


@pytest.fixture
def tcp_echo() -> Iterator[int]:
    """A blocking TCP echo server on 127.0.0.1 (a thread), for relays in child processes."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(10)
                while data := conn.recv(65536):
                    conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


@pytest.fixture
def udp_echo() -> Iterator[int]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, peer = server.recvfrom(65536)
            except TimeoutError:
                continue
            server.sendto(data, peer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def _free(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET6, kind) as s:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.bind(("::", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("loop", LOOPS)
def test_tcp6_listen_serves_ipv4_clients_as_socat_does(loop: str, tcp_echo: int) -> None:
    """socat's TCP6-LISTEN binds [::] with IPV6_V6ONLY at the kernel's default (off): 127.0.0.1 and ::1
    both reach it. Before, the relay listened IPv6-only and 127.0.0.1 was refused."""
    port = _free()
    argv = [f"TCP6-LISTEN:{port},fork,reuseaddr", f"TCP:127.0.0.1:{tcp_echo}"]
    with RelayProcess(argv, {"RELAY_METRICS": "off", "RELAY_LOOP": loop}) as relay:
        relay.wait_for("ready")
        assert exchange(connect_when_ready("127.0.0.1", port), b"over v4") == b"over v4"
        assert exchange(connect_when_ready("::1", port), b"over v6") == b"over v6"
        assert relay.stop() == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_tcp6_listen_ipv6only_refuses_ipv4(loop: str, tcp_echo: int) -> None:
    port = _free()
    argv = [f"TCP6-LISTEN:{port},ipv6only=1", f"TCP:127.0.0.1:{tcp_echo}"]
    with RelayProcess(argv, {"RELAY_METRICS": "off", "RELAY_LOOP": loop}) as relay:
        relay.wait_for("ready")
        assert exchange(connect_when_ready("::1", port), b"v6") == b"v6"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        assert relay.stop() == 0


@pytest.mark.parametrize("loop", LOOPS)
def test_udp6_listen_serves_ipv4_clients(loop: str, udp_echo: int) -> None:
    """UDP6-LISTEN on [::], dual-stack: a datagram from 127.0.0.1 is relayed and answered."""
    port = _free(socket.SOCK_DGRAM)
    argv = [f"UDP6-LISTEN:{port},fork", f"UDP:127.0.0.1:{udp_echo}"]
    with RelayProcess(argv, {"RELAY_METRICS": "off", "RELAY_LOOP": loop}) as relay:
        relay.wait_for("ready")
        for host in ("127.0.0.1", "::1"):
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as client:
                client.settimeout(5)
                client.sendto(f"from {host}".encode(), (host, port))
                data, source = client.recvfrom(100)
                assert data == f"from {host}".encode() and source[1] == port
        assert relay.stop() == 0


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
@pytest.mark.parametrize("loop", LOOPS)
def test_su_drops_root_after_binding(loop: str, tcp_echo: int) -> None:
    """Started as root with su=nobody on a port below 1024: after `ready` the process runs as nobody
    (uid, gid, and nobody's groups only), and relaying still works."""
    nobody = pwd.getpwnam("nobody")
    port = 1000 + os.getpid() % 20  # below 1024: binding needs the root the relay then gives up
    argv = [f"TCP-LISTEN:{port},bind=127.0.0.1,su=nobody", f"TCP:127.0.0.1:{tcp_echo}"]
    with RelayProcess(argv, {"RELAY_METRICS": "off", "RELAY_LOOP": loop}) as relay:
        relay.wait_for("ready")
        line = relay.wait_for("su=nobody")
        assert f"now running as uid {nobody.pw_uid}" in line
        status = _status(relay.proc.pid)
        assert status["Uid"].split() == [str(nobody.pw_uid)] * 4
        assert status["Gid"].split() == [str(nobody.pw_gid)] * 4
        assert status["Groups"].split() == [str(nobody.pw_gid)]
        assert exchange(connect_when_ready("127.0.0.1", port), b"as nobody") == b"as nobody"
        assert relay.stop() == 0


def test_su_when_not_root_says_why_in_one_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A relay that is not root (the image's uid 10001) cannot change user: one warning says so, and
    nothing is attempted. (The interpreter here is readable by root only, so no child runs as nobody.)"""
    from relay import privileges

    user = privileges.parse_user("nobody")
    assert user is not None
    monkeypatch.setattr(os, "geteuid", lambda: 10001)
    monkeypatch.setattr(os, "getegid", lambda: 10001)
    for name in ("setuid", "setgid", "setgroups"):
        monkeypatch.setattr(os, name, lambda *_: pytest.fail("tried to change user"))
    with caplog.at_level("INFO", logger="relay"):
        privileges.drop(user)
    assert [r.getMessage() for r in caplog.records] == [
        "su=nobody is not applied: the relay runs as uid 10001, not root, and only root can change user; "
        "it keeps running as uid 10001"
    ]


@pytest.mark.parametrize("name", ["nosuchuser", "4294967295", ""])
def test_unknown_user_is_a_config_error(name: str) -> None:
    from relay.address import AddressError
    from relay.privileges import parse_user

    if not name:
        assert parse_user(name) is None
        return
    with pytest.raises(AddressError, match=f"'{name}' is not a user known here"):
        parse_user(name)


def test_ipv6only_off_beside_an_ipv4_listener_is_one_line() -> None:
    """[::] with ipv6only off takes the port on IPv4 too: an IPv4 listener beside it is a config error
    naming both, not a bind failure saying 'address in use'."""
    from relay.config import ConfigError, load

    with pytest.raises(ConfigError) as err:
        load({}, {"RELAY_PORTS": "80", "RELAY_LISTEN": "0.0.0.0,::", "RELAY_IPV6ONLY": "off"})
    assert str(err.value) == (
        "RELAY_PORTS: 0.0.0.0:80 cannot listen beside [::]:80, which serves IPv4 too with RELAY_IPV6ONLY "
        "off; expected ipv6only on, or [::] alone for both families"
    )
    config = load({}, {"RELAY_PORTS": "80", "RELAY_LISTEN": "::", "RELAY_IPV6ONLY": "off"})
    assert not config.ipv6only and [str(hp) for hp in config.routes[0].listen] == ["[::]:80"]
