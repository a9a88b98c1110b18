"""Drain on SIGTERM, reload on SIGHUP and JSON logs, on a real relay process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RelayProcess, connect_when_ready, exchange, free_port_block, relay_args
from tests.test_cli import echo_server


@contextlib.contextmanager
def slow_sender(total: int, chunk: int, pause: float) -> Iterator[int]:
    """A server that, after reading a 1-byte request, sends `total` bytes in `chunk`s `pause` apart."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    payload = bytes(range(256)) * (total // 256)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(1)
            for start in range(0, len(payload), chunk):
                conn.sendall(payload[start : start + chunk])
                time.sleep(pause)  # the transfer is slow on purpose: it spans the SIGTERM

    worker = threading.Thread(target=serve, daemon=True)
    worker.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()
        worker.join(30)


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def test_drain_lets_a_transfer_in_flight_finish() -> None:
    """Steps: a 2 MB transfer paced over ~1.5 s is in flight at SIGTERM; readiness turns 503; a new
    connection is refused; the transfer completes intact; the process exits 0 inside the 5 s drain."""
    size = 2 * 1024 * 1024
    listen = free_port_block(2)
    metrics = listen + 1
    with (
        slow_sender(size, 64 * 1024, 0.05) as target,
        RelayProcess(
            [
                "--ports",
                f"{listen}:{target}",
                "--target",
                "127.0.0.1",
                "--listen",
                "127.0.0.1",
                "--metrics",
                f"127.0.0.1:{metrics}",
                "--drain-timeout",
                "5s",
            ]
        ) as relay,
    ):
        relay.wait_for("ready")
        client = connect_when_ready("127.0.0.1", listen)
        client.sendall(b"g")
        first = client.recv(65536)
        started = time.monotonic()
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_for("draining 1 connection")
        assert readyz(metrics) == 503
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", listen), timeout=2)
        received = first + b"".join(iter(lambda: client.recv(65536), b""))
        client.close()
        assert relay.proc.wait(10) == 0
        assert time.monotonic() - started < 5
    expected = bytes(range(256)) * (size // 256)
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(expected).hexdigest()
    assert not any("closed 1 connection" in line for line in relay.lines)


def test_drain_timeout_closes_what_is_left_and_says_how_many() -> None:
    """Steps: a connection that never ends is open at SIGTERM with a 0.5 s drain; the relay closes it,
    logs that it closed 1, and exits 0."""
    listen = free_port_block(1)
    with (
        echo_server() as target,
        RelayProcess(relay_args(listen, target, "--drain-timeout", "500ms")) as relay,
    ):
        relay.wait_for("ready")
        client = connect_when_ready("127.0.0.1", listen)
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        started = time.monotonic()
        assert relay.stop() == 0
        assert 0.4 < time.monotonic() - started < 3
        relay.wait_for("drain: closed 1 connection(s) still open after 0.5s")
        client.close()


def test_second_signal_ends_the_drain_at_once() -> None:
    """Steps: an open connection and a 30 s drain; SIGTERM starts the drain, SIGINT ends it at once; the
    drain log gives the time it actually waited (before: "after 30s")."""
    listen = free_port_block(1)
    with (
        echo_server() as target,
        RelayProcess(relay_args(listen, target, "--drain-timeout", "30s")) as relay,
    ):
        relay.wait_for("ready")
        client = connect_when_ready("127.0.0.1", listen)
        client.sendall(b"x")
        assert client.recv(1) == b"x"
        relay.proc.send_signal(signal.SIGTERM)
        relay.wait_for("draining 1 connection")
        started = time.monotonic()
        assert relay.stop(signal.SIGINT) == 0
        assert time.monotonic() - started < 3
        client.close()
    # The log says how long it waited, not the 30 s it would have waited.
    line = relay.wait_for("drain: closed 1 connection(s) still open after ")
    waited = float(line.split(" still open after ")[1].split("s")[0])
    assert waited < 3, line
    assert line.endswith("(a second signal ended the 30s drain)"), line


def test_reload_adds_and_removes_routes_without_touching_open_connections(tmp_path: Path) -> None:
    """Steps: route A serves a held connection; SIGHUP with A and a new route B: B answers, the held
    connection still echoes; a broken file is refused with one error line and both keep serving;
    SIGHUP without A: A stops listening but the held connection still works until closed."""
    a = free_port_block(2)
    b = a + 1
    path = tmp_path / "relay.yaml"
    with echo_server() as target:

        def write(ports: str) -> None:
            path.write_text(f"target: 127.0.0.1\nlisten: 127.0.0.1\nmetrics: off\nroutes:\n{ports}")

        write(f"  - {{name: a, listen: {a}, target: '127.0.0.1:{target}'}}\n")
        with RelayProcess(["--config", str(path)]) as relay:
            relay.wait_for("ready")
            held = connect_when_ready("127.0.0.1", a)
            held.sendall(b"1")
            assert held.recv(1) == b"1"

            write(
                f"  - {{name: a, listen: {a}, target: '127.0.0.1:{target}'}}\n"
                f"  - {{name: b, listen: {b}, target: '127.0.0.1:{target}'}}\n"
            )
            relay.proc.send_signal(signal.SIGHUP)
            relay.wait_for("reloaded: 1 route(s) added, 0 removed, 1 unchanged")
            assert exchange(connect_when_ready("127.0.0.1", b), b"to b") == b"to b"
            held.sendall(b"2")
            assert held.recv(1) == b"2"

            path.write_text("routes: [oops\n")
            relay.proc.send_signal(signal.SIGHUP)
            line = relay.wait_for("reload failed")
            assert "keeping the running configuration" in line and "YAML syntax error" in line
            assert exchange(connect_when_ready("127.0.0.1", b), b"still b") == b"still b"

            write(f"  - {{name: b, listen: {b}, target: '127.0.0.1:{target}'}}\n")
            relay.proc.send_signal(signal.SIGHUP)
            relay.wait_for("reloaded: 0 route(s) added, 1 removed, 1 unchanged")
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", a), timeout=2)
            held.sendall(b"3")
            assert held.recv(1) == b"3"
            held.close()
            assert relay.stop() == 0


def test_json_logs_are_one_object_per_line() -> None:
    listen = free_port_block(1)
    with RelayProcess(
        ["--ports", f"{listen}:9", "--target", "127.0.0.1", "--metrics", "off"],
        env={"RELAY_LOG_FORMAT": "json"},
    ) as relay:
        relay.wait_for("ready")
        assert relay.stop() == 0
    entries = [json.loads(line) for line in relay.lines]
    assert entries and all({"time", "level", "message"} <= set(e) for e in entries)
    assert any(e.get("route") == f"tcp/{listen}" for e in entries)
    assert entries[-1]["message"] == "stopped"


def test_reload_applies_a_new_metrics_address_and_names_what_needs_a_restart(tmp_path: Path) -> None:
    """Steps: a relay with metrics on port M1; SIGHUP after the file moves metrics to M2, sets an idle
    timeout and a new backlog. /readyz answers on M2 and no longer on M1; the reload line lists the
    changed settings; one warning says plainly that backlog needs a restart. Then metrics: off closes
    the endpoint. (Before: "0 added, 0 removed" and metrics stayed on M1.)"""
    listen = free_port_block(3)
    m1, m2 = listen + 1, listen + 2
    path = tmp_path / "relay.yaml"
    with echo_server() as target:

        def write(extra: str) -> None:
            path.write_text(f"ports: '{listen}:{target}'\ntarget: 127.0.0.1\nlisten: 127.0.0.1\n{extra}")

        write(f"metrics: 127.0.0.1:{m1}\n")
        with RelayProcess(["--config", str(path)]) as relay:
            relay.wait_for("ready")
            assert readyz(m1) == 200
            write(f"metrics: 127.0.0.1:{m2}\nidle_timeout: 1m\nbacklog: 64\n")
            mark = relay.mark()
            relay.proc.send_signal(signal.SIGHUP)
            line = relay.wait_for("reloaded:", since=mark)
            assert line.endswith(
                f"reloaded: 0 route(s) added, 0 removed, 1 unchanged; settings changed: idle_timeout (off -> "
                f"60.0), backlog (1024 -> 64), metrics (127.0.0.1:{m1} -> 127.0.0.1:{m2})"
            ), line
            warning = relay.wait_for("cannot change while the relay runs", since=mark)
            assert "reload: backlog cannot change" in warning and "restart the relay to apply it" in warning
            assert readyz(m2) == 200
            with pytest.raises(urllib.error.URLError):
                readyz(m1)
            assert exchange(connect_when_ready("127.0.0.1", listen), b"still") == b"still"

            write("metrics: off\nidle_timeout: 1m\nbacklog: 64\n")
            mark = relay.mark()
            relay.proc.send_signal(signal.SIGHUP)
            relay.wait_for(f"settings changed: metrics (127.0.0.1:{m2} -> off)", since=mark)
            with pytest.raises(urllib.error.URLError):
                readyz(m2)
            assert relay.stop() == 0


def test_reload_refuses_a_route_into_the_relay_itself(tmp_path: Path) -> None:
    """Steps: a serving relay; SIGHUP after the file points the route at its own listen address; the
    reload is refused with one error line naming the loop, and the running route keeps serving."""
    listen = free_port_block(1)
    path = tmp_path / "relay.yaml"
    with echo_server() as target:
        path.write_text(f"ports: '{listen}:{target}'\ntarget: 127.0.0.1\nlisten: 127.0.0.1\nmetrics: off\n")
        with RelayProcess(["--config", str(path)]) as relay:
            relay.wait_for("ready")
            path.write_text(f"ports: '{listen}'\ntarget: 127.0.0.1\nlisten: 127.0.0.1\nmetrics: off\n")
            relay.proc.send_signal(signal.SIGHUP)
            line = relay.wait_for("reload failed")
            assert "keeping the running configuration" in line
            assert (
                f"forwards to 127.0.0.1:{listen}, which is its own listen address 127.0.0.1:{listen}" in line
            )
            assert exchange(connect_when_ready("127.0.0.1", listen), b"still") == b"still"
            assert relay.stop() == 0
