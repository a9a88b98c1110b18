"""The health check the image runs: `python -I -m relay.probe` asks the running relay's /readyz.

A Docker HEALTHCHECK runs inside the container's memory cgroup every 30 s, so it imports as little as it
can: the standard library's socket and relay.address, never the relay itself (asyncio, uvloop, ssl,
prometheus-client). It finds the metrics address as the relay does (default < config file <
RELAY_METRICS); only a config file, when RELAY_METRICS does not say, brings in relay.config and YAML.
Exit 0 when /readyz answers 200, 1 otherwise, as Docker expects. `relay healthcheck` is the same check
behind the full command line.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping

from relay.address import DEFAULT_METRICS, AddressError, HostPort, parse_metrics

TIMEOUT = 3.0
ENV = "RELAY_METRICS"
MAX_ANSWER = 1 << 20  # /readyz of a relay with thousands of routes is still well below this
LOCAL = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # a relay listening everywhere answers on loopback


def metrics_address(environ: Mapping[str, str], config_path: str | None = None) -> HostPort | None:
    """The metrics address the relay uses with this environment (None: off): RELAY_METRICS, else the
    config file's `metrics` (read by relay.config, the one reading of it, with its YAML parser), else the
    default. Only that setting is read: the routes (a 65,535-port PORTS) are the relay's business."""
    if ENV in environ:
        try:
            return parse_metrics(environ[ENV])
        except AddressError as err:
            raise ValueError(f"{ENV}: {err}") from None
    path = config_path or environ.get("RELAY_CONFIG") or None
    if path is None:
        return DEFAULT_METRICS
    from relay.config import ConfigError, build, from_file

    try:
        return build({k: v for k, v in from_file(path).items() if k == "metrics"}, need_routes=False).metrics
    except ConfigError as err:
        raise ValueError(str(err)) from None


def ask(address: HostPort, timeout: float = TIMEOUT) -> tuple[int, str]:
    """GET /readyz: (status, body). OSError when nothing answers in time."""
    host = LOCAL.get(address.host, address.host)
    with socket.create_connection((host, address.port), timeout=timeout) as sock:
        sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        chunks: list[bytes] = []
        size = 0
        while size < MAX_ANSWER and (chunk := sock.recv(65536)):
            chunks.append(chunk)
            size += len(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    parts = head.split(None, 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"not an HTTP answer: {head[:60]!r}")
    return int(parts[1]), body.decode(errors="replace").strip()


def healthcheck(address: HostPort | None, timeout: float = TIMEOUT) -> int:
    """0 when /readyz answers 200, 1 otherwise; prints the answer, or why there is none."""
    if address is None:
        print("relay: healthcheck: the health endpoint is off (RELAY_METRICS=off)", file=sys.stderr)
        return 1
    try:
        status, body = ask(address, timeout)
    except OSError as err:
        shown = HostPort(LOCAL.get(address.host, address.host), address.port)
        print(f"relay: healthcheck: {shown}: {err}", file=sys.stderr)
        return 1
    print(body)
    return 0 if status == 200 else 1


def main() -> int:
    try:
        address = metrics_address(os.environ)
    except ValueError as err:
        print(f"relay: healthcheck: {err}", file=sys.stderr)
        return 1  # Docker reserves exit 2; unhealthy is what a bad setting makes the check
    return healthcheck(address)


if __name__ == "__main__":
    sys.exit(main())
