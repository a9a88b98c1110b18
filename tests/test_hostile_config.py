"""Config input a user (or a neighbour with write access to a mounted file) can get wrong or make hostile:
odd files, YAML alias bombs, huge values, and the same things loaded by SIGHUP into a serving relay.

Every case ends in one short line naming the source, an excerpt of the value and the expected form, exit
code 2 at start and the running configuration kept on reload, within seconds and bounded memory."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import time
from pathlib import Path

import pytest

from relay.config import OPTIONS, ConfigError, Raw, load
from relay.socat import parse as parse_socat
from tests.support import RelayProcess, alias_bomb, connect_when_ready, free_port_block
from tests.test_cli import echo_server, run_relay

MAX_LINE = 500  # an error line quotes excerpts (60 characters each), not the value
FILE_FORM = "expected a regular YAML file of at most 1 MiB"


def limit_memory() -> None:
    """1 GiB of address space for the relay under test: today's unbounded reads and expansions fail
    there instead of taking the machine's memory."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def one_line(result_stderr: str) -> str:
    lines = result_stderr.splitlines()
    assert len(lines) == 1, result_stderr[:2000]
    assert "Traceback" not in result_stderr
    assert len(lines[0]) < MAX_LINE, lines[0][:2000]
    return lines[0]


@pytest.mark.parametrize(
    "kind", ["fifo", "dev-zero", "directory", "too-large", "alias-bomb", "deep-alias-bomb"]
)
def test_odd_config_files_exit_2_with_one_short_line(tmp_path: Path, kind: str) -> None:
    """Steps: `relay --config PATH` where PATH is a FIFO nobody writes (hung on main), /dev/zero (grew
    without bound), a directory, a file over 1 MiB, or a few hundred bytes of YAML aliases (6 s, 1.4 GB
    and a 351 MB error line on main; deeper: a MemoryError traceback). Each exits 2 with one short line
    naming the path and the expected form, within the subprocess timeout and a 1 GiB address space."""
    path = tmp_path / "relay.yaml"
    expected = FILE_FORM
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = Path("/dev/zero")
    elif kind == "directory":
        path = tmp_path
    elif kind == "too-large":
        path.write_text("ports: '80'\n" + "#" * 80 + "\n" * (1 << 20))
    else:
        path.write_text(alias_bomb(7 if kind == "alias-bomb" else 10))
        expected = "expected a settings file without so many aliases"
    result = run_relay(["--config", str(path)], timeout=20, preexec_fn=limit_memory)
    assert result.returncode == 2, result.stderr[:2000]
    line = one_line(result.stderr)
    assert line.startswith(f"relay: error: {path}"), line
    assert expected in line, line


def test_moderate_yaml_anchors_still_load(tmp_path: Path) -> None:
    """Anchors have honest uses (one TLS block for several routes): the limit leaves them alone, while a
    bomb of the same shape is refused."""
    path = tmp_path / "relay.yaml"
    path.write_text(
        "target: 127.0.0.1\nroutes:\n"
        "  - {listen: 6000, target: 'db:5432', target_tls: &tls {verify: false}}\n"
        "  - {listen: 6001, target: 'db:5433', target_tls: *tls}\n"
    )
    config = load({}, {}, str(path))
    assert [r.target_tls for r in config.routes] == [config.routes[0].target_tls] * 2
    assert config.routes[0].target_tls is not None
    path.write_text(alias_bomb(7))
    with pytest.raises(ConfigError, match="YAML aliases expand to more than"):
        load({}, {}, str(path))


LONG = "1" * 20_000 + "\nsecond line" + "x" * 20_000


@pytest.mark.parametrize("option", [opt.key for opt in OPTIONS if opt.key != "ports"])
def test_an_error_quotes_an_excerpt_of_a_long_value(option: str, tmp_path: Path) -> None:
    """A 40 kB value with a line break, from the environment, the command line and the file: the error is
    one line that names the source and starts quoting the value, without carrying all of it."""
    opt = next(o for o in OPTIONS if o.key == option)
    path = tmp_path / "relay.yaml"
    path.write_text(f"ports: '80'\n{option}: {json.dumps(LONG)}\n")
    for source, environ, config_path in (
        (opt.env, {"RELAY_PORTS": "80", opt.env: LONG}, None),
        (f"{opt.flag}: ", {}, None),
        (f"{path}:2: {option}", {}, str(path)),
    ):
        cli = {option: Raw(LONG, opt.flag)} if source.startswith("--") else {}
        with pytest.raises(ConfigError) as err:
            load({**cli, "ports": Raw("80", "--ports")}, environ, config_path)
        message = str(err.value)
        assert message.startswith(source), message[:300]
        assert "'1111111111" in message and "\n" not in message, message[:300]
        assert len(message) < MAX_LINE, message[:MAX_LINE]


@pytest.mark.parametrize(
    "args",
    [
        ["--ports", LONG],
        ["--prots", LONG],
        ["tcp-listen:" + LONG, "tcp:h:1"],
        ["tcp-listen:80", "tcp:" + LONG],
        ["tcp-listen:80," + LONG, "tcp:h:1"],
        ["tcp-listen:80", "tcp:h:1,connect-timeout=" + LONG],
        ["-T", LONG, "tcp-listen:80", "tcp:h:1"],
    ],
    ids=["flag", "unknown-flag", "socat-listen", "socat-target", "socat-option", "socat-value", "socat-T"],
)
def test_command_line_errors_quote_an_excerpt(args: list[str]) -> None:
    result = run_relay(args)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "1111111111" in line, line


def test_file_errors_quote_an_excerpt_of_keys_and_values(tmp_path: Path) -> None:
    """An unknown key, a route key and a bad !!tag value, each 40 kB: one short line each."""
    path = tmp_path / "relay.yaml"
    key = "k" * 40_000
    for text in (
        f"ports: '80'\n{key}: 1\n",
        f"routes:\n  - {{listen: 6000, target: 'db:1', {key}: 1}}\n",
        f"ports: '80'\nbacklog: !!int {'9' * 30_000}x\n",
        f"ports: '80'\nlisten: ['{'1' * 40_000}']\n",
    ):
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load({}, {}, str(path))
        message = str(err.value)
        assert message.startswith(str(path)) and "\n" not in message, message[:300]
        assert len(message) < MAX_LINE, message[:MAX_LINE]


def test_socat_errors_quote_an_excerpt() -> None:
    with pytest.raises(ConfigError) as err:
        parse_socat(["tcp-listen:80,bind=" + LONG, "tcp:h:1"])
    assert len(str(err.value)) < MAX_LINE, str(err.value)[:MAX_LINE]


def round_trip(client: socket.socket, payload: bytes) -> bytes:
    client.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = client.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


@pytest.mark.parametrize("kind", ["alias-bomb", "fifo", "too-large", "dev-zero"])
def test_a_sighup_with_a_hostile_file_never_stalls_traffic(tmp_path: Path, kind: str) -> None:
    """Steps: a relay serving a held connection from its config file; the file is replaced by a bomb, a
    FIFO, a file over 1 MiB, or a link to /dev/zero, and SIGHUP sent; until the reload has logged its
    one error line, the held connection keeps echoing, each round trip within 1 s (on main the loop froze
    for seconds on the bomb, and for good on the FIFO); then a new connection is served too."""
    listen = free_port_block(1)
    path = tmp_path / "relay.yaml"
    with echo_server() as target:
        path.write_text(f"ports: '{listen}:{target}'\ntarget: 127.0.0.1\nlisten: 127.0.0.1\nmetrics: off\n")
        with RelayProcess(["--config", str(path)], preexec_fn=limit_memory) as relay:
            relay.wait_for("ready")
            held = connect_when_ready("127.0.0.1", listen)
            held.settimeout(1.0)  # the structural bound: a stalled loop fails the round trip
            assert round_trip(held, b"before") == b"before"
            path.unlink()
            if kind == "fifo":
                os.mkfifo(path)
            elif kind == "dev-zero":
                path.symlink_to("/dev/zero")
            elif kind == "too-large":
                path.write_text("ports: '80'\n" + "\n" * (1 << 20))
            else:
                path.write_text(alias_bomb(8))
            mark = relay.mark()
            relay.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 15
            rounds = 0
            while not any("reload failed" in line for line in relay.lines[mark:]):
                assert time.monotonic() < deadline, relay.output()[-2000:]
                payload = f"during {rounds}".encode()
                assert round_trip(held, payload) == payload
                rounds += 1
            line = relay.wait_for("reload failed", since=mark)
            assert "keeping the running configuration" in line and len(line) < MAX_LINE + 100, line[:2000]
            assert str(path) in line, line
            assert round_trip(held, b"after") == b"after"
            held.close()
            fresh = connect_when_ready("127.0.0.1", listen)
            fresh.settimeout(5)
            assert round_trip(fresh, b"new") == b"new"
            fresh.close()
            assert relay.stop() == 0


def blocked_in_fifo_open(pid: int) -> bool:
    """Whether a thread of `pid` waits in open() of a FIFO for a writer (the kernel's wait_for_partner)."""
    for wchan in Path(f"/proc/{pid}/task").glob("*/wchan"):
        try:
            if wchan.read_text() == "wait_for_partner":
                return True
        except OSError:
            continue  # the thread ended meanwhile
    return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_a_reload_stuck_reading_a_file_holds_neither_traffic_nor_a_stop(tmp_path: Path) -> None:
    """Steps: SIGHUP with a file whose tls: cert= is a FIFO nobody writes, so reading it blocks for good
    (as a stalled network mount would); once the relay's reading thread waits in that open(), the held
    connection still echoes, each round trip within 1 s, and SIGTERM still drains and exits 0 (on main
    the event loop itself sat in the open(): no byte relayed, no signal handled). The FIFO stands for any
    read that never returns: should tls.py come to refuse FIFOs as the config file does, block elsewhere."""
    listen = free_port_block(1)
    path, fifo = tmp_path / "relay.yaml", tmp_path / "cert.pem"
    os.mkfifo(fifo)
    base = f"ports: '{listen}:{{target}}'\ntarget: 127.0.0.1\nlisten: 127.0.0.1\nmetrics: off\n"
    with echo_server() as target:
        path.write_text(base.format(target=target))
        with RelayProcess(["--config", str(path)]) as relay:
            relay.wait_for("ready")
            held = connect_when_ready("127.0.0.1", listen)
            held.settimeout(1.0)
            assert round_trip(held, b"before") == b"before"
            path.write_text(base.format(target=target) + f"tls: cert={fifo},key={fifo}\n")
            relay.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while not blocked_in_fifo_open(relay.proc.pid):
                assert time.monotonic() < deadline, relay.output()
                time.sleep(0.01)
            for rounds in range(5):
                payload = f"while stuck {rounds}".encode()
                assert round_trip(held, payload) == payload
            held.close()
            assert relay.stop(timeout=10) == 0
        assert not any("reloaded" in line for line in relay.lines)
