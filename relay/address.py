"""Pure parsers for ports, port lists, host:port pairs and durations.

Every function here takes text and returns frozen values or raises `AddressError` whose message quotes
the bad text and shows the expected form. The caller prefixes the source (`RELAY_PORTS: ...`).
No DNS, no sockets.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import reprlib
from dataclasses import dataclass, field

PORTS_FORM = (
    "expected P, LO-HI, L:T, LLO-LHI:T or LLO-LHI:TLO-THI, each optionally /udp or /tcp; "
    "L:unix:PATH (to a socket file) or unix:PATH:T (listen on one)"
)
UNIX = "unix:"
UNIX_FORM = "expected unix:/ABSOLUTE/PATH of a socket file (at most 107 bytes)"
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its final NUL
DEFAULT_MODE = 0o660
PROTOCOLS = ("tcp", "udp")
HOSTPORT_FORM = "expected HOST:PORT, IP:PORT or [IPv6]:PORT"
DURATION_FORM = "expected a duration like 250ms, 5s, 1m, 1h or plain seconds"


class AddressError(ValueError):
    """A value that does not parse; the message quotes it and names the expected form."""


EXCERPT_CHARS = 60  # the whole of any value a user writes by hand; an excerpt of anything longer


class _Excerpt(reprlib.Repr):
    """repr() on one line and bounded: a long text keeps its start and says its length, a list or mapping
    its first items (a value built by YAML aliases is never expanded)."""

    def repr_str(self, value: str, level: int) -> str:
        return excerpt(value)


_EXCERPT = _Excerpt()
_EXCERPT.maxlevel = 3
_EXCERPT.maxlist = _EXCERPT.maxtuple = _EXCERPT.maxdict = _EXCERPT.maxset = 4
_EXCERPT.maxother = EXCERPT_CHARS


PATH_CHARS = 200  # a file's path is what the user must find: shown whole up to this


def excerpt(value: object, chars: int = EXCERPT_CHARS) -> str:
    """How every error quotes a value (where `{value!r}` carried all of it: a 1 MiB value made a 1 MiB
    error line, a YAML alias bomb a 351 MB one)."""
    if isinstance(value, str) and len(value) <= chars:
        return repr(value)
    if isinstance(value, str):
        return f"{value[:chars]!r}... ({len(value)} characters)"
    return _EXCERPT.repr(value)


@dataclass(frozen=True, slots=True)
class UnixAddress:
    """A socket file: where a route listens (the file made with `mode`) or what it connects to.

    Shaped like HostPort where routes compare endpoints (config checks, metrics labels, /readyz): `host`
    is the `unix:PATH` text and `port` is 0. So a socket file is one more endpoint of a route, not a
    route type of its own; only binding (listener.py) and connecting (upstream.py) tell them apart.
    """

    path: str
    mode: int = DEFAULT_MODE

    @property
    def host(self) -> str:
        return UNIX + self.path

    @property
    def port(self) -> int:
        return 0

    def __str__(self) -> str:
        return self.host


@dataclass(frozen=True, slots=True)
class PortMap:
    """One listen port forwarded to one target port, over TCP or UDP; either end may be a socket file
    (a stream, so TCP)."""

    listen: int | UnixAddress
    target: int | UnixAddress
    protocol: str = "tcp"
    # `LO-HI` of the range item this port came from ("" for a single port): its metrics series (config.py).
    span: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return format_hostport(self.host, self.port)


def format_hostport(host: str, port: int) -> str:
    """`127.0.0.1:80`, `[::1]:80`, `name:80`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def format_target(host: str, port: int) -> str:
    """`host:port` as format_hostport writes it, or a socket file's `unix:PATH` (which has no port)."""
    return host if is_unix(host) else format_hostport(host, port)


def whole_number(text: str, limit: int) -> int | None:
    """The value of a string of ASCII digits if it is at most `limit`, else None.

    Not `text.isdigit()` and `int(text)` alone: isdigit() also says yes to '²' (which int() refuses) and
    to '٨٠' (which int() reads as 80), and int() refuses more than 4300 digits; each of those escaped
    as a bare ValueError or an accepted value.
    """
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"
    if len(digits) > len(str(limit)) or int(digits) > limit:
        return None
    return int(digits)


def parse_port(text: str, form: str = PORTS_FORM) -> int:
    """A decimal port 1-65535."""
    if not (text.isascii() and text.isdigit()):
        raise AddressError(f"{excerpt(text)} is not a port number; {form}")
    port = whole_number(text, 65535)
    if port is None or port < 1:
        raise AddressError(f"{excerpt(text)} is not a port number (1-65535); {form}")
    return port


def _parse_range(text: str) -> tuple[int, int]:
    """`P` or `LO-HI` -> (lo, hi)."""
    lo_text, dash, hi_text = text.partition("-")
    lo = parse_port(lo_text)
    if not dash:
        return lo, lo
    hi = parse_port(hi_text)
    if lo > hi:
        raise AddressError(f"{excerpt(text)} is not a port range (low > high); {PORTS_FORM}")
    return lo, hi


def is_unix(text: str) -> bool:
    """Whether a listen or target text names a socket file (`unix:PATH`, any case)."""
    return text[: len(UNIX)].lower() == UNIX


def parse_unix(text: str) -> str:
    """The path of `unix:/PATH`: absolute (a sidecar's working directory means nothing to its user),
    short enough for sun_path, one line, and not a directory's name."""
    path = text[len(UNIX) :] if is_unix(text) else text
    if not path.startswith("/"):
        raise AddressError(f"{excerpt(text)} is not an absolute socket file path; {UNIX_FORM}")
    if path.endswith("/"):
        raise AddressError(f"{excerpt(text)} names a directory, not a socket file; {UNIX_FORM}")
    if not path.isprintable():
        raise AddressError(
            f"{excerpt(text)} is not a socket file path (a line break or control character); {UNIX_FORM}"
        )
    try:
        size = len(os.fsencode(path))
    except UnicodeError:
        raise AddressError(
            f"{excerpt(text)} is not a socket file path (not encodable); {UNIX_FORM}"
        ) from None
    if size > UNIX_PATH_MAX:
        raise AddressError(f"{excerpt(text)} is too long for a socket file ({size} bytes); {UNIX_FORM}")
    return path


def _unix_item(item: str) -> PortMap | None:
    """`L:unix:PATH` (connect to a socket file) or `unix:PATH:T` (listen on one; the last colon splits);
    None for any other item. Checked before the /udp suffix: a path may contain a slash."""
    if is_unix(item):
        path, colon, port = item[len(UNIX) :].rpartition(":")
        if not colon:
            raise AddressError(f"{excerpt(item)} has no target port; expected unix:PATH:TARGET_PORT")
        try:
            return PortMap(UnixAddress(parse_unix(path)), parse_port(port, "expected unix:PATH:TARGET_PORT"))
        except AddressError as err:
            raise AddressError(f"{excerpt(item)}: {err}") from None
    listen, colon, rest = item.partition(":")
    if not (colon and is_unix(rest)):
        return None
    try:
        return PortMap(parse_port(listen, "expected LISTEN_PORT:unix:PATH"), UnixAddress(parse_unix(rest)))
    except AddressError as err:
        raise AddressError(f"{excerpt(item)}: {err}") from None


def parse_port_item(item: str) -> list[PortMap]:
    """One item of a port list: `P`, `LO-HI`, `L:T`, `LLO-LHI:T`, `LLO-LHI:TLO-THI`, then /udp or /tcp;
    or a socket file at one end: `L:unix:PATH`, `unix:PATH:T`."""
    unix = _unix_item(item)
    if unix is not None:
        return [unix]
    body, slash, proto = item.partition("/")
    protocol = proto.lower() if slash else "tcp"
    if protocol not in PROTOCOLS:
        raise AddressError(
            f"{excerpt(item)} has protocol {excerpt(proto)}; expected /tcp or /udp; {PORTS_FORM}"
        )
    listen_text, colon, target_text = body.partition(":")
    try:
        llo, lhi = _parse_range(listen_text)
        # Without a target part every listen port maps to itself.
        tlo, thi = _parse_range(target_text) if colon else (llo, lhi)
    except AddressError as err:
        if str(err).startswith(excerpt(item)):
            raise
        raise AddressError(f"{excerpt(item)}: {err}") from None
    if colon and tlo != thi and (thi - tlo) != (lhi - llo):
        raise AddressError(
            f"{excerpt(item)} maps {lhi - llo + 1} listen ports to {thi - tlo + 1} target ports "
            f"(ranges of unequal width); {PORTS_FORM}"
        )
    span = f"{llo}-{lhi}" if llo != lhi else ""
    if tlo != thi or llo == lhi:
        # 1:1, in order (docker-host collapses these onto the first port; we don't).
        offset = tlo - llo
        return [PortMap(p, p + offset, protocol, span) for p in range(llo, lhi + 1)]
    return [PortMap(p, tlo, protocol, span) for p in range(llo, lhi + 1)]


def parse_ports(text: str) -> tuple[PortMap, ...]:
    """A docker-host style list: items split on commas and/or whitespace; each listen port once per
    protocol (`53 53/udp` is DNS over both)."""
    maps: list[PortMap] = []
    seen: dict[tuple[int | UnixAddress, str], str] = {}
    items = port_items(text)
    if not items:
        raise AddressError(f"{excerpt(text)} lists no ports; {PORTS_FORM}")
    for item in items:
        for pm in parse_port_item(item):
            key = (pm.listen, pm.protocol)
            if key in seen:
                shown = str(pm.listen) if pm.protocol == "tcp" else f"{pm.listen}/{pm.protocol}"
                raise AddressError(
                    f"listen port {shown} appears twice ({excerpt(seen[key])} and {excerpt(item)}); "
                    "each listen port may be used once per protocol"
                )
            seen[key] = item
            maps.append(pm)
    return tuple(maps)


def parse_hostport(text: str, *, default_port: int | None = None) -> HostPort:
    """`host:port`, `1.2.3.4:port`, `[::1]:port`; a bare host only when default_port is given."""
    text = text.strip()
    try:
        return _hostport(text, default_port)
    except AddressError as err:
        if str(err).startswith(excerpt(text)):
            raise
        # A part's own message (`'' is not a port number`) does not say which value it came from.
        raise AddressError(f"{excerpt(text)}: {err}") from None


def _hostport(text: str, default_port: int | None) -> HostPort:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not _is_ipv6(host):
            raise AddressError(f"{excerpt(text)} is not a valid [IPv6]:PORT; {HOSTPORT_FORM}")
        if not rest:
            if default_port is None:
                raise AddressError(f"{excerpt(text)} has no port; {HOSTPORT_FORM}")
            return HostPort(host, default_port)
        if not rest.startswith(":"):
            raise AddressError(f"{excerpt(text)} is not a valid [IPv6]:PORT; {HOSTPORT_FORM}")
        return HostPort(host, parse_port(rest[1:], HOSTPORT_FORM))
    if text.count(":") > 1:
        if default_port is not None and _is_ipv6(text):
            return HostPort(text, default_port)
        raise AddressError(
            f"{excerpt(text)}: an IPv6 address needs brackets, as in [::1]:80; {HOSTPORT_FORM}"
        )
    host, colon, port_text = text.partition(":")
    if not colon:
        if default_port is None:
            raise AddressError(f"{excerpt(text)} has no port; {HOSTPORT_FORM}")
        port = default_port
    else:
        port = parse_port(port_text, HOSTPORT_FORM)
    check_host(host, HOSTPORT_FORM)
    return HostPort(host, port)


# \Z, not $: $ also matches before a final line break, which let 'db\n' through as a host name.
_HOSTNAME = re.compile(
    r"^(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62}))*\.?\Z"
)


def check_host(host: str, form: str = "expected a host name or an IP address") -> str:
    """A host name or IP literal (brackets stripped); raises for anything else."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # A name's last label is never all digits (RFC 3696 2): '5432' is a port put where the host goes,
    # '10.0.0.256' a mistyped address; both would only fail later, at each connection's lookup.
    if _is_ip(host) or (_HOSTNAME.match(host) and not host.rstrip(".").rpartition(".")[2].isdigit()):
        return host
    raise AddressError(f"{excerpt(host)} is not a host name or IP address; {form}")


def parse_ip(text: str, form: str = "expected an IP address such as 127.0.0.1 or ::1") -> str:
    """An IP literal for listening (brackets allowed); returns its compressed form."""
    bare = text.strip()
    if bare.startswith("[") and bare.endswith("]"):
        bare = bare[1:-1]
    ip = _ip(bare)
    if ip is None:
        raise AddressError(f"{excerpt(text)} is not an IP address; {form}")
    return str(ip)


METRICS_OFF = {"off", "none", "", "false", "0"}


def parse_metrics(text: str) -> HostPort | None:
    """The metrics address: IP:PORT, [V6]:PORT, a bare PORT (on 0.0.0.0), or off (None). Here rather than
    in config.py so that the image's health check (probe.py) reads RELAY_METRICS without the rest."""
    text = text.strip()
    if text.lower() in METRICS_OFF:
        return None
    if text.isdigit():
        return HostPort("0.0.0.0", parse_port(text, "expected HOST:PORT, PORT or off"))
    hp = parse_hostport(text)
    return HostPort(parse_ip(hp.host, "expected IP:PORT, PORT or off"), hp.port)


DEFAULT_METRICS = HostPort("0.0.0.0", 9464)


def is_loopback(ip: str) -> bool:
    return ipaddress.ip_address(ip).is_loopback


# An IPv6 zone is an interface name (at most 15 characters) or index; ipaddress takes any text after
# '%', spaces and line breaks included.
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None and not _ZONE.fullmatch(ip.scope_id):
        return None
    return ip


def _is_ip(text: str) -> bool:
    return _ip(text) is not None


def _is_ipv6(text: str) -> bool:
    ip = _ip(text)
    return ip is not None and ip.version == 6


# [0-9], not \d: \d also matches '٣' and other Unicode digits.
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(ms|s|m|h)?$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(text: str) -> float:
    """`250ms`, `5s`, `1m`, `1h`, `1.5` (seconds) -> seconds as a float."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise AddressError(f"{excerpt(text)} is not a duration; {DURATION_FORM}")
    seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if not math.isfinite(seconds):  # 400 nines read as a float are infinity
        raise AddressError(f"{excerpt(text)} is too long a duration; {DURATION_FORM}")
    return seconds


# --- docker-host's PORTS ---------------------------------------------------------------------------------

_COLON_PAIR = re.compile(r"^([0-9]+):([0-9]+)$")


def port_items(text: str) -> list[str]:
    """The items of a port list as parse_ports splits them (commas and/or whitespace)."""
    return [i for i in re.split(r"[\s,]+", text.strip()) if i]


def colon_pairs(text: str) -> list[tuple[str, int, int]]:
    """Items `A:B` of plain port numbers: docker-host until 2021 read them as the range A to B (iptables'
    multiport syntax), today as port A forwarded to port B."""
    pairs = []
    for item in port_items(text):
        match = _COLON_PAIR.match(item)
        if match:
            pairs.append((item, int(match.group(1)), int(match.group(2))))
    return pairs


def both_protocols(text: str) -> str:
    """docker-host forwards TCP and UDP: each item without /tcp or /udp is listed for both (a socket file
    carries a stream only)."""
    items: list[str] = []
    for item in port_items(text):
        items.append(item)
        if "/" not in item and not is_unix(item) and ":unix:" not in item.lower():
            items.append(item + "/udp")
    return " ".join(dict.fromkeys(items))
