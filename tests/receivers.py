"""`RecordingReceiver`: a real HTTP server on 127.0.0.1 that records what sinks send it.

    with RecordingReceiver(validate=check_body) as receiver:   # started on a free port
        sink = WebhookSink(receiver.url)
        sink.deliver(notification)
        [request] = receiver.accepted
        receiver.fail_next(2)                  # the next two requests get 503
        receiver.respond(429, headers={"Retry-After": "7"})   # every later request gets 429
        receiver.stop()                        # connections are refused ...
        receiver.start()                       # ... until it listens again, on the same port
        receiver.wait_for(3, timeout=10)       # block until 3 requests in all were accepted

Every request is recorded (`requests`), whatever the answer. The answer is, in this order: the failure
status while a `fail_next` budget lasts; 400 with the validator's message when `validate` rejects the
request; else the configured response (200 and an empty body unless `respond` said otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.servers import RestartableHttpServer


@dataclass(frozen=True)
class RecordedRequest:
    """One request as received. `headers` has lower-case names (repeated headers joined by `, `); `json` is
    the parsed body, or None when it is not JSON. `status` is the answer given; `error` the validator's
    complaint (the request was then rejected with 400, unless a `fail_next` failure came first)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    status: int = 0
    error: str | None = None

    @property
    def accepted(self) -> bool:
        """Whether the receiver answered 2xx."""
        return 200 <= self.status < 300


# Returns an error message for an invalid request, or None; an exception it raises (a failed `assert`)
# rejects the request too, with the exception as the message.
Validator = Callable[[RecordedRequest], str | None]


@dataclass
class _Response:
    status: int
    body: bytes
    headers: dict[str, str]


def _encode(body: bytes | str | Any) -> tuple[bytes, str]:
    if isinstance(body, bytes):
        return body, "application/octet-stream"
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    return json.dumps(body).encode(), "application/json"


class RecordingReceiver(RestartableHttpServer):
    """A threaded HTTP server on 127.0.0.1 that records requests and answers as told. Thread-safe.

    `status`, `body` (bytes, text, or anything JSON-serialisable) and `headers`: the normal answer.
    `validate`: checks each request (see `Validator`). `fail_first`: how many requests, from the first,
    get `fail_status` (503) instead. Started on construction; `stop()` and `start()` keep the port.
    """

    _thread_name = "recording-receiver"

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes | str | Any = b"",
        headers: dict[str, str] | None = None,
        validate: Validator | None = None,
        fail_first: int = 0,
        fail_status: int = 503,
    ) -> None:
        super().__init__()
        self._lock = threading.Condition()
        self._requests: list[RecordedRequest] = []
        self._validate = validate
        self._response = _Response(0, b"", {})
        self._failure = _Response(0, b"", {})
        self._failures_left = 0
        self.respond(status, body, headers=headers)
        self.fail_next(fail_first, fail_status)
        self.start()

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`, without a trailing slash."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def accepted(self) -> list[RecordedRequest]:
        """The requests answered 2xx."""
        return [request for request in self.requests if request.accepted]

    @property
    def rejected(self) -> list[RecordedRequest]:
        """The requests the validator found fault with."""
        return [request for request in self.requests if request.error is not None]

    def respond(
        self, status: int, body: bytes | str | Any = b"", *, headers: dict[str, str] | None = None
    ) -> None:
        """Answer later requests with `status`, `body` and `headers` (after any `fail_next` budget)."""
        content, content_type = _encode(body)
        with self._lock:
            self._response = _Response(status, content, {"Content-Type": content_type, **(headers or {})})

    def fail_next(self, count: int, status: int = 503, *, headers: dict[str, str] | None = None) -> None:
        """Answer the next `count` requests with `status` (and `headers`, such as Retry-After)."""
        with self._lock:
            self._failures_left = count
            body = f"failure injected by the test receiver ({status})".encode()
            self._failure = _Response(status, body, {"Content-Type": "text/plain", **(headers or {})})

    def wait_for(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until `count` requests were accepted; return them. Raises `TimeoutError` otherwise."""
        with self._lock:
            done = self._lock.wait_for(
                lambda: sum(request.accepted for request in self._requests) >= count, timeout
            )
            if not done:
                raise TimeoutError(f"{count} accepted requests expected, got {len(self._requests)} requests")
            return [request for request in self._requests if request.accepted]

    def _answer(self, request: RecordedRequest) -> _Response:
        error = None
        if self._validate is not None:
            try:
                error = self._validate(request)
            except Exception as exc:  # a failed assert in the validator is a rejection, not a crash
                error = f"{type(exc).__name__}: {exc}"
        with self._lock:
            if self._failures_left > 0:
                self._failures_left -= 1
                response = self._failure
            elif error is not None:
                response = _Response(400, error.encode(), {"Content-Type": "text/plain; charset=utf-8"})
            else:
                response = self._response
            self._requests.append(dataclasses.replace(request, status=response.status, error=error))
            self._lock.notify_all()
        return response

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.0: one request per connection, so stop() never waits on an idle keep-alive connection.
            protocol_version = "HTTP/1.0"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers: dict[str, str] = {}
                for name, value in self.headers.items():
                    key = name.lower()
                    headers[key] = f"{headers[key]}, {value}" if key in headers else value
                try:
                    parsed = json.loads(body) if body else None
                except ValueError:
                    parsed = None
                request = RecordedRequest(self.command, self.path, headers, body, parsed)
                response = receiver._answer(request)
                self.send_response(response.status)
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(response.body)))
                self.end_headers()
                self.wfile.write(response.body)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests are recorded; stderr stays quiet

        return Handler
