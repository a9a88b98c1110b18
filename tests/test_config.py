"""Config sources and their precedence, and the one-line errors that name source, value and form."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.address import HostPort
from relay.config import Config, ConfigError, Raw, Route, load


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    config = load({}, {"RELAY_PORTS": "5432"})
    assert config.routes == (
        Route("tcp/5432", (HostPort("127.0.0.1", 5432), HostPort("::1", 5432)), "auto", 5432),
    )
    assert (config.connect_timeout, config.max_connections, config.backlog) == (5.0, 4096, 1024)
    assert (config.idle_timeout, config.half_close_timeout, config.connect_retry) == (None, None, None)
    assert config.metrics == HostPort("0.0.0.0", 9464)
    assert config.drain_timeout == 5.0


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    path = write(tmp_path, "ports: '1000'\ntarget: from-file\nconnect_timeout: 1s\nidle_timeout: 1m\n")
    env = {"RELAY_CONFIG": path, "RELAY_TARGET": "from-env", "RELAY_CONNECT_TIMEOUT": "2s"}
    config = load({"connect_timeout": Raw("3s", "--connect-timeout")}, env)
    assert config.routes[0].target == "from-env"
    assert config.connect_timeout == 3.0
    assert config.idle_timeout == 60.0
    assert config.routes[0].listen[0].port == 1000


def test_file_shape_from_the_issue(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
target: auto
listen: ["127.0.0.1", "::1"]
ports: "5432 8000-8001"
connect_timeout: 5s
routes:
  - name: cache
    listen: 127.0.0.1:6000
    target: other.host:6379
  - listen: [6001, "[::1]:6002"]
    target: 10.0.0.5
""",
    )
    config = load({}, {}, path)
    names = [r.name for r in config.routes]
    assert names == ["tcp/5432", "tcp/8000", "tcp/8001", "cache", "tcp/6001"]
    cache = config.routes[3]
    assert (cache.listen, cache.target, cache.target_port) == (
        (HostPort("127.0.0.1", 6000),),
        "other.host",
        6379,
    )
    last = config.routes[4]
    assert last.listen == (HostPort("127.0.0.1", 6001), HostPort("::1", 6001), HostPort("::1", 6002))
    assert (last.target, last.target_port) == ("10.0.0.5", 6001)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0.00001", 1e-05), ("1.5e+3", 1500.0), ("0.5", 0.5), ("2", 2.0), ("'250ms'", 0.25)],
)
def test_yaml_numbers_are_seconds(tmp_path: Path, text: str, seconds: float) -> None:
    """YAML reads 0.00001 as a float whose str() is '1e-05', which the duration parser refused."""
    path = write(tmp_path, f"ports: '80'\nidle_timeout: {text}\n")
    assert load({}, {}, path).idle_timeout == seconds


def test_wide_port_ranges_load() -> None:
    """The overlap and loop checks compared every pair of listen sockets: minutes for 1-65535
    (docker-host's default PORTS). No clock here: pytest's timeout catches a return to that."""
    config = load({}, {"PORTS": "1-30000", "RELAY_LISTEN": "0.0.0.0,::1"})
    assert len(config.routes) == 30000
    routes = Raw([{"listen": "127.0.0.1:30000", "target": "db"}], "routes")
    with pytest.raises(ConfigError, match=r"port 30000 on 127\.0\.0\.1:30000 is used twice \(PORTS"):
        load({"routes": routes}, {"PORTS": "1-30000", "RELAY_LISTEN": "0.0.0.0"})


def test_docker_host_compat_variables() -> None:
    """Configured the docker-host way (PORTS, DOCKER_HOST, nothing of the relay's own), the relay listens
    as docker-host did: every address, TCP and UDP, and says so (before: loopback and TCP only, silently)."""
    config = load({}, {"PORTS": "80 443", "DOCKER_HOST": "gateway.lan"})
    assert [(r.protocol, r.target_port) for r in config.routes] == [
        ("tcp", 80),
        ("udp", 80),
        ("tcp", 443),
        ("udp", 443),
    ]
    assert all(
        r.listen == (HostPort("0.0.0.0", r.target_port), HostPort("::", r.target_port)) for r in config.routes
    )
    assert config.routes[0].target == "gateway.lan"
    assert config.warnings[0].startswith("configured the docker-host way (PORTS without RELAY_PORTS")
    assert (
        "every container on this container's networks can reach the Docker host's ports 80 443"
        in (config.warnings[1])
    )
    config = load({}, {"PORTS": "80", "RELAY_PORTS": "81", "DOCKER_HOST": "unix:///var/run/docker.sock"})
    assert config.routes[0].target_port == 81
    assert config.routes[0].target == "auto"
    assert any("DOCKER_HOST" in w for w in config.warnings)


@pytest.mark.parametrize(
    ("environ", "cli", "listen", "udp"),
    [
        # The relay's own settings, anywhere, mean it is not configured the docker-host way.
        ({"PORTS": "80", "RELAY_LISTEN": "127.0.0.1"}, {}, ("127.0.0.1",), False),
        ({"PORTS": "80", "RELAY_PORTS": "80"}, {}, ("127.0.0.1", "::1"), False),
        ({"PORTS": "80"}, {"listen": Raw("::1", "--listen")}, ("::1",), False),
        ({"PORTS": "80"}, {"ports": Raw("80", "--ports")}, ("127.0.0.1", "::1"), False),
        # An item with its protocol keeps it; a socket file carries a stream only.
        ({"PORTS": "53/udp 8125/tcp"}, {}, ("0.0.0.0", "::"), True),
        ({"PORTS": "5432:unix:/run/pg/.s.PGSQL.5432"}, {}, ("0.0.0.0", "::"), False),
    ],
)
def test_docker_host_layout_only_without_the_relays_own_settings(
    environ: dict[str, str], cli: dict[str, Raw], listen: tuple[str, ...], udp: bool
) -> None:
    config = load(cli, environ)
    assert tuple(hp.host for hp in config.routes[0].listen) == listen
    assert any(r.protocol == "udp" for r in config.routes) is udp
    assert any("docker-host way" in w for w in config.warnings) is (listen == ("0.0.0.0", "::"))


def test_docker_host_2020_colon_syntax_warns_how_it_was_read() -> None:
    """docker-host until 2021 read `8000:9000` as a range (iptables multiport); today, and here, it is 8000
    forwarded to 9000. The reading is named, with the way to write the old meaning."""
    config = load({}, {"PORTS": "443,80,8000:9000"})
    assert [r.target_port for r in config.routes if r.name == "tcp/8000"] == [9000]
    assert (
        "PORTS: '8000:9000' is read as port 8000 forwarded to the host's port 9000 (docker-host's syntax "
        "since 2021); docker-host before 2021 read it as the ports 8000 to 9000: write 8000-9000 for those"
    ) in config.warnings
    with pytest.raises(ConfigError) as err:
        load({}, {"PORTS": "0:1024,9000"})
    assert str(err.value) == (
        "PORTS: '0:1024' is docker-host's range syntax before 2021 (ports 0 to 1024), and port 0 cannot be "
        "listened on; expected 1-1024"
    )


def test_unknown_relay_variable_warns_with_suggestion_but_kubernetes_links_do_not() -> None:
    config = load(
        {},
        {
            "RELAY_PORTS": "80",
            "RELAY_CONECT_TIMEOUT": "1s",
            "RELAY_SERVICE_HOST": "10.0.0.1",
            "RELAY_PORT": "tcp://10.0.0.1:9464",
        },
    )
    assert config.warnings == (
        "RELAY_CONECT_TIMEOUT: unknown setting, ignored (did you mean 'RELAY_CONNECT_TIMEOUT'?)",
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"RELAY_PORTS": "80-70"},
            "RELAY_PORTS: '80-70' is not a port range (low > high); expected P, LO-HI",
        ),
        ({"PORTS": "x"}, "PORTS: 'x' is not a port number"),
        ({"RELAY_PORTS": "80", "RELAY_TARGET": "bad host"}, "RELAY_TARGET: 'bad host' is not a host name"),
        (
            {"RELAY_PORTS": "80", "RELAY_LISTEN": "localhostt"},
            "RELAY_LISTEN: 'localhostt' is not an IP address",
        ),
        (
            {"RELAY_PORTS": "80", "RELAY_CONNECT_TIMEOUT": "5x"},
            "RELAY_CONNECT_TIMEOUT: '5x' is not a duration",
        ),
        (
            {"RELAY_PORTS": "80", "RELAY_CONNECT_TIMEOUT": "0"},
            "RELAY_CONNECT_TIMEOUT: '0' must be more than zero",
        ),
        (
            {"RELAY_PORTS": "80", "RELAY_MAX_CONNECTIONS": "-1"},
            "RELAY_MAX_CONNECTIONS: '-1' is not a whole number",
        ),
        # str.isdigit() says yes to these; int() refused them with a bare ValueError, or read '٣' as 3.
        ({"RELAY_PORTS": "80", "RELAY_BACKLOG": "²"}, "RELAY_BACKLOG: '²' is not a whole number from 1 to"),
        ({"RELAY_PORTS": "80", "RELAY_BACKLOG": "٣"}, "RELAY_BACKLOG: '٣' is not a whole number from 1 to"),
        (
            {"RELAY_PORTS": "80", "RELAY_MAX_CONNECTIONS": "9" * 5000},
            "'... (5000 characters) is not a whole number from 1 to 1000000",
        ),
        ({"RELAY_PORTS": "80", "RELAY_KEEPALIVE": "maybe"}, "RELAY_KEEPALIVE: 'maybe' is not a yes/no value"),
        ({"RELAY_PORTS": "80", "RELAY_METRICS": "nowhere"}, "RELAY_METRICS: 'nowhere' has no port"),
        (
            {"RELAY_PORTS": "80", "RELAY_LOG_LEVEL": "loud"},
            "RELAY_LOG_LEVEL: 'loud' is not one of debug, info",
        ),
        (
            {"RELAY_PORTS": "80", "RELAY_LOOP": "trio"},
            "RELAY_LOOP: 'trio' is not one of auto, asyncio, uvloop",
        ),
        ({}, "no ports to forward: set RELAY_PORTS"),
        (
            {"RELAY_PORTS": "80", "RELAY_LISTEN": "0.0.0.0,127.0.0.1"},
            "RELAY_LISTEN: '0.0.0.0,127.0.0.1': 0.0.0.0 already covers 127.0.0.1",
        ),
    ],
)
def test_bad_env_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load({}, env)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_errors_name_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--ports: '99999' is not a port number"):
        load({"ports": Raw("99999", "--ports")}, {"RELAY_PORTS": "80"})


def test_yaml_base_60_numbers_stay_text(tmp_path: Path) -> None:
    """YAML 1.1 reads an unquoted 22:22 as 1342 (22 * 60 + 22): ports and listen must see 22:22 and 1:30."""
    path = write(tmp_path, "ports: 22:22\nroutes:\n  - listen: 1:30\n    target: db:5432\n")
    with pytest.raises(ConfigError, match="'1:30': '1' is not a host name"):
        load({}, {}, path)
    path = write(tmp_path, "ports: 22:22, 23:24\n")
    assert [(r.listen[0].port, r.target_port) for r in load({}, {}, path).routes] == [(22, 22), (23, 24)]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Each escaped as a bare ValueError from the YAML constructor or from str() of the number.
        ("ports: 2001-13-01\n", ":1: ports: '2001-13-01': '13-01' is not a port number"),
        ("ports: " + "9" * 5000 + "\n", "9'... (5000 characters) is not a port number (1-65535)"),
        ("ports: 0x" + "f" * 5000 + "\n", "'0x" + "f" * 50),
        ("max_connections: -" + "9" * 5000 + "\n", "'... (5001 characters) is not a whole number from 1 to"),
        # An explicit tag skips the pattern PyYAML's constructors rely on: KeyError, AttributeError ...
        ("ports: !!int x\n", ":1: YAML syntax error: 'x' is not a valid !!int"),
        ("ports: !!bool x\n", ":1: YAML syntax error: 'x' is not a valid !!bool"),
        ("ports: !!timestamp x\n", ":1: YAML syntax error: 'x' is not a valid !!timestamp"),
    ],
)
def test_yaml_values_python_cannot_hold(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load({}, {}, path)
    assert str(err.value).startswith(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "ports: '80'\nconect_timeout: 1s\n",
            ":2: conect_timeout: unknown key (did you mean 'connect_timeout'?)",
        ),
        ("ports: '80'\ntarget: [a\n", ":3: YAML syntax error"),
        ("ports: [80, 70-60]\n", ":1: ports: '70-60' is not a port range"),
        ("- 80\n", "the file must be a mapping"),
        ('"a\\nb": 1\n', ":1: 'a\\nb': unknown key; known keys:"),  # was two lines
        ("'my key': 1\n", ":1: 'my key': unknown key"),
        # Was two lines (`  in "<unicode string>", position 10`).
        (
            "ports: '80'\n\x1f\n",
            ":2: YAML error: unacceptable character #x001f: special characters are not allowed",
        ),
        ("routes: {a: 1}\n", "routes: expected a list of routes"),
        ("routes:\n  - listen: 6000\n", "routes[0]: missing 'target'"),
        # A route's name is a log and metrics label; str() made these names.
        (
            'routes:\n  - name: "a\\nb"\n    listen: 1\n    target: x\n',
            ":2: routes[0]: 'a\\nb' is not a route name",
        ),
        ("routes:\n  - name: [a, b]\n    listen: 1\n    target: x\n", "['a', 'b'] is not a single value"),
        # Names key the counters, metrics and /readyz: shared, they mixed two routes' figures.
        (
            "routes:\n  - {name: a, listen: 1, target: x}\n  - {name: a, listen: 2, target: y}\n",
            ":3: routes[1]: route name 'a' is used twice (",
        ),
        (
            "ports: '5'\nroutes:\n  - {name: tcp/5, listen: 6, target: y}\n",
            ":3: routes[0]: route name 'tcp/5' is used twice (",
        ),
        (
            "routes:\n  - {listen: '127.0.0.1:6', target: x}\n  - {listen: '[::1]:6', target: y}\n",
            "route name 'tcp/6' is used twice",
        ),
        (
            "routes:\n  - listen: 6000\n    target: x:1\n    tagret: y\n",
            "unknown key 'tagret' (did you mean 'target'?)",
        ),
        ("routes:\n  - listen: nope:6000\n    target: x:1\n", "routes[0]: 'nope' is not an IP address"),
        (
            "ports: '6000'\nroutes:\n  - listen: 127.0.0.1:6000\n    target: x:1\n",
            "routes[0]: listen port 6000 on 127.0.0.1:6000 is used twice",
        ),
    ],
)
def test_bad_yaml(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load({}, {}, path)
    assert str(err.value).startswith(path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("opener", ["[", "{a: ", "- "])
def test_deeply_nested_yaml_is_one_line(tmp_path: Path, opener: str) -> None:
    """PyYAML recurses per level: this escaped as RecursionError."""
    nested = "".join(f"\n{'  ' * i}- " for i in range(600)) if opener == "- " else opener * 600
    path = write(tmp_path, "ports: " + nested + "\n")
    with pytest.raises(ConfigError) as err:
        load({}, {}, path)
    assert str(err.value) == f"{path}: YAML nested too deeply; expected settings a few levels deep"


def test_config_file_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A Latin-1 file escaped as UnicodeDecodeError (a ValueError, which the OSError handler missed)."""
    path = tmp_path / "relay.yaml"
    path.write_bytes("ports: '80'\ntarget: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load({}, {}, str(path))
    assert str(err.value) == f"{path}:2: not UTF-8 text (byte 0xe9); expected a UTF-8 YAML file"


def test_config_file_name_with_a_line_break_is_quoted(tmp_path: Path) -> None:
    """`--config $'a\\nb'` gave a two-line error: the name is quoted when it is not printable."""
    path = tmp_path / "a\nb.yaml"
    with pytest.raises(ConfigError) as err:
        load({}, {"RELAY_CONFIG": str(path)})
    assert str(err.value) == (
        f"{str(path)!r}: cannot read the config file (No such file or directory); expected a regular YAML "
        "file of at most 1 MiB"
    )
    path.write_text("ports: '80'\nconect_timeout: 1s\n")
    with pytest.raises(ConfigError, match=r"b\.yaml':2: conect_timeout: unknown key"):
        load({}, {"RELAY_CONFIG": str(path)})


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load({}, {"RELAY_CONFIG": str(tmp_path / "absent.yaml")})


def test_example_config_documents_every_key() -> None:
    """config/relay.example.yaml parses and mentions every setting the file accepts."""
    from relay.config import FILE_KEYS

    example = Path(__file__).parent.parent / "config" / "relay.example.yaml"
    text = example.read_text()
    for key in FILE_KEYS:
        assert f"{key}:" in text, key
    load({}, {}, str(example))


def test_config_is_frozen() -> None:
    config = Config()
    with pytest.raises(AttributeError):
        config.target = "x"  # type: ignore[misc]


def test_readme_documents_every_env_var_and_flag() -> None:
    from relay.config import OPTIONS

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for opt in OPTIONS:
        assert f"`{opt.env}`" in readme, opt.env
        assert f"`{opt.flag}`" in readme, opt.flag


# --- first contact (issue 9) ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (  # the README's own example: the default listen addresses, target 127.0.0.1, same port
            {"RELAY_PORTS": "5432", "RELAY_TARGET": "127.0.0.1"},
            "RELAY_PORTS: route tcp/5432 forwards to 127.0.0.1:5432, which is its own listen address "
            "127.0.0.1:5432: every connection would come back into the relay in a loop",
        ),
        (
            {"RELAY_PORTS": "5432", "RELAY_TARGET": "localhost"},
            "route tcp/5432 forwards to localhost:5432, which is its own listen address 127.0.0.1:5432",
        ),
        (  # a wildcard listener is reached over loopback
            {"RELAY_PORTS": "8000", "RELAY_LISTEN": "0.0.0.0", "RELAY_TARGET": "127.0.0.2"},
            "forwards to 127.0.0.2:8000, which is its own listen address 0.0.0.0:8000",
        ),
        (  # 0.0.0.0 as a destination is loopback on Linux
            {"RELAY_PORTS": "8000", "RELAY_TARGET": "0.0.0.0"},
            "forwards to 0.0.0.0:8000, which is its own listen address 127.0.0.1:8000",
        ),
        (
            {"RELAY_PORTS": "8000", "RELAY_LISTEN": "::", "RELAY_TARGET": "::1"},
            "forwards to [::1]:8000, which is its own listen address [::]:8000",
        ),
        (  # one route into another's listener
            {"RELAY_PORTS": "7000:7001 7001:7000", "RELAY_TARGET": "127.0.0.1"},
            "route tcp/7000 forwards to 127.0.0.1:7001, which is route tcp/7001's listen address",
        ),
    ],
)
def test_a_route_that_targets_the_relay_itself_is_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load({}, env)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "env",
    [
        {"RELAY_PORTS": "5432:5433", "RELAY_TARGET": "127.0.0.1"},  # another port
        {"RELAY_PORTS": "5432", "RELAY_TARGET": "127.0.0.2"},  # listening on 127.0.0.1 only
        {"RELAY_PORTS": "5432", "RELAY_LISTEN": "::1", "RELAY_TARGET": "127.0.0.1"},  # other family
        {"RELAY_PORTS": "5432", "RELAY_LISTEN": "0.0.0.0", "RELAY_TARGET": "172.17.0.1"},  # unknown here
        {"RELAY_PORTS": "5432", "RELAY_TARGET": "host.docker.internal"},
    ],
)
def test_targets_that_are_not_the_relay_are_accepted(env: dict[str, str]) -> None:
    assert load({}, env).routes


def test_a_self_targeting_route_in_a_file_names_the_route(tmp_path: Path) -> None:
    path = write(
        tmp_path, "listen: 127.0.0.1\nroutes:\n  - name: db\n    listen: 6000\n    target: localhost\n"
    )
    with pytest.raises(ConfigError, match=r":3: routes\[0\]: route db forwards to localhost:6000"):
        load({}, {}, path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (  # the bad key's own line (5), not the `routes:` line (1)
            "routes:\n  - listen: 6000\n    target: x:1\n  - listen: 6001\n    tagret: y\n",
            ":5: routes[1]: unknown key 'tagret' (did you mean 'target'?)",
        ),
        (
            "routes:\n  - name: a\n    listen: nope:6000\n    target: x:1\n",
            ":3: routes[0]: 'nope' is not an IP",
        ),
        ("routes:\n  - name: a\n    listen: 6000\n    target: 'bad host'\n", ":4: routes[0]: 'bad host'"),
        ("ports: '80'\nroutes:\n\n  - name: a\n    listen: 6000\n", ":4: routes[0]: missing 'target'"),
        (
            "ports: '6000'\nroutes:\n  - {listen: 7000, target: 'x:1'}\n  - {listen: 6000, target: 'x:1'}\n",
            ":4: routes[1]: listen port 6000",
        ),
    ],
)
def test_errors_inside_routes_point_at_their_own_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load({}, {}, path)
    assert str(err.value).startswith(f"{path}{message}"), str(err.value)


@pytest.mark.parametrize("value", ["-1", "-1s", "-250ms", "0", "0s"])
def test_a_negative_or_zero_connect_timeout_has_one_message(value: str) -> None:
    with pytest.raises(ConfigError) as err:
        load({"connect_timeout": Raw(value, "--connect-timeout")}, {"RELAY_PORTS": "80"})
    assert str(err.value) == (
        f"--connect-timeout: {value!r} must be more than zero; expected a duration like 250ms, 5s or 1m"
    )


def test_negative_optional_durations_say_negative() -> None:
    with pytest.raises(ConfigError, match=r"^RELAY_IDLE_TIMEOUT: '-5s' is negative; expected a duration"):
        load({}, {"RELAY_PORTS": "80", "RELAY_IDLE_TIMEOUT": "-5s"})


def test_the_config_knows_whether_metrics_was_set() -> None:
    assert not load({}, {"RELAY_PORTS": "80"}).metrics_explicit
    assert load({}, {"RELAY_PORTS": "80", "RELAY_METRICS": "0.0.0.0:9464"}).metrics_explicit
    assert load({"metrics": Raw("9000", "--metrics")}, {"RELAY_PORTS": "80"}).metrics_explicit
