"""The sidecar topology without Docker: the relay in an "app" network namespace, the service on a "host"
namespace across a veth pair.

Each test builds two namespaces joined by a veth pair (app 10.200.0.2, host 10.200.0.1), each with its own
loopback. The host service listens on the host's veth address, not on 127.0.0.1, as it must for a real
engine. `/etc/netns/<app>/hosts` (mounted over /etc/hosts by `ip netns exec`, like Docker's extra_hosts)
maps host.docker.internal to 10.200.0.1, or leaves it out; `/etc/netns/<app>/resolv.conf` names only the
app's own loopback, so a name missing from the hosts file fails at once and no query leaves the
namespaces. The relay runs with `ip netns exec <app> python -m relay`; the clients run in the app
namespace and connect to localhost. Only addresses inside these namespaces are used.

Needs root on Linux and `ip netns`; skipped elsewhere. The topology fixture lives in tests/netns.py.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import pytest

from tests.netns import HOST_IP, UNAVAILABLE, Topology
from tests.support import LineProcess

SEED_ARGV = ["-d", "tcp-listen:8000,fork,reuseaddr", "tcp-connect:host.docker.internal:8000"]

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
]


def assert_passed(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert result.returncode == 0, f"client failed:\n{result.stdout}{result.stderr}"
    for name in names:
        assert f"ok {name}\n" in result.stdout, f"missing 'ok {name}':\n{result.stdout}"


def assert_round_trips_over_both_families(topo: Topology, port: int) -> None:
    """Echo and half-close through localhost:port over 127.0.0.1 and ::1 reach host port `port`."""
    result = topo.app_client(f"4:{port}:{port}", f"6:{port}:{port}")
    assert_passed(
        result,
        *(
            f"{check} {host}:{port}->{port}"
            for check in ("echo", "half-close")
            for host in ("127.0.0.1", "::1")
        ),
    )


def assert_stops_promptly(relay: LineProcess) -> None:
    started = time.monotonic()
    code = relay.stop(timeout=5.0)
    took = time.monotonic() - started
    assert code == 0, f"relay exited {code} on SIGTERM; output:\n{relay.output()}"
    assert took < 2.0, f"relay took {took:.2f} s to stop"


def test_with_hosts_entry(topology: Callable[..., Topology]) -> None:
    """host.docker.internal from the hosts file (like extra_hosts: host-gateway).

    1. App and host namespaces; the app's hosts file maps host.docker.internal to the host's veth address;
       the app has no default route, so only that entry leads to the host.
    2. Host services on 10.200.0.1:8000 and :9001; relay with RELAY_PORTS="8000 8001:9001".
    3. The relay logs `host.docker.internal -> 10.200.0.1`.
    4. A client in the app namespace, over 127.0.0.1 and over ::1, to localhost:8000 and localhost:8001:
       256 KiB echoed back intact; 64 KiB then a half-close, and the host's answer, sent a second after
       the client's FIN, arrives and names port 8000 / 9001 and the payload's SHA-256.
    5. SIGTERM: the relay exits 0 within two seconds.
    """
    topo = topology(hosts_entry=True)
    topo.host_services(HOST_IP, 8000, 9001)
    relay = topo.relay([], {"RELAY_PORTS": "8000 8001:9001"})
    relay.wait_for(f"host.docker.internal -> {HOST_IP}", timeout=5)  # resolved in the background

    result = topo.app_client("4:8000:8000", "6:8000:8000", "4:8001:9001", "6:8001:9001")
    assert_passed(
        result,
        "echo 127.0.0.1:8000->8000",
        "half-close ::1:8000->8000",
        "echo ::1:8001->9001",
        "half-close 127.0.0.1:8001->9001",
    )
    assert_stops_promptly(relay)


def test_default_gateway_fallback(topology: Callable[..., Topology]) -> None:
    """Without the hosts entry the relay falls back to the default gateway.

    1. App and host namespaces; no host.docker.internal in the app's hosts file and no reachable
       resolver; the app's default route goes via the host's veth address.
    2. Host service on 10.200.0.1:8000; relay with RELAY_PORTS=8000 (target auto).
    3. The relay logs `host.docker.internal does not resolve; using default gateway 10.200.0.1`.
    4. Echo and half-close round trips over 127.0.0.1 and ::1 to localhost:8000 reach the host service.
    5. SIGTERM: the relay exits 0 promptly.
    """
    topo = topology(hosts_entry=False, default_route=True)
    topo.host_services(HOST_IP, 8000)
    relay = topo.relay([], {"RELAY_PORTS": "8000"})
    relay.wait_for(f"using default gateway {HOST_IP}", timeout=5)  # resolved in the background

    assert_round_trips_over_both_families(topo, 8000)
    assert_stops_promptly(relay)


REFUSED_CLIENT = """
import socket, sys, time
start = time.monotonic()
try:  # the relay's reset may come before the bytes are sent (the refusal inside is that quick)
    sock = socket.create_connection(("localhost", int(sys.argv[1])), timeout=10)
    sock.sendall(b"hello")
    outcome = "eof" if sock.recv(1) == b"" else "data"
except (ConnectionResetError, BrokenPipeError):
    outcome = "reset"
except TimeoutError:
    outcome = "timeout"
print(outcome, time.monotonic() - start)
"""


def test_host_service_on_loopback_only(topology: Callable[..., Topology]) -> None:
    """The classic mistake: the host service listens on 127.0.0.1 only.

    1. App and host namespaces with the hosts entry; the host service listens on the host namespace's
       127.0.0.1:8000, so the host's veth address refuses port 8000.
    2. Relay with RELAY_PORTS=8000.
    3. A client connects to localhost:8000 in the app namespace and sends a few bytes: the relay accepts,
       its connect is refused, and the client's connection is reset within two seconds.
    4. The relay logs the hint naming 0.0.0.0 and keeps running; SIGTERM then ends it with 0.
    """
    topo = topology(hosts_entry=True)
    topo.host_services("127.0.0.1", 8000)
    relay = topo.relay([], {"RELAY_PORTS": "8000"})
    before_client = relay.mark()

    result = topo.run_in_app(["-c", REFUSED_CLIENT, "8000"])
    assert result.returncode == 0, result.stderr
    outcome, took = result.stdout.split()
    assert outcome == "reset", result.stdout
    assert float(took) < 2.0, f"client closed only after {took} s"

    relay.wait_for("0.0.0.0", timeout=5, since=before_client)
    assert relay.proc.poll() is None, "the relay died on a refused connect"
    assert_stops_promptly(relay)


def test_socat_argv(topology: Callable[..., Topology]) -> None:
    """The seed's socat command line, unchanged.

    1. App and host namespaces with the hosts entry; host service on 10.200.0.1:8000.
    2. Relay started with `-d tcp-listen:8000,fork,reuseaddr tcp-connect:host.docker.internal:8000`.
    3. Echo and half-close round trips over 127.0.0.1 and ::1 (socat would refuse ::1; the relay adds
       it) to localhost:8000 reach the host service, the late reply after the FIN included (socat cuts
       it after 0.5 s).
    4. SIGTERM: the relay exits 0 promptly.
    """
    topo = topology(hosts_entry=True)
    topo.host_services(HOST_IP, 8000)
    relay = topo.relay(SEED_ARGV)

    assert_round_trips_over_both_families(topo, 8000)
    assert_stops_promptly(relay)


def test_udp_round_trip_to_a_host_service(topology: Callable[..., Topology]) -> None:
    """UDP next to TCP on one port number, as an app reaches a host's DNS or StatsD.

    1. App and host namespaces with the hosts entry; host services (TCP and UDP) on 10.200.0.1:8000 and
       :9125.
    2. Relay with RELAY_PORTS="8000 8000/udp 8125:9125/udp".
    3. From the app namespace: datagrams of 1 byte to 60,000 bytes to localhost:8000 and localhost:8125
       over 127.0.0.1 and ::1 come back whole from host ports 8000 / 9125; TCP on 8000 still echoes.
    4. SIGTERM: the relay exits 0 promptly.
    """
    topo = topology(hosts_entry=True)
    topo.host_services(HOST_IP, 8000, 9125)
    relay = topo.relay([], {"RELAY_PORTS": "8000 8000/udp 8125:9125/udp"})
    relay.wait_for(f"host.docker.internal -> {HOST_IP}", timeout=5)

    result = topo.app_client("u4:8000:8000", "u6:8000:8000", "u4:8125:9125", "u6:8125:9125", "4:8000:8000")
    assert_passed(
        result,
        "udp 127.0.0.1:8000->8000",
        "udp ::1:8000->8000",
        "udp 127.0.0.1:8125->9125",
        "udp ::1:8125->9125",
        "echo 127.0.0.1:8000->8000",
    )
    assert_stops_promptly(relay)
