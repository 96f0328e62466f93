"""Latency of the risk endpoint under load, beside a baseline measured in the same run.

The endpoint (`GET /v1/risk/{model}/{client}`, answered from memory) runs in a process of its own, as in the
daemon, holding decisions on `--clients` clients; `--threads` keep-alive connections ask it for random
clients (a tenth of them with a decision, the rest `allow`) as fast as it answers, for `--seconds`. The
baseline is the same HTTP server answering a fixed body without a lookup: what the HTTP stack alone costs.

Run: `python benchmarks/risk_endpoint.py [--clients N] [--threads N] [--seconds S] [--json]`. With `--json`
the last line is one JSON object: `risk_p50_ms`, `risk_p99_ms`, `risk_requests_per_s`, and the baseline's
`baseline_p50_ms`, `baseline_p99_ms`; the aim is p99 < 5 ms.
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import random
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson

from detector.alerts.risk_endpoint import RiskEndpoint
from detector.alerts.risk_feed import RiskView
from detector.domain import Coarsening, RiskAction, RiskDecision, RiskParameters

MODEL = "credit-risk"


def decisions(clients: int) -> list[RiskDecision]:
    """A decision on every tenth of `clients` clients, from the policy."""
    now = datetime.now(UTC)
    return [
        RiskDecision(
            model=MODEL,
            client_id=f"client-{index}",
            action=RiskAction.COARSEN,
            parameters=RiskParameters(coarsening=Coarsening.LABELS),
            source="policy",
            alert_id=index,
            actor="policy",
            reason="alert: confidence_harvesting (high)",
            decided_at=now,
            expires_at=now + timedelta(days=1),
        )
        for index in range(0, clients, 10)
    ]


def serve(clients: int, baseline: bool, ready: Any, stop: Any) -> None:
    """The endpoint (or, as the baseline, a view answering one fixed document) until `stop` is set."""
    held = decisions(clients)
    view = RiskView(lambda: held)
    view.refresh()
    if baseline:
        fixed = {"model": MODEL, "client_id": "x", "action": "allow", "alert_ids": []}
        view.document = lambda model, client_id: fixed  # type: ignore[method-assign]
    endpoint = RiskEndpoint(view, "127.0.0.1", 0).start()
    ready.send(endpoint.port)
    stop.wait()
    endpoint.close()


def load(port: int, clients: int, threads: int, seconds: float) -> tuple[list[float], float]:
    """Latencies (ms) of every request `threads` keep-alive connections made in `seconds`, and the time."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    deadline = time.perf_counter() + seconds

    def ask(mine: list[float]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        pick = random.Random(id(mine)).randrange  # noqa: S311 (which client to ask for, not a secret)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            connection.request("GET", f"/v1/risk/{MODEL}/client-{pick(clients)}")
            response = connection.getresponse()
            orjson.loads(response.read())
            mine.append((time.perf_counter() - started) * 1000)
        connection.close()

    started = time.perf_counter()
    workers = [threading.Thread(target=ask, args=(mine,)) for mine in latencies]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [latency for mine in latencies for latency in mine], time.perf_counter() - started


def measure(clients: int, threads: int, seconds: float, baseline: bool) -> dict[str, float]:
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    stop = context.Event()
    server = context.Process(target=serve, args=(clients, baseline, send, stop))
    server.start()
    try:
        port = receive.recv()
        load(port, clients, threads, 0.5)  # warm up: connections, caches
        latencies, elapsed = load(port, clients, threads, seconds)
    finally:
        stop.set()
        server.join(10)
    p50, p99 = np.percentile(latencies, [50, 99])
    return {"p50_ms": float(p50), "p99_ms": float(p99), "requests_per_s": len(latencies) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=100_000, help="clients asked for (default 100k)")
    parser.add_argument("--threads", type=int, default=8, help="concurrent connections (default 8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long each run lasts (default 5)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    args = parser.parse_args()
    print(f"load: {args.threads} keep-alive connections for {args.seconds:.0f} s, {args.clients} clients")
    figures = {}
    for name, baseline in (("baseline", True), ("risk", False)):
        result = measure(args.clients, args.threads, args.seconds, baseline)
        label = "baseline: the HTTP server, fixed answer" if baseline else "risk endpoint: lookup + in force"
        print(
            f"  {label:<42} p50 {result['p50_ms']:6.2f} ms  p99 {result['p99_ms']:6.2f} ms  "
            f"{result['requests_per_s']:>8,.0f} requests/s"
        )
        figures |= {f"{name}_{key}": value for key, value in result.items()}
    ratio = figures["risk_p99_ms"] / figures["baseline_p99_ms"]
    print(f"  p99 risk / baseline: {ratio:.2f}   (aim: p99 < 5 ms)")
    if args.json:
        rounded = {key: round(value, 3) for key, value in figures.items()}
        sys.stdout.write(orjson.dumps(rounded).decode() + "\n")


if __name__ == "__main__":
    main()
