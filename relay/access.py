"""Who may use a route: source address ranges (socat's `range=`, a route's `allow:`) and, for socket
files, peer uids.

Rules:
1. An empty allow (None) admits everyone; otherwise a client is admitted when one entry matches.
2. A v4 client on a dual-stack socket arrives as ::ffff:a.b.c.d and is matched as a.b.c.d; an IPv6 range
   inside ::ffff:0:0/96 (socat's way of writing one, `[::ffff:10.0.0.0]/104`) is stored as the IPv4
   range it covers, so both spellings admit the same clients.
3. Host bits in a range are ignored, as socat masks them (`10.1.2.3/8` is 10.0.0.0/8).
4. Matching is integer masking on the peer address the kernel gave (no DNS, no allocation beyond
   parsing the address text): it runs once per accepted connection and once per datagram from an
   address with no session.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from relay.address import AddressError, excerpt

FORM = (
    "expected CIDRs such as 10.0.0.0/8, 127.0.0.1, ::1, [fd00::]/8 or 10.0.0.0:255.0.0.0, or uid:N for a "
    "socket file"
)
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class Allow:
    """Admitted ranges as (network int, mask int) per family, and admitted uids; `text` as given."""

    v4: tuple[tuple[int, int], ...] = ()
    v6: tuple[tuple[int, int], ...] = ()
    uids: frozenset[int] = frozenset()
    text: str = ""

    def admits(self, host: str) -> bool:
        """Whether an IP peer (the host part of a socket address) is in one of the ranges."""
        try:
            packed = socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host.split("%")[0])
        except OSError:
            return False
        if len(packed) == 16 and packed[:12] == b"\0" * 10 + b"\xff\xff":  # rule 2
            packed = packed[12:]
        value = int.from_bytes(packed)
        ranges = self.v4 if len(packed) == 4 else self.v6
        return any(value & mask == net for net, mask in ranges)

    def admits_uid(self, uid: int) -> bool:
        return uid in self.uids

    @property
    def has_ranges(self) -> bool:
        return bool(self.v4 or self.v6)

    def __str__(self) -> str:
        return self.text


def parse_range(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """One range: ADDR, ADDR/BITS, [V6]/BITS, [V6] or ADDR:MASK (socat's IPv4 form). Rule 3."""
    item = text.strip()
    if item.startswith("["):
        inner, bracket, rest = item[1:].partition("]")
        if not bracket or (rest and not rest.startswith("/")):
            raise AddressError(f"{excerpt(text)} is not an address range; {FORM}")
        item = inner + rest
    elif item.count(":") == 1 and "." in item:  # 10.0.0.0:255.0.0.0
        item = item.replace(":", "/")
    try:
        network = ipaddress.ip_network(item, strict=False)
    except ValueError:
        raise AddressError(f"{excerpt(text)} is not an address range; {FORM}") from None
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_allow(value: object) -> Allow | None:
    """A list (YAML) or a comma/space separated text (env, CLI, socat) of ranges and uid:N entries.

    `none`/`any`/empty text means no restriction (None); a list that names nothing is an error, since
    refusing everyone is never what an `allow:` is for.
    """
    if isinstance(value, list):
        items = [_item(v) for v in value]
    elif value is None:
        return None
    else:
        text = _item(value)
        if text.strip().lower() in ("", "any", "all", "none", "off"):
            return None
        items = text.replace(",", " ").split()
    if not items:
        raise AddressError(f"{excerpt(value)} lists no address range; {FORM}")
    v4: list[tuple[int, int]] = []
    v6: list[tuple[int, int]] = []
    uids: set[int] = set()
    for item in items:
        if item.lower().startswith("uid:"):
            digits = item[4:].strip()
            if not digits.isascii() or not digits.isdigit() or int(digits) >= 2**32 - 1:
                raise AddressError(
                    f"{excerpt(item)} is not a uid; expected uid:N with N a number such as 1000"
                )
            uids.add(int(digits))
            continue
        network = parse_range(item)
        entry = (int(network.network_address), int(network.netmask))
        (v4 if network.version == 4 else v6).append(entry)
    return Allow(tuple(v4), tuple(v6), frozenset(uids), ", ".join(items))


def _item(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise AddressError(f"{excerpt(value)} is not an address range; {FORM}")
    return str(value)


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of a socket file connection (SO_PEERCRED), if known."""
    try:
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return None
    return int(uid)
