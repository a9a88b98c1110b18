"""The "host" services of the Docker engine test: TCP and UDP servers on an address of a bridge the test
created.

Usage: host_services.py ADDRESS PORT [PORT...] [unix:PATH:PORT...]

Binds every port on ADDRESS, prints `ready` once all are listening, then serves until SIGTERM. The
first byte a client sends picks what the connection does:

- `E` (echo): every later byte is sent back as it arrives; the server closes after the client's EOF.
- `H` (half-close): the server reads until the client's EOF (the client has shut its write side), waits
  one second, then answers `PORT SHA256 LENGTH` of what it read and closes. The reply proves that the
  path kept the other direction open after the client's FIN, and which host port was reached.

A `unix:PATH:PORT` argument serves the same on a socket file at PATH (mode 0777, as PostgreSQL makes its
socket), answering the half-close as PORT: a host service that listens on 127.0.0.1 and on a socket file.

Each port also answers UDP: every datagram comes back as `PORT ` followed by the datagram, to the address
it came from, so the client sees which host port it reached and that the datagram arrived whole.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

REPLY_DELAY = 1.0
CHUNK = 65536


def echo(conn: socket.socket) -> None:
    while data := conn.recv(CHUNK):
        conn.sendall(data)


def half_close(conn: socket.socket, port: int) -> None:
    digest = hashlib.sha256()
    length = 0
    while data := conn.recv(CHUNK):
        digest.update(data)
        length += len(data)
    time.sleep(REPLY_DELAY)  # answer late, after the client's FIN: what socat's -t 0.5 cuts off
    conn.sendall(f"{port} {digest.hexdigest()} {length}\n".encode())


def handle(conn: socket.socket, port: int) -> None:
    with conn:
        try:
            mode = conn.recv(1)
            if mode == b"E":
                echo(conn)
            elif mode == b"H":
                half_close(conn, port)
        except OSError as exc:
            print(f"port {port}: {exc}", file=sys.stderr, flush=True)


def serve_udp(sock: socket.socket) -> None:
    prefix = f"{sock.getsockname()[1]} ".encode()
    while True:
        data, client = sock.recvfrom(65535)
        sock.sendto(prefix + data, client)


def serve(listener: socket.socket, port: int) -> None:
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn, port), daemon=True).start()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    address = argv[0]
    ports = [int(p) for p in argv[1:] if not p.startswith("unix:")]
    listeners: list[tuple[socket.socket, int]] = []
    datagram = []
    for item in (p for p in argv[1:] if p.startswith("unix:")):
        path, _, port_text = item[len("unix:") :].rpartition(":")
        try:
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(path)
            os.chmod(path, 0o777)
            unix.listen(128)
        except OSError as exc:
            print(f"cannot listen on {path}: {exc}", file=sys.stderr, flush=True)
            return 1
        listeners.append((unix, int(port_text)))
    for port in ports:
        try:
            listeners.append((socket.create_server((address, port), backlog=128), port))
            udp = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM)
            datagram.append(udp)
            udp.bind((address, port))
        except OSError as exc:
            print(f"cannot listen on {address}:{port}: {exc}", file=sys.stderr, flush=True)
            return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for listener, port in listeners:
        threading.Thread(target=serve, args=(listener, port), daemon=True).start()
    for udp in datagram:
        threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
    print("ready", flush=True)
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
