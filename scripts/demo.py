"""`scripts/run` with no arguments: a self-contained demo on this machine's loopback only.

A small HTTP server on 127.0.0.1 plays the "host service"; the relay listens on localhost (127.0.0.1 and
::1) and forwards to it, with metrics and health on 127.0.0.1. Nothing listens on other interfaces and no
connection leaves the machine. It prints what it started and what to try, then runs until Ctrl-C.
"""

from __future__ import annotations

import errno
import http.server
import os
import socket
import sys
import threading

from relay.cli import main as relay_main

LISTEN_PORT = 8080
METRICS_PORT = 9464


class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        asked = f"{self.headers.get('Host', '?')}{self.path}"
        body = f"hello from the demo server behind relay-sidecar (you asked for {asked})\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the relay's own log is what the demo shows."""


def free(port: int, hosts: tuple[str, ...]) -> bool:
    """Whether `port` can be bound on every host right now."""
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((host, port))
        except OSError as err:
            if host == "::1" and err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # no IPv6 here: the relay skips ::1 too
            return False
    return True


def pick(preferred: int, hosts: tuple[str, ...]) -> int:
    """`preferred` when it is free, else a port the kernel picks (free on the first host)."""
    if free(preferred, hosts):
        return preferred
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((hosts[0], 0))
            port = int(sock.getsockname()[1])
        if free(port, hosts):
            return port
    raise SystemExit("demo: no free port found on loopback")


def main() -> int:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    target = int(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, name="demo-http", daemon=True)
    thread.start()
    listen = pick(LISTEN_PORT, ("127.0.0.1", "::1"))
    metrics = pick(METRICS_PORT, ("127.0.0.1",))
    print(
        f"""relay-sidecar demo (scripts/run with no arguments); everything stays on this machine's loopback:
  a demo HTTP server on 127.0.0.1:{target} plays the service on the Docker host
  the relay listens on localhost:{listen} (127.0.0.1 and ::1) and forwards there
  metrics and health on http://127.0.0.1:{metrics}/ (loopback only)
try, in another terminal:
  curl http://localhost:{listen}/
  curl -s http://127.0.0.1:{metrics}/metrics | grep '^relay_connections'
  scripts/run check --ports {listen}:{target} --target 127.0.0.1
Ctrl-C stops it. For real use pass arguments: scripts/run --help, scripts/run --ports 5432 (to the Docker
host), scripts/run --config config/relay.example.yaml.
""",
        flush=True,
    )
    argv = ["--ports", f"{listen}:{target}", "--target", "127.0.0.1", "--metrics", f"127.0.0.1:{metrics}"]
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_") and k not in {"PORTS"}}
    environ.update({k: v for k, v in os.environ.items() if k in {"RELAY_LOG_LEVEL", "RELAY_LOG_FORMAT"}})
    try:
        return relay_main(argv, environ)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


if __name__ == "__main__":
    sys.exit(main())
