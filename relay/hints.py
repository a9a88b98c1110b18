"""The likely cause and fix of a failed connect, worded for what the relay can see of the target.

A refusal from an address of the relay's own network namespace (127.0.0.1, or an address of one of its
interfaces) means nothing listens *here*: advice about the Docker host (bind 0.0.0.0, docker0) would send
the user the wrong way. A name the user wrote that does not resolve is a typo or a name only the host
knows; only the auto chain's names are fixed by extra_hosts. Used by connection.py (the rate-limited
warning), server.py and upstream.py (start-up) and check.py (the table).
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import stat

AUTO_NAMES = frozenset({"auto", "host.docker.internal", "host.containers.internal"})

REFUSED_HOST = (
    "is the host service listening on 0.0.0.0 / the docker0 address rather than 127.0.0.1? If it listens "
    "only on 127.0.0.1 and has a socket file (PostgreSQL, MySQL, Redis ...), mount the socket's directory "
    "into the relay and forward to it instead: RELAY_PORTS=5432:unix:/host/postgresql/.s.PGSQL.5432"
)
REFUSED_LOCAL = (
    "{address} is an address of the relay's own network namespace (the app container), not of the Docker "
    "host, and nothing listens there; to reach a service on the host, set the target to auto (the default) "
    "or the host's name"
)
TIMEOUT = "a host firewall (ufw, firewalld) dropping the connection, or a wrong address?"
UNRESOLVED_AUTO = 'add extra_hosts: ["host.docker.internal:host-gateway"] to the app service'
UNRESOLVED_NAME = (
    "{name} is not in this container's /etc/hosts and its DNS does not know it: check the spelling, or "
    "use an address or a name the container can resolve"
)
LOOP = (
    "the target is this relay itself ({address} is one of its own listen addresses): each connection would "
    "come back into the relay; set the target to the Docker host (auto) or the service's own address"
)


@functools.lru_cache(maxsize=256)
def is_local(address: str) -> bool:
    """Whether `address` belongs to this network namespace: loopback, unspecified, or bindable here."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.is_loopback or ip.is_unspecified:
        return True
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((address, 0))  # EADDRNOTAVAIL: not an address of this namespace
        except OSError:
            return False
    return True


# A socket file as the target (unix:PATH). The relay runs as uid 10001 (the image's USER).
SOCKET_MISSING = (
    "no socket file at {path}: mount the host's socket directory into the relay, e.g. "
    'volumes: ["/var/run/postgresql:/host/postgresql:ro"] (read-only is enough to connect), and check '
    "that the host service is running and makes its socket there"
)
SOCKET_DENIED = (
    "permission denied on {path}: the relay runs as uid {me}; connecting needs write permission on the "
    "socket file (and search permission on its directories). {fix}"
)
# The fix names the socket's real owner and group when the relay can stat it (a socket in a directory it
# cannot search cannot be stat'ed either: then the numbers come from the host).
DENIED_GROUP = (
    "The socket is owned by uid {uid}, group {gid} (mode {mode:04o}): add that group to the relay, "
    'group_add: ["{gid}"] on the relay service, or run it as the owner (user: "{uid}:{gid}")'
)
DENIED_OWNER = (
    "The socket is owned by uid {uid}, group {gid} (mode {mode:04o}), writable by its owner only: run the "
    'relay as the owner (user: "{uid}:{gid}" on the relay service), or have the service make its socket '
    'group-writable and add the group (group_add: ["{gid}"])'
)
DENIED_UNKNOWN = (
    'Run the relay as the socket\'s owner (user: "UID:GID" on the relay service) or add its group '
    "(group_add: [\"GID\"]), with the numbers from `stat -c '%u %g' {path}` on the host"
)
SOCKET_BUSY = (
    "{path} accepted no connection within the connect timeout: its listen backlog stayed full (the "
    "service accepts connections more slowly than they come, or has stopped accepting)"
)
SOCKET_REFUSED = (
    "{path} exists but nothing accepts connections on it: a stale socket file, the host service is down "
    "(or restarting); start it, and the relay connects again on the next connection"
)


def for_socket(reason: str, target: str) -> str | None:
    """The hint for a failed connect to a socket file target (`unix:PATH`)."""
    path = target.partition(":")[2]
    texts = {
        "missing": SOCKET_MISSING,
        "refused": SOCKET_REFUSED,
        "timeout": SOCKET_BUSY,
    }
    if reason == "denied":
        return SOCKET_DENIED.format(path=path, me=os.geteuid(), fix=_denied_fix(path))
    text = texts.get(reason)
    return text.format(path=path) if text is not None else None


def _denied_fix(path: str) -> str:
    try:
        info = os.stat(path)
    except OSError:
        return DENIED_UNKNOWN.format(path=path)
    mode = stat.S_IMODE(info.st_mode)
    text = DENIED_GROUP if mode & stat.S_IWGRP else DENIED_OWNER
    return text.format(uid=info.st_uid, gid=info.st_gid, mode=mode)


def refused(addresses: tuple[str, ...]) -> str:
    local = [a for a in addresses if is_local(a)]
    if addresses and len(local) == len(addresses):
        return REFUSED_LOCAL.format(address=", ".join(local))
    return REFUSED_HOST


def unresolved(target: str) -> str:
    if target.lower() in AUTO_NAMES:
        return UNRESOLVED_AUTO
    return UNRESOLVED_NAME.format(name=target)


def for_failure(reason: str, target: str, addresses: tuple[str, ...] = ()) -> str | None:
    """The hint for a connect that failed for `reason` (refused, timeout, unresolved, loop, missing,
    denied, other)."""
    if target.startswith("unix:") and reason != "loop":
        return for_socket(reason, target)
    if reason == "refused":
        return refused(addresses)
    if reason == "timeout":
        return TIMEOUT
    if reason == "unresolved":
        return unresolved(target)
    if reason == "loop":
        return LOOP.format(address=", ".join(addresses) or target)
    return None
