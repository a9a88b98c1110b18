"""TLS inside the relay image (tests/docker/run.sh runs it there, with the image's own python).

Usage: tls_handshake.py CERT KEY [TLS_PORT PLAIN_PORT]

1. Python's ssl alone: a TLS echo server on 127.0.0.1 (CERT/KEY) and a client that verifies CERT as its
   only CA and `localhost` as the name; also the image's default CA bundle must hold certificates (what a
   TLS target verified against the system store needs).
2. With TLS_PORT: the relay terminates TLS there in front of host_services.py's echo (send `E` + bytes);
   this client speaks TLS to it, verifying CERT.
3. With PLAIN_PORT: the relay originates TLS from there to a TLS echo server this script runs on
   127.0.0.1:18443 (the relay's route verifies CERT, name `localhost`); this client speaks plain TCP.

Prints `tls ok: ...` and exits 0; a missing module (_ssl, libssl, libcrypto) or file fails with a traceback.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading

TIMEOUT = 10.0
UPSTREAM_PORT = 18443  # the relay's target_tls route points here (inside the container's own namespace)


def tls_echo_server(cert: str, key: str, port: int) -> tuple[socket.socket, threading.Thread]:
    """Accept one TLS connection and echo what it reads until EOF."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", port))
    listener.settimeout(TIMEOUT)

    def serve() -> None:
        conn, _ = listener.accept()
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.settimeout(TIMEOUT)
            while data := tls.recv(65536):
                tls.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


def round_trip(sock: socket.socket, send: bytes, expect: bytes) -> None:
    sock.sendall(send)
    got = b""
    while len(got) < len(expect) and (data := sock.recv(65536)):
        got += data
    if got != expect:
        raise SystemExit(f"tls: sent {send!r}, got {got!r}, expected {expect!r}")


def main(argv: list[str]) -> int:
    cert, key = argv[0], argv[1]
    client = ssl.create_default_context(cafile=cert)
    done = []
    listener, thread = tls_echo_server(cert, key, 0)
    with (
        socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as raw,
        client.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        round_trip(tls, b"hello tls\n", b"hello tls\n")
        done.append(f"python ssl {tls.version()}")
    thread.join(TIMEOUT)
    listener.close()
    store = ssl.create_default_context().cert_store_stats()["x509_ca"]
    if store == 0:
        print(f"tls: the default CA bundle is empty ({ssl.get_default_verify_paths()})", file=sys.stderr)
        return 1
    done.append(f"{store} CA certificates in the default store")
    if len(argv) > 2:
        with (
            socket.create_connection(("127.0.0.1", int(argv[2])), timeout=TIMEOUT) as raw,
            client.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            round_trip(tls, b"Ethrough the relay's tls listener", b"through the relay's tls listener")
        done.append(f"the relay terminates TLS on {argv[2]}")
    if len(argv) > 3:
        listener, thread = tls_echo_server(cert, key, UPSTREAM_PORT)
        with socket.create_connection(("127.0.0.1", int(argv[3])), timeout=TIMEOUT) as plain:
            round_trip(plain, b"plain in, TLS out", b"plain in, TLS out")
        thread.join(TIMEOUT)
        listener.close()
        done.append(f"the relay speaks verified TLS from {argv[3]} to :{UPSTREAM_PORT}")
    print("tls ok: " + "; ".join(done))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
