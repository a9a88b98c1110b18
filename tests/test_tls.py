"""TLS both ways (issue 18, relay/tls.py): the relay terminates TLS in front of a plain service, speaks TLS
to a TLS target, requires client certificates (mTLS), and counts and explains failed handshakes.

Certificates are made once per session with `openssl` in a temporary directory: a CA, a server
certificate for localhost / 127.0.0.1, a client certificate, a second CA with a client of its own (a
stranger), and an expired server certificate. Real clients where cheap: `openssl s_client`, `curl`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay import socat
from relay.address import HostPort
from relay.config import ConfigError, Raw, build, from_env, from_file
from relay.server import Server
from relay.tls import ListenTLS, TargetTLS, names_match, parse_listen, parse_target
from tests.support import (
    Handler,
    connect_when_ready,
    echo,
    port_of,
    relay,
    scrape,
    tcp_server,
    tracked_server,
    unused_port,
    value,
    wait_until,
)
from tests.test_cli import run_relay
from tests.test_unix import REDIS_REASON, redis

Run = Callable[..., Any]
PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


@dataclass(frozen=True)
class Certs:
    dir: Path
    ca: str
    server: str
    server_key: str
    client: str
    client_key: str
    stranger: str  # a client certificate from another CA
    stranger_key: str
    expired: str  # the server's names, expired in 2020
    expired_key: str
    rotated: str  # another certificate for the server's names, from the same CA
    rotated_key: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _key_and_csr(name: str, subject: str, cwd: Path, san: str | None = None) -> None:
    extra = ["-addext", f"subjectAltName={san}"] if san else []
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, *extra, cwd=cwd,
    )  # fmt: skip


def _ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}", cwd=cwd,
    )  # fmt: skip


def _sign(name: str, ca: str, cwd: Path, *dates: str) -> None:
    """Sign name.csr with `openssl ca` (which takes start and end dates, for the expired one)."""
    if not (cwd / f"{ca}.cnf").exists():
        (cwd / f"{ca}.index").write_text("")
        (cwd / f"{ca}.serial").write_text("1000\n")
        (cwd / f"{ca}.cnf").write_text(
            f"[ca]\ndefault_ca = d\n[d]\ndatabase = {ca}.index\nserial = {ca}.serial\nnew_certs_dir = .\n"
            "default_md = sha256\npolicy = p\ncopy_extensions = copy\ndefault_days = 2\nunique_subject = no\n"
            "[p]\ncommonName = supplied\n"
        )
    _openssl(
        "ca", "-batch", "-config", f"{ca}.cnf", "-cert", f"{ca}.pem", "-keyfile", f"{ca}.key",
        "-in", f"{name}.csr", "-out", f"{name}.pem", "-notext", *dates, cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    d = tmp_path_factory.mktemp("tls")
    _ca("ca", d)
    _ca("otherca", d)
    _key_and_csr("server", "/CN=localhost", d, "DNS:localhost,IP:127.0.0.1")
    _sign("server", "ca", d)
    _key_and_csr("client", "/CN=app", d)
    _sign("client", "ca", d)
    _key_and_csr("stranger", "/CN=stranger", d)
    _sign("stranger", "otherca", d)
    _key_and_csr("expired", "/CN=localhost", d, "DNS:localhost,IP:127.0.0.1")
    _sign("expired", "ca", d, "-startdate", "20200101000000Z", "-enddate", "20200102000000Z")
    _key_and_csr("rotated", "/CN=localhost", d, "DNS:localhost,IP:127.0.0.1")
    _sign("rotated", "ca", d)
    p = {name: str(d / name) for name in ("ca", "server", "client", "stranger", "expired", "rotated")}
    return Certs(
        d,
        p["ca"] + ".pem",
        p["server"] + ".pem",
        p["server"] + ".key",
        p["client"] + ".pem",
        p["client"] + ".key",
        p["stranger"] + ".pem",
        p["stranger"] + ".key",
        p["expired"] + ".pem",
        p["expired"] + ".key",
        p["rotated"] + ".pem",
        p["rotated"] + ".key",
    )


def client_context(certs: Certs, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=certs.ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


@contextlib.asynccontextmanager
async def tls_server(handler: Handler, context: ssl.SSLContext) -> AsyncIterator[int]:
    """An asyncio TLS stream server on 127.0.0.1, port 0."""
    start = lambda cb: asyncio.start_server(cb, "127.0.0.1", 0, ssl=context)  # noqa: E731
    async with tracked_server(handler, start) as server:
        yield server.sockets[0].getsockname()[1]


def server_context(cert: str, key: str, seen: list[str | None] | None = None) -> ssl.SSLContext:
    """A TLS server's context; `seen` collects the SNI name of each handshake (None: none sent)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if seen is not None:
        context.sni_callback = lambda sslobj, name, ctx: seen.append(name)
    return context


async def reply_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read one line, answer it and PAYLOAD, then close (FIN)."""
    line = await reader.readline()
    writer.write(b"got " + line + PAYLOAD)
    await writer.drain()


async def tls_exchange(port: int, context: ssl.SSLContext, data: bytes = b"hello\n") -> bytes:
    """Connect with TLS, send `data` then read until the relay closes."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname="localhost"
    )
    try:
        writer.write(data)
        return await reader.read(-1)
    finally:
        writer.close()


async def refused_handshake(port: int, context: ssl.SSLContext) -> bytes:
    """A TLS client sends a line and reads: what came back (b"" when the handshake failed or the relay
    closed the connection; with TLS 1.3 the client's handshake ends before the server has checked its
    certificate, so the refusal may come at the first read)."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="localhost"
        )
    except (ssl.SSLError, ConnectionError):
        return b""
    try:
        writer.write(b"hello\n")
        return await reader.read(100)
    except (ssl.SSLError, ConnectionError):
        return b""
    finally:
        writer.close()


def failures(server: Server, name: str = "test") -> dict[tuple[str, str], int]:
    return dict(server.stats[name].tls_failures)


# --- the listen side: the relay terminates TLS ---------------------------------------------------------


def test_openssl_s_client_through_the_relay_to_a_plain_service(run: Run, certs: Certs) -> None:
    """Steps: a plain service answers a line and 1 MiB, then closes; the relay terminates TLS in front of
    it; `openssl s_client` verifies the relay's certificate against the CA and gets every byte, then a
    clean TLS close (the target's FIN becomes close_notify after the last byte)."""

    async def scenario() -> None:
        async with (
            tcp_server(reply_then_close) as target,
            relay(target, tls=ListenTLS(certs.server, certs.server_key)) as server,
        ):
            proc = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-connect", f"127.0.0.1:{port_of(server)}", "-CAfile", certs.ca,
                "-verify_return_error", "-verify_hostname", "localhost", "-quiet", "-ign_eof",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate(b"ping\n")
            assert proc.returncode == 0, err
            assert out == b"got ping\n" + PAYLOAD
            assert failures(server) == {}

    run(scenario())


def test_curl_to_an_https_terminated_route(run: Run, certs: Certs) -> None:
    """Steps: a plain HTTP service behind a TLS route; `curl --cacert` gets its page; curl without the
    CA refuses the relay's certificate, which the relay counts as peer_rejected and explains."""

    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n")
        await writer.drain()

    async def scenario() -> None:
        async with (
            tcp_server(http) as target,
            relay(target, tls=ListenTLS(certs.server, certs.server_key)) as server,
        ):
            url = f"https://localhost:{port_of(server)}/"
            resolve = f"localhost:{port_of(server)}:127.0.0.1"
            ok = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", "10", "--resolve", resolve, "--cacert", certs.ca, url,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await ok.communicate()
            assert (ok.returncode, out) == (0, b"hello\n"), err
            bad = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", "10", "--resolve", resolve, "--capath", str(certs.dir / "none"),
                "--cacert", certs.stranger, url,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            await bad.communicate()
            assert bad.returncode == 60  # curl: peer certificate cannot be authenticated
            await wait_until(lambda: failures(server).get(("listen", "peer_rejected")) == 1)

    run(scenario())


def test_mtls_accepts_a_client_certificate_of_the_ca_and_refuses_the_others(
    run: Run, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: a route with cafile and verify (mTLS) to an echo service; a client with a certificate of
    that CA gets 1 MiB echoed; a client without a certificate and one with a stranger's CA are refused,
    counted as no_client_cert and unknown_ca, each logged once with a hint; neither became a connection."""

    async def scenario() -> None:
        settings = ListenTLS(certs.server, certs.server_key, cafile=certs.ca, verify=True)
        async with tcp_server(echo) as target, relay(target, tls=settings) as server:
            port = port_of(server)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1",
                port,
                ssl=client_context(certs, certs.client, certs.client_key),
                server_hostname="localhost",
            )
            writer.write(PAYLOAD)
            assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD
            writer.close()
            assert await refused_handshake(port, client_context(certs)) == b""
            stranger = client_context(certs, certs.stranger, certs.stranger_key)
            assert await refused_handshake(port, stranger) == b""
            await wait_until(lambda: sum(failures(server).values()) == 2)
            assert failures(server) == {("listen", "no_client_cert"): 1, ("listen", "unknown_ca"): 1}
            assert server.stats["test"].accepted == 1

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert any("no_client_cert" in line and "sent no certificate" in line for line in lines), lines
    assert any("unknown_ca" in line and certs.ca in line for line in lines), lines


def test_listen_commonname_requires_that_name_in_the_client_certificate(
    run: Run, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """socat's commonname= on OPENSSL-LISTEN: with mTLS, the client certificate (CN=app) must carry the
    name. `app`: echoed; `billing`: the client is reset with no byte relayed, never a connection, counted
    as name_mismatch and hinted."""

    async def scenario() -> None:
        client = client_context(certs, certs.client, certs.client_key)
        async with tcp_server(echo) as target:
            for name, served in (("app", True), ("billing", False)):
                settings = ListenTLS(
                    certs.server, certs.server_key, cafile=certs.ca, verify=True, commonname=name
                )
                async with relay(target, tls=settings) as server:
                    assert await refused_handshake(port_of(server), client) == (b"hello\n" if served else b"")
                    if not served:
                        await wait_until(lambda: bool(failures(server)))
                    assert failures(server) == ({} if served else {("listen", "name_mismatch"): 1})
                    assert server.stats["test"].accepted == (1 if served else 0)

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario())
    (line,) = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert "name_mismatch" in line and "'billing'" in line


def test_an_expired_client_certificate_is_refused_as_expired(run: Run, certs: Certs) -> None:
    """mTLS: a client presenting an expired certificate of the right CA is refused, counted as expired."""

    async def scenario() -> None:
        settings = ListenTLS(certs.server, certs.server_key, cafile=certs.ca, verify=True)
        async with tcp_server(echo) as target, relay(target, tls=settings) as server:
            expired = client_context(certs, certs.expired, certs.expired_key)
            assert await refused_handshake(port_of(server), expired) == b""
            await wait_until(lambda: bool(failures(server)))
            assert failures(server) == {("listen", "expired"): 1}

    run(scenario())


def test_plain_text_to_a_tls_port_is_counted_and_hinted(
    run: Run, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: an HTTP request in plain text to a TLS route: the client is closed, the target never sees
    a connection, the failure is counted as plaintext and the log says what happened; a client that
    connects and leaves without a byte (a TCP health check) counts as eof and is not warned about."""

    async def scenario() -> None:
        seen: list[int] = []

        async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(1)

        async with (
            tcp_server(count) as target,
            relay(target, tls=ListenTLS(certs.server, certs.server_key)) as server,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await reader.read(-1)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.close()
            await wait_until(lambda: sum(failures(server).values()) == 2)
            assert failures(server) == {("listen", "plaintext"): 1, ("listen", "eof"): 1}
            assert seen == []

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario())
    lines = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(lines) == 1 and "plain text" in lines[0], lines


# --- the target side: the relay speaks TLS -------------------------------------------------------------


def test_target_tls_verified_with_sni_and_without(run: Run, certs: Certs) -> None:
    """Steps: a TLS echo server with the CA's certificate for localhost; a plain client through a route
    with target TLS: (1) the name checked and sent as SNI is server_name `localhost`, (2) the target is
    127.0.0.1 with no server_name: checked against the IP entry, no SNI (an address is never sent),
    (3) sni off: no SNI, the name still checked after the handshake. 1 MiB echoed each time."""

    async def scenario() -> None:
        seen: list[str | None] = []
        async with tls_server(echo, server_context(certs.server, certs.server_key, seen)) as target:
            for settings, sni in (
                (TargetTLS(cafile=certs.ca, server_name="localhost"), "localhost"),
                (TargetTLS(cafile=certs.ca), None),
                (TargetTLS(cafile=certs.ca, server_name="localhost", sni=False), None),
            ):
                async with relay(target, target_tls=settings) as server:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
                    writer.write(PAYLOAD)
                    assert await reader.readexactly(len(PAYLOAD)) == PAYLOAD
                    writer.close()
                    assert seen[-1] == sni
                    assert failures(server) == {}

    run(scenario())


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown_ca", "unknown_ca"),
        ("name_mismatch", "name_mismatch"),
        ("name_mismatch_no_sni", "name_mismatch"),
        ("expired", "expired"),
        ("plaintext", "plaintext"),
    ],
)
def test_target_tls_failures_reset_the_client_and_are_counted(
    run: Run, certs: Certs, case: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Steps: a target whose certificate the relay must refuse (a CA it does not trust, another name,
    with and without SNI, expired) or that speaks plain text; the client is reset with no byte relayed,
    and the failure is a `tls` connect error counted by its reason and hinted."""
    settings = {
        "unknown_ca": TargetTLS(cafile=certs.stranger),
        "name_mismatch": TargetTLS(cafile=certs.ca, server_name="db.internal"),
        "name_mismatch_no_sni": TargetTLS(cafile=certs.ca, server_name="db.internal", sni=False),
        "expired": TargetTLS(cafile=certs.ca),
        "plaintext": TargetTLS(cafile=certs.ca),
    }[case]
    cert = certs.expired if case == "expired" else certs.server
    key = certs.expired_key if case == "expired" else certs.server_key

    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"-ERR unknown command\r\n" * 10)
        await writer.drain()
        await reader.read(-1)

    async def scenario() -> None:
        serving = tcp_server(plain) if case == "plaintext" else tls_server(echo, server_context(cert, key))
        async with serving as target, relay(target, target_tls=settings) as server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"secret")
            try:
                got = await reader.read(100)
            except ConnectionError:
                got = b""
            writer.close()
            assert got == b""
            await wait_until(lambda: server.stats["test"].connect_errors["tls"] == 1)
            assert failures(server) == {("target", reason): 1}

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario())
    (line,) = [r.getMessage() for r in caplog.records if "cannot connect" in r.getMessage()]
    assert f"handshake {reason}" in line
    assert {
        "unknown_ca": "set cafile",
        "name_mismatch": "server_name",
        "expired": "expired",
        "plaintext": "plain text",
    }[reason] in line


def test_target_tls_without_verify_connects_and_warns(
    run: Run, certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    """verify off (socat's verify=0): a certificate from a CA nobody trusts is accepted, with a WARNING
    at start."""

    async def scenario() -> None:
        async with (
            tls_server(echo, server_context(certs.stranger, certs.stranger_key)) as target,
            relay(target, target_tls=TargetTLS(verify=False)) as server,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port_of(server))
            writer.write(b"hello")
            assert await reader.readexactly(5) == b"hello"
            writer.close()

    with caplog.at_level(logging.WARNING, logger="relay"):
        run(scenario())
    assert any("not verified" in r.getMessage() for r in caplog.records)


def test_tls_both_sides_and_the_half_close_that_tls_can_carry(run: Run, certs: Certs) -> None:
    """Steps: TLS client -> relay (terminates) -> relay's TLS to a TLS target that answers a line and
    1 MiB then closes: the client gets every byte and a clean close (close_notify, no truncation)."""

    async def scenario() -> None:
        async with (
            tls_server(reply_then_close, server_context(certs.server, certs.server_key)) as target,
            relay(
                target,
                tls=ListenTLS(certs.server, certs.server_key),
                target_tls=TargetTLS(cafile=certs.ca, server_name="localhost"),
            ) as server,
        ):
            assert await tls_exchange(port_of(server), client_context(certs)) == b"got hello\n" + PAYLOAD

    run(scenario())


def test_sighup_serves_a_certificate_rotated_at_the_same_path(run: Run, certs: Certs, tmp_path: Path) -> None:
    """Steps: a TLS route whose cert and key are files at fixed paths; a client connects (and stays);
    the files are replaced by another certificate and the relay reloads (SIGHUP's path, the config built
    again): a new client gets the new certificate, on the same listener, and the first connection still
    echoes. Before: the route was unchanged, so the old certificate was served until a restart."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(certs.server, cert)
    shutil.copy(certs.server_key, key)
    raw = {
        "listen": Raw("127.0.0.1", "RELAY_LISTEN"),
        "tls": Raw(f"cert={cert},key={key}", "RELAY_TLS"),
        "metrics": Raw("off", "RELAY_METRICS"),
    }

    def der(pem: str) -> bytes:
        return ssl.PEM_cert_to_DER_cert(Path(pem).read_text())

    async def scenario() -> None:
        async with tcp_server(echo) as target:
            raw["target"] = Raw("127.0.0.1", "RELAY_TARGET")
            raw["ports"] = Raw(f"{unused_port()}:{target}", "RELAY_PORTS")
            server = Server(build(raw), reload=lambda: build(raw))
            await server.start()
            try:
                port = port_of(server)
                context = client_context(certs)
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="localhost"
                )
                assert writer.get_extra_info("ssl_object").getpeercert(binary_form=True) == der(certs.server)
                shutil.copy(certs.rotated, cert)
                shutil.copy(certs.rotated_key, key)
                await server.reload()
                assert port_of(server) == port
                _, second = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="localhost"
                )
                assert second.get_extra_info("ssl_object").getpeercert(binary_form=True) == der(certs.rotated)
                second.close()
                writer.write(b"still here")
                assert await reader.readexactly(10) == b"still here"
                writer.close()
            finally:
                await server.drain()

    run(scenario())


def test_handshake_failures_are_a_metric_by_route_side_and_reason(run: Run, certs: Certs) -> None:
    async def scenario() -> None:
        async with (
            tcp_server(echo) as target,
            relay(
                target,
                metrics=HostPort("127.0.0.1", 0),
                tls=ListenTLS(certs.server, certs.server_key, cafile=certs.ca, verify=True),
            ) as server,
        ):
            await refused_handshake(port_of(server), client_context(certs))
            await wait_until(lambda: sum(failures(server).values()) == 1)
            samples = await scrape(server)
            labels = {"route": "test", "side": "listen"}
            assert (
                value(samples, "relay_tls_handshake_failures_total", **labels, reason="no_client_cert") == 1
            )
            assert value(samples, "relay_tls_handshake_failures_total", **labels, reason="expired") == 0

    run(scenario())


# --- settings: YAML, env, socat's argv; bad values --------------------------------------------------


def test_env_yaml_and_socat_forms_give_the_same_settings(certs: Certs, tmp_path: Path) -> None:
    listen = ListenTLS(certs.server, certs.server_key, cafile=certs.ca, verify=True)
    target = TargetTLS(cafile=certs.ca, server_name="db.internal", sni=False)
    env, _ = from_env(
        {
            "RELAY_PORTS": "8443:5432",
            "RELAY_TLS": f"cert={certs.server},key={certs.server_key},cafile={certs.ca}",
            "RELAY_TARGET_TLS": f"cafile={certs.ca},server_name=db.internal,sni=off",
        }
    )
    (route,) = build(env).routes
    assert (route.tls, route.target_tls) == (listen, target)
    path = tmp_path / "relay.yaml"
    path.write_text(
        "routes:\n  - listen: 8443\n    target: db:5432\n"
        f"    tls: {{cert: {certs.server}, key: {certs.server_key}, cafile: {certs.ca}}}\n"
        f"    target_tls: {{cafile: {certs.ca}, commonname: db.internal, sni: false}}\n"
    )
    (route,) = build(from_file(str(path))).routes
    assert (route.tls, route.target_tls) == (listen, target)
    parsed = socat.parse(
        [
            f"OPENSSL-LISTEN:8443,fork,reuseaddr,cert={certs.server},key={certs.server_key},cafile={certs.ca}",
            f"OPENSSL:db:5432,cafile={certs.ca},commonname=db.internal,openssl-no-sni",
        ]
    )
    (route,) = build(parsed.raw).routes
    assert (route.tls, route.target_tls) == (listen, target)


@pytest.mark.parametrize(
    ("listen", "verify"),
    [("verify=0", False), ("verify=1", True), ("", True)],
)
def test_socat_openssl_listen_verify(certs: Certs, listen: str, verify: bool) -> None:
    """socat verifies the peer unless verify=0: OPENSSL-LISTEN then asks for client certificates (the
    system store without cafile=, as socat 1.7.4 does); OPENSSL checks the target's certificate."""
    options = f",{listen}" if listen else ""
    parsed = socat.parse(
        [f"openssl-listen:443,cert={certs.server},key={certs.server_key}{options}", "tcp:db:80"]
    )
    (route,) = build(parsed.raw).routes
    assert route.tls == ListenTLS(certs.server, certs.server_key, verify=verify)
    assert route.target_tls is None
    parsed = socat.parse(
        [
            f"openssl-listen:443,cert={certs.server},key={certs.server_key},cafile={certs.ca},cn=app",
            "tcp:db:80",
        ]
    )
    (route,) = build(parsed.raw).routes
    assert route.tls == ListenTLS(
        certs.server, certs.server_key, cafile=certs.ca, verify=True, commonname="app"
    )
    listen = f"openssl-listen:443,cert={certs.server},key={certs.server_key},verify=0,commonname=app"
    (route,) = build(socat.parse([listen, "tcp:db:80"]).raw).routes
    assert route.tls == ListenTLS(certs.server, certs.server_key)  # as socat: no name to check without verify
    parsed = socat.parse(["tcp-listen:80", "openssl-connect:db:443,verify=0,openssl-commonname="])
    (route,) = build(parsed.raw).routes
    assert route.target_tls == TargetTLS(verify=False)  # an empty commonname is the default: db


def test_names_match_as_openssl() -> None:
    cert = {
        "subject": ((("commonName", "ignored"),),),
        "subjectAltName": (("DNS", "*.example.com"), ("IP Address", "10.0.0.1")),
    }
    assert names_match(cert, "db.example.com")
    assert names_match(cert, "DB.Example.COM.")
    assert not names_match(cert, "a.db.example.com")
    assert not names_match(cert, "example.com")
    assert names_match(cert, "10.0.0.1")
    assert not names_match(cert, "ignored")
    assert names_match({"subject": ((("commonName", "db"),),)}, "db")


def test_bad_tls_values_name_the_value_and_the_form(certs: Certs, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (f"cert={tmp_path}/missing.pem", f"'{tmp_path}/missing.pem': no such file"),
        (f"cert={certs.server},key={garbage}", "holds no PEM private key"),
        (f"cert={certs.server},key={certs.client_key}", "does not match the certificate"),
        (f"cert={garbage},key={certs.server_key}", "holds no PEM certificate"),
        (f"cert={certs.server},key={certs.server_key},cafile={garbage}", "cafile"),
        (f"key={certs.server_key}", "has no cert"),
        (f"cert={certs.server},key={certs.server_key},verify=maybe", "'maybe' is not a yes/no value"),
        (f"cert={certs.server},pem=x", "'pem' is not a TLS setting"),
    ]
    for text, expected in cases:
        with pytest.raises(ConfigError, match=None) as info:
            build({"ports": Raw("443:80", "RELAY_PORTS"), "tls": Raw(text, "RELAY_TLS")})
        message = str(info.value)
        assert message.startswith("RELAY_TLS: ") and expected in message and "expected" in message, message
    with pytest.raises(ConfigError, match="RELAY_TLS: TLS is for TCP"):
        build(
            {
                "ports": Raw("443:80 53/udp", "RELAY_PORTS"),
                "tls": Raw(f"cert={certs.server},key={certs.server_key}", "RELAY_TLS"),
            }
        )


def test_tls_to_a_socket_file_needs_the_name_to_check(certs: Certs) -> None:
    raw = {"ports": Raw("443:unix:/run/db.sock", "RELAY_PORTS"), "target_tls": Raw("on", "RELAY_TARGET_TLS")}
    with pytest.raises(ConfigError, match="RELAY_PORTS: route tcp/443 speaks TLS to the socket file"):
        build(raw)
    raw["target_tls"] = Raw("server_name=db.internal", "RELAY_TARGET_TLS")
    (route,) = build(raw).routes
    assert route.target_tls == TargetTLS(server_name="db.internal")


def test_bad_tls_file_is_one_line_and_exit_2(certs: Certs, tmp_path: Path) -> None:
    result = run_relay(
        [f"openssl-listen:8443,cert={certs.server},key={certs.client_key},verify=0", "tcp:127.0.0.1:80"], {}
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert (
        f"key {certs.client_key!r} does not match the certificate in cert {certs.server!r}" in result.stderr
    )


def test_parse_target_on_off() -> None:
    assert parse_target("on") == TargetTLS()
    assert parse_target("off") is None
    assert parse_target(True) == TargetTLS()
    with pytest.raises(Exception, match="is not a TLS setting"):
        parse_listen({"server_name": "x"})


# --- real clients and servers: Redis over TLS ------------------------------------------------------------


async def redis_cli(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "redis-cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    return out.decode().strip()


@pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None, reason=REDIS_REASON
)
def test_redis_cli_tls_with_a_client_certificate_through_the_relay(
    run: Run, certs: Certs, tmp_path: Path
) -> None:
    """Steps: a plain redis-server; a route with mTLS in front of it; `redis-cli --tls` with the CA and a
    client certificate sets and gets a 100 kB value; without the certificate it is refused and counted."""
    port = unused_port()
    big = "x" * 100_000

    async def scenario() -> None:
        settings = ListenTLS(certs.server, certs.server_key, cafile=certs.ca, verify=True)
        async with relay(port, tls=settings) as server:
            tls = [
                "--tls",
                "--cacert",
                certs.ca,
                "--sni",
                "localhost",
                "-h",
                "127.0.0.1",
                "-p",
                str(port_of(server)),
            ]
            mine = ["--cert", certs.client, "--key", certs.client_key]
            assert await redis_cli(*tls, *mine, "set", "k", big) == "OK"
            assert await redis_cli(*tls, *mine, "get", "k") == big
            proc = await asyncio.create_subprocess_exec(
                "redis-cli", *tls, "ping", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            out, _ = await proc.communicate()
            assert b"PONG" not in out
            await wait_until(lambda: failures(server).get(("listen", "no_client_cert")) == 1)

    with redis(tmp_path, port=port):
        run(scenario())


@pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None, reason=REDIS_REASON
)
def test_plain_redis_cli_to_a_tls_only_redis_server_through_the_relay(
    run: Run, certs: Certs, tmp_path: Path
) -> None:
    """Steps: redis-server listening with TLS only (its certificate from the CA, client certificates not
    asked); plain `redis-cli` to the relay, which speaks TLS to it, verified against the CA by the name
    localhost: SET and GET go through."""
    tls_port = unused_port()
    args = [
        "--port", "0", "--tls-port", str(tls_port), "--tls-cert-file", certs.server, "--tls-key-file",
        certs.server_key, "--tls-ca-cert-file", certs.ca, "--tls-auth-clients", "no", "--bind", "127.0.0.1",
        "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
    ]  # fmt: skip

    async def scenario() -> None:
        async with relay(tls_port, target_tls=TargetTLS(cafile=certs.ca, server_name="localhost")) as server:
            plain = ["-h", "127.0.0.1", "-p", str(port_of(server))]
            assert await redis_cli(*plain, "set", "k", "through tls") == "OK"
            assert await redis_cli(*plain, "get", "k") == "through tls"
            assert failures(server) == {}

    with subprocess.Popen(
        ["redis-server", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    ) as server:
        try:
            connect_when_ready("127.0.0.1", tls_port).close()
            run(scenario())
        finally:
            server.terminate()
            server.wait(10)
