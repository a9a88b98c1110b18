"""TLS through the image's own Python (tests/docker/run.sh runs it inside the relay image).

Usage: tls_handshake.py CERT KEY

Serves TLS on 127.0.0.1 (port 0) with CERT/KEY in a thread and connects to it verifying CERT as the only
CA and `localhost` as the name, then sends a line and expects it back. Also loads the image's default CA
bundle (what a TLS target verified against the system store needs): it must hold certificates. Prints
`tls ok: VERSION CIPHER, N CA certificates` and exits 0; any missing module (_ssl, libssl, libcrypto) or
file fails with a traceback and a non-zero exit.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading


def main(cert: str, key: str) -> int:
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)

    def serve() -> None:
        conn, _ = listener.accept()
        with server_context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(64))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_context = ssl.create_default_context(cafile=cert)
    with (
        socket.create_connection(listener.getsockname(), timeout=10) as raw,
        client_context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"hello tls\n")
        reply = tls.recv(64)
        version, cipher = tls.version(), tls.cipher()
    thread.join(10)
    listener.close()
    if reply != b"hello tls\n":
        print(f"tls: echo returned {reply!r}", file=sys.stderr)
        return 1
    store = ssl.create_default_context().cert_store_stats()["x509_ca"]
    if store == 0:
        print(f"tls: the default CA bundle is empty ({ssl.get_default_verify_paths()})", file=sys.stderr)
        return 1
    print(f"tls ok: {version} {cipher[0] if cipher else '?'}, {store} CA certificates")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
