"""Table tests for the pure parsers: ports, host:port, durations, gateways, backoff, socat argv."""

from __future__ import annotations

import pytest

from relay.address import (
    AddressError,
    HostPort,
    PortMap,
    parse_duration,
    parse_hostport,
    parse_ip,
    parse_ports,
)
from relay.config import ConfigError
from relay.socat import looks_like_socat
from relay.socat import parse as parse_socat
from relay.upstream import backoff_delays, chain_for, parse_default_gateway


def maps(*pairs: tuple[int, int]) -> tuple[PortMap, ...]:
    return tuple(PortMap(a, b) for a, b in pairs)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5432", maps((5432, 5432))),
        ("8000-8002", maps((8000, 8000), (8001, 8001), (8002, 8002))),
        ("80:8080", maps((80, 8080))),
        ("8000-8002:9000-9002", maps((8000, 9000), (8001, 9001), (8002, 9002))),
        ("8000-8002:9000", maps((8000, 9000), (8001, 9000), (8002, 9000))),
        ("5432/tcp", maps((5432, 5432))),
        ("5432/TCP 6379", maps((5432, 5432), (6379, 6379))),
        ("1,2 ,3\n4\t5", maps((1, 1), (2, 2), (3, 3), (4, 4), (5, 5))),
        ("  65535  ", maps((65535, 65535))),
        ("7-7", maps((7, 7))),
        ("7:9-9", maps((7, 9))),
        ("0" * 5000 + "80", maps((80, 80))),
    ],
)
def test_port_list_forms(text: str, expected: tuple[PortMap, ...]) -> None:
    assert parse_ports(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("80-70", "'80-70' is not a port range (low > high)"),
        ("0", "'0' is not a port number (1-65535)"),
        ("65536", "'65536' is not a port number (1-65535)"),
        ("http", "'http' is not a port number"),
        ("80/sctp", "'80/sctp' has protocol 'sctp'; expected /tcp or /udp"),
        ("8000-8002:9000-9001", "maps 3 listen ports to 2 target ports (ranges of unequal width)"),
        ("80:9000-9001", "maps 1 listen ports to 2 target ports"),
        ("80 81 80", "listen port 80 appears twice ('80' and '80')"),
        ("8000-8005 8003", "listen port 8003 appears twice ('8000-8005' and '8003')"),
        ("", "lists no ports"),
        (" , ", "lists no ports"),
        ("80:", "'80:': '' is not a port number"),
        ("-80", "'-80': '' is not a port number"),
        # str.isdigit() says yes to these; they used to escape as ValueError or be read as 80.
        ("²", "'²' is not a port number"),
        ("٨٠", "'٨٠' is not a port number"),
        ("9" * 5000, "9'... (5000 characters) is not a port number (1-65535)"),
    ],
)
def test_bad_port_lists_quote_the_value_and_the_form(text: str, message: str) -> None:
    with pytest.raises(AddressError) as err:
        parse_ports(text)
    assert message in str(err.value)
    if "twice" not in message:
        assert "expected P, LO-HI, L:T" in str(err.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("db:5432", HostPort("db", 5432)),
        ("10.0.0.1:80", HostPort("10.0.0.1", 80)),
        ("[::1]:80", HostPort("::1", 80)),
        ("host.docker.internal:6379", HostPort("host.docker.internal", 6379)),
    ],
)
def test_host_port(text: str, expected: HostPort) -> None:
    assert parse_hostport(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("db", "has no port"),
        ("::1:80", "an IPv6 address needs brackets"),
        ("[::1]80", "is not a valid [IPv6]:PORT"),
        ("[nope]:80", "is not a valid [IPv6]:PORT"),
        ("db:0", "is not a port number"),
        ("bad host:80", "'bad host:80': 'bad host' is not a host name or IP address"),
        # The part's own message used to be all: `'' is not a port number`, not saying which value.
        ("db:", "'db:': '' is not a port number"),
        (":1", "':1': '' is not a host name or IP address"),
        ("[::1]:", "'[::1]:': '' is not a port number"),
        # ipaddress takes any text as an IPv6 zone, spaces and line breaks included.
        ("[fe80::1%a b]:80", "is not a valid [IPv6]:PORT"),
        ("[::1%\n]:80", "is not a valid [IPv6]:PORT"),
        ("db\n:80", "is not a host name or IP address"),  # $ matched before the line break
        # Were taken as host names, to fail only at each connection's lookup.
        ("10.0.0.256:80", "'10.0.0.256' is not a host name or IP address"),
        ("5432:80", "'5432' is not a host name or IP address"),
        ("1.2.3.:80", "'1.2.3.' is not a host name or IP address"),
    ],
)
def test_bad_host_port(text: str, message: str) -> None:
    with pytest.raises(AddressError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_hostport(text)


@pytest.mark.parametrize(
    ("text", "ip"),
    [("127.0.0.1", "127.0.0.1"), ("[::1]", "::1"), ("0:0::1", "::1"), ("fe80::1%eth0", "fe80::1%eth0")],
)
def test_ip_literals(text: str, ip: str) -> None:
    assert parse_ip(text) == ip


@pytest.mark.parametrize(
    "text", ["::% ", "fe80::1%a b", "fe80::1%eth\n0", "fe80::1%", "localhost", "1.2.3.256"]
)
def test_bad_ip_literals(text: str) -> None:
    with pytest.raises(AddressError, match="is not an IP address"):
        parse_ip(text)


def test_host_port_defaults() -> None:
    assert parse_hostport("db", default_port=5432) == HostPort("db", 5432)
    assert str(HostPort("::1", 80)) == "[::1]:80"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("5s", 5.0), ("1m", 60.0), ("1h", 3600.0), ("1.5", 1.5), ("0", 0.0), (" 2S ", 2.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5x", "-1s", "s", "", "1e3", "five", "٣s", "9" * 400, "9" * 306 + "h"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(AddressError, match="expected a duration like 250ms, 5s"):
        parse_duration(text)


ROUTE_TABLE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth0\t00000000\t010012AC\t0003\t0\t0\t0\t00000000\t0\t0\t0
"""


@pytest.mark.parametrize(
    ("table", "gateway"),
    [
        (ROUTE_TABLE, "172.18.0.1"),
        ("Iface\tDestination\tGateway\neth0\t000012AC\t00000000\n", None),
        ("", None),
        ("Iface\tDestination\tGateway\nveth\t00000000\t0102A8C0\n", "192.168.2.1"),
    ],
)
def test_default_gateway_from_proc_net_route(table: str, gateway: str | None) -> None:
    assert parse_default_gateway(table) == gateway


@pytest.mark.parametrize(
    ("target", "chain"),
    [
        ("auto", ("host.docker.internal", "host.containers.internal", "")),
        ("host.docker.internal", ("host.docker.internal", "host.containers.internal", "")),
        ("host.containers.internal", ("host.containers.internal", "")),
        ("db.internal", ("db.internal",)),
        ("10.1.2.3", ("10.1.2.3",)),
    ],
)
def test_target_chain(target: str, chain: tuple[str, ...]) -> None:
    assert chain_for(target) == chain


@pytest.mark.parametrize(
    ("budget", "delays"),
    [
        (0.0, []),
        (0.35, [0.1, 0.2]),
        (5.0, [0.1, 0.2, 0.4, 0.8, 1.6]),
        (10.0, [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0]),
    ],
)
def test_backoff_schedule(budget: float, delays: list[float]) -> None:
    got = list(backoff_delays(budget))
    assert got == pytest.approx(delays)
    assert sum(got) <= budget


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # argparse copied the argument into its message as it was: two lines.
        (["--ports", "80", "a\nb"], "command line: unrecognized arguments: a\\nb; see 'relay --help'"),
        (["\r"], "command line: unrecognized arguments: \\r; see"),
        (["--ports"], "command line: argument --ports: expected one argument"),
    ],
)
def test_command_line_errors_are_one_line(argv: list[str], message: str) -> None:
    from relay.cli import parse

    with pytest.raises(ConfigError) as err:
        parse(argv, {})
    assert str(err.value).startswith(message)
    assert len(str(err.value).splitlines()) == 1


# --- socat argv ---------------------------------------------------------------------------------------

SEED = ["-d", "tcp-listen:8000,fork,reuseaddr", "tcp-connect:host.docker.internal:8000"]


def test_seed_recipe_argv() -> None:
    parsed = parse_socat(SEED)
    values = {k: v.value for k, v in parsed.raw.items()}
    assert values == {"ports": "8000:8000", "listen": ["0.0.0.0", "::1"], "target": "host.docker.internal"}
    assert parsed.debug_level == 1


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["TCP-LISTEN:80", "TCP:db:5432"],
            {"ports": "80:5432", "target": "db", "listen": ["0.0.0.0", "::1"]},
        ),
        (["tcp-l:80,bind=127.0.0.1", "tcp:db:5432"], {"listen": ["127.0.0.1"]}),
        (["TCP4-LISTEN:80", "TCP4:db:5432"], {"listen": ["0.0.0.0"], "family": "ipv4"}),
        (
            ["TCP6-LISTEN:80", "TCP6:[::1]:5432"],
            {"listen": ["::"], "family": "ipv6", "target": "::1", "ipv6only": "0"},  # dual-stack, as socat
        ),
        (["TCP6-LISTEN:80,ipv6only=1", "TCP:db:1"], {"listen": ["::"], "ipv6only": "1"}),
        (["UDP6-LISTEN:53", "UDP:db:53"], {"listen": ["::"], "ipv6only": "0"}),
        (["tcp-listen:80,pf=ip4", "tcp:db:1"], {"listen": ["0.0.0.0"]}),
        (["tcp-listen:80,pf=ip6", "tcp:db:1"], {"listen": ["::"], "ipv6only": "0"}),
        (["tcp-listen:80", "tcp:db:1,pf=ip6"], {"family": "ipv6"}),
        (["tcp-listen:80,range=10.0.0.0/8", "tcp:db:1"], {"allow": "10.0.0.0/8"}),
        (["tcp6-listen:80,range=[::1]/128", "tcp:db:1"], {"allow": "[::1]/128"}),
        (["tcp-listen:80,su=nobody", "tcp:db:1"], {"user": "nobody"}),
        (["tcp-listen:80,su-d=nobody", "tcp:db:1"], {"user": "nobody"}),
        (
            ["tcp-listen:80,backlog=4096,max-children=10", "tcp:db:1"],
            {"backlog": "4096", "max_connections": "10"},
        ),
        (
            ["tcp-listen:80,reuseport", "tcp:db:1,connect-timeout=2"],
            {"reuseport": "true", "connect_timeout": "2"},
        ),
        (["tcp-listen:80,keepalive,nodelay", "tcp:db:1"], {"keepalive": "true"}),
        (["tcp-listen:80", "tcp:db:1,retry=5,interval=2"], {"connect_retry": 10.0}),
        (
            ["-b", "16384", "-t", "3", "-T", "60", "tcp-listen:80", "tcp:db:1"],
            {"half_close_timeout": "3", "idle_timeout": "60"},
        ),
        (["-4", "tcp-listen:80", "tcp:db:1"], {"family": "ipv4"}),
    ],
)
def test_socat_forms(argv: list[str], expected: dict[str, object]) -> None:
    values = {k: v.value for k, v in parse_socat(argv).raw.items()}
    for key, value in expected.items():
        assert values[key] == value, key


@pytest.mark.parametrize(
    ("argv", "expected", "note"),
    [
        # Fused values (socat takes -T3 as -T 3), a trailing comma (an empty option, skipped by socat).
        (
            ["-T3", "-t5", "tcp-l:80,fork,", "tcp:db:1"],
            {"idle_timeout": "3", "half_close_timeout": "5"},
            None,
        ),
        (["-b8192", "tcp-l:80,,reuseaddr", "tcp:db:1"], {"ports": "80:1"}, None),
        # -ls logs to stderr, where the relay logs: nothing to say.
        (["-ls", "tcp-l:80", "tcp:db:1"], {"ports": "80:1"}, None),
        (["-lmlocal2", "tcp-l:80", "tcp:db:1"], {"ports": "80:1"}, "(syslog) has no equivalent"),
        # A bare path is socat's GOPEN, which connects to a socket file.
        (
            ["tcp-l:2375,fork", "/var/run/docker.sock"],
            {"ports": "2375:unix:/var/run/docker.sock"},
            "is read as UNIX-CONNECT:/var/run/docker.sock",
        ),
        (
            ["tcp-l:80,fork,retry", "tcp:db:1"],
            {"ports": "80:1"},
            "the relay exits with code 1 when a port is taken",
        ),
        (["tcp-l:80,retry=5,interval=2", "tcp:db:1"], {"ports": "80:1"}, "retries a failed bind"),
        (
            ["tcp-l:80,ignoreeof", "tcp:db:1"],
            {"ports": "80:1"},
            "keeps a connection open after one side's EOF",
        ),
        # linagora/socat-client-server's client: commonname="" with verify=0 gives no name, as in socat.
        (
            ["tcp-l:3000,fork,retry", 'openssl:h:4000,verify=0,openssl-no-sni,openssl-commonname=""'],
            {"target_tls": {"verify": "0", "sni": "0"}},
            "retries a failed bind",
        ),
        # perm= chmods the socket file after creating it; mode= while: the same bits.
        (["unix-listen:/run/a.sock,perm=0666,fork", "tcp:db:1"], {}, None),
    ],
)
def test_socat_smaller_items(argv: list[str], expected: dict[str, object], note: str | None) -> None:
    parsed = parse_socat(argv)
    values = {k: v.value for k, v in parsed.raw.items()}
    for key, value in expected.items():
        assert values[key] == value, key
    assert [n for n in parsed.notes if note and note in n] if note else parsed.notes == ()
    if argv[0].startswith("unix-listen"):
        routes = values["routes"]
        assert isinstance(routes, list) and routes[0]["mode"] == "0666"


@pytest.mark.parametrize(
    ("argv", "setting", "seconds"),
    [
        # Passed on as str(float): '1e-05' and '1e+20', which the duration parser refused.
        (["-t", "0.00001", "tcp-l:80", "tcp:db:1"], "half_close_timeout", 1e-05),
        (["-T", "100000000000000000000", "tcp-l:80", "tcp:db:1"], "idle_timeout", 1e20),
        (["-T", "250ms", "tcp-l:80", "tcp:db:1"], "idle_timeout", 0.25),
        (["tcp-l:80", "tcp:db:1,retry=3,interval=0.00001"], "connect_retry", 3e-05),
        (["tcp-l:80", "tcp:db:1,retry=2147483647,interval=100000000000"], "connect_retry", 2147483647e11),
        (["tcp-l:80", "tcp:db:1,forever,interval=5"], "connect_retry", 365 * 86400.0),
    ],
)
def test_socat_durations_reach_the_config(argv: list[str], setting: str, seconds: float) -> None:
    from relay.config import load

    assert getattr(load(parse_socat(argv).raw, {}), setting) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tcp-listen:80", "udp:db:1"], "a TCP listener cannot forward to a UDP target"),
        (["sctp-listen:80", "tcp:db:1"], "'SCTP-LISTEN' is not a supported listen address"),
        (["tcp-listen:80,setsid", "tcp:db:1"], "option 'setsid': 'setsid' is not supported"),
        (
            ["tcp-listen:80,range=10.0.0.0/8,range=127.0.0.0/8", "tcp:db:1"],
            "socat takes one range= per address; expected a single range=",
        ),
        (["tcp-listen:80,range=10.0.0.0/40", "tcp:db:1"], "'10.0.0.0/40' is not an address range"),
        (["tcp-listen:80,pf=ipx", "tcp:db:1"], "'ipx' is not a protocol family; expected pf=ip4 or pf=ip6"),
        (["tcp-listen:80", "tcp:db:1,sourceport=9"], "'sourceport' is not supported"),
        (["tcp-listen:80"], "expected exactly two addresses"),
        (["tcp-listen:htp", "tcp:db:1"], "'htp' is neither a port number nor a tcp service name"),
        (["tcp-listen:80", "tcp:db"], "expected HOST:PORT after TCP"),
        (["-b", "tcp-listen:80", "tcp:db:1"], "'tcp-listen:80' is not a whole number"),
        (["-u", "tcp-listen:80", "tcp:db:1"], "'-u': not supported"),
        (["tcp-listen:80,bind=nope", "tcp:db:1"], "'nope' is not an IP address"),
        # Were read as [::1]:80: whatever followed `]` lost its colons.
        (["tcp-listen:80", "tcp6:[::1]80"], "expected HOST:PORT after TCP6"),
        (["tcp-listen:80", "tcp6:[::1]:::80"], "'::80' is neither a port number nor a tcp service name"),
        # str.isdigit() said yes; int() then raised a bare ValueError (or the count overflowed a float).
        (["tcp-listen:80", "tcp:db:1,retry=²"], "'²' is not a whole number from 0 to 2147483647"),
        (
            ["tcp-listen:80", "tcp:db:1,retry=" + "9" * 5000],
            "9'... (5000 characters) is not a whole number from 0",
        ),
        (
            ["tcp-listen:80", "tcp:db:1,retry=" + "9" * 400],
            "9'... (400 characters) is not a whole number from 0",
        ),
        (["-b", "٣", "tcp-listen:80", "tcp:db:1"], "'٣' is not a whole number"),
        (["-T", "tcp-listen:80", "tcp:db:1"], "'tcp-listen:80' is not a duration"),
        (["-Tx", "tcp-listen:80", "tcp:db:1"], "socat argument -T: 'x' is not a duration"),
        # socat refuses these too: merged flags, a socket file's options on TCP or UDP.
        (["-vvv", "tcp-listen:80", "tcp:db:1"], "'-vvv': not supported"),
        (
            ["tcp4-listen:80,unlink-close=1", "tcp4:db:1"],
            "'unlink-close' applies to socket files (UNIX-LISTEN)",
        ),
        (["udp4-listen:53,fork,unlink-close=1", "udp4:db:53"], "'unlink-close' applies to socket files"),
        # What no relay has, in one line that says so.
        (["tcp-l:1337,fork", "exec:./chall,stderr"], "EXEC runs a program for each connection"),
        (["tcp-l:80,fork", "system:./x.sh"], "SYSTEM runs a shell command for each connection"),
        (["tcp-l:80,fork", "vsock-connect:16:8080"], "VSOCK-CONNECT reaches a VM socket (vsock)"),
        (["-", "tcp-l:8080,fork"], "STDIO is standard input and output"),
        (["tcp4-listen:80,fork", "STDOUT"], "STDOUT is standard output"),
        (["pty,raw,echo=0", "tcp:db:1"], "PTY makes a pseudo-terminal"),
        (["-u", "tcp4-listen:80", "tcp:db:1"], "'-u': not supported"),
        # A line with both: the address no relay has is the reason given.
        (["-u", "tcp4-listen:80", "open:/tmp/x.log,creat"], "OPEN opens a file"),
        (["tcp4-listen:80", "open:/tmp/x.log,creat"], "OPEN opens a file, which is not a network endpoint"),
        (["tcp-l:80", "PIPE"], "PIPE echoes data back within socat"),
        (["/dev/ttyS0", "tcp:db:1"], "a bare path (socat's GOPEN) opens an existing file"),
    ],
)
def test_bad_socat_argv_names_the_culprit(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        from relay.config import load

        load(parse_socat(argv).raw, {})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("argv", "socat"),
    [
        (SEED, True),
        (["--ports", "8000:9000", "--target", "db"], False),
        (["--metrics", "0.0.0.0:9464", "--listen", "::1"], False),
        (["check"], False),
        (["TCP-L:80", "TCP:x:1"], True),
        # An IPv6 value of the relay's own option starts like a socat address.
        (["--ports", "80", "--target", "fd00::1"], False),
        (["--listen", "fe80::1%eth0", "--target", "db"], False),
        (["--target", "fd00::1", "tcp-l:80", "tcp:x:1"], True),
    ],
)
def test_socat_detection(argv: list[str], socat: bool) -> None:
    assert looks_like_socat(argv) is socat
