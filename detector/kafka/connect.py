"""Reaching the Kafka brokers: the TLS context of the settings, and a bounded check that a broker answers.

kafka-python's clients connect inside their constructors, and kafka-python 3.0 waits for a TLS handshake
without any time limit: `security_protocol=SSL` against a plain listener (which reads the TLS greeting as the
length of a request of some hundred megabytes and waits for it) never returns. So before a client is built,
`check_connection` connects to the bootstrap servers itself, every step bounded in time: TCP, the TLS
handshake with the very context the client will use, an ApiVersions request (a listener that does not speak
Kafka, or speaks it without TLS, answers nothing sensible), and with SASL a SaslHandshake for the configured
mechanism. Its error says in one line which step failed and what to check.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import time
from collections.abc import Callable
from pathlib import Path

from detector.settings import SASL_PROTOCOLS, TLS_PROTOCOLS, KafkaSettings

log = logging.getLogger(__name__)

_API_VERSIONS = 18
_SASL_HANDSHAKE = 17
# An ApiVersions or SaslHandshake answer is a few hundred bytes; a length beyond this is not Kafka talking.
_MAX_ANSWER_BYTES = 1024 * 1024
_UNSUPPORTED_SASL_MECHANISM = 33


class KafkaUnreachable(Exception):
    """No broker could be reached over the configured security protocol; the message is one line: where,
    over what, and why."""


class _StepFailed(Exception):
    """One bootstrap server failed one step; the message says which and why."""


def ssl_context(settings: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for `settings` (None without TLS): TLS 1.2 or later, the broker's certificate
    verified against `ssl_cafile` (or the system's trust store) and, unless `ssl_check_hostname` is off,
    against the broker's host name; a client certificate when `ssl_certfile` is set.

    Raises `KafkaUnreachable` naming the setting when a file cannot be loaded.
    """
    if settings.security_protocol not in TLS_PROTOCOLS:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = settings.ssl_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED  # also without the host name check: the chain is still verified
    cafile, certfile, keyfile = settings.ssl_cafile, settings.ssl_certfile, settings.ssl_keyfile
    if cafile is not None:
        _load("MIA_KAFKA_SSL_CAFILE", cafile, lambda: context.load_verify_locations(cafile))
    else:
        context.load_default_certs()
    if certfile is not None:
        password = settings.ssl_password.get_secret_value() if settings.ssl_password is not None else None
        _load(
            "MIA_KAFKA_SSL_CERTFILE",
            certfile,
            lambda: context.load_cert_chain(certfile, keyfile, password),
            hint="with MIA_KAFKA_SSL_KEYFILE and MIA_KAFKA_SSL_PASSWORD",
        )
    return context


def _load(variable: str, path: Path, load: Callable[[], object], hint: str = "") -> None:
    try:
        load()
    except OSError as exc:  # ssl.SSLError is an OSError too
        reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        extra = f" ({hint})" if hint and isinstance(exc, ssl.SSLError) else ""
        raise KafkaUnreachable(f"cannot load {variable} ({path}){extra}: {reason}") from None


def bootstrap_servers(settings: KafkaSettings) -> list[str]:
    """The `host:port` entries of `bootstrap_servers`."""
    return [server.strip() for server in settings.bootstrap_servers.split(",") if server.strip()]


def check_connection(settings: KafkaSettings, timeout: float | None = None) -> None:
    """Return once one bootstrap server has accepted a connection over the configured security protocol
    and answered an ApiVersions request (with SASL: and enabled the configured mechanism). Each server gets
    `timeout` seconds (default: `connect_timeout_seconds`) for all of it.

    Raises `KafkaUnreachable`, e.g. `cannot connect to Kafka at 127.0.0.1:9093 over SSL: TLS handshake timed
    out after 10 s (is the listener plain TCP? ...)`.
    """
    limit = settings.connect_timeout_seconds if timeout is None else timeout
    context = ssl_context(settings)
    servers = bootstrap_servers(settings)
    log.info("connecting to Kafka at %s over %s", ",".join(servers), settings.security_protocol)
    failures: list[str] = []
    for server in servers:
        try:
            _probe(server, settings, context, time.monotonic() + limit, limit)
        except _StepFailed as failure:
            failures.append(f"{server}: {failure}" if len(servers) > 1 else str(failure))
        else:
            return
    where = f"at {servers[0]} " if len(servers) == 1 else ""
    raise KafkaUnreachable(
        f"cannot connect to Kafka {where}over {settings.security_protocol}: {'; '.join(failures)}"
    )


def _probe(
    server: str, settings: KafkaSettings, context: ssl.SSLContext | None, deadline: float, limit: float
) -> None:
    host, port = _split(server)
    try:
        sock = socket.create_connection((host, port), timeout=_remaining(deadline))
    except TimeoutError:
        raise _StepFailed(f"no TCP connection within {limit:g} s") from None
    except socket.gaierror as exc:
        raise _StepFailed(f"unknown host {host!r} ({exc.strerror})") from None
    except OSError as exc:
        raise _StepFailed(exc.strerror or type(exc).__name__) from None
    step = "the TLS handshake"
    try:
        if context is not None:
            sock = _handshake(sock, context, host, deadline, limit)
        step = "an ApiVersions request"
        answer = _ask(sock, _request(_API_VERSIONS, 0, 1, settings.client_id, b""), deadline)
        if answer is None or not _answers(answer, 1):
            raise _StepFailed(_no_kafka_answer(settings, answer is None))
        if settings.security_protocol in SASL_PROTOCOLS:
            step = "the SASL handshake"
            _check_mechanism(sock, settings, deadline)
    except TimeoutError:
        raise _StepFailed(f"no answer to {step} within {limit:g} s") from None
    except ssl.SSLError as exc:
        # With TLS 1.3 a broker that wants a client certificate says so after the handshake.
        raise _StepFailed(
            f"the broker ended the TLS session: {exc.reason or exc}{_client_hint(exc)}"
        ) from None
    except OSError as exc:
        raise _StepFailed(f"the connection failed at {step}: {exc.strerror or type(exc).__name__}") from None
    finally:
        sock.close()


def _split(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise _StepFailed("not host:port (MIA_KAFKA_BOOTSTRAP_SERVERS)")
    return host.strip("[]"), int(port)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _handshake(
    sock: socket.socket, context: ssl.SSLContext, host: str, deadline: float, limit: float
) -> ssl.SSLSocket:
    try:
        sock.settimeout(_remaining(deadline))
        return context.wrap_socket(sock, server_hostname=host)
    except TimeoutError:
        raise _StepFailed(
            f"TLS handshake timed out after {limit:g} s (is the listener plain TCP? then "
            "MIA_KAFKA_SECURITY_PROTOCOL is PLAINTEXT or SASL_PLAINTEXT)"
        ) from None
    except ssl.SSLCertVerificationError as exc:
        raise _StepFailed(
            f"the broker's TLS certificate is not trusted: {exc.verify_message or exc.reason} "
            "(MIA_KAFKA_SSL_CAFILE, MIA_KAFKA_SSL_CHECK_HOSTNAME)"
        ) from None
    except (ssl.SSLEOFError, ConnectionError) as exc:
        # A plain Kafka listener drops a TLS greeting as an oversized request.
        why = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
        raise _StepFailed(
            f"the broker closed the connection during the TLS handshake ({why}; is the listener plain TCP? "
            "then MIA_KAFKA_SECURITY_PROTOCOL is PLAINTEXT or SASL_PLAINTEXT)"
        ) from None
    except ssl.SSLError as exc:
        raise _StepFailed(f"TLS handshake failed: {exc.reason or exc}{_client_hint(exc)}") from None


_CLIENT_CERTIFICATE_HINT = " (does the broker require a client certificate? MIA_KAFKA_SSL_CERTFILE)"


def _client_hint(exc: ssl.SSLError) -> str:
    reason = str(exc.reason or exc).upper()
    if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason or "BAD_CERTIFICATE" in reason:
        return _CLIENT_CERTIFICATE_HINT
    return ""


def _no_kafka_answer(settings: KafkaSettings, closed: bool) -> str:
    what = "closed the connection without answering" if closed else "answered something that is not Kafka"
    if settings.security_protocol in TLS_PROTOCOLS:
        # A broker that requires a client certificate may just hang up once TLS 1.3 lets it see none.
        hint = _CLIENT_CERTIFICATE_HINT if closed and settings.ssl_certfile is None else ""
        return f"the broker {what} an ApiVersions request{hint}"
    return (
        f"the broker {what} an ApiVersions request (a TLS listener? then MIA_KAFKA_SECURITY_PROTOCOL is SSL "
        "or SASL_SSL)"
    )


def _check_mechanism(sock: socket.socket, settings: KafkaSettings, deadline: float) -> None:
    mechanism = settings.sasl_mechanism
    correlation = 2
    answer = _ask(
        sock, _request(_SASL_HANDSHAKE, 1, correlation, settings.client_id, _string(mechanism)), deadline
    )
    if answer is None or not _answers(answer, correlation):
        raise _StepFailed(
            f"the broker closed the connection at the SASL handshake for {mechanism} "
            "(MIA_KAFKA_SASL_MECHANISM; is SASL enabled on this listener?)"
        )
    error, offered = _sasl_handshake_answer(answer)
    if error == _UNSUPPORTED_SASL_MECHANISM:
        raise _StepFailed(
            f"the broker does not enable SASL mechanism {mechanism} (MIA_KAFKA_SASL_MECHANISM); it enables "
            f"{', '.join(offered) or 'none'}"
        )
    if error:
        raise _StepFailed(f"the broker refused the SASL handshake for {mechanism} (Kafka error {error})")


def _request(api_key: int, version: int, correlation: int, client_id: str, body: bytes) -> bytes:
    """A request frame with a v1 header (api key, version, correlation id, client id)."""
    message = struct.pack(">hhi", api_key, version, correlation) + _string(client_id) + body
    return struct.pack(">i", len(message)) + message


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">h", len(data)) + data


def _ask(sock: socket.socket, request: bytes, deadline: float) -> bytes | None:
    """Send `request`; return the answer frame without its length, or None when the broker closed the
    connection. An impossible length gives b"" (not Kafka)."""
    sock.settimeout(_remaining(deadline))
    sock.sendall(request)
    head = _read(sock, 4, deadline)
    if head is None:
        return None
    (size,) = struct.unpack(">i", head)
    if not 4 <= size <= _MAX_ANSWER_BYTES:
        return b""
    return _read(sock, size, deadline)


def _read(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    data = b""
    while len(data) < size:
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _answers(answer: bytes, correlation: int) -> bool:
    return len(answer) >= 6 and struct.unpack(">i", answer[:4])[0] == correlation


def _sasl_handshake_answer(answer: bytes) -> tuple[int, list[str]]:
    """(error code, enabled mechanisms) of a SaslHandshake v1 answer (after the correlation id)."""
    (error,) = struct.unpack(">h", answer[4:6])
    offered: list[str] = []
    try:
        (count,) = struct.unpack(">i", answer[6:10])
        at = 10
        for _ in range(max(count, 0)):
            (length,) = struct.unpack(">h", answer[at : at + 2])
            offered.append(answer[at + 2 : at + 2 + length].decode(errors="replace"))
            at += 2 + length
    except struct.error:
        pass  # the list only helps the message
    return error, offered
