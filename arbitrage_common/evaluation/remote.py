"""`arbitrage bench --endpoint`: the same sweep against a running service over gRPC.

No memoization here: every point is real requests, so latency is end-to-end wall time
as clients see it. Keep ``n`` small; the matched rule is the in-process bench's.
"""
from __future__ import annotations

from ..client import Client, ServiceError
from .runners import EndpointRunner
from .stack import run_sweep
from .tasks import SyntheticTask


def endpoint_runner(client: Client, tag: str) -> EndpointRunner:
    def call(request):
        try:
            return client.generate(request)
        except ServiceError as exc:  # name the request: one bad request stops the sweep
            raise RuntimeError(f"request {request.request_id}: {exc}") from exc

    return EndpointRunner(call, tag)


def run_remote_bench(endpoint: str, n: int, seed: int, app: str | None = None, grid: dict | None = None,
                     show_progress: bool = True, mix: str = "math") -> dict:
    with Client(endpoint, app) as client:
        result, _, _ = run_sweep(SyntheticTask(n, seed, mix), endpoint_runner(client, "bench"), grid,
                                 show_progress=show_progress)
    return {**result, "endpoint": endpoint}
