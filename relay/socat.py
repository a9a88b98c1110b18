"""socat's argv for the relay case, turned into the same raw settings the CLI gives.

    relay [-d…] [-b N] [-t S] [-T S] [-4|-6] TCP-LISTEN:port[,opts] TCP:host:port[,opts]
    relay [-d…] [-T S] [-4|-6] UDP-LISTEN:port[,opts] UDP:host:port[,opts]     (also UDP-RECVFROM:port,fork)
    relay [-d…] TCP-LISTEN:port[,opts] UNIX-CONNECT:/path                       (also UNIX-CLIENT)
    relay [-d…] UNIX-LISTEN:/path[,fork][,mode=0666][,unlink-early] TCP:host:port[,opts]
    relay [-d…] OPENSSL-LISTEN:port,cert=PEM[,key=PEM][,cafile=PEM][,verify=0|1][,opts] TCP:host:port
    relay [-d…] TCP-LISTEN:port[,opts] OPENSSL:host:port[,cafile=PEM][,verify=0|1][,commonname=NAME]
                [,openssl-no-sni][,cert=PEM,key=PEM]                              (also OPENSSL-CONNECT)

so that a compose file written for alpine/socat only swaps its image. Differences from socat, on purpose:
a listener without bind= also listens on ::1 (clients whose localhost is ::1 connect too), and a
half-closed connection is not cut after 0.5 s unless -t is given.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from relay.access import parse_range
from relay.address import (
    UNIX,
    AddressError,
    check_host,
    excerpt,
    format_hostport,
    parse_duration,
    parse_ip,
    parse_port,
    parse_unix,
    whole_number,
)
from relay.config import ConfigError, Raw

SOURCE = "socat argument"
LISTEN_FORM = (
    "expected TCP-LISTEN:PORT[,options] (also TCP-L, TCP4-LISTEN, TCP6-LISTEN, OPENSSL-LISTEN) or "
    "UDP-LISTEN:PORT[,options] "
    "(also UDP4-LISTEN, UDP6-LISTEN, UDP-RECVFROM:PORT,fork) or UNIX-LISTEN:/PATH[,mode=0660]"
)
CONNECT_FORM = (
    "expected TCP:HOST:PORT[,options] (also TCP-CONNECT, TCP4, TCP6, OPENSSL, OPENSSL-CONNECT) or "
    "UDP:HOST:PORT (also UDP-CONNECT, UDP4, UDP6, UDP-SENDTO) or UNIX-CONNECT:/PATH (also UNIX-CLIENT)"
)
LISTEN_KEYWORDS = {
    "tcp-listen": "any",
    "tcp-l": "any",
    "tcp4-listen": "ipv4",
    "tcp4-l": "ipv4",
    "tcp6-listen": "ipv6",
    "tcp6-l": "ipv6",
    "udp-listen": "any",
    "udp4-listen": "ipv4",
    "udp6-listen": "ipv6",
    "udp-recvfrom": "any",
    "udp4-recvfrom": "ipv4",
    "udp6-recvfrom": "ipv6",
    "openssl-listen": "any",
}
CONNECT_KEYWORDS = {
    "tcp": "any",
    "tcp-connect": "any",
    "tcp4": "ipv4",
    "tcp4-connect": "ipv4",
    "tcp6": "ipv6",
    "tcp6-connect": "ipv6",
    "udp": "any",
    "udp-connect": "any",
    "udp4": "ipv4",
    "udp4-connect": "ipv4",
    "udp6": "ipv6",
    "udp6-connect": "ipv6",
    "udp-sendto": "any",
    "udp4-sendto": "ipv4",
    "udp6-sendto": "ipv6",
    "openssl": "any",
    "openssl-connect": "any",
}
# TLS options (relay/tls.py), by socat's names and aliases -> the relay's settings key.
TLS_LISTEN_OPTIONS = {
    "cert": "cert",
    "certificate": "cert",
    "openssl-certificate": "cert",
    "key": "key",
    "openssl-key": "key",
    "cafile": "cafile",
    "openssl-cafile": "cafile",
    "verify": "verify",
    "openssl-verify": "verify",
    "commonname": "commonname",
    "cn": "commonname",
    "openssl-commonname": "commonname",
}
TLS_CONNECT_OPTIONS = {
    **TLS_LISTEN_OPTIONS,
    "commonname": "server_name",
    "cn": "server_name",
    "openssl-commonname": "server_name",
    "no-sni": "no_sni",
    "openssl-no-sni": "no_sni",
}
# Socket files: a stream like TCP. UNIX-LISTEN is the first address, UNIX-CONNECT the second.
UNIX_LISTEN = ("unix-listen", "unix-l")
UNIX_CONNECT = ("unix-connect", "unix-client", "unix")
UNIX_LISTEN_FORM = "expected UNIX-LISTEN:/PATH[,fork][,mode=0660][,unlink-early] (also UNIX-L)"
UNIX_CONNECT_FORM = "expected UNIX-CONNECT:/PATH (also UNIX-CLIENT, UNIX)"
# UNIX-LISTEN options without effect: the relay forks anyway, replaces a stale socket file (one nobody
# listens on) itself and removes its file on a clean stop. unlink-early never removes a live socket.
UNIX_HARMLESS = {"fork", "unlink-early", "unlink-close", "reuseaddr"}
# Options that mean something for a TCP socket only; on a UDP address they are an error, not ignored.
TCP_ONLY = {
    "backlog",
    "max-children",
    "keepalive",
    "nodelay",
    "connect-timeout",
    "retry",
    "interval",
    "forever",
}
# Options accepted without effect: the relay always forks (one process, a task per connection),
# always sets SO_REUSEADDR and TCP_NODELAY.
HARMLESS = {"fork", "reuseaddr", "nodelay", "crlf-off", "mode", "perm"}
VALUE_FLAGS = {"-b", "-t", "-T"}
INT_MAX = 2**31 - 1
IGNORED_FLAGS = {"-v", "-x", "-ly", "-lu", "-lm", "-lh"}
# -ls is socat's "log to stderr", where the relay logs anyway; -ly/-lm take a syslog facility fused.
SAME_FLAGS = {"-ls"}
SYSLOG_FLAGS = ("-ly", "-lm", "-lp")
# Address types that cannot be a relay's end: the reason applies to any relay, in a container or not.
NOT_A_RELAY = {
    "exec": "runs a program for each connection (run it as a service and forward to its port)",
    "system": "runs a shell command for each connection (run it as a service and forward to its port)",
    "pty": "makes a pseudo-terminal, a local device",
    "vsock-connect": "reaches a VM socket (vsock), which a container's network namespace does not have",
    "vsock-listen": "listens on a VM socket (vsock), which a container's network namespace does not have",
    "vsock-l": "listens on a VM socket (vsock), which a container's network namespace does not have",
    "-": "is standard input and output, which a detached sidecar does not have",
    "stdio": "is standard input and output, which a detached sidecar does not have",
    "stdin": "is standard input, which a detached sidecar does not have",
    "stdout": "is standard output, which a detached sidecar does not have",
    "stderr": "is standard error, which a detached sidecar does not have",
    "readline": "reads a terminal, which a detached sidecar does not have",
    "open": "opens a file, which is not a network endpoint",
    "create": "creates a file, which is not a network endpoint",
    "file": "opens a file, which is not a network endpoint",
    "pipe": "echoes data back within socat instead of reaching a target",
}
NOT_A_RELAY_FORM = (
    "the relay forwards a TCP, UDP or socket-file listener to a network target or a socket file"
)
# Options of socket files; socat itself refuses them on a TCP or UDP address (it takes mode= and perm=
# there, without effect on a socket: HARMLESS).
FILE_ONLY = {"unlink-early", "unlink-close"}
# A listen address's retry= retries a failed bind in socat; the relay exits 1 on a taken port instead.
LISTEN_RETRY = {"retry", "interval", "forever"}


@dataclass(frozen=True, slots=True)
class SocatArgs:
    raw: dict[str, Raw]
    debug_level: int
    notes: tuple[str, ...]


_ADDRESS = re.compile(r"^[A-Za-z][A-Za-z0-9-]*:")


def looks_like_socat(argv: list[str]) -> bool:
    """socat's argv has KEYWORD:... addresses. The value after one of the relay's own --options does not
    count: an IPv6 address starts the same way (`--target fd00::1` was taken for socat's argv)."""
    after_option = False
    for arg in argv:
        if not after_option and _ADDRESS.match(arg):
            return True
        after_option = arg.startswith("--") and "=" not in arg
    return False


def parse(argv: list[str]) -> SocatArgs:
    raw: dict[str, Raw] = {}
    notes: list[str] = []
    debug = 0
    addresses: list[str] = []
    unsupported: str | None = None
    args = iter(argv)
    for arg in args:
        if not arg.startswith("-") or arg == "-":
            addresses.append(arg)
        elif set(arg[1:]) == {"d"}:
            debug += len(arg) - 1
        elif arg in VALUE_FLAGS:
            value = next(args, None)
            if value is None:
                raise ConfigError(f"{SOURCE} {arg}: missing its value")
            _flag(arg, value, raw)
        elif arg[:2] in VALUE_FLAGS:  # -T3: socat also takes the value fused to its flag
            _flag(arg[:2], arg[2:], raw)
        elif arg in SAME_FLAGS:
            continue
        elif arg.startswith(SYSLOG_FLAGS):
            notes.append(f"socat flag {arg} (syslog) has no equivalent in relay; it logs to stderr")
        elif arg in ("-4", "-6"):
            raw["family"] = Raw("ipv4" if arg == "-4" else "ipv6", f"{SOURCE} {arg}")
        elif arg in IGNORED_FLAGS:
            notes.append(f"socat flag {arg} has no equivalent in relay; ignored")
        else:
            unsupported = unsupported or arg
    if len(addresses) == 2:
        _refuse_non_relay(addresses)  # the more basic reason, when a line has both (-u with OPEN:)
    if unsupported is not None:
        raise ConfigError(
            f"{SOURCE} {excerpt(unsupported)}: not supported; "
            "expected -d, -b N, -t S, -T S, -4 or -6 and two addresses"
        )
    if len(addresses) != 2:
        raise ConfigError(
            f"{SOURCE}s {excerpt(' '.join(addresses))}: expected exactly two addresses, "
            "TCP-LISTEN:PORT[,options] then TCP:HOST:PORT[,options]"
        )
    addresses[1] = _bare_path(addresses[1], notes)
    if _keyword(addresses[0]) in UNIX_LISTEN or _keyword(addresses[1]) in UNIX_CONNECT:
        _unix_pair(addresses, raw, notes)
    else:
        _listen_address(addresses[0], raw, notes)
        _connect_address(addresses[1], raw)
        _same_protocol(addresses, raw)
    return SocatArgs(raw, debug, tuple(notes))


def _keyword(address: str) -> str:
    return _split(address)[0]


def _refuse_non_relay(addresses: list[str]) -> None:
    """Programs, terminals, files, standard I/O and VM sockets: one line saying why a relay has none."""
    for address in addresses:
        keyword = _keyword(address)
        if keyword in NOT_A_RELAY:
            shown = address if len(address) <= 60 else address[:57] + "..."
            raise ConfigError(
                f"{SOURCE} {excerpt(shown)}: {'STDIO' if keyword == '-' else keyword.upper()} "
                f"{NOT_A_RELAY[keyword]}; {NOT_A_RELAY_FORM}"
            )
    if _is_path(addresses[0]):
        raise ConfigError(
            f"{SOURCE} {excerpt(addresses[0])}: a bare path (socat's GOPEN) opens an existing file, which "
            "cannot be listened on; expected UNIX-LISTEN:/PATH"
        )


def _is_path(address: str) -> bool:
    """socat reads an address that starts like a path as GOPEN."""
    return address.startswith(("/", "./", "../"))


def _bare_path(address: str, notes: list[str]) -> str:
    """A bare path as the target is socat's GOPEN, which connects when the file is a socket: the relay
    takes it as UNIX-CONNECT (a regular file or a device is no relay target, and fails at connect)."""
    if not _is_path(address):
        return address
    notes.append(f"socat address {excerpt(address)} is read as UNIX-CONNECT:{address} (a socket file)")
    return f"unix-connect:{address}"


def _unix_pair(addresses: list[str], raw: dict[str, Raw], notes: list[str]) -> None:
    """A socket file at one end or both: UNIX-LISTEN (a route of its own, for its mode) or TCP-LISTEN as
    the first address, UNIX-CONNECT or TCP as the second."""
    listen, connect = addresses
    if _protocol(listen) == "udp" or _protocol(connect) == "udp":
        raise ConfigError(
            f"{SOURCE}s {excerpt(' '.join(addresses))}: a socket file carries a stream, not datagrams; "
            "expected "
            "UNIX-LISTEN:/PATH with TCP:HOST:PORT, or TCP-LISTEN:PORT with UNIX-CONNECT:/PATH"
        )
    if _keyword(connect) in UNIX_CONNECT:
        target = _unix_path(connect, UNIX_CONNECT_FORM, set())
    else:
        target = format_hostport(*_connect_target(connect, raw))
    if _keyword(listen) not in UNIX_LISTEN:
        _listen_address(listen, raw, notes)
        raw["ports"] = Raw(f"{raw['ports'].value}:{target}", raw["ports"].source)
        return
    where = f"{SOURCE} {excerpt(listen)}"
    route = {"listen": _unix_path(listen, UNIX_LISTEN_FORM, UNIX_HARMLESS), "target": target}
    for option in _split(listen)[2]:
        name, _, value = option.partition("=")
        name = name.lower()
        if name in ("mode", "perm"):  # perm= chmods after creating, mode= while: the same bits result
            route["mode"] = value
        elif name == "backlog":
            raw["backlog"] = Raw(value, where)
        elif name == "max-children":
            raw["max_connections"] = Raw(value, where)
    raw["routes"] = Raw([route], where)


def _unix_path(address: str, form: str, allowed: set[str]) -> str:
    """`unix:/PATH` of a UNIX-LISTEN or UNIX-CONNECT address; its options checked against `allowed` (and
    mode=, backlog=, max-children= for a listener)."""
    where = f"{SOURCE} {excerpt(address)}"
    keyword, params, options = _split(address)
    if keyword not in (UNIX_LISTEN if allowed else UNIX_CONNECT):
        expected = "a TCP or UDP listen" if allowed else "a TCP or UDP connect"
        raise ConfigError(f"{where}: {excerpt(keyword.upper())} is not {expected} address here; {form}")
    try:
        path = parse_unix(":".join(params))
    except AddressError as err:
        raise ConfigError(f"{where}: {err}") from None
    for option in options:
        name = option.partition("=")[0].lower()
        if name not in allowed and not (allowed and name in ("mode", "perm", "backlog", "max-children")):
            supported = (
                ", ".join(sorted(allowed | {"mode=", "perm=", "backlog=", "max-children="}))
                if allowed
                else ""
            )
            raise ConfigError(
                f"{where}: option {excerpt(option)} is not supported on {keyword.upper()}; "
                + (f"supported: {supported}" if allowed else "expected no options")
            )
    return UNIX + path


def _protocol(address: str) -> str:
    return "udp" if address.lower().startswith("udp") else "tcp"


def _same_protocol(addresses: list[str], raw: dict[str, Raw]) -> None:
    """Both addresses UDP, or both TCP; a UDP pair gets /udp on its port and UDP's settings."""
    listen, connect = (_protocol(a) for a in addresses)
    if (listen, connect) == ("udp", "tcp"):
        _udp_to_tcp(addresses, raw)
        return
    if listen != connect:
        raise ConfigError(
            f"{SOURCE}s {excerpt(' '.join(addresses))}: a {listen.upper()} listener cannot forward to a "
            f"{connect.upper()} target; expected both TCP (TCP-LISTEN:P TCP:HOST:P), both UDP "
            "(UDP-LISTEN:P UDP:HOST:P), or UDP-LISTEN:P TCP:HOST:P"
        )
    if listen == "udp":
        ports = raw["ports"]
        raw["ports"] = Raw(f"{ports.value}/udp", ports.source)
        for tcp_key, udp_key in (("idle_timeout", "udp_idle_timeout"),):
            if tcp_key in raw:  # -T: socat's inactivity timeout is the UDP session's idle timeout
                raw[udp_key] = raw.pop(tcp_key)
        if "half_close_timeout" in raw:
            raise ConfigError(
                f"{raw['half_close_timeout'].source}: UDP has no half-close; expected -T for UDP"
            )


def _udp_to_tcp(addresses: list[str], raw: dict[str, Raw]) -> None:
    """UDP-LISTEN (or UDP-RECVFROM,fork) to TCP: a route of its own, each client's datagrams written to
    its TCP connection (relay/udp_stream.py). -T is the session's idle timeout, as for UDP."""
    listen_port, _, target_port = str(raw.pop("ports").value).partition(":")
    host = raw.pop("target").value
    route = {
        "listen": listen_port,
        "target": format_hostport(str(host), int(target_port)),
        "protocol": "udp",
        "target_protocol": "tcp",
    }
    raw["routes"] = Raw([route], f"{SOURCE}s {excerpt(' '.join(addresses))}")
    if "idle_timeout" in raw:
        raw["udp_idle_timeout"] = raw.pop("idle_timeout")


def _flag(flag: str, value: str, raw: dict[str, Raw]) -> None:
    where = f"{SOURCE} {flag}"
    try:
        if flag == "-b":
            if whole_number(value, INT_MAX) is None:
                raise AddressError(f"{excerpt(value)} is not a whole number; expected -b BYTES")
            # No effect: the event loop reads up to 256 KiB at a time (socat's default is 8 KiB).
        else:
            # Checked here, passed on as written: str(float) writes 0.00001 as 1e-05, not a duration.
            # -t, asked for explicitly, cuts half-closed connections after this long, as socat does.
            parse_duration(value)
            raw["half_close_timeout" if flag == "-t" else "idle_timeout"] = Raw(value, where)
    except AddressError as err:
        raise ConfigError(f"{where}: {err}") from None


def _split(address: str) -> tuple[str, list[str], list[str]]:
    """`KEYWORD:a:b,opt1,opt2=v` -> (keyword lowercased, [a, b], [opt1, opt2=v]). An empty option (a
    trailing comma, `fork,,reuseaddr`) is skipped, as socat skips it."""
    head, *all_options = address.split(",")
    options = [option for option in all_options if option]
    keyword, _, rest = head.partition(":")
    params = rest.split(":") if rest else []
    if rest.startswith("["):  # TCP6:[::1]:80; anything else after `]` (`[::1]80`, `[::1]:::80`) is not
        host, bracket, port = rest[1:].partition("]")
        params = [host, port[1:]] if bracket and port.startswith(":") else [rest]
    return keyword.lower(), params, options


def _parts(
    address: str, keywords: dict[str, str], what: str, count: int, form: str
) -> tuple[str, str, list[str], list[str]]:
    """(where, keyword, params, options) of one address, checked against its allowed keywords."""
    where = f"{SOURCE} {excerpt(address)}"
    keyword, params, options = _split(address)
    if keyword not in keywords:
        raise ConfigError(f"{where}: {excerpt(keyword.upper())} is not a supported {what} address; {form}")
    if len(params) != count:
        expected = "one port" if count == 1 else "HOST:PORT"
        raise ConfigError(f"{where}: expected {expected} after {keyword.upper()}; {form}")
    return where, keyword, params, options


def _port_or_service(text: str, keyword: str, form: str) -> int:
    """A port number, or a service name as socat takes it (`www` is 80: /etc/services, through NSS)."""
    if text.isascii() and text.isdigit():
        return parse_port(text, form)
    protocol = "udp" if keyword.startswith("udp") else "tcp"
    try:
        return socket.getservbyname(text, protocol)
    except (OSError, UnicodeError):
        raise AddressError(
            f"{excerpt(text)} is neither a port number nor a {protocol} service name of /etc/services; {form}"
        ) from None


def _listen_address(address: str, raw: dict[str, Raw], notes: list[str]) -> None:
    where, keyword, params, options = _parts(address, LISTEN_KEYWORDS, "listen", 1, LISTEN_FORM)
    _udp_options(keyword, options, where)
    try:
        port = _port_or_service(params[0], keyword, LISTEN_FORM)
    except AddressError as err:
        raise ConfigError(f"{where}: {err}") from None
    family = LISTEN_KEYWORDS[keyword]
    raw["ports"] = Raw(str(port), where)
    options = _tls_options(keyword, options, where, "tls", raw)
    bind: str | None = None
    for option in options:
        name, _, value = option.partition("=")
        name = name.lower()
        try:
            if name == "bind":
                bind = parse_ip(value, "expected bind=IP")
            elif name == "pf":
                family = _pf(value)
            elif name == "ipv6only":
                raw["ipv6only"] = Raw(value or "1", where)
            elif name == "range":
                if "allow" in raw:  # socat 1.7.4 applies the first range= and fails on the second
                    raise AddressError(
                        "socat takes one range= per address; expected a single range= (a config file's "
                        "allow: or RELAY_ALLOW takes several)"
                    )
                parse_range(value)
                raw["allow"] = Raw(value, where)
            elif name == "backlog":
                raw["backlog"] = Raw(value, where)
            elif name == "max-children":
                raw["max_connections"] = Raw(value, where)
            elif name == "reuseport":
                raw["reuseport"] = Raw(value or "true", where)
            elif name in LISTEN_RETRY:
                notes.append(
                    f"socat option {excerpt(option)} on a listen address retries a failed bind; the "
                    "relay exits "
                    "with code 1 when a port is taken, and the container's restart policy starts it again"
                )
            elif name == "ignoreeof":
                notes.append(
                    f"socat option {excerpt(option)}: the relay keeps a connection open after one side's EOF "
                    "until the other side closes too (unless -t is given), which is what ignoreeof is for"
                )
            else:
                _common_option(name, value, where, raw)
        except AddressError as err:
            raise ConfigError(f"{where}: option {excerpt(option)}: {err}") from None
    listen = [bind] if bind else {"any": ["0.0.0.0", "::1"], "ipv4": ["0.0.0.0"], "ipv6": ["::"]}[family]
    if all(":" in host for host in listen) and "ipv6only" not in raw:
        # socat leaves IPV6_V6ONLY to the kernel's default (net.ipv6.bindv6only, 0): [::] takes IPv4 too
        raw["ipv6only"] = Raw("0", f"{where} (socat's default)")
    raw["listen"] = Raw(listen, where)


def _connect_address(address: str, raw: dict[str, Raw]) -> None:
    host, port = _connect_target(address, raw)
    listen_port = raw["ports"].value
    raw["ports"] = Raw(f"{listen_port}:{port}", raw["ports"].source)
    raw["target"] = Raw(host, f"{SOURCE} {excerpt(address)}")


def _connect_target(address: str, raw: dict[str, Raw]) -> tuple[str, int]:
    """HOST and PORT of a TCP or UDP connect address; its options go into `raw`."""
    where, keyword, params, options = _parts(address, CONNECT_KEYWORDS, "connect", 2, CONNECT_FORM)
    _udp_options(keyword, options, where)
    try:
        host = check_host(params[0], CONNECT_FORM)
        port = _port_or_service(params[1], keyword, CONNECT_FORM)
    except AddressError as err:
        raise ConfigError(f"{where}: {err}") from None
    if CONNECT_KEYWORDS[keyword] != "any":
        raw["family"] = Raw(CONNECT_KEYWORDS[keyword], where)
    options = _tls_options(keyword, options, where, "target_tls", raw)
    retries: int | None = None
    interval = 1.0
    for option in options:
        name, _, value = option.partition("=")
        name = name.lower()
        try:
            if name == "connect-timeout":
                raw["connect_timeout"] = Raw(value, where)
            elif name == "retry":
                retries = _count(value)
            elif name == "interval":
                interval = parse_duration(value)
            elif name == "forever":
                retries = -1
            elif name == "bind":  # the source address of the target connection: config `source`
                raw["source"] = Raw(value, where)
            elif name == "pf":
                raw["family"] = Raw(_pf(value), where)
            else:
                _common_option(name, value, where, raw)
        except AddressError as err:
            raise ConfigError(f"{where}: option {excerpt(option)}: {err}") from None
    if retries is not None:
        # socat retries N times, `interval` apart; the relay retries refused connects for that long.
        # A number, not str(budget): that writes 1e+20 or 1e-05, which the duration parser refuses.
        budget = 365 * 86400.0 if retries < 0 else retries * interval
        raw["connect_retry"] = Raw(budget, where)
    return host, port


def _tls_options(keyword: str, options: list[str], where: str, key: str, raw: dict[str, Raw]) -> list[str]:
    """An OPENSSL address's TLS options as `raw[key]` (relay/tls.py settings); returns the other options.

    As socat, verify is on unless verify=0: OPENSSL-LISTEN then requires client certificates (checked
    against cafile, else the system store, which tls.py warns about), OPENSSL checks the target's.
    """
    if not keyword.startswith("openssl"):
        return options
    names = TLS_LISTEN_OPTIONS if key == "tls" else TLS_CONNECT_OPTIONS
    settings: dict[str, object] = {"verify": "1"}
    rest = []
    for option in options:
        name, eq, value = option.partition("=")
        setting = names.get(name.lower())
        if setting is None:
            if name.lower() in TLS_CONNECT_OPTIONS or name.lower().startswith("openssl-"):
                supported = ", ".join(sorted(names))
                raise ConfigError(
                    f"{where}: option {excerpt(option)} is not supported here; supported: {supported}"
                )
            rest.append(option)
        elif setting == "server_name" and not value.strip("\"'"):
            continue  # commonname="" (seen with verify=0): no name given, as in socat
        elif setting == "no_sni":  # a bare flag is on, as socat's booleans
            settings["sni"] = (
                "0" if (value.strip().lower() if eq else "1") not in ("0", "false", "no") else "1"
            )
        else:
            settings[setting] = value if eq else "1"
    raw[key] = Raw(settings, where)
    return rest


def _udp_options(keyword: str, options: list[str], where: str) -> None:
    """What a UDP address cannot honour: TCP's options, and RECVFROM without fork (socat then answers one
    datagram and exits; the relay serves every client)."""
    if not keyword.startswith("udp"):
        return
    names = [option.partition("=")[0].lower() for option in options]
    for option, name in zip(options, names, strict=True):
        if name in TCP_ONLY:
            raise ConfigError(
                f"{where}: option {excerpt(option)} applies to TCP only; UDP addresses take fork, reuseaddr, "
                "reuseport and bind="
            )
    if keyword.endswith("recvfrom") and "fork" not in names:
        raise ConfigError(
            f"{where}: {keyword.upper()} without fork relays one datagram and exits in socat; the relay "
            f"serves every client; expected {keyword.upper()}:PORT,fork (or UDP-LISTEN:PORT)"
        )


def _count(value: str) -> int:
    """socat's counts are C ints. (str.isdigit() and int() let '²' and 5000 digits escape as ValueError.)"""
    number = whole_number(value, INT_MAX)
    if number is None:
        raise AddressError(f"{excerpt(value)} is not a whole number from 0 to {INT_MAX}")
    return number


def _pf(value: str) -> str:
    """socat's pf=ip4|ip6 (also inet, inet6), as a family."""
    family = {"ip4": "ipv4", "ipv4": "ipv4", "inet": "ipv4", "ip6": "ipv6", "ipv6": "ipv6", "inet6": "ipv6"}
    found = family.get(value.strip().lower())
    if found is None:
        raise AddressError(f"{excerpt(value)} is not a protocol family; expected pf=ip4 or pf=ip6")
    return found


def _common_option(name: str, value: str, where: str, raw: dict[str, Raw]) -> None:
    """Options valid on either address."""
    if name == "keepalive":
        raw["keepalive"] = Raw(value or "true", where)
    elif name in ("su", "su-d", "substuser", "substuser-delayed"):
        # the relay drops to the user after binding, which is what su-d is for; su= comes to the same
        raw["user"] = Raw(value, where)
    elif name in HARMLESS:
        return
    elif name in FILE_ONLY:
        raise AddressError(
            f"{excerpt(name)} applies to socket files (UNIX-LISTEN) only; socat refuses it here too"
        )
    else:
        raise AddressError(
            f"{excerpt(name)} is not supported; supported: fork, reuseaddr, reuseport, bind=, backlog=, "
            "max-children=, connect-timeout=, keepalive, nodelay, retry=, interval=, forever, range=, su=, "
            "pf=, ipv6only="
        )
