"""compose-examples/prometheus/ against a real Prometheus (Debian's package: `prometheus`, `promtool`).

- promtool checks the example's prometheus.yml and relay-alerts.yml and runs relay-alerts.test.yml;
- a Prometheus server started here (own storage folder, web on 127.0.0.1, scrape and evaluation every
  1 s, relay-alerts.yml loaded) scrapes a relay started here, and its HTTP API answers what the traffic
  sent here implies; every metric name used by the rules and the Grafana dashboard exists in that live
  scrape, and every rule evaluates without error.

Prometheus's scrape manager starts its first scrape about 6 s after start (its reload interval): the
waits below are bounded polls of the HTTP API, the only way to see what the server has.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import socketserver
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import LineProcess, RelayProcess, free_port_block

EXAMPLE = Path(__file__).resolve().parent.parent / "compose-examples" / "prometheus"
RULES = EXAMPLE / "relay-alerts.yml"
DASHBOARD = EXAMPLE / "grafana-dashboard.json"
WAIT = 40.0  # seconds for any one condition: the first scrape alone takes ~6 s

pytestmark = pytest.mark.timeout(150)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus; scripts/test installs it as root)")
    return subprocess.run(["promtool", *args], cwd=EXAMPLE, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_config_and_the_rules() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    result = _promtool("check", "rules", "relay-alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_promtool_unit_tests_cover_every_rule() -> None:
    result = _promtool("test", "rules", "relay-alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((EXAMPLE / "relay-alerts.test.yml").read_text())["tests"]
    tested: dict[str, list[bool]] = {}
    for case in tests:
        for check in case["alert_rule_test"]:
            tested.setdefault(check["alertname"], []).append(bool(check["exp_alerts"]))
    names = {
        rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    }
    assert tested.keys() == names
    for name, fires in tested.items():
        assert True in fires and False in fires, f"{name}: a case where it fires and one where it stays quiet"


def test_compose_example_scrapes_the_relay_through_the_app_service() -> None:
    compose = yaml.safe_load((EXAMPLE / "compose.yaml").read_text())["services"]
    assert compose["relay"]["network_mode"] == "service:app"
    config = yaml.safe_load((EXAMPLE / "prometheus.yml").read_text())
    assert config["scrape_configs"][0]["static_configs"][0]["targets"] == ["app:9464"]
    assert config["rule_files"] == ["relay-alerts.yml"]
    mounts = " ".join(compose["prometheus"]["volumes"])
    assert "./relay-alerts.yml:/etc/prometheus/relay-alerts.yml" in mounts


# --- metric names in PromQL ------------------------------------------------------------------------

FUNCTIONS_AND_WORDS = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right|and|or|unless|bool|offset)\s*(?:\([^)]*\))?"
)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers that are not functions, keywords, label
    names in matchers or grouping clauses, strings, durations or dashboard variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\$\w+", "", expr)  # $__rate_interval, $instance
    expr = FUNCTIONS_AND_WORDS.sub(" ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        following = expr[match.end() :].lstrip()
        if not following.startswith("("):  # a function call
            names.add(match.group())
    return names


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names(
        'sum by (job) (rate(relay_connect_errors_total{reason=~"a|b"}[5m])) / on (job) relay_max_connections'
    ) == {"relay_connect_errors_total", "relay_max_connections"}
    assert metric_names(
        "histogram_quantile(0.9, sum by (le) (rate(relay_connect_duration_seconds_bucket[$__rate_interval])))"
    ) == {"relay_connect_duration_seconds_bucket"}
    assert metric_names(
        "changes(process_start_time_seconds[15m]) > 0 and on (job, instance) relay_build_info"
    ) == {
        "process_start_time_seconds",
        "relay_build_info",
    }


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(target["expr"] for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            exprs.append(re.sub(r"^label_values\((.*), \w+\)$", r"\1", variable["query"]["query"]))
    return exprs


def test_dashboard_is_a_grafana_10_dashboard_with_the_panels_users_need() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 38  # Grafana 10.0
    assert dashboard["uid"] == "relay-sidecar"
    panels: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys()
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
    exprs = " ".join(dashboard_expressions())
    for needed in (
        "relay_connections_active",
        "relay_connections_accepted_total",
        "relay_bytes_total",
        "histogram_quantile(0.99, sum by (le) (rate(relay_connect_duration_seconds_bucket",
        "relay_connect_errors_total",
        "relay_datagrams_total",
        "relay_udp_sessions_active",
        "relay_datagrams_dropped_total",
    ):
        assert needed in exprs, needed


# --- a live Prometheus ------------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        while data := sock.recv(65536):
            sock.sendall(data)


class _UdpEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        sock.sendto(data, self.client_address)


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])  # type: ignore[index]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class Api:
    """Prometheus's HTTP API on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}/api/v1/"

    def get(self, path: str, **params: str) -> Any:
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("query", query=expr)["result"]
        return result

    def wait(self, what: str, expr: str, ok: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        """Poll `expr` until ok(result), at most WAIT seconds (bounded in time and count)."""
        deadline = time.monotonic() + WAIT
        result: list[dict[str, Any]] = []
        for _ in range(int(WAIT / 0.2)):
            result = self.query(expr)
            if ok(result):
                return result
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        raise AssertionError(f"{what}: {expr} gave {result} for {WAIT} s")

    def wait_value(self, what: str, expr: str, ok: Callable[[float], bool]) -> float:
        result = self.wait(what, expr, lambda r: len(r) == 1 and ok(float(r[0]["value"][1])))
        return float(result[0]["value"][1])


def _traffic(
    stop: threading.Event,
    persistent: int,
    short: int,
    refused: int,
    counts: dict[str, int],
    errors: list[str],
) -> None:
    try:
        _traffic_loop(stop, persistent, short, refused, counts)
    except Exception as err:  # reported by the test, which checks `errors` after joining
        errors.append(repr(err))


def _traffic_loop(
    stop: threading.Event, persistent: int, short: int, refused: int, counts: dict[str, int]
) -> None:
    """Until `stop` (at most 90 s): 1000 bytes every 50 ms echoed over one open connection; every
    200 ms a short connection (one echo, then close) and one whose target refuses."""
    chunk = b"x" * 1000
    with socket.create_connection(("127.0.0.1", persistent), timeout=5) as conn:
        until = time.monotonic() + 90
        tick = 0
        while not stop.wait(0.05) and time.monotonic() < until:
            conn.sendall(chunk)
            got = 0
            while got < len(chunk):
                data = conn.recv(len(chunk) - got)
                if not data:
                    raise ConnectionError(f"the relay closed the long-lived connection after {got} bytes")
                got += len(data)
            counts["bytes"] += len(chunk)
            tick += 1
            if tick % 4:
                continue
            with socket.create_connection(("127.0.0.1", short), timeout=5) as s:
                s.sendall(b"ping")
                s.shutdown(socket.SHUT_WR)
                while s.recv(16):
                    pass
            counts["short"] += 1
            # The relay accepts, then resets the connection once the target refuses (on loopback the
            # reset can come before connect() returns).
            with (
                contextlib.suppress(ConnectionResetError),
                socket.create_connection(("127.0.0.1", refused), timeout=5) as s,
            ):
                s.settimeout(5)
                s.recv(16)
            counts["refused"] += 1


def test_a_real_prometheus_scrapes_a_running_relay(tmp_path: Path) -> None:
    """Steps: echo targets (TCP, UDP) and a refusing one (a bound socket that does not listen); a relay
    with five routes (one to a name, for the lookup counter); Prometheus scraping it every second with
    relay-alerts.yml loaded; traffic through the relay. Then, through the API: the scrape is up, bytes
    flow (rate > 0), one connection is open on the long-lived route, a connect-latency quantile is a
    loopback-sized number, UDP datagrams and a session show, the target-unreachable alert is pending for
    the refusing route and no other alert is; every rule evaluates cleanly; every metric name the rules
    and the dashboard use is in the scrape. When the traffic stops, the open-connection gauge falls to 0."""
    if shutil.which("prometheus") is None:
        pytest.skip(
            "prometheus is not installed (Debian package prometheus; scripts/test installs it as root)"
        )
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))  # bound, not listening: connects to it are refused
    base = free_port_block(7)
    persistent, short, refused, udp, by_name, prom_port, metrics = (base + i for i in range(7))
    with (
        refusing,
        serving(_TcpServer(("127.0.0.1", 0), _Echo)) as echo_port,
        serving(socketserver.ThreadingUDPServer(("127.0.0.1", 0), _UdpEcho)) as udp_port,
    ):
        routes = [
            {"name": "persistent", "listen": f"127.0.0.1:{persistent}", "target": f"127.0.0.1:{echo_port}"},
            {"name": "short", "listen": f"127.0.0.1:{short}", "target": f"127.0.0.1:{echo_port}"},
            {
                "name": "refused",
                "listen": f"127.0.0.1:{refused}",
                "target": f"127.0.0.1:{refusing.getsockname()[1]}",
            },
            {
                "name": "udp",
                "protocol": "udp",
                "listen": f"127.0.0.1:{udp}",
                "target": f"127.0.0.1:{udp_port}",
            },
            # A name target, looked up (relay_resolver_lookups_total); never connected to here.
            {"name": "by-name", "listen": f"127.0.0.1:{by_name}", "target": f"localhost:{echo_port}"},
        ]
        relay_config = tmp_path / "relay.yaml"
        relay_config.write_text(yaml.safe_dump({"routes": routes, "metrics": f"127.0.0.1:{metrics}"}))
        with RelayProcess(["--config", str(relay_config)]) as relay:
            relay.wait_for("ready: relay")
            config = tmp_path / "prometheus.yml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                        "rule_files": [str(RULES)],
                        "scrape_configs": [
                            {"job_name": "relay", "static_configs": [{"targets": [f"127.0.0.1:{metrics}"]}]}
                        ],
                    }
                )
            )
            prometheus = LineProcess(
                [
                    "prometheus",
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                cwd=tmp_path,
            )
            stop = threading.Event()
            counts = {"bytes": 0, "short": 0, "refused": 0}
            errors: list[str] = []
            traffic = threading.Thread(
                target=_traffic, args=(stop, persistent, short, refused, counts, errors)
            )
            with prometheus:
                try:
                    prometheus.wait_for("Server is ready to receive web requests", timeout=WAIT)
                    _check_live(Api(prom_port), udp, traffic, stop, counts)
                finally:
                    stop.set()
                    if traffic.is_alive():
                        traffic.join(10)
                assert errors == [], errors
                prometheus.stop(timeout=20)
            assert relay.stop() == 0


def _check_live(
    api: Api,
    udp: int,
    traffic: threading.Thread,
    stop: threading.Event,
    counts: dict[str, int],
) -> None:
    api.wait_value("the relay scraped", 'up{job="relay"}', lambda v: v == 1)
    traffic.start()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(5)
        for i in range(5):
            client.sendto(b"datagram %d" % i, ("127.0.0.1", udp))
            assert client.recvfrom(100)[0] == b"datagram %d" % i
        api.wait_value(
            "UDP datagrams back to the client",
            'relay_datagrams_total{route="udp", direction="target_to_client"}',
            lambda v: v == 5,
        )
        api.wait_value("one UDP session", 'relay_udp_sessions_active{route="udp"}', lambda v: v == 1)
    rate = api.wait_value(
        "bytes flowing",
        'sum(rate(relay_bytes_total{route="persistent", direction="client_to_target"}[5s]))',
        lambda v: v > 0,
    )
    assert rate < 1e6, rate  # 1000 B every 50 ms (plus the echo wait): 20 kB/s at most
    api.wait_value("one open connection", 'relay_connections_active{route="persistent"}', lambda v: v == 1)
    buckets = 'relay_connect_duration_seconds_bucket{route="short"}'
    quantile = api.wait_value(
        "connect latency",
        f"histogram_quantile(0.9, sum by (le) (rate({buckets}[10s])))",
        lambda v: v == v,  # not NaN: some connects in the window
    )
    assert 0 < quantile < 1, quantile  # a loopback connect
    errors = api.wait(
        "target-unreachable alert pending",
        'ALERTS{alertname="RelayTargetUnreachable"}',
        lambda r: len(r) == 1 and r[0]["metric"]["alertstate"] == "pending",
    )
    assert errors[0]["metric"]["route"] == "refused"
    assert errors[0]["metric"]["reason"] == "refused"
    others = [a for a in api.get("alerts")["alerts"] if a["labels"]["alertname"] != "RelayTargetUnreachable"]
    assert others == [], others  # a healthy relay: ready, listening, not stranded, not restarted
    rules = [rule for group in api.get("rules")["groups"] for rule in group["rules"]]
    assert len(rules) == len(rule_expressions())
    assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
    live = set(api.get("label/__name__/values"))
    used = set().union(*map(metric_names, rule_expressions() + dashboard_expressions()))
    assert used <= live, f"not in a live scrape: {sorted(used - live)}"
    stop.set()
    traffic.join(10)
    assert counts["bytes"] > 0 and counts["short"] > 0 and counts["refused"] > 0, counts
    api.wait_value("the connection closed", 'relay_connections_active{route="persistent"}', lambda v: v == 0)
    accepted = api.wait_value(
        "every short connection counted",
        'relay_connections_accepted_total{route="short"}',
        lambda v: v == counts["short"],
    )
    assert accepted == counts["short"]
