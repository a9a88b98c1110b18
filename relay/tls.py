"""TLS on either side of a route: settings, contexts, and failed handshakes named for people.

Rules:
1. Settings are plain frozen values (ListenTLS: the relay terminates TLS; TargetTLS: it speaks TLS to the
   target). Parsing them also loads every file they name into a context, so a missing file, a file that
   is not PEM or a certificate that does not match its key is an AddressError when the config is built
   (one line naming the source, exit 2; SIGHUP keeps the old config), never at the first connection.
2. The loop's own TLS transport (asyncio's or uvloop's) sits under the same pair and pump as plain TCP
   (connection.py, pump.py): the handshake completes before `connection_made`, so a pair never sees a
   socket that is half through it, and a failed handshake never becomes a pair. Neither loop's TLS
   transport can half-close: EOF towards a TLS side closes it after flushing (close_notify), and a TLS
   side's close_notify ends that side (connection.py `_send_eof`, pump.py `eof_received`).
3. A failed handshake is given one reason from REASONS (from the exception's type, verify code or OpenSSL
   reason code, never its text), counted per route, side and reason (RouteStats.tls_failures), and logged
   with a hint at most once per interval per route, side and reason. A client that leaves before saying
   anything (a TCP health check) is counted as `eof` and logged at debug only.
4. As socat: the target's certificate is verified (cafile, else the system store) and its name checked
   (server_name/commonname, else the target's host) unless verify is off, which is warned about at start;
   SNI carries that name unless sni is off, and then the name is checked after the handshake, before any
   byte is relayed. On the listen side, verify means client certificates are required (mTLS), and
   commonname (socat's, ignored without verify) a name they must carry, checked before the pair exists.
5. SIGHUP reads the files of every TLS route again (server.py): a certificate rotated at the same path
   serves the connections from then on, without closing the listener; open connections keep theirs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from relay.address import PATH_CHARS, AddressError, excerpt

log = logging.getLogger("relay")

LISTEN, TARGET = "listen", "target"
REASONS = (
    "plaintext",  # the peer does not speak TLS
    "no_client_cert",  # a client certificate was required and not given
    "unknown_ca",  # the peer's certificate is not signed by a trusted CA
    "expired",  # the peer's certificate has expired or is not valid yet
    "name_mismatch",  # the target's certificate does not carry the expected name
    "peer_rejected",  # the peer refused our certificate or us (an alert)
    "protocol",  # no common TLS version or cipher
    "timeout",  # the handshake did not complete in time
    "eof",  # the peer closed the connection during the handshake
    "other",
)
# X509_V_ERR_* codes (openssl/x509_vfy.h) -> reason
VERIFY_CODES = {
    9: "expired",  # not yet valid
    10: "expired",
    2: "unknown_ca",  # unable to get issuer certificate
    18: "unknown_ca",  # self-signed certificate
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",  # unable to verify the first certificate
    62: "name_mismatch",  # hostname mismatch
    64: "name_mismatch",  # IP address mismatch
}
# OpenSSL reason codes (SSLError.reason) -> reason
SSL_REASONS = {
    "WRONG_VERSION_NUMBER": "plaintext",
    "HTTP_REQUEST": "plaintext",
    "HTTPS_PROXY_REQUEST": "plaintext",
    "UNKNOWN_PROTOCOL": "plaintext",
    "PACKET_LENGTH_TOO_LONG": "plaintext",
    "RECORD_LAYER_FAILURE": "plaintext",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_cert",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "no_client_cert",
    "NO_SHARED_CIPHER": "protocol",
    "UNSUPPORTED_PROTOCOL": "protocol",
    "NO_PROTOCOLS_AVAILABLE": "protocol",
    "VERSION_TOO_LOW": "protocol",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol",
}
NAME_FORM = "expected a host name or an IP address"


# --- settings --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ListenTLS:
    """The relay terminates TLS on a route's listen addresses."""

    cert: str  # PEM: the certificate chain, and the key unless `key` is given
    key: str | None = None
    cafile: str | None = None  # CAs that sign client certificates (else the system store)
    verify: bool = False  # require a client certificate and verify it (mTLS)
    commonname: str | None = None  # with verify: the name the client's certificate must carry (socat's)

    def describe(self) -> str:
        return "TLS, client certificates required" if self.verify else "TLS"


@dataclass(frozen=True, slots=True)
class TargetTLS:
    """The relay speaks TLS to a route's target."""

    cafile: str | None = None  # CAs that sign the target's certificate; None: the system store
    verify: bool = True
    server_name: str | None = None  # the name checked (and sent as SNI); None: the target's host
    sni: bool = True
    cert: str | None = None  # a client certificate, for a target that asks for one
    key: str | None = None

    def describe(self) -> str:
        return "TLS" if self.verify else "TLS, not verified"


LISTEN_KEYS = {
    "cert": "cert",
    "certificate": "cert",
    "key": "key",
    "cafile": "cafile",
    "verify": "verify",
    "commonname": "commonname",
}
TARGET_KEYS = {
    "cafile": "cafile",
    "verify": "verify",
    "server_name": "server_name",
    "commonname": "server_name",
    "sni": "sni",
    "cert": "cert",
    "certificate": "cert",
    "key": "key",
}
LISTEN_FORM = "expected cert=PEM[,key=PEM][,cafile=PEM][,verify=BOOL][,commonname=NAME] (a mapping in YAML)"
TARGET_FORM = (
    "expected on, off, or cafile=PEM,verify=BOOL,server_name=NAME,sni=BOOL,cert=PEM,key=PEM "
    "(each optional; a mapping in YAML)"
)
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _items(value: object, keys: Mapping[str, str], form: str) -> dict[str, object]:
    """A YAML mapping or `k=v,k=v` text as {canonical key: value}."""
    if isinstance(value, Mapping):
        pairs = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, str):
        pairs = []
        for item in value.split(","):
            name, eq, text = item.strip().partition("=")
            if not name and not eq:
                continue  # "a=1,,b=2" or a trailing comma
            pairs.append((name, text if eq else "true"))
    else:
        raise AddressError(f"{excerpt(value)} is not TLS settings; {form}")
    found: dict[str, object] = {}
    for name, item in pairs:
        key = keys.get(name.strip().lower().replace("-", "_"))
        if key is None:
            raise AddressError(f"{excerpt(name)} is not a TLS setting here; {form}")
        found[key] = item
    return found


def _flag(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if isinstance(value, str | int) and text in _TRUE | _FALSE:
        return text in _TRUE
    raise AddressError(f"{name} {excerpt(value)} is not a yes/no value; expected true, false, 1 or 0")


def _path(name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip() or not value.isprintable():
        raise AddressError(
            f"{name} {excerpt(value, PATH_CHARS)} is not a file path; expected the path of a PEM file"
        )
    return value.strip()


def parse_listen(value: object) -> ListenTLS:
    """`tls:` of a route (or RELAY_TLS): checked by loading its files (rule 1)."""
    items = _items(value, LISTEN_KEYS, LISTEN_FORM)
    if "cert" not in items:
        raise AddressError(f"{excerpt(value)} has no cert; {LISTEN_FORM}")
    verify = _flag("verify", items["verify"]) if "verify" in items else "cafile" in items
    settings = ListenTLS(
        cert=_path("cert", items["cert"]),
        key=_path("key", items["key"]) if "key" in items else None,
        cafile=_path("cafile", items["cafile"]) if "cafile" in items else None,
        verify=verify,
        # As socat: a name to check means nothing without verify (no client certificate is asked for).
        commonname=_name("commonname", items["commonname"]) if verify and items.get("commonname") else None,
    )
    server_context(settings)
    return settings


def _name(key: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip() or not value.isprintable() or " " in value.strip():
        raise AddressError(f"{key} {excerpt(value)} is not a name; {NAME_FORM}")
    return value.strip()


def parse_target(value: object) -> TargetTLS | None:
    """`target_tls:` of a route (or RELAY_TARGET_TLS): on (verify against the system store), off, or
    settings; checked by loading its files (rule 1)."""
    if value is None or isinstance(value, bool):
        return TargetTLS() if value else None
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE | {""}:
        return TargetTLS() if value.strip().lower() in _TRUE else None
    items = _items(value, TARGET_KEYS, TARGET_FORM)
    name = _name("server_name", items["server_name"]) if "server_name" in items else None
    settings = TargetTLS(
        cafile=_path("cafile", items["cafile"]) if "cafile" in items else None,
        verify=_flag("verify", items["verify"]) if "verify" in items else True,
        server_name=name,
        sni=_flag("sni", items["sni"]) if "sni" in items else True,
        cert=_path("cert", items["cert"]) if "cert" in items else None,
        key=_path("key", items["key"]) if "key" in items else None,
    )
    if settings.key is not None and settings.cert is None:
        raise AddressError(f"{excerpt(value)} has a key but no cert; {TARGET_FORM}")
    client_context(settings)
    return settings


# --- contexts --------------------------------------------------------------------------------------------


def _readable(name: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(1 << 20)
    except FileNotFoundError:
        raise AddressError(
            f"{name} {excerpt(path, PATH_CHARS)}: no such file; expected a PEM file the relay can read"
        ) from None
    except IsADirectoryError:
        raise AddressError(
            f"{name} {excerpt(path, PATH_CHARS)} is a directory; expected a PEM file"
        ) from None
    except PermissionError:
        raise AddressError(
            f"{name} {excerpt(path, PATH_CHARS)}: permission denied; expected a PEM file the relay (uid "
            f"{os.getuid()}) can read"
        ) from None
    except OSError as err:
        raise AddressError(
            f"{name} {excerpt(path, PATH_CHARS)}: {err.strerror}; expected a PEM file"
        ) from None


def _no_password() -> str:
    raise AddressError("is encrypted (has a passphrase)")


def _load_chain(context: ssl.SSLContext, cert: str, key: str | None) -> None:
    """The certificate (and key): missing, unreadable, not PEM, encrypted and mismatched each say so."""
    cert_text = _readable("cert", cert)
    key_text = _readable("key", key) if key is not None else cert_text
    key_name = f"key {excerpt(key, PATH_CHARS)}" if key is not None else f"cert {excerpt(cert, PATH_CHARS)}"
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        raise AddressError(
            f"cert {excerpt(cert, PATH_CHARS)} holds no PEM certificate; expected -----BEGIN CERTIFICATE-----"
        )
    if b"PRIVATE KEY-----" not in key_text:
        where = f"{key_name} holds no PEM private key"
        raise AddressError(
            f"{where}; expected -----BEGIN PRIVATE KEY----- (give key= when the key is in a file of its own)"
        )
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except AddressError as err:
        raise AddressError(f"{key_name} {err}; expected a key without a passphrase") from None
    except ssl.SSLError as err:
        if err.reason == "KEY_VALUES_MISMATCH":
            raise AddressError(
                f"{key_name} does not match the certificate in cert {excerpt(cert, PATH_CHARS)}; "
                "expected that "
                "certificate's key"
            ) from None
        raise AddressError(
            f"cert {excerpt(cert, PATH_CHARS)} / {key_name}: OpenSSL cannot load them ({err.reason or err}); "
            "expected PEM files"
        ) from None


def _load_trust(context: ssl.SSLContext, cafile: str | None, purpose: ssl.Purpose) -> None:
    if cafile is None:
        context.load_default_certs(purpose)
        return
    if b"-----BEGIN CERTIFICATE-----" not in _readable("cafile", cafile):
        raise AddressError(
            f"cafile {excerpt(cafile, PATH_CHARS)} holds no PEM certificate; expected -----BEGIN "
            "CERTIFICATE-----"
        )
    try:
        context.load_verify_locations(cafile=cafile)
    except ssl.SSLError as err:
        raise AddressError(
            f"cafile {excerpt(cafile, PATH_CHARS)}: OpenSSL cannot load it ({err.reason or err}); "
            "expected PEM"
        ) from None


def server_context(settings: ListenTLS) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _load_chain(context, settings.cert, settings.key)
    if settings.verify:
        context.verify_mode = ssl.CERT_REQUIRED
        _load_trust(context, settings.cafile, ssl.Purpose.CLIENT_AUTH)
    elif settings.cafile is not None:
        _readable("cafile", settings.cafile)  # named, so checked; unused without verify
    return context


def client_context(settings: TargetTLS) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if settings.verify:
        _load_trust(context, settings.cafile, ssl.Purpose.SERVER_AUTH)
        context.check_hostname = settings.sni  # without SNI the name is checked after the handshake
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if settings.cert is not None:
        _load_chain(context, settings.cert, settings.key)
    return context


@dataclass(frozen=True, slots=True)
class TargetSide:
    """What a connection to the target needs: the context, and which name to check and send."""

    context: ssl.SSLContext
    settings: TargetTLS

    def server_hostname(self, host: str) -> str:
        """The name for create_connection: checked and sent as SNI; "" sends no SNI (rule 4)."""
        return (self.settings.server_name or host) if self.settings.sni else ""

    @property
    def check_after(self) -> bool:
        return self.settings.verify and not self.settings.sni

    def mismatch(self, transport: Any, host: str) -> ssl.SSLCertVerificationError | None:
        """Without SNI: the error when the verified certificate does not carry the expected name."""
        return name_mismatch(transport, self.settings.server_name or host)


def name_mismatch(transport: Any, name: str) -> ssl.SSLCertVerificationError | None:
    """The error (classified name_mismatch) when the peer's verified certificate does not carry `name`."""
    if names_match(transport.get_extra_info("peercert") or {}, name):
        return None
    err = ssl.SSLCertVerificationError(f"certificate verify failed: the certificate does not name {name!r}")
    err.verify_code, err.verify_message = 62, f"hostname mismatch, certificate is not valid for {name!r}"
    return err


def names_match(cert: Mapping[str, Any], name: str) -> bool:
    """RFC 6125 as OpenSSL checks it: DNS names (a `*` as the whole leftmost label), else the subject's CN;
    an IP address against the IP address entries."""
    try:
        ip: str | None = str(ipaddress.ip_address(name))
    except ValueError:
        ip = None
    alt = cert.get("subjectAltName", ())
    if ip is not None:
        return any(kind == "IP Address" and _same_ip(value, ip) for kind, value in alt)
    dns = [value for kind, value in alt if kind == "DNS"]
    if not dns:
        dns = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    wanted = name.lower().rstrip(".")
    for pattern in dns:
        pattern = pattern.lower().rstrip(".")
        if pattern == wanted:
            return True
        if pattern.startswith("*.") and "." in wanted and wanted.partition(".")[2] == pattern[2:]:
            return True
    return False


def _same_ip(value: str, ip: str) -> bool:
    try:
        return str(ipaddress.ip_address(value.strip())) == ip
    except ValueError:
        return False


def contexts(
    route_name: str, listen: ListenTLS | None, target: TargetTLS | None, *, warn: bool = True
) -> tuple[ssl.SSLContext | None, TargetSide | None]:
    """A route's contexts, with the start-up warnings of rule 4 (not repeated at a reload: `warn`)."""
    server = client = None
    if listen is not None:
        server = server_context(listen)
        if warn and listen.verify and listen.cafile is None:
            log.warning(
                "%s: client certificates are required and verified against the system's CA store (socat's "
                "verify=1 without cafile=); clients without one are refused. Set cafile for mTLS with your "
                "own CA, or verify to false (verify=0) to accept every client",
                route_name,
            )
    if target is not None:
        client = TargetSide(client_context(target), target)
        if warn and not target.verify:
            log.warning(
                "%s: the target's TLS certificate is not verified (verify=0 / verify: false): anyone "
                "between the relay and the target can pose as it",
                route_name,
            )
    return server, client


# --- failed handshakes -----------------------------------------------------------------------------------


def classify(exc: BaseException) -> str:
    """A failed handshake as one of REASONS (rule 3)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return VERIFY_CODES.get(exc.verify_code, "other")
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ConnectionResetError | BrokenPipeError):
        return "eof"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or ""
        if reason in SSL_REASONS:
            return SSL_REASONS[reason]
        if "ALERT" in reason:
            return "peer_rejected"
        return "other"
    if isinstance(exc, TimeoutError | ConnectionAbortedError):  # the loops' handshake timeout
        return "timeout"
    return "other"


def _alert(exc: BaseException) -> str:
    reason = getattr(exc, "reason", None) or ""
    return reason.rpartition("ALERT_")[2].replace("_", " ").lower() or "an alert"


LISTEN_HINTS: dict[str, Callable[[ListenTLS, BaseException], str]] = {
    "plaintext": lambda s, e: (
        "a client sent plain text to this TLS port: make it use TLS (https://, sslmode=require, --tls) "
        "or forward this port without TLS"
    ),
    "no_client_cert": lambda s, e: (
        "the client sent no certificate and this port requires one (verify): give the client a "
        f"certificate signed by a CA in {s.cafile or 'the system store'}, or turn verify off"
    ),
    "unknown_ca": lambda s, e: (
        f"the client's certificate is not signed by a CA in {s.cafile or 'the system store'} "
        f"({getattr(e, 'verify_message', '')})"
    ),
    "name_mismatch": lambda s, e: (
        f"the client's certificate does not carry the name {s.commonname!r} that this port requires "
        "(commonname)"
    ),
    "expired": lambda s, e: (
        "the client's certificate has expired or is not valid yet: renew it (or check the clock)"
    ),
    "peer_rejected": lambda s, e: (
        f"the client refused the relay's certificate ({_alert(e)}): give the client the CA that signed "
        f"{s.cert} (curl --cacert, PGSSLROOTCERT, ...) and connect by a name the certificate carries"
    ),
    "protocol": lambda s, e: "the client and the relay have no TLS version or cipher in common",
    "timeout": lambda s, e: "the client did not finish the TLS handshake in time (connect_timeout)",
}
TARGET_HINTS: dict[str, Callable[[TargetTLS, BaseException], str]] = {
    "plaintext": lambda s, e: (
        "the target answered in plain text, not TLS: forward to its TLS port, or drop the target's TLS"
    ),
    "unknown_ca": lambda s, e: (
        f"the target's certificate is not signed by a CA in {s.cafile or 'the system store'} "
        f"({getattr(e, 'verify_message', '')}): set cafile to the CA that signed it"
    ),
    "expired": lambda s, e: (
        "the target's certificate has expired or is not valid yet: renew it (or check the clock)"
    ),
    "name_mismatch": lambda s, e: (
        "the target's certificate does not carry the name the relay checks "
        f"({getattr(e, 'verify_message', '')}): set server_name (socat: commonname=) to a name it carries"
    ),
    "no_client_cert": lambda s, e: "the target requires a client certificate: give the relay one (cert, key)",
    "peer_rejected": lambda s, e: f"the target refused the relay's handshake ({_alert(e)})",
    "protocol": lambda s, e: "the target and the relay have no TLS version or cipher in common",
    "eof": lambda s, e: (
        "the target closed the connection during the TLS handshake: is this its TLS port, and does it "
        "require a client certificate?"
    ),
}


def hint(side: str, settings: ListenTLS | TargetTLS | None, reason: str, exc: BaseException) -> str | None:
    table: Mapping[str, Callable[[Any, BaseException], str]] = (
        LISTEN_HINTS if side == LISTEN else TARGET_HINTS
    )
    make = table.get(reason)
    return make(settings, exc) if make is not None and settings is not None else None


def handshake_failed(
    failures: Counter[tuple[str, str]],
    warn: Callable[..., None],
    route: str,
    side: str,
    settings: ListenTLS | TargetTLS | None,
    exc: BaseException,
) -> str:
    """Count a failed handshake and log it with its hint, rate-limited (rule 3); returns the reason.
    `warn` is RateLimited.warning."""
    reason = classify(exc)
    failures[(side, reason)] += 1
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if side == LISTEN and reason == "eof":
        log.debug("%s: a client left during the TLS handshake (%s)", route, detail, extra={"route": route})
        return reason
    said = hint(side, settings, reason, exc)
    who = "client" if side == LISTEN else "target"
    warn(
        f"tls:{route}:{side}:{reason}",
        f"{route}: TLS handshake with the {who} failed ({reason}: {detail})" + (f"; {said}" if said else ""),
        route=route,
        reason=reason,
    )
    return reason
