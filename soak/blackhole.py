"""The resolver black hole: a relay in a network namespace whose DNS server never answers.

Arrangement (needs root): bench.netns.veth_topology makes two namespaces joined by a veth pair (app
198.18.0.2, host 198.18.0.1). Here the app namespace also gets a default route via the host end, and
an on-link route 198.18.1.0/24 on the veth; /etc/netns/<app>/resolv.conf names RESOLVER in it, which
nobody owns: queries go out, ARP is never answered, every lookup waits the resolver's full timeout.
/etc/netns/<app>/hosts holds only localhost, so host.docker.internal and host.containers.internal go to
DNS and `auto` must end at the default gateway, where the target listens (in the host namespace). All
addresses are in the benchmarking range (RFC 2544) and exist only inside these two namespaces.

The soak process itself never changes namespace: a one-thread executor that has called setns(2) makes
sockets there (a socket keeps the namespace it was made in) and hands them to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench import netns
from soak.clients import Streams

RESOLVER = "198.18.1.53"
ON_LINK = "198.18.1.0/24"
CLONE_NEWNET = 0x40000000


def available() -> str:
    """Empty when the arrangement can be made here, else why not."""
    return netns.available()


def _enter(name: str) -> None:
    """Executor initializer: move this thread (only) into the namespace `name`."""
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _listening(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen(1024)
    return sock


@dataclass
class Namespace:
    name: str
    pool: ThreadPoolExecutor

    def listen(self, host: str) -> socket.socket:
        """A listening socket on host:0 in this namespace."""
        return self.pool.submit(_listening, host).result(10)

    async def dial(self, host: str, port: int) -> Streams:
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(self.pool, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, (host, port))
            return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise


@dataclass
class Hole:
    app: Namespace  # the relay and its clients
    host: Namespace  # the target
    prefix: tuple[str, ...]  # runs a command in the app namespace
    gateway: str


def _ip(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], check=True, timeout=10, capture_output=True, text=True, stdin=subprocess.DEVNULL
    ).stdout


@contextlib.contextmanager
def blackhole() -> Iterator[Hole]:
    with netns.veth_topology() as topo:
        app, host = topo.client_prefix[-1], topo.server_prefix[-1]
        dev = _ip("-n", app, "-o", "link", "show", "type", "veth").split(":")[1].strip().split("@")[0]
        _ip("-n", app, "route", "add", "default", "via", netns.HOST_ADDR)
        _ip("-n", app, "route", "add", ON_LINK, "dev", dev)
        etc = Path("/etc/netns") / app
        pools: list[ThreadPoolExecutor] = []
        try:
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
            (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n")
            for name in (app, host):
                pools.append(ThreadPoolExecutor(1, f"ns-{name}", _enter, (name,)))
            yield Hole(
                Namespace(app, pools[0]), Namespace(host, pools[1]), topo.client_prefix, netns.HOST_ADDR
            )
        finally:
            for pool in pools:
                pool.shutdown(wait=True, cancel_futures=True)
            shutil.rmtree(etc, ignore_errors=True)
