"""The app watch (relay/netwatch.py): following the app container when it starts again.

- The decisions as tables over plain values: hostname-file stamps, interface sets, route file text,
  mountinfo text, the environment.
- `AppWatch` on both loops with injected readers: a rewrite calls back once; lost interfaces set and
  clear `stranded`; a file with no links left sets `app_removed` and never calls back.
- Processes: the relay with the watch on exits with code 75 and says why when its hostname file is
  rewritten; with the file's last link removed (a bind mount in a private mount namespace) it logs the
  fix, /readyz answers 503 with it, and it keeps running; `app_watch` as an option.
- A network namespace: the relay's veth pair is deleted; /readyz answers 503 with the stranded reason,
  `relay_stranded` is 1, the relay keeps running; the pair comes back and readiness with it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.cli import EXIT_APP_RESTARTED, parse
from relay.netwatch import (
    APP_REMOVED,
    STRANDED,
    AppWatch,
    Stamp,
    bind_mounted,
    compare,
    decide,
    has_default_route,
    is_stranded,
)
from tests.netns import HOST_IP, UNAVAILABLE, Topology, ip
from tests.support import LineProcess, free_port_block, relay_args, unused_port

ROOT = Path(__file__).resolve().parent.parent

# --- decisions -------------------------------------------------------------------------------------------

START = Stamp(inode=612, mtime_ns=1_700_000_000_000_000_000, size=13, links=1)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (START, "same"),
        (Stamp(612, START.mtime_ns + 1, 13, 1), "restarted"),  # Docker writes it in place: mtime moves
        (Stamp(612, START.mtime_ns, 14, 1), "restarted"),
        (Stamp(613, START.mtime_ns, 13, 1), "restarted"),
        (Stamp(612, START.mtime_ns, 13, 2), "same"),  # another link is not a new start
        (Stamp(612, START.mtime_ns, 13, 0), "removed"),
        (Stamp(612, START.mtime_ns + 5, 13, 0), "removed"),  # removed wins: Docker cannot restart into it
    ],
)
def test_compare(now: Stamp, expected: str) -> None:
    assert compare(START, now) == expected


ROUTE_HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
V4_DEFAULT = "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
V4_LINK = "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
V4_DEFAULT_DOWN = "eth0\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\t0\t0\t0\n"
ZERO = "0" * 32
V6_DEFAULT = (
    f"{ZERO} 00 {ZERO} 00 fd000000000000000000000000000001 00000400 00000002 00000000 00000003 eth0\n"
)
V6_LO_REJECT = f"{ZERO} 00 {ZERO} 00 {ZERO} ffffffff 00000001 00000000 00200200 lo\n"
V6_LOOPBACK = f"{'0' * 31}1 80 {ZERO} 00 {ZERO} 00000000 00000003 00000000 80200001 lo\n"


@pytest.mark.parametrize(
    ("v4", "v6", "expected"),
    [
        (ROUTE_HEADER + V4_DEFAULT + V4_LINK, "", True),
        (ROUTE_HEADER + V4_LINK, "", False),
        (ROUTE_HEADER + V4_DEFAULT_DOWN, "", False),
        (ROUTE_HEADER, V6_DEFAULT, True),
        (ROUTE_HEADER, V6_LOOPBACK + V6_LO_REJECT, False),  # what a stranded namespace has
        ("", "", False),
        ("garbage\nnot a route table\n", "zz 00 zz\n", False),
        (V4_DEFAULT, "", False),  # the first line is always the header
    ],
)
def test_has_default_route(v4: str, v6: str, expected: bool) -> None:
    assert has_default_route(v4, v6) is expected


LO, ETH = frozenset({"lo"}), frozenset({"lo", "eth0"})


@pytest.mark.parametrize(
    ("start", "now", "default_route", "expected"),
    [
        (ETH, ETH, True, False),
        (ETH, LO, False, True),
        (ETH, LO, True, False),  # a default route left: not stranded
        (ETH, frozenset({"lo", "eth1"}), False, True),  # none of the start interfaces is back
        (frozenset({"lo", "eth0", "eth1"}), frozenset({"lo", "eth1"}), False, False),
        (LO, LO, False, False),  # --network none: nothing to lose
        (frozenset(), frozenset(), False, False),
    ],
)
def test_is_stranded(start: frozenset[str], now: frozenset[str], default_route: bool, expected: bool) -> None:
    assert is_stranded(start, now, default_route) is expected


DOCKER_HOSTNAME = (
    "612 600 254:0 /var/lib/docker/containers/0123abcd/hostname /etc/hostname rw,relatime - ext4 "
    "/dev/vda rw\n"
)
ROOT_MOUNT = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"


@pytest.mark.parametrize(
    ("mountinfo", "path", "expected"),
    [
        (ROOT_MOUNT + DOCKER_HOSTNAME, "/etc/hostname", True),
        (ROOT_MOUNT, "/etc/hostname", False),
        (DOCKER_HOSTNAME.replace("/etc/hostname", "/etc/hostname.bak"), "/etc/hostname", False),
        ("1 2 3:4 / /tmp/my\\040dir/h rw - tmpfs t rw\n", "/tmp/my dir/h", True),
        ("", "/etc/hostname", False),
        ("short line\n", "/etc/hostname", False),
    ],
)
def test_bind_mounted(mountinfo: str, path: str, expected: bool) -> None:
    assert bind_mounted(mountinfo, path) is expected


DOCKER_FILES = {"/.dockerenv"}


@pytest.mark.parametrize(
    ("mode", "environ", "files", "mountinfo", "runs"),
    [
        ("auto", {}, DOCKER_FILES, DOCKER_HOSTNAME, True),
        ("auto", {}, set(), DOCKER_HOSTNAME, False),  # containerd, CRI-O: bind mount, no /.dockerenv
        ("auto", {}, DOCKER_FILES, ROOT_MOUNT, False),  # /.dockerenv but hostname from the image
        ("auto", {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, DOCKER_FILES, DOCKER_HOSTNAME, False),
        ("auto", {}, {"/.dockerenv", "/run/.containerenv"}, DOCKER_HOSTNAME, False),  # Podman
        ("auto", {}, set(), ROOT_MOUNT, False),  # a plain host
        ("on", {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, set(), "", True),
        ("off", {}, DOCKER_FILES, DOCKER_HOSTNAME, False),
    ],
)
def test_decide(mode: Any, environ: dict[str, str], files: set[str], mountinfo: str, runs: bool) -> None:
    why_not = decide(mode, environ, files.__contains__, lambda: mountinfo)
    assert (why_not is None) is runs, why_not


# --- AppWatch with injected readers, on both loops ------------------------------------------------------


class Fake:
    """The readers an AppWatch polls, as values the test changes."""

    def __init__(self) -> None:
        self.stamp = START
        self.interfaces = ETH
        self.routes = (ROUTE_HEADER + V4_DEFAULT, "")
        self.restarts = 0

    def watch(self, problems: dict[str, str], on_restart: Callable[[], None] | None = None) -> AppWatch:
        def restarted() -> None:
            self.restarts += 1

        watch = AppWatch(
            problems,
            on_restart or restarted,
            hostname="/fake/hostname",
            interval=0.01,
            stat=lambda path: self.stamp,
            interfaces=lambda: self.interfaces,
            routes=lambda: self.routes,
        )
        assert watch.remember()
        return watch


def test_restart_calls_back_once_and_stops_polling(run: Callable[..., Any]) -> None:
    fake = Fake()

    async def scenario() -> None:
        problems: dict[str, str] = {}
        restarted = asyncio.Event()
        watch = fake.watch(problems, restarted.set)
        task = asyncio.ensure_future(watch.run())
        fake.stamp = Stamp(START.inode, START.mtime_ns + 1, START.size, 1)
        await asyncio.wait_for(restarted.wait(), 5)
        await asyncio.wait_for(task, 5)  # run() returns by itself after a restart
        assert watch.restarted
        watch.poll()  # nothing more happens
        assert problems == {}

    run(scenario())


def test_stranded_is_set_once_and_cleared(caplog: pytest.LogCaptureFixture) -> None:
    fake = Fake()
    problems: dict[str, str] = {}
    watch = fake.watch(problems)
    watch.poll()
    assert problems == {}
    fake.interfaces, fake.routes = LO, (ROUTE_HEADER, V6_LO_REJECT)
    with caplog.at_level("INFO", logger="relay"):
        watch.poll()
        watch.poll()
    assert "eth0" in problems[STRANDED] and "waiting for the app container" in problems[STRANDED]
    assert [r.levelname for r in caplog.records if "stranded" in r.message] == ["ERROR"]  # once
    fake.interfaces, fake.routes = ETH, (ROUTE_HEADER + V4_DEFAULT, "")
    watch.poll()
    assert problems == {}
    assert fake.restarts == 0  # stranded alone never exits


def test_removed_app_says_how_to_fix_and_does_not_exit(caplog: pytest.LogCaptureFixture) -> None:
    fake = Fake()
    problems: dict[str, str] = {}
    watch = fake.watch(problems)
    fake.stamp = Stamp(START.inode, START.mtime_ns, START.size, 0)
    fake.interfaces, fake.routes = LO, ("", "")
    with caplog.at_level("INFO", logger="relay"):
        watch.poll()
        watch.poll()
    # The fix that works once the app was recreated (Compose 1.29: --always-recreate-deps then does nothing).
    assert "docker compose up -d --force-recreate relay" in problems[APP_REMOVED]
    assert "--always-recreate-deps" not in problems[APP_REMOVED]
    assert STRANDED in problems
    removed = [r for r in caplog.records if "app container removed" in r.message]
    assert len(removed) == 1 and "--force-recreate relay" in removed[0].message
    assert fake.restarts == 0 and not watch.restarted


def test_unreadable_hostname_file_is_no_restart(caplog: pytest.LogCaptureFixture) -> None:
    fake = Fake()
    problems: dict[str, str] = {}
    watch = fake.watch(problems)

    def gone(path: str) -> Stamp:
        raise PermissionError(13, "Permission denied")

    watch._stat = gone
    with caplog.at_level("INFO", logger="relay"):
        watch.poll()
        watch.poll()
    assert fake.restarts == 0
    assert len([r for r in caplog.records if "cannot read" in r.message]) == 1


# --- the option ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "expected"),
    [
        ([], {}, "auto"),
        (["--app-watch", "off"], {}, "off"),
        (["--app-watch", "ON"], {}, "on"),
        ([], {"RELAY_APP_WATCH": "off"}, "off"),
        (["--app-watch", "auto"], {"RELAY_APP_WATCH": "off"}, "auto"),
    ],
)
def test_app_watch_option(argv: list[str], environ: dict[str, str], expected: str) -> None:
    _, config, _ = parse(["--ports", "80", *argv], environ)
    assert config.app_watch == expected


@pytest.mark.parametrize(("value", "expected"), [("off", "off"), ("on", "on"), ("auto", "auto")])
def test_app_watch_in_yaml(tmp_path: Path, value: str, expected: str) -> None:
    """YAML reads a bare on/off as a boolean; both spellings mean the mode."""
    path = tmp_path / "relay.yaml"
    path.write_text(f"ports: '80'\napp_watch: {value}\n")
    _, config, _ = parse(["--config", str(path)], {})
    assert config.app_watch == expected


def test_bad_app_watch_is_one_line_and_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "--ports", "80"],
        env={**env, "RELAY_APP_WATCH": "sometimes"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "relay: error: RELAY_APP_WATCH: 'sometimes' is not one of auto, on, off"
    ]


# --- processes -----------------------------------------------------------------------------------------

# The relay's own CLI with the watched file injected (the Server constructor parameter, tests only).
CHILD = """
import sys
from relay import cli, logs
from relay.server import Server
path = sys.argv[1]
_, config, reload = cli.parse(sys.argv[2:], {})
logs.setup(config.log_level, config.log_format)
async def main() -> int:
    return await cli.run_server(
        Server(config, reload=reload, app_watch_file=path, endpoint=cli.http_endpoint)
    )
sys.exit(cli.run_on_loop(cli.loop_factory(config.loop), main()))
"""


def child_argv(path: Path, loop: str, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        CHILD,
        str(path),
        *relay_args(unused_port(), unused_port(), "--app-watch", "on"),
        "--loop",
        loop,
        *extra,
    ]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k != "PORTS"}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_rewritten_hostname_file_exits_75(tmp_path: Path, loop: str) -> None:
    """Steps: start the relay with the watch on a temp file; rewrite the file as Docker does (in place,
    same size); the relay logs `app restarted`, stops listening at once and exits with code 75."""
    pytest.importorskip(loop)
    hostname = tmp_path / "hostname"
    hostname.write_text("0123abcd\n")
    with LineProcess(child_argv(hostname, loop), clean_env(), cwd=ROOT) as relay:
        relay.wait_for("app watch: on")
        relay.wait_for("ready")
        hostname.write_text("0123abcd\n")
        os.utime(hostname, ns=(0, 0))  # a different mtime even on a coarse clock
        line = relay.wait_for("app restarted:")
        assert "exit code 75" in line and str(hostname) in line
        assert relay.proc.wait(10) == EXIT_APP_RESTARTED
        relay.wait_for("app restarted: stopped listening")
        relay.wait_for("stopped")


def test_sigterm_with_the_watch_on_is_a_clean_stop(tmp_path: Path) -> None:
    hostname = tmp_path / "hostname"
    hostname.write_text("0123abcd\n")
    with LineProcess(child_argv(hostname, "asyncio"), clean_env(), cwd=ROOT) as relay:
        relay.wait_for("ready")
        assert relay.stop() == 0
    assert "app restarted" not in relay.output()


def _metrics_address(relay: LineProcess) -> str:
    line = relay.wait_for("metrics and health: http://")
    match = re.search(r"http://([^/]+)/metrics", line)
    assert match, line
    return match.group(1)


def _get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read().decode()


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1) for a bind mount"
)
def test_hostname_file_without_links_says_recreate_and_keeps_running(tmp_path: Path) -> None:
    """Steps: bind-mount a file over the watched path in a private mount namespace (as Docker mounts the
    app's hostname file), start the relay there, delete the file's only name (as removing the container
    does): the relay logs the fix, /readyz answers 503 with it, it keeps running; SIGTERM stops it (0)."""
    source, watched = tmp_path / "container-hostname", tmp_path / "hostname"
    source.write_text("0123abcd\n")
    watched.write_text("")
    argv = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        'mount --bind "$1" "$2" && shift 2 && exec "$@"',
        "sh",
        str(source),
        str(watched),
        *child_argv(watched, "asyncio", "--metrics", f"127.0.0.1:{free_port_block(1)}"),
    ]
    with LineProcess(argv, clean_env(), cwd=ROOT) as relay:
        address = _metrics_address(relay)
        relay.wait_for("ready")
        assert _get(address, "/readyz")[0] == 200
        source.unlink()
        line = relay.wait_for("app container removed:")
        assert "docker compose up -d --force-recreate relay" in line and "--always-recreate-deps" not in line
        status, body = _get(address, "/readyz")
        assert status == 503
        assert any("--force-recreate relay" in reason for reason in json.loads(body)["reasons"])
        assert "relay_stranded 1.0" in _get(address, "/metrics")[1]
        assert relay.proc.poll() is None
        assert relay.stop() == 0


# --- a network namespace whose interfaces go away ------------------------------------------------------


def _links(namespace: str) -> set[str]:
    out = subprocess.run(
        ["ip", "-n", namespace, "-o", "link", "show"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def _in_app(topo: Topology, address: str, path: str) -> tuple[int, str]:
    """GET http://ADDRESS/PATH from inside the app namespace: (status, body)."""
    code = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        "    r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode())\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code); print(e.read().decode())\n"
    )
    result = topo.run_in_app(["-c", code, f"http://{address}{path}"])
    assert result.returncode == 0, result.stderr
    status, _, body = result.stdout.partition("\n")
    return int(status), body


@pytest.fixture
def stranded_topology(topology: Callable[..., Topology]) -> Iterator[Topology]:
    if UNAVAILABLE is not None:
        pytest.skip(UNAVAILABLE)
    yield topology(default_route=True)


@pytest.mark.netns
def test_lost_interfaces_make_readyz_503_and_the_relay_stays(stranded_topology: Topology) -> None:
    """Steps: the relay (watch on) in an app namespace with a veth pair to a host namespace and a default
    route through it; a round trip works. Delete the pair (as Docker does when the app container stops):
    the relay logs `stranded` once, /readyz answers 503 with the reason, relay_stranded is 1, and it keeps
    running. Add the pair back: readiness returns, relay_stranded is 0. SIGTERM: exit 0."""
    topo = stranded_topology
    (veth,) = _links(topo.app) - {"lo"}
    (peer,) = _links(topo.host) - {"lo"}
    topo.host_services(HOST_IP, 8000)
    # A port of the namespace's own loopback: nothing else can hold it.
    relay = topo.relay(["--ports", "8000", "--app-watch", "on", "--metrics", "127.0.0.1:9464"])
    address = _metrics_address(relay)
    assert topo.app_client("4:8000:8000").returncode == 0
    assert _in_app(topo, address, "/readyz")[0] == 200

    mark = relay.mark()
    ip("-n", topo.host, "link", "delete", peer)  # both ends go
    line = relay.wait_for("stranded:", since=mark)
    assert veth in line
    status, body = _in_app(topo, address, "/readyz")
    assert status == 503
    (reason,) = json.loads(body)["reasons"]
    assert reason.startswith("stranded:") and veth in reason
    assert "relay_stranded 1.0" in _in_app(topo, address, "/metrics")[1]
    assert relay.proc.poll() is None

    mark = relay.mark()
    ip("link", "add", veth, "netns", topo.app, "type", "veth", "peer", "name", peer, "netns", topo.host)
    ip("-n", topo.app, "link", "set", veth, "up")
    relay.wait_for("no longer stranded", since=mark)
    assert _in_app(topo, address, "/readyz")[0] == 200
    assert "relay_stranded 0.0" in _in_app(topo, address, "/metrics")[1]
    assert len([ln for ln in relay.lines if "ERROR" in ln and "stranded:" in ln]) == 1
    assert relay.stop() == 0


# --- the holder example ----------------------------------------------------------------------------------


def test_holder_example_shape() -> None:
    """compose-examples/holder: app and relay both join the holder's namespace; what is per namespace
    (extra_hosts) sits on the holder; every service restarts on its own; the relay's routes parse."""
    found = yaml.safe_load((ROOT / "compose-examples" / "holder" / "compose.yaml").read_text())["services"]
    assert set(found) == {"holder", "app", "relay"}
    assert found["app"]["network_mode"] == found["relay"]["network_mode"] == "service:holder"
    assert "network_mode" not in found["holder"]
    assert found["holder"]["extra_hosts"] == ["host.docker.internal:host-gateway"]
    assert {s["restart"] for s in found.values()} == {"unless-stopped"}
    _, config, _ = parse([], found["relay"]["environment"])
    assert [(r.listen[0].port, r.target, r.target_port) for r in config.routes] == [(8000, "auto", 8000)]
