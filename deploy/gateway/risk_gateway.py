"""A reference gateway that enforces mia-detector's risk decisions in front of a model server.

It proxies OIP v2 (`POST /v2/models/{model}[/versions/{version}]/infer`) and KServe v1
(`POST /v1/models/{model}:predict`) requests to the model server, and for each one asks the detector's risk
endpoint (`GET /v1/risk/{model}/{client}`, answers cached for `--cache-seconds`) what to do with its client,
named by a request header (`--client-header`, default `X-Client-Id`, as the API gateway in front sets it
from the authenticated key):

- `block`: 403, the model server never sees the request;
- `throttle`: a token bucket of `requests_per_minute` per (model, client); 429 with `Retry-After` beyond it;
- `coarsen`: the response is reduced before it leaves (`coarsen`): `labels` keeps the predicted label only,
  `round` rounds every probability to `decimals`, `top1` keeps the top class and its probability;
- `allow` (and anything else): passed through untouched.

When the risk endpoint does not answer, requests pass (`--fail-closed` refuses them with 503 instead): a
detector outage must not take the model down unless the operators choose so. Standard library only, so
that it runs beside any model server. Nginx or Envoy in front keep TLS and authentication; this process
only decides.

It also answers nginx's `auth_request` subrequests on `/authz` (deploy/nginx/mia-risk.conf), so that
nginx sends only coarsened clients through this proxy: the request to judge is the one named by
`X-Original-URI` with the client header, and the answer is 204 for `allow` and `coarsen`, and for
`throttle` within the rate; 403 for `block`, for `throttle` beyond the rate (with `Retry-After`) and, with
`--fail-closed`, when the risk endpoint does not answer. `X-Risk-Action` says which: the decision's action,
or `unavailable` for the last case (auth_request passes on nothing but 2xx, 401 and 403, so the action is
what tells nginx which refusal to answer).

    python deploy/gateway/risk_gateway.py --listen 127.0.0.1:8081 --upstream http://127.0.0.1:8080 \
        --risk http://127.0.0.1:9109 [--risk-token-file /run/secrets/mia-risk-token]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import math
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("risk_gateway")

OIP_INFER = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/infer$")
KSERVE_PREDICT = re.compile(r"^/v1/models/(?P<model>[^/:]+):predict$")
AUTHZ_PATH = "/authz"
ACTIONS = {"allow", "coarsen", "throttle", "block"}
FLOAT_TYPES = {"FP16", "FP32", "FP64", "BF16"}
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}

Decision = dict[str, Any]


# -- coarsening a response ----------------------------------------------------------------------------------


def coarsen(body: Any, parameters: dict[str, Any]) -> Any:
    """`body` (a decoded OIP v2 or KServe v1 response) reduced as `parameters` say (`coarsening`: labels,
    round with `decimals`, top1); a body of neither shape, or an unknown coarsening, comes back as it was."""
    how = parameters.get("coarsening")
    if isinstance(body, dict) and isinstance(body.get("outputs"), list):
        return {
            **body,
            "outputs": [out for output in body["outputs"] for out in _oip_output(output, how, parameters)],
        }
    if isinstance(body, dict) and isinstance(body.get("predictions"), list):
        return {**body, "predictions": [_kserve_row(row, how, parameters) for row in body["predictions"]]}
    return body


def _oip_output(output: Any, how: str | None, parameters: dict[str, Any]) -> list[Any]:
    """One OIP v2 output as coarsened: probabilities (a float output of shape [n, k], k > 1) become labels,
    rounded values or the top class and its probability; other outputs pass."""
    if not isinstance(output, dict) or output.get("datatype") not in FLOAT_TYPES:
        return [output]
    shape, data = output.get("shape"), output.get("data")
    if how == "round":
        return [{**output, "data": _rounded(data, int(parameters.get("decimals", 0)))}]
    if not (isinstance(shape, list) and len(shape) == 2 and shape[1] > 1 and isinstance(data, list)):
        return [output]
    classes = int(shape[1])
    flat = [value for row in data for value in row] if data and isinstance(data[0], list) else data
    rows = [flat[start : start + classes] for start in range(0, len(flat), classes)]
    labels = [max(range(classes), key=row.__getitem__) for row in rows]
    label = {"name": "label", "shape": [len(rows)], "datatype": "INT64", "data": labels}
    if how == "labels":
        return [label]
    if how == "top1":
        top = [row[index] for row, index in zip(rows, labels, strict=True)]
        return [
            label,
            {"name": "probability", "shape": [len(rows)], "datatype": output["datatype"], "data": top},
        ]
    return [output]


def _kserve_row(row: Any, how: str | None, parameters: dict[str, Any]) -> Any:
    """One KServe v1 prediction as coarsened: a list of class probabilities becomes its label, rounded
    values, or `{"label", "probability"}`; a scalar prediction (already a label) passes (rounded by round)."""
    if how == "round":
        return _rounded(row, int(parameters.get("decimals", 0)))
    if not (isinstance(row, list) and len(row) > 1 and all(isinstance(v, int | float) for v in row)):
        return row
    label = max(range(len(row)), key=row.__getitem__)
    if how == "labels":
        return label
    if how == "top1":
        return {"label": label, "probability": row[label]}
    return row


def _rounded(value: Any, decimals: int) -> Any:
    if isinstance(value, list):
        return [_rounded(item, decimals) for item in value]
    if isinstance(value, float) and math.isfinite(value):
        return round(value, decimals)
    return value


# -- throttling ---------------------------------------------------------------------------------------------


class TokenBuckets:
    """A token bucket per key: `rate` requests a minute, bursts up to that many."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # key -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, key: tuple[str, str], rate: int) -> float:
        """Take a token for `key`; 0 when there was one, else the seconds until there is."""
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(key, (float(rate), now))
            tokens = min(float(rate), tokens + (now - at) * rate / 60.0)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) * 60.0 / rate


# -- asking the detector ------------------------------------------------------------------------------------


class RiskClient:
    """The decisions of the risk endpoint at `base_url`, each cached for `cache_seconds`; None when the
    endpoint does not answer."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        cache_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if urllib.parse.urlsplit(base_url).scheme not in ("http", "https"):
            raise ValueError(f"the risk endpoint must be an http(s):// URL, got {base_url!r}")
        self._base = base_url.rstrip("/")
        self._token = token
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, Decision]] = {}

    def decision(self, model: str, client_id: str) -> Decision | None:
        now = self._clock()
        cached = self._cache.get((model, client_id))
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        path = "/".join(urllib.parse.quote(part, safe="") for part in (model, client_id))
        request = urllib.request.Request(f"{self._base}/v1/risk/{path}")  # noqa: S310 (checked http(s))
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310 (the configured URL)
                decision: Decision = json.loads(response.read())
        except (OSError, ValueError) as error:
            log.warning("risk endpoint unavailable: %s", error)
            return None
        if len(self._cache) > 100_000:
            self._cache.clear()  # a bound, not an eviction policy: the next requests fill it again
        self._cache[(model, client_id)] = (now, decision)
        return decision


# -- the proxy ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """What a request gets before the model server sees it: `action` is the decision's (`allow` for a
    request that cannot be attributed, an unknown action, or a detector that does not answer), or
    `unavailable` when the detector does not answer and the gateway fails closed; `retry_after` (seconds)
    is above 0 when a throttled client is beyond its rate."""

    action: str
    parameters: dict[str, Any] = field(default_factory=dict)
    retry_after: int = 0

    @property
    def refused(self) -> bool:
        """Whether the request must not reach the model server."""
        return self.action in ("block", "unavailable") or self.retry_after > 0


class Gateway:
    """Decides on and forwards one request at a time (thread-safe)."""

    def __init__(
        self, upstream: str, risk: RiskClient, client_header: str, fail_closed: bool, buckets: TokenBuckets
    ) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        if parsed.scheme != "http" or not parsed.hostname:
            raise ValueError(f"the upstream must be an http:// URL, got {upstream!r}")
        self.upstream = (parsed.hostname, parsed.port or 80)
        self.risk = risk
        self.client_header = client_header
        self.fail_closed = fail_closed
        self.buckets = buckets

    def verdict(self, path: str, headers: dict[str, str]) -> Verdict:
        """The verdict on a request for `path` with `headers` (names in lower case); a throttled client's
        request within the rate takes a token."""
        route = urllib.parse.urlsplit(path).path
        match = OIP_INFER.match(route) or KSERVE_PREDICT.match(route)
        client_id = headers.get(self.client_header.lower(), "")
        if not (match and client_id):
            return Verdict("allow")
        model = urllib.parse.unquote(match["model"])
        decision = self.risk.decision(model, client_id)
        if decision is None:
            return Verdict("unavailable" if self.fail_closed else "allow")
        action = decision.get("action")
        if action not in ACTIONS:
            return Verdict("allow")
        parameters = decision.get("parameters") or {}
        if action == "throttle":
            wait = self.buckets.take((model, client_id), int(parameters.get("requests_per_minute", 1)))
            return Verdict(action, parameters, math.ceil(wait))
        return Verdict(action, parameters)

    def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        """The status, headers and body to answer a request with (`headers`' names in lower case)."""
        if urllib.parse.urlsplit(path).path == AUTHZ_PATH:
            return self.authorize(headers)
        verdict = self.verdict(path, headers)
        if verdict.action == "unavailable":
            return _error(HTTPStatus.SERVICE_UNAVAILABLE, "the risk decision is unavailable")
        if verdict.action == "block":
            return _error(HTTPStatus.FORBIDDEN, "this client is blocked")
        if verdict.retry_after:
            status, extra, text = _error(HTTPStatus.TOO_MANY_REQUESTS, "rate limited")
            return status, extra | {"Retry-After": str(verdict.retry_after)}, text
        status, answer_headers, answer = self._forward(method, path, headers, body)
        if verdict.action == "coarsen" and status == HTTPStatus.OK:
            try:
                reduced = coarsen(json.loads(answer), verdict.parameters)
            except ValueError:
                return _error(HTTPStatus.BAD_GATEWAY, "the model server's answer is not JSON; not passed")
            answer = json.dumps(reduced, separators=(",", ":")).encode()
            answer_headers["Content-Type"] = "application/json"
        return status, answer_headers, answer

    def authorize(self, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        """The answer to an nginx `auth_request` subrequest on the request named by `X-Original-URI`:
        204 when it may go on, 403 when it is refused; `X-Risk-Action` the verdict's action, `Retry-After`
        for a throttled client beyond its rate. 400 without `X-Original-URI`: nginx is not configured to
        send it, and every request would pass unjudged."""
        original = headers.get("x-original-uri", "")
        if not original:
            return _error(
                HTTPStatus.BAD_REQUEST, "X-Original-URI is missing (see deploy/nginx/mia-risk.conf)"
            )
        verdict = self.verdict(original, headers)
        answer = {"X-Risk-Action": verdict.action}
        if verdict.retry_after:
            answer["Retry-After"] = str(verdict.retry_after)
        return (HTTPStatus.FORBIDDEN if verdict.refused else HTTPStatus.NO_CONTENT), answer, b""

    def _forward(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            forwarded = {
                k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP | {"host", "content-length"}
            }
            connection.request(method, path, body=body or None, headers=forwarded)
            response = connection.getresponse()
            answer = response.read()
            kept = {
                k: v for k, v in response.getheaders() if k.lower() not in HOP_BY_HOP | {"content-length"}
            }
            return response.status, kept, answer
        except OSError as error:
            log.warning("model server unavailable: %s", error)
            return _error(HTTPStatus.BAD_GATEWAY, "the model server does not answer")
        finally:
            connection.close()


def _error(status: HTTPStatus, message: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json"}, json.dumps({"error": message}).encode()


def server(gateway: Gateway, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server on `host`:`port` (0: any free port) answering through `gateway`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            self._relay()

        def do_POST(self) -> None:
            self._relay()

        def _relay(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {name.lower(): value for name, value in self.headers.items()}
            status, answer_headers, answer = gateway.handle(self.command, self.path, headers, body)
            self.send_response(status)
            for name, value in answer_headers.items():
                self.send_header(name, value)
            if status != HTTPStatus.NO_CONTENT:  # a 204 has no body and must not say it has one
                self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer((host, port), Handler)
    httpd.daemon_threads = True
    return httpd


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8081", help="host:port to serve on")
    parser.add_argument("--upstream", required=True, help="the model server, http://host:port")
    parser.add_argument("--risk", required=True, help="the detector's risk endpoint, http://host:port")
    parser.add_argument("--risk-token-file", type=Path, help="a file holding the endpoint's bearer token")
    parser.add_argument("--client-header", default="X-Client-Id", help="the header naming the client")
    parser.add_argument("--cache-seconds", type=float, default=1.0, help="how long a decision is reused")
    parser.add_argument(
        "--fail-closed", action="store_true", help="refuse requests when the detector is down"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = args.listen.rpartition(":")
    token = args.risk_token_file.read_text().strip() if args.risk_token_file else None
    try:
        gateway = Gateway(args.upstream, RiskClient(args.risk, token, args.cache_seconds), args.client_header,
                          args.fail_closed, TokenBuckets())  # fmt: skip
        httpd = server(gateway, host, int(port))
    except (ValueError, OSError) as error:
        sys.exit(f"risk_gateway: error: {error}")
    log.info("enforcing %s on %s, listening on %s", args.risk, args.upstream, args.listen)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
