"""The relay as users start it: a process, its exit codes, its one-line errors, its signals."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    RelayProcess,
    connect_when_ready,
    exchange,
    expect_reset,
    free_port_block,
    has_ipv6_loopback,
    relay_args,
)


@contextlib.contextmanager
def echo_server(host: str = "127.0.0.1") -> Iterator[int]:
    """A threaded echo server on port 0 that answers after the client's EOF too."""
    listener = socket.create_server((host, 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    workers: list[threading.Thread] = []

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a client that resets is not the server's failure
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10)
            worker = threading.Thread(target=serve, args=(conn,), daemon=True)
            worker.start()
            workers.append(worker)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        acceptor.join(5)
        listener.close()
        for worker in workers:
            worker.join(5)


def run_relay(
    args: list[str], env: dict[str, str] | None = None, timeout: float = 30, **popen: Any
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k != "PORTS"}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **popen,
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (
            [],
            {"RELAY_PORTS": "80-70"},
            "relay: error: RELAY_PORTS: '80-70' is not a port range (low > high); expected P, LO-HI, L:T",
        ),
        (["--ports", "0"], {}, "relay: error: --ports: '0' is not a port number (1-65535)"),
        (
            [],
            {"RELAY_PORTS": "80", "RELAY_CONNECT_TIMEOUT": "5x"},
            "RELAY_CONNECT_TIMEOUT: '5x' is not a duration",
        ),
        (["--prots", "80"], {}, "relay: error: command line: unrecognized arguments: --prots 80"),
        ([], {}, "relay: error: no ports to forward"),
        (
            ["-d", "tcp-listen:8000,fork,su=nobodyx", "tcp-connect:host.docker.internal:8000"],
            {},
            "relay: error: socat argument 'tcp-listen:8000,fork,su=nobodyx': 'nobodyx' is not a user known "
            "here (/etc/passwd); expected a user name such as nobody, or a uid",
        ),
        (
            ["udp-recvfrom:53", "udp:host.docker.internal:53"],
            {},
            "relay: error: socat argument 'udp-recvfrom:53': UDP-RECVFROM without fork relays one datagram",
        ),
        (["--loop", "uvloop", "--ports", "80", "--loop", "trio"], {}, "--loop: 'trio' is not one of"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], env: dict[str, str], expected: str) -> None:
    result = run_relay(args, env)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_yaml_is_one_line_with_the_line_number(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text("ports: '5432'\nlisten: [127.0.0.1\n")
    result = run_relay(["--config", str(path)])
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"relay: error: {path}:3: YAML syntax error")


def test_port_in_use_is_one_error_line_and_exit_1() -> None:
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_relay(
            ["--ports", f"{port}:9", "--listen", "127.0.0.1", "--metrics", "off", "--target", "127.0.0.1"]
        )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1
    assert f"cannot listen on 127.0.0.1:{port} for tcp/{port}: address already in use" in errors[0]
    assert "Traceback" not in result.stderr


def test_sigterm_and_sigint_stop_promptly_with_exit_0() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        port = free_port_block(1)
        with RelayProcess(["--ports", f"{port}:9", "--target", "127.0.0.1", "--metrics", "off"]) as relay:
            relay.wait_for("ready")
            started = time.monotonic()
            assert relay.stop(sig) == 0
            assert time.monotonic() - started < 2.0
            assert any("stopped" in line for line in relay.lines)


def test_a_second_sigterm_after_the_drain_keeps_exit_0() -> None:
    """Steps: SIGTERM; as soon as the relay logs `stopped`, while it is still winding down, a second
    SIGTERM (a second `docker stop`): the exit code stays 0. Before the relay ignored late signals,
    that second one found the default action restored and the process died by the signal (-15)."""
    for _ in range(5):
        port = free_port_block(1)
        with RelayProcess(["--ports", f"{port}:9", "--target", "127.0.0.1", "--metrics", "off"]) as relay:
            relay.wait_for("ready")
            relay.proc.send_signal(signal.SIGTERM)
            relay.wait_for("INFO stopped")  # the drain's last line, not "SIGTERM: stopped listening"
            if relay.proc.poll() is None:
                relay.proc.send_signal(signal.SIGTERM)
            assert relay.proc.wait(10) == 0, relay.output()


def test_seed_socat_argv_relays_over_ipv4_and_ipv6() -> None:
    """Steps: the seed recipe's argv with the target swapped for a loopback echo server (so no DNS
    leaves the machine); connections to 127.0.0.1 and ::1 (socat itself would refuse ::1) round-trip,
    and the half-closed reply arrives."""
    listen = free_port_block(1)
    with (
        echo_server() as target,
        RelayProcess(
            ["-d", f"tcp-listen:{listen},fork,reuseaddr", f"tcp-connect:127.0.0.1:{target}"],
            env={"RELAY_METRICS": "off"},
        ) as relay,
    ):
        relay.wait_for("ready")
        payload = os.urandom(100_000)
        assert exchange(connect_when_ready("127.0.0.1", listen), payload) == payload
        if has_ipv6_loopback():
            assert exchange(connect_when_ready("::1", listen), payload) == payload
        assert relay.stop() == 0
    assert any(f"0.0.0.0:{listen}, [::1]:{listen} -> 127.0.0.1:{target}" in line for line in relay.lines)


def test_connect_failure_logs_the_hint_once_per_interval() -> None:
    """Steps: the target refuses; five clients that each send bytes are reset at once (deterministic:
    before, unread bytes turned some closes into resets); one warning line (rate-limited, not five) says
    that 127.0.0.1 is the relay's own namespace, not the host (no "bind 0.0.0.0" advice)."""
    listen = free_port_block(1)
    with socket.create_server(("127.0.0.1", 0)) as s:
        dead = s.getsockname()[1]
    with RelayProcess(["--ports", f"{listen}:{dead}", "--target", "127.0.0.1", "--metrics", "off"]) as relay:
        relay.wait_for("ready")
        for _ in range(5):
            try:
                client = connect_when_ready("127.0.0.1", listen)
            except ConnectionResetError:
                continue  # the reset came before connect() returned: a reset all the same
            expect_reset(client, b"hello")
        line = relay.wait_for("cannot connect")
        assert relay.stop() == 0
    assert f"cannot connect to 127.0.0.1:{dead} (refused: " in line
    assert "127.0.0.1 is an address of the relay's own network namespace (the app container)" in line
    assert "0.0.0.0" not in line
    assert sum("cannot connect" in x for x in relay.lines) == 1


def test_low_open_file_limit_caps_connections_instead_of_failing() -> None:
    """Steps: the relay starts with RLIMIT_NOFILE 96 and the default 4096 connections; it warns and
    caps itself; 60 clients at once get either served or closed, never a crash; afterwards a new
    client is still served."""

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    listen = free_port_block(1)
    with (
        echo_server() as target,
        RelayProcess(
            relay_args(listen, target, "--listen", "127.0.0.1"),
            preexec_fn=low_limit,
        ) as relay,
    ):
        warning = relay.wait_for("needs")
        assert "max_connections 4096 needs 8257 open files" in warning
        assert "allowing 15 connections" in warning
        relay.wait_for("ready")
        clients = []
        for _ in range(60):
            with contextlib.suppress(ConnectionResetError):  # turned away before connect() returned
                clients.append(connect_when_ready("127.0.0.1", listen))
        served = 0
        for client in clients:
            try:
                client.sendall(b"x")
                client.settimeout(5)
                served += client.recv(1) == b"x"
            except OSError:
                pass
        for client in clients:
            client.close()
        assert 1 <= served <= 16
        deadline = time.monotonic() + 5  # the 60 closes reach the relay asynchronously
        while True:
            with contextlib.suppress(ConnectionResetError):
                if exchange(connect_when_ready("127.0.0.1", listen), b"still here") == b"still here":
                    break
            assert time.monotonic() < deadline, "the relay stopped serving"
            time.sleep(0.05)
        assert relay.proc.poll() is None
        assert relay.stop() == 0


# --- help (issue 9) -----------------------------------------------------------------------------------------


def test_top_level_help_lists_commands_socat_flags_and_choices() -> None:
    result = run_relay(["--help"])
    assert result.returncode == 0
    out = result.stdout
    assert out.startswith("usage: relay [run|check|healthcheck]")
    for command in ("run", "check", "healthcheck"):
        assert f"\n  {command} " in out
    for flag in ("-d ", "-b N", "-t S", "-T S", "-4, -6"):
        assert f"\n  {flag}" in out, flag
    assert "--family {any,ipv4,ipv6}" in out
    assert "--keepalive [BOOL]" in out


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("check", "probe every target port"),
        ("healthcheck", "/readyz"),
        ("run", "Forward localhost ports to the Docker host (the default command)"),
    ],
)
def test_each_command_has_its_own_help(command: str, says: str) -> None:
    result = run_relay([command, "--help"])
    assert result.returncode == 0
    assert result.stdout.startswith(f"usage: relay {command} ")
    assert says in " ".join(result.stdout.split())
    assert "commands (each has its own --help)" not in result.stdout


def test_healthcheck_help_shows_only_what_it_reads() -> None:
    out = run_relay(["healthcheck", "--help"]).stdout
    assert "--metrics ADDR" in out and "--config PATH" in out
    assert "--ports" not in out and "--idle-timeout" not in out


def test_a_subcommand_error_points_at_its_own_help() -> None:
    result = run_relay(["check", "--prots", "80"])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "relay: error: command line: unrecognized arguments: --prots 80; see 'relay check --help'"
    )


@pytest.mark.parametrize(
    ("args", "keepalive", "reuseport"),
    [
        (["--keepalive"], True, False),
        (["--keepalive", "--reuseport"], True, True),
        (["--keepalive", "off", "--reuseport", "yes"], False, True),
        (["--reuseport", "--keepalive", "false"], False, True),
        ([], False, False),
    ],
)
def test_yes_no_options_work_as_bare_flags(args: list[str], keepalive: bool, reuseport: bool) -> None:
    from relay.cli import parse

    _, config, _ = parse([*args, "--ports", "80", "--target", "example.test"], {})
    assert (config.keepalive, config.reuseport) == (keepalive, reuseport)


def test_readme_defaults_match_the_help() -> None:
    """The README's configuration table gives each option the default its --help states."""
    import re

    from relay.config import OPTIONS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    rows = {
        cells[1].split("`")[1]: cells[3].strip()
        for line in readme.splitlines()
        if line.startswith("| `RELAY_") and len(cells := line.split("|")) > 4
    }
    for opt in OPTIONS:
        stated = re.search(r"\(default ([^)]*)\)", opt.help)
        if stated is None or rows.get(opt.env, "—") == "—":
            continue  # no row (another test says so), or no default (ports: "/tcp" is a part's)
        default = stated.group(1).split(" ")[0].rstrip(":")
        assert rows.get(opt.env) == f"`{default}`", (opt.env, rows.get(opt.env), default)
