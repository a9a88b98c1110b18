"""The sidecar topology without Docker, shared by the namespace tests: an "app" network namespace (where
the relay and its clients run) and a "host" namespace (where the services run) joined by a veth pair (app
10.200.0.2, host 10.200.0.1), each with its own loopback.

`/etc/netns/<app>/hosts` (mounted over /etc/hosts by `ip netns exec`, like Docker's extra_hosts) maps
host.docker.internal to 10.200.0.1, or leaves it out; `/etc/netns/<app>/resolv.conf` names the app's own
loopback by default, so a name missing from the hosts file fails at once and no query leaves the
namespaces (or another address inside them, e.g. one nobody owns, for a resolver that never answers).

Needs root on Linux and `ip netns`. Namespaces are named relay-test-<pid>-<n>-app/-host and removed with
their processes and /etc/netns folders after each test, even when it fails; a run also removes the ones an
aborted earlier run left. The `topology` fixture is made available to every test module by conftest.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import LineProcess

ROOT = Path(__file__).resolve().parent.parent
HOST_SERVICES = ROOT / "tests" / "docker" / "host_services.py"
APP_CLIENT = ROOT / "tests" / "docker" / "app_client.py"
HOST_IP, APP_IP, PREFIX_LEN = "10.200.0.1", "10.200.0.2", 24
NAME_PREFIX = "relay-test-"
STALE_NAME = re.compile(rf"^{NAME_PREFIX}(\d+)-\d+-(app|host)$")
# Nothing listens on the app's loopback port 53: a name missing from the hosts file fails at once.
LOOPBACK_RESOLVER = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"
# Environment variables that would change the relay's configuration behind the test's back.
FOREIGN_ENV = re.compile(r"^(RELAY_.*|PORTS|DOCKER_HOST)$")


def netns_unavailable() -> str | None:
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip()}"
    return None


UNAVAILABLE = netns_unavailable()


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass
class Topology:
    """An app namespace and a host namespace joined by a veth pair, and the processes started in them."""

    app: str
    host: str
    processes: list[LineProcess] = field(default_factory=list)

    def relay(self, argv: list[str], env: dict[str, str] | None = None, *, wait: bool = True) -> LineProcess:
        """Start `python -m relay ARGV` in the app namespace with ENV; return once it logged `ready`
        (at once when `wait` is false)."""
        environ = {k: v for k, v in os.environ.items() if not FOREIGN_ENV.match(k)}
        environ.update(env or {})
        process = self._start(self.app, [sys.executable, "-m", "relay", *argv], environ)
        if wait:
            process.wait_for("ready")
        return process

    def host_services(self, address: str, *ports: int) -> LineProcess:
        """Start tests/docker/host_services.py in the host namespace; return once it listens."""
        process = self._start(self.host, [sys.executable, str(HOST_SERVICES), address, *map(str, ports)])
        process.wait_for("ready")
        return process

    def app_client(self, *checks: str) -> subprocess.CompletedProcess[str]:
        """Run tests/docker/app_client.py in the app namespace (echo and half-close per check)."""
        return self.run_in_app([str(APP_CLIENT), *checks])

    def run_in_app(self, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.app, sys.executable, *argv],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )

    def _start(self, namespace: str, argv: list[str], env: dict[str, str] | None = None) -> LineProcess:
        process = LineProcess(["ip", "netns", "exec", namespace, *argv], env, cwd=ROOT)
        self.processes.append(process)
        return process


def _pid_alive(pid: int) -> bool:
    """A process that has not exited (a zombie, which has, may still hold its pid)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return not re.search(r"^State:\s*Z", status, re.M)


def _remove_namespace(name: str) -> None:
    """Kill what still runs in the namespace (by pid), delete it and its /etc/netns folder."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, timeout=10)
    for pid in pids.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)
    shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def _remove_stale_namespaces() -> None:
    """Namespaces this test made in a run that no longer exists (an aborted one)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = STALE_NAME.match(name)
        if match and not _pid_alive(int(match.group(1))):
            _remove_namespace(name)


_counter = 0


@pytest.fixture
def topology() -> Iterator[Callable[..., Topology]]:
    """make(hosts_entry=True, default_route=False, resolv_conf=LOOPBACK_RESOLVER) -> Topology; everything
    is removed after the test."""
    _remove_stale_namespaces()
    made: list[Topology] = []

    def make(
        *, hosts_entry: bool = True, default_route: bool = False, resolv_conf: str = LOOPBACK_RESOLVER
    ) -> Topology:
        global _counter
        _counter += 1
        base = f"{NAME_PREFIX}{os.getpid()}-{_counter}"
        topo = Topology(app=f"{base}-app", host=f"{base}-host")
        made.append(topo)
        ip("netns", "add", topo.app)
        ip("netns", "add", topo.host)
        veth_app, veth_host = f"rt{_counter}a", f"rt{_counter}h"
        ip(
            "link",
            "add",
            veth_app,
            "netns",
            topo.app,
            "type",
            "veth",
            "peer",
            "name",
            veth_host,
            "netns",
            topo.host,
        )
        for namespace, veth, address in ((topo.app, veth_app, APP_IP), (topo.host, veth_host, HOST_IP)):
            ip("-n", namespace, "addr", "add", f"{address}/{PREFIX_LEN}", "dev", veth)
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("-n", namespace, "link", "set", veth, "up")
        if default_route:
            ip("-n", topo.app, "route", "add", "default", "via", HOST_IP)
        etc = Path("/etc/netns") / topo.app
        etc.mkdir(parents=True, exist_ok=True)
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        if hosts_entry:
            hosts += f"{HOST_IP}\thost.docker.internal\n"
        (etc / "hosts").write_text(hosts)
        (etc / "resolv.conf").write_text(resolv_conf)
        return topo

    try:
        yield make
    finally:
        for topo in made:
            for process in topo.processes:
                process.kill()
            _remove_namespace(topo.app)
            _remove_namespace(topo.host)
        try:
            Path("/etc/netns").rmdir()  # only when empty: ours were the last ones
        except OSError:
            pass
