"""Stand-in app: reach PostgreSQL and Redis through localhost, as a real app would, and say what answered.

Standard library only, so it runs in any python image. Every ten seconds it opens DATABASE_URL's and
REDIS_URL's host:port, sends each server a first message it answers without credentials (PostgreSQL's
SSLRequest, Redis's PING) and prints the reply.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from urllib.parse import urlsplit

SSL_REQUEST = struct.pack("!ii", 8, 80877103)


def endpoint(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "localhost", parts.port or default_port


def ask(address: tuple[str, int], message: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(message)
        return sock.recv(64)


def probe_postgres(address: tuple[str, int]) -> str:
    reply = ask(address, SSL_REQUEST)
    if reply[:1] in (b"S", b"N"):
        ssl = "yes" if reply[:1] == b"S" else "no"
        return f"PostgreSQL at {address[0]}:{address[1]} answered (SSL {ssl})"
    return f"PostgreSQL at {address[0]}:{address[1]}: unexpected reply {reply!r}"


def probe_redis(address: tuple[str, int]) -> str:
    reply = ask(address, b"PING\r\n")
    return f"Redis at {address[0]}:{address[1]} answered {reply.decode(errors='replace').strip()}"


def main() -> None:
    postgres = endpoint(os.environ.get("DATABASE_URL", "postgresql://localhost:5432"), 5432)
    redis = endpoint(os.environ.get("REDIS_URL", "redis://localhost:6379"), 6379)
    while True:
        for probe, address in ((probe_postgres, postgres), (probe_redis, redis)):
            try:
                print(probe(address), flush=True)
            except OSError as exc:
                print(f"{address[0]}:{address[1]}: {exc}", flush=True)
        time.sleep(10)


if __name__ == "__main__":
    main()
