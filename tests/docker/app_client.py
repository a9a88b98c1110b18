"""The app side of the Docker engine test: runs inside the app container (`python3 - CHECK...`).

Each CHECK is `FAMILY:LISTEN:TARGET`, e.g. `6:5432:5433`: connect to localhost:LISTEN over 127.0.0.1
(FAMILY 4) or ::1 (FAMILY 6) and expect host_services.py's port TARGET behind it. Two scenarios per check,
all run at once:

- echo: send `E` and 256 KiB of random bytes while reading the echo, shut the write side, read to EOF;
  the bytes must come back intact and in order.
- half-close: send `H` and 64 KiB of random bytes, shut the write side, read to EOF; the server answers a
  second after the FIN with `TARGET SHA256 LENGTH`, which must arrive and match what was sent.

A CHECK `s:PATH:TARGET` runs the same two scenarios through the socket file PATH instead of localhost (the
relay listening on a socket file in a volume it shares with the app).

A CHECK `u4:LISTEN:TARGET` or `u6:...` is UDP instead: datagrams of 1 byte to 60,000 bytes to
localhost:LISTEN, each answered by the host's port TARGET as `TARGET ` + the datagram (one scenario, `udp`).

Prints `ok NAME` or `FAIL NAME: why` per scenario; exits 0 when all passed.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading

TIMEOUT = 15.0
LOOPBACK = {"4": "127.0.0.1", "6": "::1"}


def connect(family: str, listen: str) -> socket.socket:
    if family == "s":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(listen)
        return sock
    sock = socket.create_connection((LOOPBACK[family], int(listen)), timeout=TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while data := sock.recv(65536):
        chunks.append(data)
    return b"".join(chunks)


def echo(family: str, listen: str, target: int) -> str | None:
    payload = os.urandom(256 * 1024)
    with connect(family, listen) as sock:
        errors: list[BaseException] = []

        def send() -> None:
            try:
                sock.sendall(b"E" + payload)
                sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = read_to_eof(sock)
        sender.join(TIMEOUT)
    if errors:
        return f"send failed: {errors[0]}"
    if received != payload:
        return f"echo differs: sent {len(payload)} bytes, got {len(received)}"
    return None


def half_close(family: str, listen: str, target: int) -> str | None:
    payload = os.urandom(64 * 1024)
    with connect(family, listen) as sock:
        sock.sendall(b"H" + payload)
        sock.shutdown(socket.SHUT_WR)
        reply = read_to_eof(sock).decode()
    expected = f"{target} {hashlib.sha256(payload).hexdigest()} {len(payload)}\n"
    if reply != expected:
        return f"reply after half-close {reply!r}, expected {expected!r}"
    return None


UDP_SIZES = (1, 100, 1400, 9000, 60000)


def udp(family: str, listen: str, target: int) -> str | None:
    """One datagram of each size, each answered before the next is sent (UDP may drop; loopback and a
    bridge on one machine do not when nothing else is sent)."""
    host = LOOPBACK[family[-1]]
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT / 3)
        sock.connect((host, int(listen)))
        for size in UDP_SIZES:
            payload = os.urandom(size)
            sock.send(payload)
            reply = sock.recv(65535)
            if reply != f"{target} ".encode() + payload:
                return f"{size}-byte datagram: reply of {len(reply)} bytes starting {reply[:12]!r}"
    return None


def main(argv: list[str]) -> int:
    results: dict[str, str | None] = {}

    def run(name: str, family: str, listen: str, target: int) -> None:
        scenario = echo if name.startswith("echo") else udp if name.startswith("udp") else half_close
        try:
            results[name] = scenario(family, listen, target)
        except OSError as exc:
            results[name] = f"{type(exc).__name__}: {exc}"

    threads = []
    for check in argv:
        family, listen, target = check.split(":")
        for scenario in ("udp",) if family.startswith("u") else ("echo", "half-close"):
            where = listen if family == "s" else f"{LOOPBACK[family[-1]]}:{listen}"
            name = f"{scenario} {where}->{target}"
            results[name] = "did not finish"
            threads.append(
                threading.Thread(target=run, args=(name, family, listen, int(target)), daemon=True)
            )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 2)
    for name, error in results.items():
        print(f"ok {name}" if error is None else f"FAIL {name}: {error}", flush=True)
    return 0 if argv and all(error is None for error in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
