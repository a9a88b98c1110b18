"""`relay check`: the doctor's table and exit codes against working, refusing, silent and unnamed targets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import in_namespace
from tests.test_cli import echo_server, run_relay


def test_all_targets_answer_exit_0() -> None:
    with echo_server() as port:
        result = run_relay(["check", "--ports", f"5432:{port}", "--target", "127.0.0.1"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tcp/5432       127.0.0.1:5432, [::1]:5432 -> 127.0.0.1:" in result.stdout
    assert "127.0.0.1: 127.0.0.1 -> 127.0.0.1 (literal)" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("tcp/5432 "))
    assert f"127.0.0.1:{port}" in row and " ok " in row
    assert "1 of 1 target(s) answer" in result.stdout


def test_configuration_error_exit_2() -> None:
    result = run_relay(["check", "--ports", "70-60"])
    assert result.returncode == 2
    assert result.stderr.startswith("relay: error: --ports: '70-60' is not a port range")


def test_refused_timeout_unresolved_and_ok_each_get_their_cause(namespace: str, tmp_path: Path) -> None:
    """Steps: inside a namespace, one route reaches a listening server, one a closed port, one an
    address on a link where nothing answers, and one `auto` with no host.docker.internal and no
    default gateway; the table names ok, refused (bind 0.0.0.0), timeout (firewall) and unresolved
    (extra_hosts), and the exit code is 1."""
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            namespace,
            sys.executable,
            "-c",
            "import socket,sys; s=socket.create_server(('127.0.0.1', 7000)); print('up', flush=True); "
            "c,_=s.accept(); c.close()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "up"
        config = tmp_path / "relay.yaml"
        config.write_text(
            "routes:\n"
            "  - {name: works, listen: 7001, target: '127.0.0.1:7000'}\n"
            "  - {name: closed, listen: 7002, target: '127.0.0.1:7003'}\n"
            "  - {name: silent, listen: 7004, target: '10.203.0.2:80'}\n"
            "  - {name: unnamed, listen: 7005, target: 'auto:5432'}\n"
            "connect_timeout: 1s\n"
        )
        result = in_namespace(namespace, "check", "--config", str(config))
    finally:
        server.kill()
        server.wait(10)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.split() and line.split()[0] in {"works", "closed", "silent", "unnamed"}
    }
    assert " ok " in rows["works"]
    assert " refused " in rows["closed"] and "0.0.0.0 or the docker0 address" in rows["closed"]
    assert " timeout " in rows["silent"] and "firewall" in rows["silent"]
    assert (
        " unresolved " in rows["unnamed"]
        and 'extra_hosts: ["host.docker.internal:host-gateway"]' in rows["unnamed"]
    )
    assert (
        "auto (auto): host.docker.internal nor host.containers.internal does not resolve and /proc/net/route "
        "has no default gateway" in out
    )
    assert "1 of 4 target(s) answer" in out


def test_check_reports_default_gateway_fallback(namespace: str) -> None:
    """Steps: the namespace gets a default route via 10.203.0.254; `auto` falls back to it and the
    output says host.docker.internal did not resolve and which gateway was used."""
    subprocess.run(
        ["ip", "netns", "exec", namespace, "ip", "route", "add", "default", "via", "10.203.0.254"], check=True
    )
    result = in_namespace(namespace, "check", "--ports", "5432", "--connect-timeout", "500ms")
    assert "host.docker.internal does not resolve; using default gateway 10.203.0.254" in result.stdout
    assert "hint: the name does not resolve: add extra_hosts" in result.stdout
    assert result.returncode == 1
    assert " timeout " in result.stdout  # nothing answers for 10.203.0.254
