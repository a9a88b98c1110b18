"""A container started with IPv6 disabled: the default ::1 listener is skipped, not fatal."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import in_namespace
from tests.support import LineProcess


def disable_ipv6(namespace: str) -> None:
    for scope in ("all", "lo"):
        subprocess.run(
            ["ip", "netns", "exec", namespace, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1"],
            check=True,
        )


def test_default_listen_skips_ipv6_loopback_when_the_kernel_has_none(namespace: str) -> None:
    """Steps: IPv6 is disabled in a namespace; the relay, started with the default listen addresses,
    logs one info line about [::1], becomes ready on 127.0.0.1 alone, and stops on SIGTERM."""
    disable_ipv6(namespace)
    argv = ["--ports", "5432:5433", "--target", "127.0.0.1", "--metrics", "off"]  # not itself: 5433
    with LineProcess(["ip", "netns", "exec", namespace, sys.executable, "-m", "relay", *argv]) as relay:
        ready = relay.wait_for("ready")
        assert relay.stop() == 0
    assert "1 listener(s)" in ready
    assert "tcp/5432: IPv6 is not available here; not listening on [::1]:5432" in relay.output()
    assert "tcp/5432: 127.0.0.1:5432 -> 127.0.0.1:5433" in relay.output()


def test_check_does_not_list_ipv6_loopback_when_the_kernel_has_none(namespace: str) -> None:
    """Steps: IPv6 disabled in a namespace; `relay check` with the default listen addresses lists the
    route on 127.0.0.1 only and says why [::1] is left out, as `relay run` does (it listed [::1])."""
    disable_ipv6(namespace)
    result = in_namespace(
        namespace, "check", "--ports", "5432:5433", "--target", "127.0.0.1", "--metrics", "off"
    )
    route = next(line for line in result.stdout.splitlines() if line.strip().startswith("tcp/5432"))
    assert "127.0.0.1:5432 -> 127.0.0.1:5433" in route, result.stdout
    assert "[::1]:5432 ->" not in route and "::1]:5432," not in route, route
    assert route.endswith("(IPv6 is not available here: not listening on [::1])"), route
