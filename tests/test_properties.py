"""Property-based tests (hypothesis) for every parser: ports, durations, host:port, socat argv, YAML.

Two kinds of property:
- robustness: for arbitrary input (unicode, control characters, huge numbers, empty, near-valid forms)
  a parser returns a value or raises its one error type (AddressError, ConfigError) whose message is a
  single line that quotes the input; never another exception, and what it accepts is well formed;
- round-trip: valid values, written the way a user writes them, parse back to the generating value.

Determinism: every test runs under `PROPERTY` (derandomize=True, database=None): the examples are a
fixed function of the code (the tests, the literals hypothesis collects from relay/, its own version),
so every run of one commit sees the same examples and a failure reproduces exactly; no example database
is read or written, so no earlier run's failures are replayed. 200 examples a property (100 for the
YAML round-trip, 25 for deep nesting): the file takes about 15 s of CPU.

`relay.cli.main` may start a server on good input, so it is called only for argv/env that
`relay.cli.parse` rejects; accepted argv is checked through `parse` alone.
"""

from __future__ import annotations

import ast
import contextlib
import io
import ipaddress
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from relay import cli, socat
from relay.address import (
    AddressError,
    HostPort,
    PortMap,
    UnixAddress,
    check_host,
    format_hostport,
    parse_duration,
    parse_hostport,
    parse_ip,
    parse_port,
    parse_port_item,
    parse_ports,
)
from relay.config import FILE_KEYS, OPTIONS, ROUTE_KEYS, Config, ConfigError, Raw, Route, build, load

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- strategies: junk ------------------------------------------------------------------------------------

# Characters that matter to the grammars, plus ones that look like digits or breaks but are not ASCII.
GRAMMAR = [*"0123456789-:,/ []tcpTCPudmsh.xfe+_%=\n\t\r\x00\x0b\x85\u2028²٣", "::", "tcp", "ms"]
HUGE = st.builds(lambda d, n: d * n, st.sampled_from(["9", "0", "1", "٣"]), st.integers(300, 6000))
junk = st.one_of(
    st.text(max_size=30),
    st.lists(st.sampled_from(GRAMMAR), max_size=20).map("".join),
    HUGE,
    st.builds(lambda a, b: a + b, HUGE, st.sampled_from(["", "s", "ms", ":80", "-1"])),
)


def _literals(message: str) -> set[str]:
    """Every Python string literal (as repr() writes them) in an error message."""
    found: set[str] = set()
    literal = re.compile(r"""'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*\"""")
    for start in (i for i, ch in enumerate(message) if ch in "'\""):
        match = literal.match(message, start)
        if match:
            with contextlib.suppress(ValueError, SyntaxError):
                value = ast.literal_eval(match.group())
                if isinstance(value, str):
                    found.add(value)
    return found


def assert_one_line(err: Exception) -> str:
    message = str(err)
    assert message, f"{type(err).__name__} with no message"
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, message
    return message


def assert_quotes(err: Exception, *inputs: str) -> None:
    """One line that quotes (repr) a non-empty piece of the input (or the blank input itself)."""
    message = assert_one_line(err)
    quoted = _literals(message)
    if any(not text.strip() for text in inputs):
        return
    assert any(q.strip() and q in text for q in quoted for text in inputs), (message, inputs)


def well_formed_host(host: str) -> None:
    """What a parser hands on as a host: printable, no spaces, an IP or a name not ending in a number."""
    assert host and host.isprintable() and not any(ch.isspace() for ch in host), repr(host)
    assert not host.startswith("["), host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        assert host.isascii() and not host.rstrip(".").rpartition(".")[2].isdigit(), host


# --- strategies: valid values ----------------------------------------------------------------------------

ports = st.integers(1, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
label = st.from_regex(r"[a-z0-9_][a-z0-9-]{0,20}", fullmatch=True)
hostname = st.builds(
    lambda labels, last: ".".join([*labels, last]),
    st.lists(label, max_size=3),
    label.filter(lambda t: not t.isdigit()),
)
host = st.one_of(hostname, ipv4, ipv6)


def _elsewhere(host: str) -> bool:
    """Not a name or address of this host: a route to it cannot loop back into the relay."""
    if host.lower().startswith(("localhost", "ip6-")):
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_loopback or ip.is_unspecified)


remote = host.filter(_elsewhere)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@st.composite
def port_spec(draw: st.DrawFn) -> tuple[str, tuple[PortMap, ...]]:
    """A docker-host style list of disjoint items and the maps it means, as a user would write it."""
    starts = sorted(draw(st.sets(st.integers(1, 65000), min_size=1, max_size=6)))
    items: list[str] = []
    maps: list[PortMap] = []
    for i, lo in enumerate(starts):
        room = (starts[i + 1] if i + 1 < len(starts) else 65536) - lo
        hi = lo + draw(st.integers(0, min(room - 1, 20)))
        kind = draw(st.sampled_from(["port", "range", "map", "fan-in", "shift"]))
        target = draw(ports)
        if kind == "port" or (kind == "range" and hi == lo):
            text, pairs = str(lo), [(lo, lo)]
        elif kind == "range":
            text, pairs = f"{lo}-{hi}", [(p, p) for p in range(lo, hi + 1)]
        elif kind == "map":
            text, pairs = f"{lo}:{target}", [(lo, target)]
        elif kind == "fan-in":
            text, pairs = f"{lo}-{hi}:{target}", [(p, target) for p in range(lo, hi + 1)]
        else:
            tlo = draw(st.integers(1, 65535 - (hi - lo)))
            text, pairs = f"{lo}-{hi}:{tlo}-{tlo + hi - lo}", [(p, tlo + p - lo) for p in range(lo, hi + 1)]
        if draw(st.booleans()):
            text += draw(st.sampled_from(["/tcp", "/TCP"]))
        items.append(text)
        maps.extend(PortMap(a, b) for a, b in pairs)
    order = draw(st.permutations(range(len(items))))
    text = ""
    expected: list[PortMap] = []
    for index in order:
        text += items[index] + draw(st.sampled_from([" ", ",", ", ", "\n", "\t", " , "]))
        expected.extend(m for m in maps if isinstance(m.listen, int) and _item_of(m.listen, starts) == index)
    return text, tuple(expected)


def _is_end(end: int | UnixAddress) -> bool:
    """A port, or a socket file by its absolute path (`L:unix:PATH`, `unix:PATH:T`)."""
    return end.path.startswith("/") if isinstance(end, UnixAddress) else 1 <= end <= 65535


def _item_of(port: int, starts: list[int]) -> int:
    return max(i for i, lo in enumerate(starts) if lo <= port)


UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


@st.composite
def duration(draw: st.DrawFn, positive: bool = False) -> tuple[str, float]:
    """(text, seconds): `5s`, `250ms`, `1.5m`, `.5h`, plain seconds, small and huge."""
    whole = draw(st.one_of(st.integers(0, 10**6), st.integers(0, 10**25)))
    frac = draw(st.one_of(st.none(), st.from_regex(r"[0-9]{1,8}", fullmatch=True)))
    if positive and whole == 0 and (frac is None or not frac.strip("0")):
        whole = 1
    number = str(whole) if frac is None else draw(st.sampled_from([f"{whole}.{frac}", f".{frac}"]))
    if number.startswith(".") and whole:
        number = f"{whole}.{frac}"
    # str() of these floats uses an exponent (1e-05, 1e+20): values must not pass through str(float).
    number = draw(
        st.one_of(st.just(number), st.sampled_from(["0.00001", "0.00005", "100000000000000000000"]))
    )
    unit = draw(st.sampled_from(list(UNITS)))
    space = draw(st.sampled_from(["", "", " "])) if unit else ""
    text = number + space + draw(st.sampled_from([unit, unit.upper()]))
    return text, float(number) * UNITS[unit]


# --- 1. robustness: arbitrary text -----------------------------------------------------------------------


@PROPERTY
@given(junk)
def test_parse_port_returns_a_port_or_one_line_error(text: str) -> None:
    try:
        port = parse_port(text)
    except AddressError as err:
        assert_quotes(err, text)
    else:
        assert 1 <= port <= 65535 and text.isascii()


@PROPERTY
@given(st.one_of(junk, st.builds("{}-{}".format, junk, junk), st.builds("{}:{}".format, junk, junk)))
def test_parse_port_item_returns_maps_or_one_line_error(text: str) -> None:
    try:
        maps = parse_port_item(text)
    except AddressError as err:
        assert_quotes(err, text)
    else:
        assert maps and all(_is_end(m.listen) and _is_end(m.target) for m in maps)


@PROPERTY
@given(st.lists(st.one_of(junk, port_spec().map(lambda s: s[0])), max_size=4).map(" ".join))
def test_parse_ports_returns_unique_listen_ports_or_one_line_error(text: str) -> None:
    try:
        maps = parse_ports(text)
    except AddressError as err:
        assert_quotes(err, text)
    else:
        listens = [(m.listen, getattr(m, "protocol", "tcp")) for m in maps]  # once per protocol
        assert len(set(listens)) == len(listens)
        assert all(_is_end(m.listen) and _is_end(m.target) for m in maps)


@PROPERTY
@given(st.one_of(junk, duration().map(lambda d: d[0] + "x"), duration().map(lambda d: "-" + d[0])))
def test_parse_duration_returns_finite_seconds_or_one_line_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except AddressError as err:
        assert_quotes(err, text)
    else:
        assert math.isfinite(seconds) and seconds >= 0
        assert re.fullmatch(r"[0-9.]+\s*[a-zA-Z]*", text.strip()), text


near_hostport = st.one_of(
    junk,
    st.builds("{}:{}".format, st.one_of(host, junk), st.one_of(ports.map(str), junk)),
    st.builds("[{}]:{}".format, st.one_of(ipv6, junk), st.one_of(ports.map(str), junk)),
    st.builds("{}%{}".format, ipv6, junk),
    st.builds("[{}%{}]:80".format, ipv6, junk),
)


@PROPERTY
@given(near_hostport, st.one_of(st.none(), ports))
def test_parse_hostport_returns_a_clean_pair_or_one_line_error(text: str, default: int | None) -> None:
    try:
        hp = parse_hostport(text, default_port=default)
    except AddressError as err:
        assert_quotes(err, text)
    else:
        assert 1 <= hp.port <= 65535
        well_formed_host(hp.host)
        assert check_host(hp.host) == hp.host
        # Nothing of the text is dropped: it is HOST:PORT, [HOST]:PORT or (with a default port) HOST.
        said = rf"\[?{re.escape(hp.host)}\]?(:0*{hp.port})?"
        assert re.fullmatch(said, text.strip()), (hp, text)
        assert default is not None or ":" in text.strip().removeprefix(f"[{hp.host}]")


@PROPERTY
@given(st.one_of(near_hostport, st.builds("{}%{}".format, ipv6, junk)))
def test_check_host_and_parse_ip_accept_only_clean_hosts(text: str) -> None:
    try:
        checked = check_host(text)
    except AddressError as err:
        assert_quotes(err, text)
    else:
        well_formed_host(checked)
    try:
        ip = parse_ip(text)
    except AddressError as err:
        assert_quotes(err, text)
    else:
        well_formed_host(ip)
        assert str(ipaddress.ip_address(ip)) == ip


# --- socat argv ------------------------------------------------------------------------------------------

socat_option = st.one_of(
    st.sampled_from(["fork", "reuseaddr", "nodelay", "keepalive", "reuseport", "forever", "ipv6only"]),
    st.builds(
        "{}={}".format,
        st.sampled_from(
            ["bind", "backlog", "max-children", "connect-timeout", "retry", "interval", "keepalive", "su"]
        ),
        st.one_of(junk, ports.map(str), duration().map(lambda d: d[0]), ipv4, ipv6),
    ),
    junk,
)
KEYWORDS = st.sampled_from([*socat.LISTEN_KEYWORDS, *socat.CONNECT_KEYWORDS, "udp", "TCP-LISTEN", "x"])


# `[v6]` and a port with the separator right or wrong: `[::1]:80`, `[::1]80`, `[::1]:::80`.
BRACKETED = st.builds("[{}]{}{}".format, ipv6, st.sampled_from([":", "", ":::", "]:"]), ports)


def _socat_address(keyword: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.builds(
        lambda keyword, params, options: ",".join([f"{keyword}:{':'.join(params)}", *options]),
        keyword,
        st.lists(
            st.one_of(ports.map(str), host, st.builds("[{}]".format, ipv6), BRACKETED, junk), max_size=3
        ),
        st.lists(socat_option, max_size=4),
    )


socat_address = _socat_address(st.one_of(KEYWORDS, junk))
socat_flag = st.one_of(
    st.sampled_from(["-d", "-dd", "-4", "-6", "-v", "-x", "-u", "-", "--", "-b", "-t", "-T"]),
    st.from_regex(r"-[bdtT]", fullmatch=True),
)
socat_item = st.one_of(socat_address, socat_flag, junk, duration().map(lambda d: d[0]))
# At least one KEYWORD:... address, as relay.cli requires before it reads argv the socat way.
socat_argv = st.builds(
    lambda before, address, after: [*before, address, *after],
    st.lists(socat_item, max_size=4),
    _socat_address(KEYWORDS),
    st.lists(socat_item, max_size=3),
)
# A good listener and a connect address whose HOST:PORT part is the one thing in doubt.
near_socat_argv = st.builds(
    lambda listen, keyword, rest, options: [listen, ",".join([f"{keyword}:{rest}", *options])],
    st.sampled_from(["tcp-listen:80", "TCP-L:8000,fork,reuseaddr", "tcp6-listen:1"]),
    st.sampled_from(["tcp", "TCP6", "tcp4-connect"]),
    st.one_of(
        BRACKETED,
        st.builds(format_hostport, host, ports),
        st.builds("{}:{}".format, host, junk),
        st.builds("{}:{}".format, junk, ports),
        junk,
    ),
    st.lists(socat_option, max_size=2),
)


@PROPERTY
@given(st.one_of(socat_argv, near_socat_argv))
def test_socat_argv_gives_settings_or_one_line_error(argv: list[str]) -> None:
    try:
        config = load(socat.parse(argv).raw, {})
    except ConfigError as err:
        # Names the culprit: quotes an argument (even ''), a piece of one, or the addresses together
        # (space-joined, flags left out); or names a flag as it is (`-b: missing its value`).
        message = assert_one_line(err)
        joined = " ".join(argv)
        quoted = _literals(message)
        assert any(
            q in argv or (q.strip() and all(p in joined for p in q.split(" "))) for q in quoted
        ) or any(a.strip() and a.isprintable() and a in message for a in argv), (message, argv)
    else:
        (route,) = config.routes
        well_formed_host(route.target)
        # What was read is what one argument says: KEYWORD:HOST:PORT or KEYWORD:[HOST]:PORT, nothing lost.
        said = rf"[A-Za-z0-9-]+:\[?{re.escape(route.target)}\]?:0*{route.target_port}(,.*)?"
        assert any(re.fullmatch(said, a, re.S) for a in argv), (route, argv)


# --- config: raw values from any source, and YAML files --------------------------------------------------

NEAR = [
    "5432",
    "80:8080",
    "1-3",
    "off",
    "auto",
    "5s",
    "0",
    "127.0.0.1",
    "::1",
    "[::1]:6000",
    "127.0.0.1:6000",
    "x:1",
    "localhost",
    "true",
    "uvloop",
    "json",
    "debug",
]
scalar = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.sampled_from(NEAR),
    junk,
)
yaml_value = st.recursive(
    scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.sampled_from([*ROUTE_KEYS, *FILE_KEYS]), st.text(max_size=6)), inner, max_size=4
        ),
    ),
    max_leaves=12,
)
route_entry = st.one_of(
    yaml_value,
    # Near-valid: the name, listen or target is the one odd part.
    st.fixed_dictionaries(
        {
            "listen": st.one_of(
                ports, ports.map(str), st.builds(format_hostport, st.one_of(ipv4, ipv6), ports)
            ),
            "target": st.one_of(remote, st.builds(format_hostport, remote, ports)),
        },
        optional={"name": st.one_of(scalar, st.sampled_from(["cache", "tcp/5432", "a\nb", " "]))},
    ),
    st.fixed_dictionaries(
        {"listen": st.one_of(scalar, st.lists(scalar, max_size=3)), "target": st.one_of(remote, junk)}
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.one_of(scalar, yaml_value),
            "listen": st.one_of(scalar, st.lists(scalar, max_size=3)),
            "target": scalar,
        },
    ),
)
raw_values = st.dictionaries(
    st.sampled_from([o.key for o in OPTIONS]),
    st.one_of(scalar, st.lists(scalar, max_size=3)),
    max_size=5,
)


def assert_config_error(err: ConfigError, sources: Iterable[str]) -> None:
    """One line that starts with the source of the bad value (or says there is nothing to forward)."""
    message = assert_one_line(err)
    assert message.startswith((*sources, "no ports to forward")), message


@PROPERTY
@given(
    st.one_of(st.just({}), raw_values),  # often none: bad options would hide what routes do
    st.one_of(st.none(), st.lists(route_entry, max_size=3), yaml_value),
)
def test_build_from_any_raw_values_gives_a_config_or_one_line_error(
    values: dict[str, object], routes: object
) -> None:
    raw = {key: Raw(value, f"src-{key}") for key, value in values.items()}
    if routes is not None:
        raw["routes"] = Raw(routes, "src-routes")
    try:
        config = build(raw)
    except ConfigError as err:
        assert_config_error(err, [r.source for r in raw.values()])
    else:
        assert config.routes
        names = [r.name for r in config.routes]
        assert len(set(names)) == len(names), names
        for route in config.routes:
            assert route.name.isprintable(), route.name
            if route.target != "auto":
                well_formed_host(route.target)
            for hp in route.listen:
                assert str(ipaddress.ip_address(hp.host)) == hp.host


near_route = st.fixed_dictionaries(
    {
        "listen": st.one_of(
            st.sampled_from([5432, "6000", "127.0.0.1:6001", "[::1]:6001", [6002, "0.0.0.0:6003"]]), ports
        ),
        "target": st.one_of(remote, st.builds(format_hostport, remote, ports), st.just("auto")),
    },
    optional={
        "name": st.one_of(
            st.sampled_from(["cache", "tcp/5432", "tcp/6000", "a\nb", " ", "", 5, None, ["x"]]), junk
        )
    },
)


@PROPERTY
@given(st.lists(near_route, min_size=1, max_size=4), st.one_of(st.none(), st.sampled_from(["5432", "6000"])))
def test_near_valid_routes_give_distinct_one_line_names_or_one_line_error(
    routes: list[dict[str, object]], ports_text: str | None
) -> None:
    """Routes that mostly parse, with names that clash, break lines or are not text."""
    raw = {"routes": Raw(routes, "src-routes")}
    if ports_text:
        raw["ports"] = Raw(ports_text, "src-ports")
    try:
        config = build(raw)
    except ConfigError as err:
        assert_config_error(err, ["src-routes", "src-ports"])
    else:
        names = [r.name for r in config.routes]
        assert len(set(names)) == len(names), names
        assert all(name.strip() and name.isprintable() for name in names), names


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("properties")


YAML_BITS = [
    "ports: ",
    "routes:\n",
    "  - ",
    "listen: ",
    "target: ",
    "&a ",
    "*a",
    "!!",
    *(f"!!{tag} " for tag in ("int", "float", "bool", "null", "timestamp", "binary", "set", "omap", "str")),
    '"',
    "'",
    "{",
    "[",
    "- ",
]
yaml_document = st.one_of(
    st.dictionaries(
        st.one_of(st.sampled_from(FILE_KEYS), st.text(max_size=8)),
        st.one_of(yaml_value, st.lists(route_entry)),
        max_size=5,
    ).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
    yaml_value.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
    st.lists(st.sampled_from([*GRAMMAR, *YAML_BITS]), max_size=40).map("".join),
    # YAML reads these as ints too long for int() (decimal) or for str() (hex).
    st.builds("{}: {}{}\n".format, st.sampled_from(FILE_KEYS), st.sampled_from(["", "0x", "-"]), HUGE),
    st.text(max_size=60),
)


@PROPERTY
@given(st.one_of(yaml_document.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=40)))
def test_yaml_file_gives_a_config_or_one_line_error(scratch: Path, content: bytes) -> None:
    path = scratch / "relay.yaml"
    path.write_bytes(content)
    try:
        load({}, {}, str(path))
    except ConfigError as err:
        assert_config_error(err, [str(path)])


@settings(PROPERTY, max_examples=25)
@given(st.sampled_from(["[", "{", "- ", "a: "]), st.integers(1, 1500))
def test_deeply_nested_yaml_is_a_config_error(scratch: Path, opener: str, depth: int) -> None:
    path = scratch / "nested.yaml"
    path.write_text("ports: " + opener * depth + "\n")
    with pytest.raises(ConfigError) as err:
        load({}, {}, str(path))
    assert_config_error(err.value, [str(path)])


# --- 3. the whole CLI ------------------------------------------------------------------------------------

# The OS cannot pass NUL inside argv or the environment; every other character can arrive.
os_text = junk.map(lambda t: t.replace("\x00", ""))
FLAGS = [o.flag for o in OPTIONS] + ["--config"]
cli_value = st.one_of(os_text, st.sampled_from(NEAR))
cli_argv = st.lists(
    st.one_of(
        # A flag and its value, as two arguments or as --flag=value; or any one argument.
        st.tuples(st.sampled_from(FLAGS), cli_value).map(list),
        st.tuples(st.sampled_from(FLAGS), cli_value).map(lambda p: ["=".join(p)]),
        st.one_of(
            st.sampled_from([*FLAGS, "-d", "--debug", "run", "check", "healthcheck"]),
            os_text,
            st.sampled_from(NEAR),
            socat_address.map(lambda t: t.replace("\x00", "")),
        ).map(lambda a: [a]),
    ),
    max_size=4,
).map(lambda parts: [a for part in parts for a in part])
cli_env = st.dictionaries(
    st.sampled_from([o.env for o in OPTIONS] + ["RELAY_CONFIG", "PORTS", "DOCKER_HOST", "RELAY_NOPE"]),
    st.one_of(os_text, st.sampled_from(NEAR)),
    max_size=4,
)


def _asks_for_help(argv: list[str]) -> bool:
    """argparse exits (code 0) for -h/--help/--version: not configuration, not generated here."""
    return any(a in ("--help", "--version") or re.match(r"-[a-zA-Z]*h", a) for a in argv)


@PROPERTY
@given(cli_argv, cli_env)
def test_cli_rejects_bad_input_with_one_line_and_exit_2(argv: list[str], env: dict[str, str]) -> None:
    assume(not _asks_for_help(argv))
    try:
        cli.parse(argv, env)
    except ConfigError:
        pass
    else:
        return  # accepted: main() would start a server; the round-trip tests check accepted argv
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli.main(argv, env)
    assert code == 2
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("relay: error: "), lines
    assert stderr.getvalue().endswith("\n") and stderr.getvalue().count("\n") == 1


# --- 2. round-trips --------------------------------------------------------------------------------------


@PROPERTY
@given(port_spec())
def test_port_lists_round_trip(spec: tuple[str, tuple[PortMap, ...]]) -> None:
    text, expected = spec
    assert parse_ports(text) == expected


@PROPERTY
@given(ports, st.integers(0, 5))
def test_ports_round_trip_with_leading_zeros(port: int, zeros: int) -> None:
    assert parse_port("0" * zeros + str(port)) == port


@PROPERTY
@given(duration())
def test_durations_round_trip(spec: tuple[str, float]) -> None:
    text, seconds = spec
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12)


@PROPERTY
@given(host, ports)
def test_host_port_round_trips(host_text: str, port: int) -> None:
    text = format_hostport(host_text, port)
    hp = parse_hostport(text)
    assert hp == HostPort(host_text, port)
    assert format_hostport(hp.host, hp.port) == text == str(hp)
    assert parse_hostport(f"  {text}\t") == hp
    assert parse_hostport(host_text, default_port=port) == hp


@PROPERTY
@given(st.ip_addresses())
def test_ip_literals_parse_to_their_compressed_form(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    assert parse_ip(str(ip)) == str(ip) == parse_ip(f"[{ip}]" if ip.version == 6 else str(ip))
    if ip.version == 6:
        assert parse_ip(ip.exploded) == str(ip)


@dataclass
class SocatCase:
    argv: list[str]
    listen: tuple[str, ...]
    listen_port: int
    target: str
    target_port: int
    expected: dict[str, Any]


@st.composite
def socat_case(draw: st.DrawFn) -> SocatCase:
    """A valid socat command line for the relay case and the settings it must give."""
    expected: dict[str, Any] = {}
    flags: list[str] = []
    family = "any"
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["-d", "-dd", "-b", "-t", "-T", "-4", "-6", "-v"]))
        if kind == "-b":
            flags += ["-b", str(draw(st.integers(1, 10**6)))]
        elif kind in ("-t", "-T"):
            text, seconds = draw(duration())
            flags += [kind, text]
            expected["half_close_timeout" if kind == "-t" else "idle_timeout"] = seconds or None
        elif kind in ("-4", "-6"):
            flags.append(kind)
            family = "ipv4" if kind == "-4" else "ipv6"
        else:
            flags.append(kind)
    # TCP pairs only: a UDP pair takes other options (its forms are tested in tests/test_udp.py).
    listen_keyword = draw(st.sampled_from([k for k in socat.LISTEN_KEYWORDS if k.startswith("tcp")]))
    listen = {"any": ("0.0.0.0", "::1"), "ipv4": ("0.0.0.0",), "ipv6": ("::",)}[
        socat.LISTEN_KEYWORDS[listen_keyword]
    ]
    listen_port = draw(ports)
    listen_options: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["fork", "reuseaddr", "bind", "backlog", "max-children", "keepalive"]))
        if kind == "bind":
            ip = draw(st.one_of(ipv4, ipv6))
            listen_options.append(f"bind={ip}")
            listen = (str(ipaddress.ip_address(ip)),)
        elif kind == "backlog":
            n = draw(st.integers(1, 65535))
            listen_options.append(f"backlog={n}")
            expected["backlog"] = n
        elif kind == "max-children":
            n = draw(st.integers(1, 10**6))
            listen_options.append(f"max-children={n}")
            expected["max_connections"] = n
        elif kind == "keepalive":
            listen_options.append("keepalive")
            expected["keepalive"] = True
        else:
            listen_options.append(kind)
    connect_keyword = draw(st.sampled_from([k for k in socat.CONNECT_KEYWORDS if k.startswith("tcp")]))
    if socat.CONNECT_KEYWORDS[connect_keyword] != "any":
        family = socat.CONNECT_KEYWORDS[connect_keyword]
    expected["family"] = family
    target = draw(remote)
    target_port = draw(ports)
    if target_port == listen_port and target in listen:  # bind=IP: not back into the relay itself
        target_port = listen_port % 65535 + 1
    connect_options: list[str] = []
    retries: int | None = None
    interval = 1.0
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["connect-timeout", "retry", "interval", "forever", "nodelay"]))
        if kind == "connect-timeout":
            text, seconds = draw(duration(positive=True))
            connect_options.append(f"connect-timeout={text}")
            expected["connect_timeout"] = seconds
        elif kind == "retry":
            retries = draw(st.integers(0, 10**6))
            connect_options.append(f"retry={retries}")
        elif kind == "interval":
            text, interval = draw(duration())
            connect_options.append(f"interval={text}")
        elif kind == "forever":
            retries = -1
            connect_options.append("forever")
        else:
            connect_options.append(kind)
    if retries is not None:
        expected["connect_retry"] = (365 * 86400.0 if retries < 0 else retries * interval) or None
    shown = f"[{target}]" if ":" in target else target
    argv = [
        *flags,
        ",".join([f"{draw(case(listen_keyword))}:{listen_port}", *listen_options]),
        ",".join([f"{draw(case(connect_keyword))}:{shown}:{target_port}", *connect_options]),
    ]
    return SocatCase(argv, listen, listen_port, target, target_port, expected)


def case(word: str) -> st.SearchStrategy[str]:
    return st.sampled_from([word, word.upper()])


def approx_equal(got: object, want: object) -> bool:
    if isinstance(want, float) and isinstance(got, float):
        return math.isclose(got, want, rel_tol=1e-9)
    return got == want


@PROPERTY
@given(socat_case())
def test_valid_socat_argv_round_trips(spec: SocatCase) -> None:
    command, config, _ = cli.parse(spec.argv, {})
    assert command == "run"
    (route,) = config.routes
    assert route.listen == tuple(HostPort(ip, spec.listen_port) for ip in spec.listen)
    assert (route.target, route.target_port) == (spec.target, spec.target_port)
    for key, value in spec.expected.items():
        assert approx_equal(getattr(config, key), value), (key, getattr(config, key), value)


@st.composite
def yaml_case(draw: st.DrawFn) -> tuple[dict[str, Any], tuple[Route, ...]]:
    """A valid config file (ports, listen, target, routes) and the routes it must give."""
    listen = draw(st.sampled_from([["127.0.0.1"], ["::1"], ["127.0.0.1", "::1"], ["0.0.0.0"]]))
    target = draw(st.one_of(st.just("auto"), remote))
    free = draw(st.lists(ports, min_size=2, max_size=8, unique=True))
    data: dict[str, Any] = {"listen": listen, "target": target}
    routes: list[Route] = []
    n_ports = draw(st.integers(0, len(free) - 1))
    if n_ports:
        items = []
        for p in free[:n_ports]:
            t = draw(ports)
            items.append(f"{p}:{t}")
            routes.append(Route(f"tcp/{p}", tuple(HostPort(ip, p) for ip in listen), target, t))
        data["ports"] = draw(st.sampled_from([" ".join(items), ",".join(items)]))
    entries = []
    for i, p in enumerate(free[n_ports:]):
        entry: dict[str, Any] = {}
        if draw(st.booleans()):
            addr = draw(st.one_of(ipv4, ipv6))
            entry["listen"] = format_hostport(addr, p)
            hps: tuple[HostPort, ...] = (HostPort(str(ipaddress.ip_address(addr)), p),)
        else:
            entry["listen"] = draw(st.sampled_from([p, str(p), [p]]))
            hps = tuple(HostPort(ip, p) for ip in listen)
        t_host = draw(remote)
        t_port = draw(st.one_of(st.none(), ports))
        if t_port is None and hps[0].host == str(ipaddress.ip_address(t_host) if _is_ip(t_host) else t_host):
            t_port = p % 65535 + 1  # not back into its own listen address (a loop the config refuses)
        entry["target"] = t_host if t_port is None else format_hostport(t_host, t_port)
        name = f"tcp/{p}"
        if draw(st.booleans()):
            name = entry["name"] = f"route-{i}"
        entries.append(entry)
        routes.append(Route(name, hps, t_host, p if t_port is None else t_port))
    if entries:
        data["routes"] = entries
    return data, tuple(routes)


@settings(PROPERTY, max_examples=100)  # a file written and read twice per example
@given(yaml_case())
def test_valid_yaml_round_trips(scratch: Path, spec: tuple[dict[str, Any], tuple[Route, ...]]) -> None:
    data, routes = spec
    path = scratch / "valid.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    assert load({}, {}, str(path)).routes == routes


@st.composite
def cli_case(draw: st.DrawFn) -> tuple[list[str], dict[str, str], dict[str, Any]]:
    """Valid flags and RELAY_* variables (flags win) and the settings they must give."""
    text, maps = draw(port_spec())
    values: dict[str, tuple[str, Any]] = {"ports": (text, maps)}
    target = draw(st.one_of(st.just("auto"), remote))
    values["target"] = (target, target)
    if draw(st.booleans()):
        values["listen"] = draw(
            st.sampled_from(
                [
                    ("127.0.0.1,::1", ("127.0.0.1", "::1")),
                    ("localhost", ("127.0.0.1", "::1")),
                    ("::", ("::",)),
                    ("0.0.0.0 ::1", ("0.0.0.0", "::1")),
                ]
            )
        )
    for key in ("connect_timeout", "drain_timeout"):
        if draw(st.booleans()):
            d_text, seconds = draw(duration(positive=True))
            values[key] = (d_text, seconds)
    for key in ("idle_timeout", "half_close_timeout", "connect_retry"):
        if draw(st.booleans()):
            d_text, seconds = draw(st.one_of(duration(), st.just(("off", 0.0))))
            values[key] = (d_text, seconds or None)
    if draw(st.booleans()):
        n = draw(st.integers(1, 10**6))
        values["max_connections"] = (str(n), n)
    if draw(st.booleans()):
        n = draw(st.integers(1, 65535))
        values["backlog"] = (f"{n}", n)
    for key in ("keepalive", "reuseport"):
        if draw(st.booleans()):
            word = draw(st.sampled_from(["1", "true", "Yes", "ON", "0", "false", "no", "Off"]))
            values[key] = (word, word.lower() in ("1", "true", "yes", "on"))
    if draw(st.booleans()):
        ip, port = draw(st.one_of(ipv4, ipv6)), draw(ports)
        values["metrics"] = (format_hostport(ip, port), HostPort(str(ipaddress.ip_address(ip)), port))
    if draw(st.booleans()):
        values["metrics"] = ("off", None)
    argv: list[str] = []
    env: dict[str, str] = {}
    for key, (given_text, _) in values.items():
        opt = next(o for o in OPTIONS if o.key == key)
        where = draw(st.sampled_from(["flag", "flag=", "env", "both"]))
        if where in ("env", "both"):
            env[opt.env] = given_text if where == "env" else "junk that the flag overrides"
        if where == "flag":
            argv += [opt.flag, given_text]
        elif where in ("flag=", "both"):
            argv.append(f"{opt.flag}={given_text}")
    return argv, env, {k: v for k, (_, v) in values.items()}


@PROPERTY
@given(cli_case())
def test_valid_flags_and_environment_round_trip(
    spec: tuple[list[str], dict[str, str], dict[str, Any]],
) -> None:
    argv, env, expected = spec
    command, config, _ = cli.parse(argv, env)
    assert command == "run"
    maps = expected.pop("ports")
    target = expected.pop("target")
    listen = expected.pop("listen", Config().listen)
    assert config.routes == tuple(
        Route(f"tcp/{m.listen}", tuple(HostPort(ip, m.listen) for ip in listen), target, m.target)
        for m in maps
    )
    for key, value in expected.items():
        assert approx_equal(getattr(config, key), value), (key, getattr(config, key), value)
