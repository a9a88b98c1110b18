"""`relay check`: the doctor's table and exit codes against working, refusing, silent and unnamed targets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.conftest import in_namespace
from tests.netns import APP_IP, HOST_IP, Topology
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
    default gateway; the table names ok, refused (on the namespace's own loopback: nothing listens here,
    not "bind 0.0.0.0"), timeout (firewall) and unresolved (extra_hosts), and the exit code is 1."""
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
    assert " refused " in rows["closed"] and "0.0.0.0" not in rows["closed"]
    assert "127.0.0.1 is an address of the relay's own network namespace" in rows["closed"]
    assert " timeout " in rows["silent"] and "firewall" in rows["silent"]
    assert (
        " unresolved " in rows["unnamed"]
        and 'extra_hosts: ["host.docker.internal:host-gateway"]' in rows["unnamed"]
    )
    assert (
        "auto (auto): neither host.docker.internal nor host.containers.internal resolves, and "
        "/proc/net/route has no default gateway" in out
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


def test_check_shows_the_warnings_run_shows() -> None:
    """An unknown RELAY_* variable (with its did-you-mean) and DOCKER_HOST holding an API address: `relay
    run` logs both at start; `relay check` prints them too."""
    with echo_server() as port:
        result = run_relay(
            ["check", "--ports", f"5432:{port}", "--target", "127.0.0.1"],
            {"RELAY_CONECT_TIMEOUT": "1s", "DOCKER_HOST": "unix:///var/run/docker.sock"},
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (
        "warning: RELAY_CONECT_TIMEOUT: unknown setting, ignored (did you mean 'RELAY_CONNECT_TIMEOUT'?)"
        in result.stdout
    )
    assert (
        "warning: DOCKER_HOST='unix:///var/run/docker.sock' is a Docker API address, not a host; ignored"
        in result.stdout
    )


def test_check_hints_fit_the_target(topology: Callable[..., Topology]) -> None:
    """Steps: in the app namespace of the sidecar topology, `relay check` with four routes: a closed port
    on the host (refused: bind 0.0.0.0 / docker0), a closed port on the app namespace's own veth address
    (refused, but here: no host advice), a name nobody knows (unresolved: names it, no extra_hosts advice),
    and a name the hosts file maps to the app's own address on a port the relay listens on with 0.0.0.0
    (loop: the relay itself, not probed)."""
    topo = topology()
    hosts = Path("/etc/netns") / topo.app / "hosts"
    hosts.write_text(hosts.read_text() + f"{APP_IP}\tapp.internal\n")
    config = Path("/etc/netns") / topo.app / "relay-check.yaml"
    config.write_text(
        "listen: 0.0.0.0\n"
        "routes:\n"
        f"  - {{name: host, listen: 7001, target: '{HOST_IP}:7999'}}\n"
        f"  - {{name: here, listen: 7002, target: '{APP_IP}:7999'}}\n"
        "  - {name: typo, listen: 7003, target: 'other.host:5432'}\n"
        "  - {name: itself, listen: 7004, target: 'app.internal:7004'}\n"
        "connect_timeout: 1s\n"
    )
    result = topo.run_in_app(["-m", "relay", "check", "--config", str(config)])
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    rows = {
        line.split()[0]: line
        for line in out.splitlines()
        if line.split()[:1] in (["host"], ["here"], ["typo"], ["itself"])
    }
    assert " refused " in rows["host"] and "0.0.0.0 or the docker0 address" in rows["host"]
    assert " refused " in rows["here"] and "0.0.0.0" not in rows["here"]
    assert f"{APP_IP} is an address of the relay's own network namespace" in rows["here"]
    assert (
        " unresolved " in rows["typo"] and "other.host is not in this container's /etc/hosts" in rows["typo"]
    )
    assert "extra_hosts" not in rows["typo"] and "host.docker.internal" not in rows["typo"]
    assert " loop " in rows["itself"] and "the target is this relay itself" in rows["itself"]
    assert "  other.host: other.host does not resolve; other.host is not in" in out
    assert "0 of 4 target(s) answer" in out


def test_check_refuses_a_route_into_the_relay_itself() -> None:
    """The README's old example (`--ports 5432 --target 127.0.0.1`): `relay check` says it would loop,
    in one line, exit 2 (before: it probed 127.0.0.1:5432 and said `ok` whenever the relay itself was
    running there)."""
    result = run_relay(["check", "--ports", "5432", "--target", "127.0.0.1"])
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        "relay: error: --ports: route tcp/5432 forwards to 127.0.0.1:5432, which is its own listen address"
    )
    assert result.stdout == ""
