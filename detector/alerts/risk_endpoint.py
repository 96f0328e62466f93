"""The risk endpoint: gateways ask `GET /v1/risk/{model}/{client}` what to do with a client's requests.

Answered from memory, from a `RiskView` (`detector.alerts.risk_feed`): a request never waits on the
database. The answer is the decision in force (`detector.domain.in_force`) as `risk_document` writes it; a
client without one gets `allow`. Path segments are percent-decoded (a client id may hold a slash). With a
token, a request without `Authorization: Bearer <token>` gets 401.
"""

from __future__ import annotations

import hmac
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import orjson

from detector.alerts.risk_feed import RiskView

PREFIX = "/v1/risk/"


class RiskEndpoint:
    """The HTTP server of `view` on `host`:`port` (port 0: any free one, see `port`); `token`: the bearer
    token asked for, if any. Binding happens here: raises `OSError` when the address cannot be bound."""

    def __init__(self, view: RiskView, host: str, port: int, token: str | None = None) -> None:
        self.view = view
        self._server = ThreadingHTTPServer((host, port), _handler(view, token))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="risk-endpoint", daemon=True)

    @property
    def port(self) -> int:
        """The port listened on."""
        return int(self._server.server_address[1])

    def start(self) -> RiskEndpoint:
        """Serve in the background."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler(view: RiskView, token: str | None) -> type[BaseHTTPRequestHandler]:
    expected = f"Bearer {token}".encode() if token else None

    class RiskHandler(BaseHTTPRequestHandler):
        server_version = "mia-detector-risk"
        protocol_version = "HTTP/1.1"  # keep-alive: a gateway asks on every request
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms wait for an ACK between

        def do_GET(self) -> None:
            if expected is not None and not hmac.compare_digest(
                self.headers.get("Authorization", "").encode(), expected
            ):
                self._answer(HTTPStatus.UNAUTHORIZED, {"error": "a bearer token is required"}, bearer=True)
                return
            path = self.path.split("?", 1)[0]
            segments = path[len(PREFIX) :].split("/") if path.startswith(PREFIX) else []
            if len(segments) != 2 or not all(segments):
                self._answer(HTTPStatus.NOT_FOUND, {"error": f"ask {PREFIX}{{model}}/{{client}}"})
                return
            model, client_id = (unquote(segment) for segment in segments)
            self._answer(HTTPStatus.OK, view.document(model, client_id))

        def _answer(self, status: HTTPStatus, body: dict[str, Any], bearer: bool = False) -> None:
            data = orjson.dumps(body)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            if bearer:
                self.send_header("WWW-Authenticate", 'Bearer realm="mia-detector risk"')
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # one line per request would drown the daemon's log; the gateway logs its own

    return RiskHandler
