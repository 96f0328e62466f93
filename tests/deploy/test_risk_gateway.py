"""The reference gateway (`deploy/gateway/risk_gateway.py`) between clients, a model server and the
detector's risk endpoint, all real HTTP servers: it coarsens, throttles and blocks as the decisions say."""

from __future__ import annotations

import http.client
import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from detector.alerts.risk_endpoint import RiskEndpoint
from detector.alerts.risk_feed import RiskView
from detector.domain import Coarsening, RiskAction, RiskDecision, RiskParameters, utc

GATEWAY_FILE = Path(__file__).parents[2] / "deploy" / "gateway" / "risk_gateway.py"
MODEL = "credit-risk"
PROBABILITIES = [[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]]
ROUNDED = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
LABELS = {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 0]}


def load_gateway() -> ModuleType:
    spec = importlib.util.spec_from_file_location("risk_gateway", GATEWAY_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["risk_gateway"] = module
    spec.loader.exec_module(module)
    return module


gateway_module = load_gateway()


def oip(data: list[Any]) -> dict[str, Any]:
    return {
        "model_name": MODEL,
        "outputs": [
            {"name": "predict_proba", "shape": [2, 3], "datatype": "FP32", "data": data},
            {"name": "request_id", "shape": [1], "datatype": "BYTES", "data": ["r-1"]},
        ],
    }


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (
            {"coarsening": "labels"},
            [{"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 0]}],
        ),
        (
            {"coarsening": "top1"},
            [
                {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 0]},
                {"name": "probability", "shape": [2], "datatype": "FP32", "data": [0.7, 0.6]},
            ],
        ),
        (
            {"coarsening": "round", "decimals": 0},
            [
                {
                    "name": "predict_proba",
                    "shape": [2, 3],
                    "datatype": "FP32",
                    "data": [0.0, 1.0, 0.0, 1.0, 0.0, 0.0],
                }
            ],
        ),
    ],
)
def test_an_oip_v2_response_is_coarsened_and_other_outputs_pass(
    parameters: dict[str, Any], expected: list[dict[str, Any]]
) -> None:
    flat = [value for row in PROBABILITIES for value in row]
    coarsened = gateway_module.coarsen(oip(flat), parameters)
    assert coarsened["outputs"] == [*expected, oip(flat)["outputs"][1]]
    nested = gateway_module.coarsen(oip(PROBABILITIES), parameters)["outputs"][0]  # rows as lists
    assert (
        nested == expected[0] if parameters["coarsening"] != "round" else nested["data"][0] == [0.0, 1.0, 0.0]
    )


def test_a_kserve_v1_response_is_coarsened_and_labels_pass() -> None:
    body = {"predictions": PROBABILITIES}
    assert gateway_module.coarsen(body, {"coarsening": "labels"}) == {"predictions": [1, 0]}
    assert gateway_module.coarsen(body, {"coarsening": "top1"}) == {
        "predictions": [{"label": 1, "probability": 0.7}, {"label": 0, "probability": 0.6}]
    }
    assert gateway_module.coarsen(body, {"coarsening": "round", "decimals": 0}) == {
        "predictions": [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    }
    assert gateway_module.coarsen({"predictions": [3, 1]}, {"coarsening": "labels"}) == {
        "predictions": [3, 1]
    }
    assert gateway_module.coarsen({"other": 1}, {"coarsening": "labels"}) == {"other": 1}


def test_a_token_bucket_lets_the_rate_through_and_says_how_long_to_wait() -> None:
    now = [0.0]
    buckets = gateway_module.TokenBuckets(clock=lambda: now[0])
    assert [buckets.take(("m", "c"), 2) for _ in range(2)] == [0.0, 0.0]
    assert buckets.take(("m", "c"), 2) == pytest.approx(30.0)
    assert buckets.take(("m", "other"), 2) == 0.0
    now[0] = 30.0
    assert buckets.take(("m", "c"), 2) == 0.0


# -- end to end ----------------------------------------------------------------------------------------------


class ModelServer:
    """A model server answering every OIP v2 inference and KServe v1 prediction with `PROBABILITIES`,
    counting the requests it saw."""

    def __init__(self) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.requests += 1
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                flat = [value for row in PROBABILITIES for value in row]
                v1 = self.path.startswith("/v1/")
                body = json.dumps({"predictions": PROBABILITIES} if v1 else oip(flat)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def operator(client_id: str, action: RiskAction, **parameters: Any) -> RiskDecision:
    return RiskDecision(
        model=MODEL,
        client_id=client_id,
        action=action,
        parameters=RiskParameters(**parameters),
        source="operator",
        actor="alice",
        reason="test",
        decided_at=utc(1_700_000_000),
    )


def deciding_endpoint() -> tuple[RiskEndpoint, Any]:
    """The real risk endpoint, serving the operators' decisions on a harvester (coarsen to labels), a
    blocked client and a prober (throttled to 2 requests a minute), with a gateway's client of it."""
    decisions = [
        operator("harvester", RiskAction.COARSEN, coarsening=Coarsening.LABELS),
        operator("blocked", RiskAction.BLOCK),
        operator("prober", RiskAction.THROTTLE, requests_per_minute=2),
    ]
    view = RiskView(lambda: decisions)
    view.refresh()
    endpoint = RiskEndpoint(view, "127.0.0.1", 0, token="t0ken").start()
    return endpoint, gateway_module.RiskClient(
        f"http://127.0.0.1:{endpoint.port}", "t0ken", cache_seconds=0.0
    )


@dataclass
class ServedGateway:
    """A gateway (`gateway` deciding, `gateway_server` serving it) between `model` and the risk `endpoint`."""

    gateway: Any
    gateway_server: Any
    model: ModelServer
    endpoint: RiskEndpoint


@contextmanager
def served_gateway(gateway_class: type = gateway_module.Gateway) -> Iterator[ServedGateway]:
    """A gateway of `gateway_class` (failing open) served on 127.0.0.1, in front of a `ModelServer` and the
    `deciding_endpoint`; all three stopped on the way out."""
    endpoint, risk = deciding_endpoint()
    model = ModelServer()
    gateway = gateway_class(model.url, risk, "X-Client-Id", False, gateway_module.TokenBuckets())
    gateway_server = gateway_module.server(gateway, "127.0.0.1", 0)
    threading.Thread(target=gateway_server.serve_forever, daemon=True).start()
    try:
        yield ServedGateway(gateway, gateway_server, model, endpoint)
    finally:
        gateway_server.shutdown()
        gateway_server.server_close()
        model.close()
        endpoint.close()


@pytest.fixture
def stack() -> Iterator[tuple[Any, ModelServer, RiskEndpoint]]:
    with served_gateway() as served:
        yield served.gateway_server, served.model, served.endpoint


def infer(httpd: Any, client: str, path: str = f"/v2/models/{MODEL}/infer") -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection("127.0.0.1", httpd.server_address[1], timeout=10)
    try:
        connection.request("POST", path, body=b'{"inputs": []}', headers={"X-Client-Id": client})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_the_gateway_coarsens_blocks_and_throttles_as_the_detector_decided(
    stack: tuple[Any, ModelServer, RiskEndpoint],
) -> None:
    httpd, model, _ = stack
    status, answer = infer(httpd, "harvester")
    assert status == 200 and answer["outputs"][0] == {
        "name": "label",
        "shape": [2],
        "datatype": "INT64",
        "data": [1, 0],
    }
    status, answer = infer(httpd, "harvester", f"/v1/models/{MODEL}:predict")
    assert (status, answer) == (200, {"predictions": [1, 0]})
    status, answer = infer(httpd, "anyone")
    assert status == 200 and answer["outputs"][0]["name"] == "predict_proba"  # allow: untouched

    seen = model.requests
    assert infer(httpd, "blocked")[0] == 403 and model.requests == seen  # never reached the model

    assert [infer(httpd, "prober")[0] for _ in range(3)] == [200, 200, 429]


def authz(httpd: Any, client: str, original: str = f"/v2/models/{MODEL}/infer") -> tuple[Any, ...]:
    """The status, `X-Risk-Action` and `Retry-After` of the gateway's answer to nginx's subrequest on a
    request of `client` for `original`."""
    connection = http.client.HTTPConnection("127.0.0.1", httpd.server_address[1], timeout=10)
    try:
        connection.request("GET", "/authz", headers={"X-Client-Id": client, "X-Original-URI": original})
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("X-Risk-Action"), response.getheader("Retry-After")
    finally:
        connection.close()


def test_the_authz_answer_tells_nginx_to_pass_or_refuse_and_why(
    stack: tuple[Any, ModelServer, RiskEndpoint],
) -> None:
    httpd, model, _ = stack
    assert authz(httpd, "anyone") == (204, "allow", None)
    assert authz(httpd, "harvester", f"/v1/models/{MODEL}:predict") == (204, "coarsen", None)
    assert authz(httpd, "blocked") == (403, "block", None)
    assert authz(httpd, "blocked", f"/v2/models/{MODEL}") == (204, "allow", None)  # not an inference
    assert [authz(httpd, "prober") for _ in range(3)] == [
        (204, "throttle", None),
        (204, "throttle", None),
        (403, "throttle", "30"),
    ]
    assert model.requests == 0  # judged only


def test_without_the_detector_requests_pass_unless_the_gateway_fails_closed(
    stack: tuple[Any, ModelServer, RiskEndpoint],
) -> None:
    httpd, model, endpoint = stack
    endpoint.close()  # the detector is down
    assert infer(httpd, "blocked")[0] == 200  # fails open by default
    closed = gateway_module.Gateway(
        model.url,
        gateway_module.RiskClient(f"http://127.0.0.1:{endpoint.port}", None, 0.0),
        "X-Client-Id",
        True,
        gateway_module.TokenBuckets(),
    )
    status, _, _ = closed.handle("POST", f"/v2/models/{MODEL}/infer", {"x-client-id": "blocked"}, b"{}")
    assert status == 503
    subrequest = {"x-client-id": "blocked", "x-original-uri": f"/v2/models/{MODEL}/infer"}
    assert closed.handle("GET", "/authz", subrequest, b"") == (403, {"X-Risk-Action": "unavailable"}, b"")
    assert closed.handle("GET", "/authz", {"x-client-id": "blocked"}, b"")[0] == 400  # nginx misconfigured
