"""deploy/nginx/mia-risk.conf in a real nginx, in front of a real model server, judging every request with
auth_request through the reference gateway's `/authz` and the real risk endpoint: it blocks, throttles and
routes coarsened clients through the gateway's proxy, and lets everything through when the detector or the
gateway is down."""

from __future__ import annotations

import http.client
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from detector.alerts.risk_endpoint import RiskEndpoint
from detector.broker import free_port
from tests.deploy.test_risk_gateway import (
    LABELS,
    MODEL,
    PROBABILITIES,
    ModelServer,
    gateway_module,
    oip,
    served_gateway,
)
from tests.servers import running_server

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "mia-risk.conf"
# The addresses the deploy file names, replaced by the test's: the file is otherwise used as it is.
LISTEN, MODEL_SERVER, GATEWAY = "listen 8000;", "server 127.0.0.1:8080;", "server 127.0.0.1:8081;"
UNTOUCHED = oip([value for row in PROBABILITIES for value in row])  # the model server's OIP v2 answer

# Around the deploy file, what a system's nginx.conf gives it: one process in the foreground, and every
# file it writes (pid, logs, request bodies) under the test's own prefix, none in /var.
MAIN_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/mia-risk.conf;
}}
"""


def nginx_binary() -> str:
    """nginx on PATH or where Debian puts it (/usr/sbin, not on an unprivileged user's PATH)."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if found is None:
        # Not skipped, even on a developer's machine: the nginx configuration is tested nowhere else.
        pytest.fail("nginx is not installed: run `make tools` (apt-get install nginx)")
    return found


def render(prefix: Path, port: int, model_server: int, gateway: int) -> Path:
    """The main configuration in `prefix`, including the deploy file with the test's addresses."""
    text = CONFIG.read_text()
    for placeholder, address in (
        (LISTEN, f"listen 127.0.0.1:{port};"),
        (MODEL_SERVER, f"server 127.0.0.1:{model_server};"),
        (GATEWAY, f"server 127.0.0.1:{gateway};"),
    ):
        assert text.count(placeholder) == 1, f"{CONFIG} no longer names {placeholder!r} once"
        text = text.replace(placeholder, address)
    (prefix / "mia-risk.conf").write_text(text)
    main = prefix / "nginx.conf"
    main.write_text(MAIN_CONFIG.format(prefix=prefix))
    return main


# The gateway is loaded from its file at run time (it is not a package module): mypy cannot see its class.
class CountingGateway(gateway_module.Gateway):  # type: ignore[misc, name-defined]
    """The gateway, counting the requests its proxy forwards: nginx should send it the coarsened only."""

    forwarded = 0

    def _forward(self, *args: Any) -> Any:
        self.forwarded += 1
        return super()._forward(*args)


@dataclass
class Stack:
    """nginx on `port`, with the model server, the risk endpoint and the gateway (`gateway` deciding,
    `gateway_server` serving it) behind it."""

    port: int
    model: ModelServer
    endpoint: RiskEndpoint
    gateway: CountingGateway
    gateway_server: Any


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    binary = nginx_binary()
    with served_gateway(CountingGateway) as served:
        port = free_port()
        config = render(
            tmp_path, port, served.model.httpd.server_address[1], served.gateway_server.server_address[1]
        )
        error_log = tmp_path / "error.log"
        # -e: nginx opens its error log before it reads the configuration; the compiled-in one is in /var/log.
        command = [binary, "-p", str(tmp_path), "-c", str(config), "-e", str(error_log)]
        try:
            # Ready once it listens: a request would leave a kept-alive connection to the gateway behind.
            with running_server("nginx", command, f"http://127.0.0.1:{port}", tmp_path / "nginx.out", None):
                yield Stack(port, served.model, served.endpoint, served.gateway, served.gateway_server)
        finally:
            # Captured: pytest shows it with a failing test.
            print(error_log.read_text(errors="replace") if error_log.exists() else "no error log")


def infer(
    stack: Stack, client: str | None, path: str = f"/v2/models/{MODEL}/infer"
) -> tuple[int, http.client.HTTPResponse, Any]:
    """The status, response and decoded JSON body of an inference request through nginx from `client`
    (None: without the client header)."""
    connection = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    try:
        headers = {"Content-Type": "application/json"} | ({"X-Client-Id": client} if client else {})
        connection.request("POST", path, body=b'{"inputs": []}', headers=headers)
        response = connection.getresponse()
        return response.status, response, json.loads(response.read())
    finally:
        connection.close()


def test_a_client_without_a_decision_passes_untouched(stack: Stack) -> None:
    for client in ("anyone", None):
        status, _, answer = infer(stack, client)
        assert (status, answer) == (200, UNTOUCHED)
    status, _, answer = infer(stack, "anyone", f"/v1/models/{MODEL}:predict")
    assert (status, answer) == (200, {"predictions": PROBABILITIES})
    assert (stack.model.requests, stack.gateway.forwarded) == (3, 0)  # straight to the model server


def test_a_blocked_client_is_refused_and_the_model_server_never_sees_it(stack: Stack) -> None:
    status, response, answer = infer(stack, "blocked")
    assert (status, answer) == (403, {"error": "this client is blocked"})
    assert response.getheader("Retry-After") is None
    assert stack.model.requests == 0


def test_a_throttled_client_gets_429_with_retry_after_beyond_its_rate(stack: Stack) -> None:
    answers = [infer(stack, "prober") for _ in range(3)]
    assert [status for status, _, _ in answers] == [200, 200, 429]
    _, response, answer = answers[2]
    assert answer == {"error": "rate limited"}
    assert response.getheader("Retry-After") == "30"  # 2 a minute: the next token in 30 s
    assert (stack.model.requests, stack.gateway.forwarded) == (2, 0)


def test_a_coarsened_client_gets_labels_only(stack: Stack) -> None:
    status, _, answer = infer(stack, "harvester")
    assert status == 200
    assert answer["outputs"] == [LABELS, UNTOUCHED["outputs"][1]]  # the request id passes
    status, _, answer = infer(stack, "harvester", f"/v1/models/{MODEL}:predict")
    assert (status, answer) == (200, {"predictions": [1, 0]})
    assert stack.gateway.forwarded == 2


def test_without_the_detector_requests_pass_unless_the_gateway_fails_closed(stack: Stack) -> None:
    stack.endpoint.close()
    assert infer(stack, "blocked")[0] == 200
    assert stack.model.requests == 1
    stack.gateway.fail_closed = True  # as --fail-closed starts it
    status, _, answer = infer(stack, "blocked")
    assert (status, answer) == (503, {"error": "the risk decision is unavailable"})
    assert stack.model.requests == 1


def test_without_the_gateway_requests_pass(stack: Stack) -> None:
    # Before any request through nginx: a kept-alive connection would still reach the gateway's threads.
    stack.gateway_server.shutdown()
    stack.gateway_server.server_close()
    status, _, answer = infer(stack, "blocked")
    assert (status, answer) == (200, UNTOUCHED)
