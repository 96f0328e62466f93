"""The embedded broker with security: TLS in front of it (throwaway certificates made with the `openssl`
command, a TLS-terminating proxy, the broker advertising the proxy so that every Kafka connection of a client
goes through TLS), and the broker requiring SASL authentication.

tansu 0.6 authenticates with SCRAM only, against users kept in its storage, and creating a user needs an
authenticated connection: a memory-storage broker started with `--authentication` has no user anyone can log
in as. So SASL is tested as far as it goes here: the mechanism negotiation, and the failures."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from detector.broker import broker_binary, free_port, wait_for_port
from tests.support import missing_tool

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Certificates:
    """A CA, a server certificate for 127.0.0.1 and localhost signed by it, a client certificate signed by it
    (its key encrypted with `client_key_password`), and an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    client_key_password: str
    other_ca: Path


def make_certificates(directory: Path) -> Certificates:
    """Write fresh certificates into `directory` (EC P-256, valid for a day)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        missing_tool("openssl", "apt-get install openssl")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True, timeout=60)

    password = "client-key-pw"
    for name, subject in (("ca", "/CN=mia test CA"), ("other-ca", "/CN=some other CA")):
        run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "1",
            "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.pem",
        )  # fmt: skip
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject, key_options in (
        ("server", "/CN=localhost", ["-nodes"]),
        ("client", "/CN=mia-detector", ["-passout", f"pass:{password}"]),
    ):
        run(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", *key_options,
            "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr",
        )  # fmt: skip
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "1", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        )  # fmt: skip
    return Certificates(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        client_key_password=password,
        other_ca=directory / "other-ca.pem",
    )


class TlsProxy:
    """Accepts TLS on 127.0.0.1:`port` (with the server certificate of `certificates`; requiring a client
    certificate signed by its CA when `require_client_certificate`) and forwards the plain bytes to
    `upstream_port` on 127.0.0.1. Runs an asyncio loop on a background thread (`start`/`close`, or `with`)."""

    def __init__(
        self,
        certificates: Certificates,
        upstream_port: int,
        *,
        port: int | None = None,
        require_client_certificate: bool = False,
    ) -> None:
        self.port = port or free_port(HOST)
        self._upstream_port = upstream_port
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificates.server_cert, certificates.server_key)
        if require_client_certificate:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(certificates.ca)
        self._context = context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.handshakes = 0  # TLS sessions established, over the proxy's life

    def start(self) -> Self:
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, HOST, self.port, ssl=self._context), self._loop
        )
        self._server = started.result(timeout=10)
        return self

    def close(self) -> None:
        async def shut(server: asyncio.Server | None) -> None:
            if server is not None:
                server.close()
            for writer in list(self._writers):
                writer.close()
            if server is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(server.wait_closed(), 5)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shut(self._server), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def _serve(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(HOST, self._upstream_port)
        except OSError:
            client_writer.close()
            return
        writers = {client_writer, upstream_writer}
        self._writers |= writers
        try:
            await asyncio.gather(
                _pump(client_reader, upstream_writer),
                _pump(upstream_reader, client_writer),
                return_exceptions=True,
            )
        finally:
            self._writers -= writers


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def start_tansu(
    listen_port: int, advertised_port: int, log_file: Path, *options: str
) -> subprocess.Popen[bytes]:
    """A tansu broker (memory storage) on 127.0.0.1:`listen_port` advertising 127.0.0.1:`advertised_port`,
    accepting connections when this returns."""
    with log_file.open("ab") as log:
        process = subprocess.Popen(
            [
                broker_binary(), "broker",
                "--listener-url", f"tcp://{HOST}:{listen_port}",
                "--advertised-listener-url", f"tcp://{HOST}:{advertised_port}",
                "--storage-engine", "memory://tansu/",
                *options,
            ],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for_port(HOST, listen_port, 15)
    except BaseException:
        stop(process)
        raise
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 10 s."""
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class BrokerBehindTls:
    """A tansu broker listening on a plain port of its own and advertising a `TlsProxy` in front of it: a
    client bootstrapping from `bootstrap_servers` talks TLS to every broker it learns of."""

    def __init__(
        self, certificates: Certificates, log_file: Path, *, require_client_certificate: bool
    ) -> None:
        self._plain_port = free_port(HOST)
        self.proxy = TlsProxy(
            certificates, self._plain_port, require_client_certificate=require_client_certificate
        )
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.proxy.port}"

    def __enter__(self) -> Self:
        self._process = start_tansu(self._plain_port, self.proxy.port, self._log_file)
        try:
            self.proxy.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.proxy.close()
        if self._process is not None:
            stop(self._process)
            self._process = None
