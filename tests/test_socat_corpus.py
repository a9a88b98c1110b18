"""The corpus in tests/data/socat_corpus.yaml: real socat lines and docker-host setups, each run through the
relay and through socat 1.7.4 in network namespaces of their own (tests/netns.py's topology).

A socat line, in steps:
1. Map what it names to the test's own namespaces: host names into the app namespace's hosts file and IPv4
   addresses onto the host namespace's end of the veth pair (both 10.200.0.1's side), socket files and
   certificates into a temporary folder. Nothing outside the namespaces is ever reached.
2. Lines the relay refuses on purpose (`refuse:`): the relay exits 2 with one line giving the reason.
3. Otherwise socat runs first; its listeners are read with `ss` inside the namespace (socat has nothing to
   wait on). A line socat itself refuses (`socat_refuses:`) must make the relay exit 2 as well.
4. The relay runs the same argv; once it logs `ready`, its listeners must be socat's (address, family,
   protocol), plus [::1] beside a 0.0.0.0 that socat listens on (documented).
5. For TCP and UDP targets over IPv4, bytes through the relay to host_services.py (IPv4 only) at the
   mapped target (echo and half-close; datagrams for UDP), from the app namespace's loopback.
`needs:` lines are expected failures until the relay has the feature (FEATURES asks the relay itself);
`differs:` lines document a known gap and fail once it is closed, so the key gets removed.

A docker-host setup: the relay in the app namespace with the setup's environment, reached from the host
namespace (another container, in Docker terms) at the app namespace's address, TCP and UDP.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay import socat
from relay.config import ConfigError
from tests.netns import APP_IP, HOST_IP, HOST_SERVICES, ROOT, UNAVAILABLE, Topology, ip
from tests.support import LineProcess

CORPUS = yaml.safe_load((Path(__file__).parent / "data" / "socat_corpus.yaml").read_text(encoding="utf-8"))
SOCAT = shutil.which("socat")
pytestmark = [
    pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or ""),
    pytest.mark.skipif(SOCAT is None, reason="socat is not installed"),
]
RELAY_ENV = {"RELAY_METRICS": "off"}  # the health endpoint is the relay's own listener, not the line's
CONNECT = re.compile(r"^(tcp[46]?(-connect)?|udp[46]?(-connect|-sendto)?|openssl(-connect)?)$")
UNIX_KEYWORDS = ("unix-listen", "unix-l", "unix-connect", "unix-client", "unix")
CERT_OPTIONS = ("cert", "certificate", "key", "cafile")
LOOPBACK = {"localhost": "127.0.0.1", "ip6-localhost": "::1"}
Listener = tuple[str, str, str]  # (protocol, address, port or socket path)


# --- what the relay supports today -------------------------------------------------------------------


def _accepts(argv: list[str], refusal: str) -> bool:
    """Whether the relay's socat parser takes `argv` without the refusal a missing feature gives."""
    try:
        socat.parse(argv)
    except ConfigError as err:
        return refusal not in str(err)
    return True


def _dual_stack(topology: Callable[..., Topology]) -> bool:
    """Whether the relay's TCP6-LISTEN serves IPv4 clients too, as socat's does (asked of a relay)."""
    topo = topology()
    process = topo.relay(["tcp6-listen:7", "tcp:127.0.0.1:9"], RELAY_ENV, wait=False)
    process.wait_for("ready")
    return ("tcp", "*", "7") in _listeners(topo.app)


FEATURES: dict[str, Callable[[Callable[..., Topology]], bool]] = {
    "tls": lambda _: _accepts(["openssl-listen:1,cert=c.pem,verify=0", "tcp:h:1"], "not a supported"),
    "access": lambda _: _accepts(["tcp-listen:1,range=10.0.0.0/8", "tcp:h:1"], "'range' is not supported"),
    "udp-to-tcp": lambda _: _accepts(["udp-listen:1", "tcp:h:1"], "cannot forward to a TCP target"),
    "dual-stack": _dual_stack,
}


# --- namespaces: listeners, targets -----------------------------------------------------------------------


def _listeners(namespace: str) -> set[Listener]:
    """TCP and UDP sockets listening (bound, for UDP) and socket files listened on, as `ss` shows them."""
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, "ss", "-Hlntux"], capture_output=True, text=True, timeout=10
    ).stdout
    found: set[Listener] = set()
    for line in out.splitlines():
        fields = line.split()
        if fields[0] in ("tcp", "udp"):
            address, _, port = fields[4].rpartition(":")
            found.add((fields[0], address.strip("[]"), port))
        elif fields[0] == "u_str":
            found.add(("unix", "", fields[4]))
    return found


def _veth(namespace: str) -> str:
    out = subprocess.run(
        ["ip", "-n", namespace, "-o", "link", "show", "type", "veth"],
        capture_output=True,
        text=True,
        timeout=10,
    ).stdout
    return out.split(":")[1].strip().partition("@")[0]


def _split(address: str) -> tuple[str, list[str], list[str]]:
    head, *options = address.split(",")
    keyword, _, rest = head.partition(":")
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]")
        return keyword.lower(), [host, port.lstrip(":")], options
    return keyword.lower(), rest.split(":") if rest else [], options


class Scene:
    """One line's namespaces, with the line rewritten to them."""

    def __init__(self, topo: Topology, folder: Path, argv: list[str]) -> None:
        self.topo, self.folder = topo, folder
        self.targets: list[tuple[str, str, int]] = []  # (protocol, address in the namespaces, port)
        self.names: dict[str, str] = {}
        self.argv = [self._rewrite(arg) for arg in argv]
        self._map_names()

    def _rewrite(self, arg: str) -> str:
        if arg.startswith("-") or (":" not in arg and not arg.startswith("/")):
            return arg
        if arg.startswith("/"):
            return self._path(arg)
        keyword, params, options = _split(arg)
        if keyword in UNIX_KEYWORDS:
            head, _, rest = arg.partition(",")
            prefix, _, path = head.partition(":")
            return f"{prefix}:{self._path(path)}" + (f",{rest}" if rest else "")
        options = [self._certificate(option) for option in options]
        if CONNECT.match(keyword) and len(params) == 2 and params[1].isdigit():
            self._target(keyword, params[0], int(params[1]))
        return ",".join([arg.split(",")[0], *options])

    def _path(self, path: str) -> str:
        return str(self.folder / path.strip("/").replace("/", "_"))

    def _certificate(self, option: str) -> str:
        name, eq, _ = option.partition("=")
        if not eq or name.lower() not in CERT_OPTIONS:
            return option
        return f"{name}={self.folder / ('key.pem' if name.lower() == 'key' else 'cert.pem')}"

    def _target(self, keyword: str, host: str, port: int) -> None:
        protocol = "udp" if keyword.startswith("udp") else "tcp"
        address = LOOPBACK.get(host, host)
        try:
            ipaddress.ip_address(address)
        except ValueError:
            self.names[host] = address = HOST_IP
        if ":" not in address and not keyword.startswith(("tcp6", "udp6")):  # host_services.py is IPv4
            self.targets.append((protocol, address, port))

    def _map_names(self) -> None:
        hosts = Path("/etc/netns") / self.topo.app / "hosts"
        with hosts.open("a", encoding="utf-8") as fh:
            fh.writelines(f"{address}\t{name}\n" for name, address in self.names.items())
        app_veth, host_veth = _veth(self.topo.app), _veth(self.topo.host)
        for _, address, _ in self.targets:
            if "." in address and not address.startswith("127.") and address != HOST_IP:
                ip("-n", self.topo.host, "addr", "add", f"{address}/32", "dev", host_veth)
                ip("-n", self.topo.app, "route", "add", f"{address}/32", "dev", app_veth)

    def services(self) -> None:
        """host_services.py on every TCP or UDP target: in the host namespace, or on the app namespace's
        loopback for a loopback target."""
        for _, address, port in self.targets:
            loopback = address.startswith("127.") or address == "::1"
            namespace = self.topo.app if loopback else self.topo.host
            argv = [sys.executable, str(HOST_SERVICES), address, str(port)]
            process = LineProcess(["ip", "netns", "exec", namespace, *argv], cwd=ROOT)
            self.topo.processes.append(process)
            process.wait_for("ready")


def _certificates(folder: Path) -> None:
    key, cert = str(folder / "key.pem"), str(folder / "cert.pem")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-keyout",
            key,
            "-out",
            cert,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def folder() -> Iterator[Path]:
    """A short folder for socket files (sun_path holds 107 bytes) and certificates."""
    path = Path(tempfile.mkdtemp(prefix="corpus"))
    try:
        _certificates(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- running socat and the relay ---------------------------------------------------------------------------


def _socat_listeners(scene: Scene) -> set[Listener] | None:
    """socat's listeners once it has opened them, or None when socat refused the line (exited)."""
    process = LineProcess(["ip", "netns", "exec", scene.topo.app, str(SOCAT), *scene.argv], cwd=scene.folder)
    scene.topo.processes.append(process)
    deadline = time.monotonic() + 10
    found: set[Listener] = set()
    while time.monotonic() < deadline:  # socat prints nothing when it listens: poll, bounded
        exited = process.proc.poll() is not None
        found = _listeners(scene.topo.app)
        if found or exited:
            break
        time.sleep(0.05)
    process.kill()
    if found:
        return found
    assert process.proc.returncode not in (None, -9), (
        f"socat neither listened nor exited:\n{process.output()}"
    )
    return None


def _relay_refusal(topo: Topology, argv: list[str], env: dict[str, str] | None = None) -> str:
    """The relay's one error line for argv; fails unless it exits 2 with exactly one line."""
    process = topo.relay(argv, {**RELAY_ENV, **(env or {})}, wait=False)
    code = process.proc.wait(30)
    process.kill()
    lines = process.output().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("relay: error: "), process.output()
    return lines[0]


def _relay_listeners(scene: Scene) -> tuple[set[Listener] | None, str]:
    """The relay's listeners once ready, or None and its output when it did not start."""
    process = scene.topo.relay(scene.argv, RELAY_ENV, wait=False)
    try:
        process.wait_for("ready")
    except AssertionError:
        process.kill()
        return None, process.output()
    return _listeners(scene.topo.app), process.output()


def _compare(expected: set[Listener], got: set[Listener]) -> list[str]:
    """What differs, allowing the relay's documented [::1] beside socat's 0.0.0.0."""
    beside = {(proto, "::1", port) for proto, address, port in expected if address == "0.0.0.0"}
    problems = [f"socat listens on {x}, the relay does not" for x in sorted(expected - got)]
    problems += [f"the relay also listens on {x}" for x in sorted(got - expected - beside)]
    return problems


def _round_trip(scene: Scene, listeners: set[Listener]) -> None:
    """Bytes through the relay to each target (app_client.py: echo and half-close, or datagrams). Not for
    a loopback target on a port the line also listens on (UDP-RECVFROM:53 to 127.0.0.11:53): the target's
    stand-in could not bind beside the relay's listener, as the real one runs in another namespace."""
    checks = []
    for protocol, target, port in scene.targets:
        if target.startswith("127.") and any(p == protocol and lp == str(port) for p, _, lp in listeners):
            continue
        for listen_proto, address, listen_port in listeners:
            family = {"0.0.0.0": "4", "127.0.0.1": "4", "::1": "6", "*": "4", "::": "6"}.get(address)
            if listen_proto == protocol and family:
                checks.append(f"{'u' + family if protocol == 'udp' else family}:{listen_port}:{port}")
                break
    if not checks:
        return
    scene.services()
    result = scene.topo.app_client(*checks)
    assert result.returncode == 0, result.stdout + result.stderr


def _run(scene: Scene) -> list[str]:
    """Run the line through socat and the relay; the differences (none when it runs as socat does)."""
    expected = _socat_listeners(scene)
    assert expected is not None, "socat refused a line the corpus expects to run"
    got, output = _relay_listeners(scene)
    if got is None:
        return [f"the relay did not start: {output.strip()}"]
    problems = _compare(expected, got)
    if not problems and not any(arg.lower().startswith("openssl") for arg in scene.argv):
        _round_trip(scene, got)
    return problems


# --- the tests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", CORPUS["socat"], ids=[line["id"] for line in CORPUS["socat"]])
def test_socat_line(line: dict[str, Any], topology: Callable[..., Topology], folder: Path) -> None:
    needs = line.get("needs")
    if needs is not None:
        assert needs in FEATURES, f"unknown feature {needs!r}; known: {', '.join(FEATURES)}"
    topo = topology()
    scene = Scene(topo, folder, line["argv"])
    if "refuse" in line:
        assert line["refuse"] in _relay_refusal(topo, scene.argv)
        return
    if line.get("socat_refuses"):
        assert _socat_listeners(scene) is None, "socat ran a line the corpus says it refuses"
        _relay_refusal(topo, scene.argv)
        return
    landed = needs is None or FEATURES[needs](topology)
    problems = _run(scene)
    if not landed and problems:
        pytest.xfail(f"expected to run once {needs} lands: {'; '.join(problems)}")
    if "differs" in line and landed:
        assert problems, f"runs as socat does now: remove `differs: {line['differs']}` from the corpus"
        return
    assert not problems, "; ".join(problems)


def _reach(topo: Topology, item: str) -> None:
    """From the host namespace (another container), to the relay at the app namespace's address: a
    payload echoed over TCP, or a datagram answered over UDP by the host service behind it."""
    protocol, _, ports = item.partition("/")
    listen, _, target = ports.partition(">")
    code = (
        "import socket,sys\n"
        f"proto,port,target='{protocol}',{int(listen)},{int(target or listen)}\n"
        "if proto=='tcp':\n"
        f"    s=socket.create_connection(('{APP_IP}',port),timeout=10); s.sendall(b'E'+b'x'*4096)\n"
        "    got=b''\n"
        "    while len(got)<4096: got+=s.recv(65536)\n"
        "    assert got==b'x'*4096, got[:40]\n"
        "else:\n"
        "    s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM); s.settimeout(10)\n"
        f"    s.sendto(b'ping',('{APP_IP}',port)); data=s.recv(65536)\n"
        "    assert data==b'%d ping'%target, data\n"
    )
    result = subprocess.run(
        ["ip", "netns", "exec", topo.host, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, f"{item}: {result.stderr}"


@pytest.mark.parametrize("setup", CORPUS["docker_host"], ids=[s["id"] for s in CORPUS["docker_host"]])
def test_docker_host_setup(setup: dict[str, Any], topology: Callable[..., Topology]) -> None:
    topo = topology()
    env = {"PORTS": setup["ports"], **setup["env"]} if "ports" in setup else dict(setup["env"])
    if "refuse" in setup:
        assert _relay_refusal(topo, [], env) == f"relay: error: {setup['refuse']}"
        return
    targets = sorted(
        {int(item.partition("/")[2].partition(">")[2] or item.partition("/")[2]) for item in setup["reach"]}
    )
    services = topo.host_services(HOST_IP, *targets)
    assert services.proc.poll() is None
    relay = topo.relay([], {**RELAY_ENV, **env})
    output = relay.output()
    assert "configured the docker-host way" in output
    assert "every container on this container's networks can reach" in output
    if "warn" in setup:
        assert setup["warn"] in output
    for item in setup["reach"]:
        _reach(topo, item)


def test_corpus_ids_are_unique_and_sourced() -> None:
    """The corpus stays usable as it grows: every entry named once, with where it was seen."""
    for section in ("socat", "docker_host"):
        ids = [entry["id"] for entry in CORPUS[section]]
        assert len(ids) == len(set(ids)), section
        assert all(entry.get("source") for entry in CORPUS[section]), section
    assert len(CORPUS["socat"]) >= 50 and len(CORPUS["docker_host"]) >= 10
