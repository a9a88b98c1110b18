"""The sidecar topology: load and subject in an "app" namespace, the server across a veth pair.

Two namespaces made here and deleted on exit (the veth pair goes with them): ``<tag>-app`` holds the
load and the subject, ``<tag>-host`` the servers, joined by a veth pair with 198.18.0.2 (app) and
198.18.0.1 (host), from the benchmarking range (RFC 2544) and reachable only between the two.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

from bench.harness import Topology

APP_ADDR = "198.18.0.2"
HOST_ADDR = "198.18.0.1"


def available() -> str:
    """Empty when namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None:
        return "needs iproute2 (ip)"
    return ""


def _ip(*args: str) -> None:
    subprocess.run(
        ["ip", *args],
        check=True,
        timeout=10,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@contextlib.contextmanager
def veth_topology() -> Iterator[Topology]:
    tag = f"rb{os.getpid() % 100000}"
    app, host = f"{tag}-app", f"{tag}-host"
    made: list[str] = []
    try:
        for ns in (app, host):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", f"{tag}a", "netns", app, "type", "veth", "peer", "name", f"{tag}h", "netns", host)
        _ip("-n", app, "addr", "add", f"{APP_ADDR}/30", "dev", f"{tag}a")
        _ip("-n", host, "addr", "add", f"{HOST_ADDR}/30", "dev", f"{tag}h")
        for ns, dev in ((app, f"{tag}a"), (host, f"{tag}h")):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", dev, "up")
        yield Topology(
            "netns",
            server_host=HOST_ADDR,
            server_prefix=("ip", "netns", "exec", host),
            client_prefix=("ip", "netns", "exec", app),
        )
    finally:
        for ns in reversed(made):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("netns", "del", ns)
