"""Settings: frozen dataclasses built from defaults < YAML file < environment < command line.

Each source hands in raw values tagged with where they came from; one builder converts them, so every
error names its source (`RELAY_PORTS`, `--ports`, `relay.yaml:3: ports`), quotes the value and shows the
expected form. Nothing here opens sockets, configures logging or exits.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import math
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from relay.access import Allow, parse_allow
from relay.address import (
    DEFAULT_METRICS,
    DEFAULT_MODE,
    DURATION_FORM,
    EXCERPT_CHARS,
    PATH_CHARS,
    UNIX,
    AddressError,
    HostPort,
    PortMap,
    UnixAddress,
    both_protocols,
    check_host,
    colon_pairs,
    excerpt,
    format_target,
    is_unix,
    parse_duration,
    parse_hostport,
    parse_ip,
    parse_metrics,
    parse_port,
    parse_ports,
    parse_unix,
    whole_number,
)
from relay.privileges import User, parse_user
from relay.tls import ListenTLS, TargetTLS, parse_listen, parse_target

DEFAULT_LISTEN = ("127.0.0.1", "::1")
DOCKER_HOST_LISTEN = ("0.0.0.0", "::")  # docker-host's layout: a container of its own, reached by name
AUTO = "auto"

LoopName = Literal["auto", "asyncio", "uvloop"]
AppWatchMode = Literal["auto", "on", "off"]
Family = Literal["any", "ipv4", "ipv6"]


class ConfigError(Exception):
    """Bad configuration; the message is one line: source, value, expected form."""


@dataclass(frozen=True, slots=True)
class Route:
    """Every listen address forwards to target:target_port. `target` may be `auto`. `protocol` is tcp or
    udp (relay/udp.py); the same port number may carry one route of each. A socket file is a listen
    address (UnixAddress) or a target (`unix:PATH`, target_port 0) of a TCP route."""

    name: str
    listen: tuple[HostPort | UnixAddress, ...]
    target: str
    target_port: int
    protocol: str = "tcp"
    tls: ListenTLS | None = None  # the relay terminates TLS on the listen side (relay/tls.py)
    target_tls: TargetTLS | None = None  # the relay speaks TLS to the target
    allow: Allow | None = None  # source ranges (and socket-file uids) admitted; None: all (relay/access.py)
    target_protocol: str = ""  # "tcp" on a UDP route: datagrams to a TCP target (relay/udp_stream.py)
    # The metrics series this route counts in: a port range item (`tcp/8000-8999`) is one series, not
    # one per port; "" is the route's own name. Not compared: a reload keeps the route and its listeners.
    group: str = field(default="", compare=False)

    @property
    def series(self) -> str:
        """The `route` label of this route's metrics and the key of its stats."""
        return self.group or self.name

    def describe(self) -> str:
        listen = ", ".join(str(hp) for hp in self.listen)
        udp = f" (udp to {self.target_protocol})" if self.target_protocol else ""
        udp = udp or (" (udp)" if self.protocol == "udp" else "")
        tls = f" ({self.tls.describe()})" if self.tls else ""
        target_tls = f" ({self.target_tls.describe()})" if self.target_tls else ""
        return f"{listen}{tls} -> {format_target(self.target, self.target_port)}{target_tls}{udp}"


@dataclass(frozen=True, slots=True)
class Config:
    routes: tuple[Route, ...] = ()
    target: str = AUTO
    listen: tuple[str, ...] = DEFAULT_LISTEN
    connect_timeout: float = 5.0
    connect_retry: float | None = None
    idle_timeout: float | None = None
    half_close_timeout: float | None = None
    max_connections: int = 4096
    keepalive: bool = False
    backlog: int = 1024
    reuseport: bool = False
    family: Family = "any"
    source: str | None = None  # source address of target connections (socat's bind= on the connect side)
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    metrics: HostPort | None = DEFAULT_METRICS
    drain_timeout: float = 5.0
    udp_idle_timeout: float = 60.0
    max_udp_sessions: int = 4096
    memory_budget: int | None = None  # bytes held for slow receivers; None: from the container's limit
    socket_buffer: int | None = None  # SO_SNDBUF/SO_RCVBUF of relayed sockets; None: the kernel's autotuning
    loop: LoopName = "auto"
    app_watch: AppWatchMode = "auto"
    tls: ListenTLS | None = None  # for the TCP routes of `ports` (routes: carry their own)
    target_tls: TargetTLS | None = None
    allow: Allow | None = None  # for the routes of `ports` (routes: may carry their own)
    ipv6only: bool = True  # IPv6 listen sockets take IPv6 only; off: [::] also serves IPv4 (socat's default)
    user: User | None = None  # drop to this user after binding (socat's su=; relay/privileges.py)
    config_file: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)
    # metrics came from a source rather than the default: a taken default port is then no reason to stop
    # (two socat-style relays in one namespace), a taken explicit one is.
    metrics_explicit: bool = field(default=False, compare=False)


# --- converters: raw value (str from env/CLI, any YAML scalar or list) -> typed value ---------------


def _text(value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise AddressError(f"{excerpt(value)} is not a single value")
    return str(value)


def _duration(value: object) -> float:
    if isinstance(value, float) and math.isfinite(value) and value >= 0:
        return value  # a YAML number: str() writes 0.00001 as 1e-05, which is not a duration's text
    text = _text(value)
    if text.strip().startswith("-"):
        raise AddressError(f"{excerpt(value)} is negative; {DURATION_FORM}")
    return parse_duration(text)


def _positive_duration(value: object) -> float:
    text = _text(value).strip()
    seconds = -1.0 if text.startswith("-") else _duration(value)  # -1 gets the same message as 0
    if seconds <= 0:
        raise AddressError(
            f"{excerpt(value)} must be more than zero; expected a duration like 250ms, 5s or 1m"
        )
    return seconds


# The shortest udp_idle_timeout: a shorter one ends sessions between a query and a slow reply, and is
# more likely a unit slip (10ms for 10s) than a wish. The idle sweep runs 4 times per timeout (udp.py).
UDP_IDLE_FLOOR = 0.1


def _udp_idle_timeout(value: object) -> float:
    seconds = _positive_duration(value)
    if seconds < UDP_IDLE_FLOOR:
        raise AddressError(
            f"{value!r} is below 100ms, the shortest UDP idle timeout; expected a duration of 100ms or more"
        )
    return seconds


OFF = {"off", "none", ""}

SIZE_FORM = "expected a size like 32MiB, 512KiB, 64M or plain bytes"
SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20}
SIZE_UNITS |= {"g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str, lo: int, hi: int) -> int:
    """'32MiB', '512k', '1048576' -> bytes (binary units: memory limits are written so)."""
    digits = text.strip()
    number = digits.rstrip("bBkKmMgGiI ")
    unit = digits[len(number) :].strip().lower()
    value = whole_number(number, hi)
    if unit not in SIZE_UNITS or value is None:
        raise AddressError(f"{excerpt(text)} is not a size; {SIZE_FORM}")
    size = value * SIZE_UNITS[unit]
    if not lo <= size <= hi:
        raise AddressError(f"{excerpt(text)} is not between {lo} bytes and {hi >> 30} GiB; {SIZE_FORM}")
    return size


def _size_in(lo: int, hi: int) -> Callable[[object], int | None]:
    """A size in [lo, hi], or `auto` (None: the relay picks; config.py's users say how)."""

    def convert(value: object) -> int | None:
        text = _text(value)
        if text.strip().lower() == "auto":
            return None
        return parse_size(text, lo, hi)

    return convert


def _is_off(value: object) -> bool:
    """`off`, `none`, empty, or YAML's reading of a bare `off` (false) or of nothing (null)."""
    return value is None or value is False or (isinstance(value, str) and value.strip().lower() in OFF)


def _source(value: object) -> str | None:
    """An IP of this host to connect to targets from, or off (the kernel picks)."""
    if _is_off(value):
        return None
    return parse_ip(_text(value).strip(), "expected an IP address of this host, or off")


def _optional_duration(value: object) -> float | None:
    """`off`, `none` or 0 disable the timeout (YAML reads a bare `off` as false)."""
    if _is_off(value):
        return None
    seconds = _duration(value)
    return seconds or None


def _int_in(lo: int, hi: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        number = whole_number(_text(value).strip(), hi)
        if number is None or number < lo:
            raise AddressError(f"{excerpt(value)} is not a whole number from {lo} to {hi}")
        return number

    return convert


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise AddressError(
        f"{excerpt(value)} is not a yes/no value; expected true, false, yes, no, on, off, 1 or 0"
    )


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = _text(value).strip().lower()
        if text not in choices:
            raise AddressError(f"{excerpt(value)} is not one of {', '.join(choices)}")
        return text

    return convert


def _target(value: object) -> str:
    text = _text(value).strip()
    if text.lower() == AUTO:
        return AUTO
    if is_unix(text):  # one host serves every port; a socket file is one port's target
        raise AddressError(
            f"{excerpt(value)} is a socket file, which is a port's target rather than the host's; "
            "expected auto, a "
            "host name or an IP address here, and LISTEN_PORT:unix:PATH in the ports"
        )
    return check_host(text, "expected auto, a host name or an IP address")


def _listen(value: object) -> tuple[str, ...]:
    """A comma/space list (or YAML list) of IPs; `localhost` means both loopbacks."""
    items = value if isinstance(value, list) else _text(value).replace(",", " ").split()
    addrs: list[str] = []
    for item in items:
        text = _text(item).strip()
        found = DEFAULT_LISTEN if text.lower() == "localhost" else (parse_ip(text),)
        addrs.extend(a for a in found if a not in addrs)
    if not addrs:
        raise AddressError(f"{excerpt(value)} lists no address; expected IPs such as 127.0.0.1,::1")
    for a in addrs:
        for b in addrs:
            if a != b and _overlaps(a, b):
                raise AddressError(f"{excerpt(value)}: {a} already covers {b}; list one or the other")
    return tuple(addrs)


def _ports(value: object) -> tuple[PortMap, ...]:
    if isinstance(value, list):
        value = " ".join(_text(v) for v in value)
    return parse_ports(_text(value))


def _metrics(value: object) -> HostPort | None:
    if value is None or value is False:  # YAML reads a bare `off` as false
        return None
    return parse_metrics(_text(value))


def _app_watch(value: object) -> str:
    """auto, on or off; YAML reads a bare on/off as a boolean."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _choice("auto", "on", "off")(value)


def _log_level(value: object) -> str:
    return _choice("debug", "info", "warning", "error")(value)


@dataclass(frozen=True, slots=True)
class Option:
    key: str
    convert: Callable[[object], Any]
    help: str
    metavar: str = "VALUE"

    @property
    def env(self) -> str:
        return "RELAY_" + self.key.upper()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option(
        "ports",
        _ports,
        "ports to forward: P, LO-HI, L:T, LLO-LHI:T, LLO-LHI:TLO-THI, each optionally /udp (default /tcp); "
        "L:unix:PATH to a socket file, unix:PATH:T on one",
        "SPEC",
    ),
    Option(
        "target",
        _target,
        "host to forward to, or auto (host.docker.internal, host.containers.internal, default gateway)",
        "HOST",
    ),
    Option("listen", _listen, "addresses to listen on (default 127.0.0.1,::1)", "IPS"),
    Option(
        "tls",
        parse_listen,
        "terminate TLS on the TCP ports: cert=PEM[,key=PEM][,cafile=PEM][,verify=BOOL] (verify: require "
        "client certificates, on by default with cafile)",
        "SETTINGS",
    ),
    Option(
        "target_tls",
        parse_target,
        "speak TLS to the target: on (verified against the system store), or cafile=PEM,verify=BOOL,"
        "server_name=NAME,sni=BOOL,cert=PEM,key=PEM (default off)",
        "SETTINGS",
    ),
    Option(
        "allow",
        parse_allow,
        "admit only clients from these ranges (e.g. 10.0.0.0/8,::1; uid:N for a socket file); "
        "default: everyone",
        "RANGES",
    ),
    Option(
        "ipv6only",
        _bool,
        "IPv6 listen sockets serve IPv6 only (default on); off: [::] serves IPv4 clients too",
        "BOOL",
    ),
    Option("user", parse_user, "started as root, become this user after binding (default: stay)", "USER"),
    Option("connect_timeout", _positive_duration, "time to connect to the target (default 5s)", "DURATION"),
    Option(
        "connect_retry",
        _optional_duration,
        "keep retrying a refused connect this long (default off)",
        "DURATION",
    ),
    Option("idle_timeout", _optional_duration, "close a connection idle this long (default off)", "DURATION"),
    Option(
        "half_close_timeout",
        _optional_duration,
        "close a half-closed connection after this long (default off)",
        "DURATION",
    ),
    Option("max_connections", _int_in(1, 1_000_000), "concurrent connections (default 4096)", "N"),
    Option("keepalive", _bool, "SO_KEEPALIVE on both sockets (default off)", "BOOL"),
    Option("backlog", _int_in(1, 65535), "listen backlog (default 1024)", "N"),
    Option("reuseport", _bool, "SO_REUSEPORT on listeners (default off)", "BOOL"),
    Option(
        "family",
        _choice("any", "ipv4", "ipv6"),
        "reach the target over any, ipv4 or ipv6 (default any)",
        "{any,ipv4,ipv6}",
    ),
    Option(
        "source",
        _source,
        "connect to targets from this IP of the relay's host (socat's bind= on the connect address; "
        "default: the kernel picks)",
        "IP",
    ),
    Option("log_level", _log_level, "debug, info, warning or error (default info)", "LEVEL"),
    Option("log_format", _choice("text", "json"), "text or json (default text)", "FORMAT"),
    Option("metrics", _metrics, "metrics and health HTTP address, or off (default 0.0.0.0:9464)", "ADDR"),
    Option("drain_timeout", _duration, "on SIGTERM, wait this long for connections (default 5s)", "DURATION"),
    Option(
        "udp_idle_timeout",
        _udp_idle_timeout,
        "end a UDP session after this long without a datagram either way, 100ms at least (default 60s)",
        "DURATION",
    ),
    Option("max_udp_sessions", _int_in(1, 1_000_000), "UDP client addresses at once (default 4096)", "N"),
    Option(
        "memory_budget",
        _size_in(1 << 20, 1 << 40),
        "bytes held, all connections together, for receivers slower than their senders; past it those "
        "senders wait (default auto: a quarter of the container's memory limit, at most 64MiB)",
        "SIZE",
    ),
    Option(
        "socket_buffer",
        _size_in(4096, 1 << 30),
        "kernel send and receive buffer of each relayed socket; caps the kernel memory a stalled "
        "connection takes (default auto: the kernel's autotuning)",
        "SIZE",
    ),
    Option(
        "loop", _choice("auto", "asyncio", "uvloop"), "event loop (default auto: uvloop if installed)", "LOOP"
    ),
    Option(
        "app_watch",
        _app_watch,
        "exit with code 75 when the app container restarts, so Docker restarts the relay in its new "
        "network namespace: auto (in Docker only), on or off (default auto)",
        "MODE",
    ),
)
OPTION_BY_KEY = {o.key: o for o in OPTIONS}
FILE_KEYS = (*OPTION_BY_KEY, "routes")
ROUTE_KEYS = ("name", "listen", "target", "protocol", "target_protocol", "mode", "tls", "target_tls", "allow")
ENV_NAMES = {o.env for o in OPTIONS} | {"RELAY_CONFIG"}


@dataclass(frozen=True, slots=True)
class Raw:
    """A value as a source gave it, and where it came from (for error messages)."""

    value: object
    source: str
    # For a list of mappings from a file (routes:): per entry, where it starts and where each key is,
    # so an error points at the bad key's own line.
    entries: tuple[tuple[str, dict[str, str]], ...] = field(default=(), compare=False)


# --- sources -----------------------------------------------------------------------------------------


def from_env(environ: Mapping[str, str]) -> tuple[dict[str, Raw], list[str]]:
    """RELAY_* variables, plus docker-host's PORTS and DOCKER_HOST as fallbacks. Returns (raw, warnings)."""
    raw: dict[str, Raw] = {}
    warnings: list[str] = []
    for opt in OPTIONS:
        if opt.env in environ:
            raw[opt.key] = Raw(environ[opt.env], opt.env)
    if "ports" not in raw and "PORTS" in environ:
        raw["ports"] = Raw(environ["PORTS"], "PORTS")
        warnings.extend(_colon_ranges(environ["PORTS"]))
    docker_host = environ.get("DOCKER_HOST", "").strip()
    if "target" not in raw and docker_host:
        if "://" in docker_host:
            warnings.append(
                f"DOCKER_HOST={excerpt(docker_host)} is a Docker API address, not a host; ignored"
            )
        else:
            raw["target"] = Raw(docker_host, "DOCKER_HOST")
    for name, value in environ.items():
        if name.startswith("RELAY_") and name not in ENV_NAMES and not _k8s_service_link(name, value):
            hint = _did_you_mean(name, sorted(ENV_NAMES))
            warnings.append(f"{name}: unknown setting, ignored{hint}")
    return raw, warnings


def _docker_host_layout(environ: Mapping[str, str], cli: Mapping[str, Raw], path: str | None) -> bool:
    """Configured the docker-host way: its PORTS, and none of the relay's own ports or listen settings
    (environment, file or command line). Its users run it as a container of its own, reached by name."""
    own = {"RELAY_PORTS", "RELAY_LISTEN"} & environ.keys() or {"ports", "listen"} & cli.keys()
    return "PORTS" in environ and not own and not path


def _as_docker_host(ports: str, raw: dict[str, Raw]) -> list[str]:
    """docker-host listened on every address, for TCP and UDP."""
    raw["ports"] = Raw(both_protocols(ports), "PORTS")
    raw["listen"] = Raw(list(DOCKER_HOST_LISTEN), "PORTS (docker-host layout)")
    return [
        "configured the docker-host way (PORTS without RELAY_PORTS or RELAY_LISTEN): listening on "
        "0.0.0.0 and :: for TCP and UDP, as docker-host did",
        "every container on this container's networks can reach the Docker host's ports "
        f"{ports.strip()} through it; set RELAY_LISTEN (e.g. 127.0.0.1,::1) to keep them to this namespace, "
        "or RELAY_ALLOW (e.g. 172.16.0.0/12) to admit only some clients",
    ]


def _colon_ranges(ports: str) -> list[str]:
    """docker-host read `A:B` as the range A to B until 2021 (iptables' multiport syntax), as port A
    forwarded to port B since: the relay reads today's meaning and says so."""
    notes = []
    for item, low, high in colon_pairs(ports):
        if low == 0:
            raise ConfigError(
                f"PORTS: {excerpt(item)} is docker-host's range syntax before 2021 (ports 0 to {high}), and "
                f"port 0 cannot be listened on; expected 1-{high}"
            )
        notes.append(
            f"PORTS: {excerpt(item)} is read as port {low} forwarded to the host's port {high} "
            "(docker-host's "
            f"syntax since 2021); docker-host before 2021 read it as the ports {low} to {high}: write "
            f"{low}-{high} for those"
        )
    return notes


def _k8s_service_link(name: str, value: str) -> bool:
    """Kubernetes injects RELAY_SERVICE_HOST, RELAY_PORT=tcp://... for a Service named `relay`."""
    return name.startswith(("RELAY_SERVICE_", "RELAY_PORT_")) or value.startswith(("tcp://", "udp://"))


MAX_FILE = 1 << 20  # bytes; a config file with 1,000 routes is about 60 KiB
FILE_FORM = "expected a regular YAML file of at most 1 MiB"
MAX_ALIAS_NODES = 10_000  # values YAML aliases may add by repeating others (a bomb adds billions)


def _read_file(file_name: str, path: str) -> bytes:
    """The file's bytes, from a regular file of at most MAX_FILE only: a FIFO is opened without waiting
    for a writer and refused, as are devices (/dev/zero grew without bound) and directories. So a read
    is bounded in time and memory, whoever can write the mounted file."""
    try:
        fd = os.open(file_name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror}); {FILE_FORM}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
            raise ConfigError(f"{path}: {kind}; {FILE_FORM}")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE and (chunk := os.read(fd, MAX_FILE + 1 - size)):  # st_size is 0 in /proc
            chunks.append(chunk)
            size += len(chunk)
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror}); {FILE_FORM}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE:
        raise ConfigError(f"{path}: larger than 1 MiB ({max(info.st_size, size)} bytes); {FILE_FORM}")
    return b"".join(chunks)


_FILE_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def _check_aliases(path: str, node: Any) -> None:
    """Refuse a document whose aliases repeat more than MAX_ALIAS_NODES values: a few hundred bytes of
    nested aliases expand to billions (1.4 GB and 6 s, or a MemoryError, before this). Composing shares
    an alias's node, so the walk below counts each repetition, and stops at the limit: its cost is
    bounded whatever the file. Merge keys (`<<: *a`) are aliases too; a recursive alias never ends."""
    seen: set[int] = set()
    repeated = 0
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            repeated += 1
            if repeated > MAX_ALIAS_NODES:
                raise ConfigError(
                    f"{path}: YAML aliases expand to more than {MAX_ALIAS_NODES} repeated values; expected a "
                    "settings file without so many aliases (write the values out)"
                )
        seen.add(id(current))
        if isinstance(current.value, list):  # sequence: nodes; mapping: (key, value) pairs
            for item in current.value:
                stack.extend(item if isinstance(item, tuple) else (item,))


def from_file(path: str) -> dict[str, Raw]:
    """The YAML file: a mapping of FILE_KEYS; syntax errors give the line."""
    import yaml  # ~30 ms of start-up: only when there is a file

    # `path` from here on is the name as messages show it: quoted when a line break would split them.
    file_name, path = path, path if path.isprintable() else excerpt(path, PATH_CHARS)
    data_bytes = _read_file(file_name, path)
    try:
        text = data_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        at = data_bytes[: err.start].count(b"\n") + 1
        byte = data_bytes[err.start]
        raise ConfigError(
            f"{path}:{at}: not UTF-8 text (byte 0x{byte:02x}); expected a UTF-8 YAML file"
        ) from None
    loader = _yaml_loader()
    try:
        node = yaml.compose(text, Loader=loader)
        if node is not None:
            _check_aliases(path, node)
        data = yaml.load(text, Loader=loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: YAML syntax error: {err.problem}") from None
    except yaml.reader.ReaderError as err:
        # Its text goes on over a second line (`  in "<unicode string>", position 0`): give the line instead.
        at = text.count("\n", 0, err.position) + 1
        raise ConfigError(f"{path}:{at}: YAML error: {str(err).splitlines()[0]}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: YAML error: {err}") from None
    except RecursionError:  # PyYAML composes nested values recursively: ~500 levels exhaust the stack
        raise ConfigError(f"{path}: YAML nested too deeply; expected settings a few levels deep") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}: the file must be a mapping of settings such as 'ports: \"5432\"'")
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    node_of = {k.value: v for k, v in node.value if isinstance(k, yaml.ScalarNode)}
    raw: dict[str, Raw] = {}
    for key, value in data.items():
        where = f"{path}:{lines.get(key, '?')}: {key}"
        if key not in FILE_KEYS:
            # Quoted unless a short plain word: a key may hold a line break (`"a\nb": 1` gave two lines).
            plain = isinstance(key, str) and key.isidentifier() and len(key) <= EXCERPT_CHARS
            shown = key if plain else excerpt(key)
            where = f"{path}:{lines.get(key, '?')}: {shown}"
            hint = _did_you_mean(str(key), list(FILE_KEYS))
            raise ConfigError(f"{where}: unknown key{hint}; known keys: {', '.join(FILE_KEYS)}")
        raw[str(key)] = Raw(value, where, _entry_lines(path, str(key), node_of.get(key)))
    return raw


def _entry_lines(path: str, key: str, node: object) -> tuple[tuple[str, dict[str, str]], ...]:
    """`path:LINE: key[i]` for each mapping in a YAML sequence node, and the same for each of its keys."""
    import yaml

    if not isinstance(node, yaml.SequenceNode):
        return ()
    found = []
    for index, item in enumerate(node.value):
        where = f"{path}:{item.start_mark.line + 1}: {key}[{index}]"
        keys = {}
        if isinstance(item, yaml.MappingNode):
            keys = {
                str(k.value): f"{path}:{k.start_mark.line + 1}: {key}[{index}]"
                for k, _ in item.value
                if isinstance(k, yaml.ScalarNode)
            }
        found.append((where, keys))
    return tuple(found)


@functools.cache
def _yaml_loader() -> Any:
    """SafeLoader, except that YAML 1.1's base-60 numbers stay text: `ports: 22:22` means the map 22 -> 22,
    not port 1342 (22 * 60 + 22), and `listen: 1:30` is not port 90. So do its octal ones: `mode: 0660`
    reaches the mode converter as written, and `ports: 0080` is port 80, not 64. So do dates (no setting
    is one; `2001-13-01` raised a bare ValueError) and numbers too long to be any setting (int() refuses more
    than 4300 digits, str() a longer hex number): the converters then quote the text as written."""
    import yaml

    class Loader(yaml.SafeLoader):
        def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
            tag = super().resolve(kind, value, implicit)  # type: ignore[no-untyped-call]
            number = tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
            octal = tag == "tag:yaml.org,2002:int" and value[:1] == "0" and value[1:].isdigit()
            if (
                number and (":" in value or len(value) > 40 or octal)
            ) or tag == "tag:yaml.org,2002:timestamp":
                return "tag:yaml.org,2002:str"
            return tag

        def construct_object(self, node: Any, deep: bool = False) -> Any:
            # PyYAML's constructors trust the implicit resolver's pattern; an explicit tag skips it, and
            # `!!bool x`, `!!timestamp x`, `!!int x` then raised KeyError, AttributeError, ValueError.
            try:
                return super().construct_object(node, deep)
            except (LookupError, AttributeError, TypeError, ValueError):
                name = str(node.tag).rpartition(":")[2]
                raise yaml.constructor.ConstructorError(
                    None, None, f"{excerpt(node.value)} is not a valid !!{name}", node.start_mark
                ) from None

    return Loader


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {excerpt(close[0])}?)" if close else ""


# --- the builder ---------------------------------------------------------------------------------------


def build(
    raw: Mapping[str, Raw],
    *,
    config_file: str | None = None,
    warnings: tuple[str, ...] = (),
    need_routes: bool = True,
) -> Config:
    """Convert merged raw values into a Config, or raise ConfigError naming the source.

    `need_routes=False` is for `relay healthcheck`, which only needs the health address: in a socat-style
    container the routes live in the relay's argv, which Docker's HEALTHCHECK command does not repeat.
    """
    values: dict[str, Any] = {}
    for key, item in raw.items():
        if key == "routes":
            continue
        try:
            values[key] = OPTION_BY_KEY[key].convert(item.value)
        except AddressError as err:
            raise ConfigError(f"{item.source}: {err}") from None
    ports: tuple[PortMap, ...] = values.pop("ports", ())
    base = Config(**values, config_file=config_file, warnings=warnings)
    for key in ("tls", "target_tls"):
        udp = [str(pm.listen) for pm in ports if pm.protocol == "udp"]
        if values.get(key) is not None and udp:
            raise ConfigError(
                f"{raw[key].source}: TLS is for TCP, and {raw['ports'].source} has UDP port {udp[0]}; "
                "expected TCP ports only, or routes: with tls / target_tls on the TCP ones"
            )
    routes = [_port_route(pm, base) for pm in ports]
    sources = [raw["ports"].source] * len(routes) if routes else []
    if "routes" in raw:
        explicit = _routes(raw["routes"], base)
        routes.extend(route for route, _ in explicit)
        sources.extend(where for _, where in explicit)
    if not routes and need_routes:
        raise ConfigError(
            "no ports to forward: set RELAY_PORTS (e.g. RELAY_PORTS=5432), --ports, 'ports:' in the "
            "config file, or give socat-style arguments (tcp-listen:8000 tcp:host.docker.internal:8000)"
        )
    _check_unique(routes, sources)
    if not base.ipv6only:
        _check_dual_stack(routes, sources, raw["ipv6only"].source)
    _check_names(routes, sources)
    _check_not_itself(routes, sources)
    _check_tls_names(routes, sources)
    return Config(
        **{**values, "routes": tuple(routes)},
        config_file=config_file,
        warnings=warnings,
        metrics_explicit="metrics" in raw,
    )


def _port_route(pm: PortMap, base: Config) -> Route:
    """The route of one port-list item: on the listen addresses (or the socket file) to the target."""
    listen: tuple[HostPort | UnixAddress, ...]
    if isinstance(pm.listen, UnixAddress):
        name, listen = "unix" + pm.listen.path, (pm.listen,)
    else:
        name = f"{pm.protocol}/{pm.listen}"
        listen = tuple(HostPort(ip, pm.listen) for ip in base.listen)
    tls, target_tls = base.tls, base.target_tls
    group = f"{pm.protocol}/{pm.span}" if pm.span else ""
    if isinstance(pm.target, UnixAddress):
        return Route(
            name, listen, pm.target.host, 0, pm.protocol, tls, target_tls, allow=base.allow, group=group
        )
    return Route(
        name, listen, base.target, pm.target, pm.protocol, tls, target_tls, allow=base.allow, group=group
    )


def _mode(value: object) -> int:
    """A socket file's permission bits, in octal as chmod takes them: 660, 0660, 0o660 or "0666". A YAML
    number is read by its digits (`mode: 666` is 0o666, not 666 in decimal); YAML's own octal (`0660`)
    stays text (_yaml_loader)."""
    text = _text(value).strip().lower()
    digits = text[2:] if text.startswith("0o") else text
    if not digits or len(digits) > 4 or any(c not in "01234567" for c in digits) or int(digits, 8) > 0o777:
        raise AddressError(
            f"{excerpt(value)} is not a file mode; expected octal permission bits such as 0660 or 0666"
        )
    return int(digits, 8)


def _routes(item: Raw, base: Config) -> list[tuple[Route, str]]:
    """The explicit routes, each with where it was written (its own line in a file)."""
    if not isinstance(item.value, list):
        raise ConfigError(f"{item.source}: expected a list of routes, each with listen and target")
    routes = []
    for index, entry in enumerate(item.value):
        where, keys = item.entries[index] if index < len(item.entries) else (f"{item.source}[{index}]", {})
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with name, listen and target")
        for key in entry:
            if key not in ROUTE_KEYS:
                hint = _did_you_mean(str(key), list(ROUTE_KEYS))
                known = ", ".join(ROUTE_KEYS)
                raise ConfigError(
                    f"{keys.get(str(key), where)}: unknown key {excerpt(key)}{hint}; known keys: {known}"
                )
        for key in ("listen", "target"):
            if key not in entry:
                raise ConfigError(f"{where}: missing {excerpt(key)}")
        try:
            mode = _mode(entry["mode"]) if "mode" in entry else DEFAULT_MODE
        except AddressError as err:
            raise ConfigError(f"{keys.get('mode', where)}: {err}") from None
        try:
            listen = _route_listen(entry["listen"], base.listen, mode)
        except AddressError as err:
            raise ConfigError(f"{keys.get('listen', where)}: {err}") from None
        if "mode" in entry and not any(isinstance(hp, UnixAddress) for hp in listen):
            raise ConfigError(
                f"{keys.get('mode', where)}: mode applies to a socket file listener only; "
                "expected listen: unix:/PATH with it"
            )
        try:
            target_host, target_port = _route_target(entry["target"], listen[0].port)
        except AddressError as err:
            raise ConfigError(f"{keys.get('target', where)}: {err}") from None
        try:
            protocol = _choice("tcp", "udp")(entry.get("protocol", "tcp"))
            if protocol == "udp" and (is_unix(target_host) or not all(hp.port for hp in listen)):
                raise AddressError(
                    f"{excerpt(entry.get('protocol'))}: a socket file carries a stream; expected tcp"
                )
        except AddressError as err:
            raise ConfigError(f"{keys.get('protocol', where)}: {err}") from None
        try:
            first = listen[0]
            default = "unix" + first.path if isinstance(first, UnixAddress) else f"{protocol}/{first.port}"
            name = _route_name(entry.get("name"), default)
        except AddressError as err:
            raise ConfigError(f"{keys.get('name', where)}: {err}") from None
        try:
            tls = parse_listen(entry["tls"]) if "tls" in entry else None
        except AddressError as err:
            raise ConfigError(f"{keys.get('tls', where)}: tls: {err}") from None
        try:
            target_tls = parse_target(entry["target_tls"]) if "target_tls" in entry else None
        except AddressError as err:
            raise ConfigError(f"{keys.get('target_tls', where)}: target_tls: {err}") from None
        if protocol == "udp" and (tls or target_tls):
            raise ConfigError(
                f"{where}: TLS is for TCP routes; expected protocol: tcp with tls or target_tls"
            )
        try:
            allow = parse_allow(entry["allow"]) if "allow" in entry else base.allow
        except AddressError as err:
            raise ConfigError(f"{keys.get('allow', where)}: allow: {err}") from None
        try:
            target_protocol = _target_protocol(entry.get("target_protocol"), protocol)
        except AddressError as err:
            raise ConfigError(f"{keys.get('target_protocol', where)}: target_protocol: {err}") from None
        route = Route(
            name,
            listen,
            target_host,
            target_port,
            protocol,
            tls,
            target_tls,
            allow=allow,
            target_protocol=target_protocol,
        )
        routes.append((route, where))
    return routes


def _target_protocol(value: object, protocol: str) -> str:
    """`tcp` on a UDP route sends its datagrams to a TCP target (socat's UDP-LISTEN to TCP:); "" is the
    route's own protocol."""
    if value is None or value == "":
        return ""
    chosen = _choice("tcp", "udp")(value)
    if chosen == protocol:
        return ""
    if protocol != "udp":
        raise AddressError(
            f"{value!r}: a TCP listener forwards to a TCP target; expected tcp, or protocol: udp"
        )
    return chosen


def _route_target(value: object, listen_port: int) -> tuple[str, int]:
    """`unix:/PATH` (port 0), or HOST:PORT where PORT defaults to the listen port (a socket file
    listener has none to lend)."""
    text = _text(value).strip()
    if is_unix(text):
        return UNIX + parse_unix(text), 0
    target = parse_hostport(text, default_port=listen_port or None)
    return _target(target.host), target.port


def _route_name(value: object, default: str) -> str:
    """A label in log lines and metrics: one line of text (str() let a list or a line break through)."""
    if value is None or value == "":
        return default
    text = _text(value).strip()
    if not text or not text.isprintable():
        raise AddressError(f"{excerpt(value)} is not a route name; expected one line of text such as 'cache'")
    return text


def _route_listen(
    value: object, default_ips: tuple[str, ...], mode: int = DEFAULT_MODE
) -> tuple[HostPort | UnixAddress, ...]:
    """`6000` (default addresses), `127.0.0.1:6000`, `[::1]:6000`, `unix:/PATH` (made with `mode`), or a
    list of those."""
    items = value if isinstance(value, list) else [value]
    result: list[HostPort | UnixAddress] = []
    for item in items:
        text = _text(item).strip()
        if is_unix(text):
            result.append(UnixAddress(parse_unix(text), mode))
        elif text.isdigit():
            port = parse_port(text, "expected PORT, IP:PORT or [IPv6]:PORT")
            result.extend(HostPort(ip, port) for ip in default_ips)
        else:
            hp = parse_hostport(text)
            result.append(HostPort(parse_ip(hp.host, "expected PORT, IP:PORT or [IPv6]:PORT"), hp.port))
    if not result:
        raise AddressError(
            f"{excerpt(value)} lists no listen address; expected PORT, IP:PORT, [IPv6]:PORT or unix:/PATH"
        )
    return tuple(result)


def _overlaps(a: str, b: str) -> bool:
    if a == b:
        return True
    wild = {"0.0.0.0": ".", "::": ":"}
    return (a in wild and (":" in b) == (a == "::")) or (b in wild and (":" in a) == (b == "::"))


def _check_unique(routes: list[Route], sources: list[str]) -> None:
    """No two routes may listen on the same port of overlapping addresses (0.0.0.0 covers all IPv4).

    Compared within a port only: all pairs took minutes for PORTS=1-65535 (docker-host's default)."""
    seen: dict[tuple[int, str], list[tuple[HostPort | UnixAddress, str]]] = {}  # TCP and UDP ports are apart
    for route, source in zip(routes, sources, strict=True):
        for hp in route.listen:
            for other_hp, other_source in seen.get((hp.port, route.protocol), ()):
                if _overlaps(hp.host, other_hp.host):
                    first = "" if other_source == source else f" ({other_source} already listens there)"
                    if isinstance(hp, UnixAddress):
                        raise ConfigError(
                            f"{source}: socket file {hp.path} is used twice{first}; "
                            "each socket file may be listened on once"
                        )
                    raise ConfigError(
                        f"{source}: listen port {hp.port} on {hp} is used twice{first}; "
                        "each listen port may be used once"
                    )
            seen.setdefault((hp.port, route.protocol), []).append((hp, source))


def _check_dual_stack(routes: list[Route], sources: list[str], setting: str) -> None:
    """With ipv6only off, [::] takes the port on every IPv4 address too: an IPv4 listener on the same
    port and protocol could not bind (the kernel says "address in use", which would not say why)."""
    wild: dict[tuple[int, str], str] = {}
    for route, source in zip(routes, sources, strict=True):
        for hp in route.listen:
            if isinstance(hp, HostPort) and hp.host == "::":
                wild[(hp.port, route.protocol)] = source
    for route, source in zip(routes, sources, strict=True):
        for hp in route.listen:
            if isinstance(hp, HostPort) and ":" not in hp.host and (hp.port, route.protocol) in wild:
                raise ConfigError(
                    f"{source}: {hp} cannot listen beside [::]:{hp.port}, which serves IPv4 too with "
                    f"{setting} off; expected ipv6only on, or [::] alone for both families"
                )


def _check_names(routes: list[Route], sources: list[str]) -> None:
    """Names key each route's counters, metrics labels and /readyz entry: two routes sharing one would
    mix their figures."""
    first: dict[str, str] = {}
    for route, source in zip(routes, sources, strict=True):
        if route.name in first:
            raise ConfigError(
                f"{source}: route name {excerpt(route.name)} is used twice ({first[route.name]} has it too); "
                "expected a name of its own for each route (name: ...)"
            )
        first[route.name] = source


def _check_tls_names(routes: list[Route], sources: list[str]) -> None:
    """TLS to a socket file: the path is no name a certificate carries, so the name must be given."""
    for route, source in zip(routes, sources, strict=True):
        tls = route.target_tls
        if tls is not None and tls.verify and tls.server_name is None and is_unix(route.target):
            raise ConfigError(
                f"{source}: route {route.name} speaks TLS to the socket file {route.target}, which has no "
                "host name to check its certificate against; expected server_name (socat: commonname=)"
            )


LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
# Docker's embedded DNS server. The engine's NAT rules in the container's namespace send 127.0.0.11:53
# to the resolver's own port, so a wildcard listener on port 53 beside it is no loop (socat's
# UDP-RECVFROM:53,fork UDP-SENDTO:127.0.0.11:53 forwards a network's DNS to it).
DOCKER_DNS = "127.0.0.11"


def lands_on(address: str, port: int, listen: HostPort | UnixAddress) -> bool:
    """Whether connecting to address:port (an IP, or a loopback name) reaches the listen socket `listen`.

    Only what is known without asking the kernel: the same address, a wildcard listener reached over
    loopback, and 0.0.0.0 / :: as a destination (Linux connects those to loopback). A non-loopback address
    of this host reaching a wildcard listener is caught at run time (connection.py).
    """
    if port != listen.port:
        return False
    if isinstance(listen, UnixAddress) or is_unix(address):  # a socket file is reached by its path only
        return address == listen.host
    if address.lower() in LOOPBACK_NAMES:
        return lands_on("127.0.0.1", port, listen) or lands_on("::1", port, listen)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    here = str(ip)
    if here == listen.host:
        return True
    wildcard, loopback = ("0.0.0.0", "127.0.0.1") if ip.version == 4 else ("::", "::1")
    if listen.host == wildcard:
        return (ip.is_loopback and here != DOCKER_DNS) or ip.is_unspecified
    return ip.is_unspecified and listen.host == loopback


def _check_not_itself(routes: list[Route], sources: list[str]) -> None:
    """A route whose target is one of the relay's own listen sockets would forward each connection back
    into the relay, which forwards it again, until max_connections is exhausted."""
    by_port: dict[
        tuple[int, str], list[tuple[Route, HostPort | UnixAddress]]
    ] = {}  # all pairs took minutes for 1-65535
    for other in routes:
        for hp in other.listen:
            by_port.setdefault((hp.port, other.protocol), []).append((other, hp))
    for route, source in zip(routes, sources, strict=True):
        for other, hp in by_port.get((route.target_port, route.target_protocol or route.protocol), ()):
            if lands_on(route.target, route.target_port, hp):
                whose = "its own" if other is route else f"route {other.name}'s"
                target = format_target(route.target, route.target_port)
                raise ConfigError(
                    f"{source}: route {route.name} forwards to {target}, which is {whose} listen address "
                    f"{hp}: every connection would come back into the relay in a loop; expected a target "
                    "that is not this relay (auto for the Docker host, another host, or another port)"
                )


def load(
    cli: Mapping[str, Raw],
    environ: Mapping[str, str] | None = None,
    config_path: str | None = None,
    *,
    need_routes: bool = True,
) -> Config:
    """defaults < file < env < CLI. `config_path` is --config; RELAY_CONFIG is its env form."""
    environ = os.environ if environ is None else environ
    env_raw, warnings = from_env(environ)
    path = config_path or environ.get("RELAY_CONFIG") or None
    if _docker_host_layout(environ, cli, path):
        warnings.extend(_as_docker_host(environ["PORTS"], env_raw))
    merged: dict[str, Raw] = {}
    if path:
        merged.update(from_file(path))
    merged.update(env_raw)
    merged.update(cli)
    return build(merged, config_file=path, warnings=tuple(warnings), need_routes=need_routes)
