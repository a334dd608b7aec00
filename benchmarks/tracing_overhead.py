"""What request tracing and the new metrics cost the ingress per request, on one core.

    python benchmarks/tracing_overhead.py [--baseline REF ...] [--requests 3000] [--rounds 3]

Two measures, both in process, without Ray or sockets:

1. The pieces the change added to the request path, timed alone (timeit, best of 5): with
   tracing off, the per-request check (``Tracing.request``), the decision counter
   (``Metrics.decided``) and the bill's counters (``Metrics.billed``, against REF's). With
   tracing on (every request sampled, exported to nothing), the whole span: start, the
   attributes of a routed and billed request, end.
2. Whole requests: non-streamed chat completions through the ASGI front (``FastRoutes``) on a
   ``RouterService`` of fake replicas that answer at once and a bill sink that drops the rows,
   CPU seconds per request (``time.process_time``, so the export thread's work counts too):
   each REF's tree (checked out into a temporary worktree, run in a subprocess; differences are
   against the first), this tree with
   tracing off, on with every request sampled, and on with none sampled. Rounds alternate the
   variants so the host's drift hits each alike; the least and the median are printed.

The machine these figures were taken on had 2 shared cores: differences under ~5 % of a
request in part 2 are noise; part 1 is the figure for the added code itself.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """
carbon_sources:
  grid: {kind: replay, dataset: electricitymaps_hourly}
regions:
  - {name: eu-north, zone: SE, carbon_source: grid, price: {flat_usd_per_kwh: 0.07},
     replicas: [{name: eu-north-0, backend: {kind: llama_cpp, model: smollm2-135m}, meter: cpu}]}
  - {name: us-south, zone: US-TEX-ERCO, carbon_source: grid, price: {flat_usd_per_kwh: 0.06},
     replicas: [{name: us-south-0, backend: {kind: llama_cpp, model: smollm2-135m}, meter: cpu}]}
tenants:
  - name: demo
    api_key_sha256: [4ff444b1a79536cc47732956cf5bc6256abf64bc1b8adff6843fac08bbb6be9f]
"""
MESSAGES = [{"role": "user", "content": "Name one fruit."}]
BODY = json.dumps({"model": "smollm2-135m", "max_tokens": 16, "messages": MESSAGES}).encode()
HEADERS = [(b"authorization", b"Bearer sk-local-demo"), (b"content-type", b"application/json")]


# ---- part 2: whole requests (this function also runs in REF's tree, in a subprocess) ---------


def whole_requests(tree: str, requests: int, mode: str) -> float:
    """CPU seconds per request through ``tree``'s ASGI front; ``mode``: off, on, unsampled."""
    sys.path.insert(0, tree)
    from forecasting.energy import EnergyPredictor
    from router.http.app import make_api
    from router.http.wire import OpenAIWire
    from router.jobs import JobStore
    from router.service.app import RouterService
    from router.service.fakes import FakeReplicaClient, StaticCarbonSource

    class DropSink:  # the bill sink and ledger reader, keeping nothing: no SQLite in the figure
        def add(self, row: dict[str, Any]) -> None:
            pass

        async def flush(self, timeout_s: float = 30.0) -> None:
            return None

        def dead_letters(self) -> list[dict[str, Any]]:
            return []

    kwargs: dict[str, Any] = {}
    processor = None
    if mode != "off":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
        from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

        from router.service.telemetry import SheddingProcessor

        class Nowhere(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider = TracerProvider(
            sampler=ALWAYS_ON if mode == "on" else ALWAYS_OFF, shutdown_on_exit=False
        )
        processor = SheddingProcessor(Nowhere())
        provider.add_span_processor(processor)
        kwargs["tracer_provider"] = provider

    async def run() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = Path(tmp) / "router.yaml"
            cfg.write_text(CONFIG)
            source = StaticCarbonSource({"SE": 30.0, "US-TEX-ERCO": 450.0})
            sink = DropSink()
            params = inspect.signature(RouterService).parameters
            svc = RouterService(
                cfg,
                replicas=[FakeReplicaClient("eu-north-0"), FakeReplicaClient("us-south-0")],
                sink=sink,  # type: ignore[arg-type]
                ledger=sink,  # type: ignore[arg-type]
                jobs=JobStore(Path(tmp) / "jobs.sqlite"),
                wire=OpenAIWire(),
                sources=lambda c, base: {"grid": source},
                predictor=EnergyPredictor(),
                **{k: v for k, v in kwargs.items() if k in params},
            )
            api = make_api()
            api.state.service = svc
            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
                "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
                "headers": HEADERS, "client": ("127.0.0.1", 1), "server": ("r", 80), "app": api,
            }  # fmt: skip
            middleware = api.build_middleware_stack()

            async def receive() -> dict[str, Any]:
                return {"type": "http.request", "body": BODY, "more_body": False}

            statuses: list[int] = []

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            for _ in range(200):  # warm up: carbon fetched, caches filled
                await middleware(scope, receive, send)
            statuses.clear()
            t0 = time.process_time()
            for _ in range(requests):
                await middleware(scope, receive, send)
            spent = time.process_time() - t0
            assert statuses == [200] * requests, set(statuses)
            svc.jobs.close()
            return spent / requests

    per_request = asyncio.run(run())
    if processor is not None:
        processor.shutdown()
    return per_request


def in_subprocess(tree: Path, requests: int, mode: str) -> float:
    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1]);"
        "from benchmarks_tracing_overhead import whole_requests;"
        "print(json.dumps(whole_requests(sys.argv[1], int(sys.argv[2]), sys.argv[3])))"
    )
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}:{tree}"}
    out = subprocess.run(
        [sys.executable, "-c", code.replace("benchmarks_tracing_overhead", Path(__file__).stem),
         str(tree), str(requests), mode],
        env=env, capture_output=True, text=True, check=True, cwd=tree,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


# ---- part 1: the added pieces alone ----------------------------------------------------------


def best_us(stmt: Any, number: int = 20000) -> float:
    return min(timeit.repeat(stmt, number=number, repeat=5)) / number * 1e6


def pieces(baseline_metrics: Any) -> dict[str, float]:
    from datetime import UTC, datetime

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    from router.billing import bill_line, tariff_for
    from router.http.wire import parse_body
    from router.service.metrics import Metrics
    from router.service.telemetry import SheddingProcessor
    from router.service.tracing import Tracing

    now = datetime.now(UTC)
    from regions.config import Billing

    row = bill_line(
        request_id="chatcmpl-x", tenant="demo", region="eu-north", replica="eu-north-0",
        model="m", started_at=now, ended_at=now, prompt_tokens=12, completion_tokens=5,
        energy_j=40.0, energy_source="measured", pue=1.1, intensity_g_per_kwh=30.0,
        signal="average", carbon_stale=False, price_usd_per_kwh=0.07,
        tariff=tariff_for(Billing()),
    )  # fmt: skip
    headers = {"authorization": "Bearer sk", "content-type": "application/json"}
    off = Tracing(None)
    new, old = Metrics(), baseline_metrics.Metrics()
    figures = {
        "tracing off: Tracing.request (returns None)": best_us(
            lambda: off.request(headers, chat=True)
        ),
        "Metrics.decided (new, per decision)": best_us(
            lambda: new.decided("eu-north", "price_carbon", "score")
        ),
        "Metrics.billed, this tree": best_us(lambda: new.billed(row)),
        "Metrics.billed, baseline": best_us(lambda: old.billed(row)),
    }

    class Nowhere(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider(shutdown_on_exit=False)
    processor = SheddingProcessor(Nowhere())
    provider.add_span_processor(processor)
    on = Tracing(provider)
    usage = {"energy_source": "measured"}

    routed = {  # what RequestSpan.routed sets
        "gen_ai.response.id": "chatcmpl-x", "gen_ai.response.model": "m",
        "gen_ai.provider.name": "openai", "carbon_router.region": "eu-north",
        "carbon_router.replica": "eu-north-0", "carbon_router.policy": "price_carbon",
        "carbon_router.binding": "score", "carbon_router.intensity_g_per_kwh": 30.0,
        "carbon_router.price_usd_per_kwh": 0.07, "server.address": "10.0.0.1",
        "server.port": 8000,
    }  # fmt: skip
    client = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}

    def one_span() -> None:  # a request's whole span, as the request path makes it
        span = on.request(client, chat=True)
        assert span is not None
        span.parsed(parse_body(BODY, chat=True, trace=span.context()))
        span.span.set_attributes(routed)
        span.billed(row)
        span.answered(usage, "stop")
        span.end()

    unsampled_provider = TracerProvider(sampler=ALWAYS_OFF, shutdown_on_exit=False)
    unsampled = Tracing(unsampled_provider)

    def one_unsampled() -> None:
        span = unsampled.request(client, chat=True)
        assert span is not None
        span.parsed(parse_body(BODY, chat=True, trace=span.context()))
        span.request_id = "chatcmpl-x"
        unsampled._track("chatcmpl-x", span)
        unsampled.billed(row)
        span.end()

    figures["tracing on, unsampled: a request's span, context, parse_body"] = best_us(
        one_unsampled, number=5000
    )
    figures["parse_body alone (the request's own work, for scale)"] = best_us(
        lambda: parse_body(BODY, chat=True), number=5000
    )

    figures["tracing on, sampled: a request's span, context, parse_body"] = best_us(
        one_span, number=2000
    )
    processor.shutdown()
    return figures


def load_baseline_metrics(ref: str) -> Any:
    source = subprocess.run(
        ["git", "show", f"{ref}:router/service/metrics.py"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = Path(tempfile.mkdtemp()) / "baseline_metrics.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_metrics", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--baseline", nargs="+", default=["main"],
        help="one or more commits to compare with (part 1 uses the first)",
    )  # fmt: skip
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # this tree, not an installed copy (not in the subprocesses)
    os.environ.setdefault("CARBON_ROUTER_DATA", str(ROOT.parent / "shared" / "data"))

    print("Part 1: the added pieces alone (us per call, best of 5)")
    for name, us in pieces(load_baseline_metrics(args.baseline[0])).items():
        print(f"  {name:70s} {us:8.3f}")

    with tempfile.TemporaryDirectory() as tmp:
        bases = []
        for ref in args.baseline:
            base = Path(tmp) / ref.replace("/", "_")
            subprocess.run(["git", "worktree", "add", "--detach", str(base), ref],
                           cwd=ROOT, check=True, capture_output=True)  # fmt: skip
            bases.append((f"baseline {ref}", base, "off"))
        try:
            runs: dict[str, list[float]] = {}
            variants = [*bases, ("this tree, tracing off", ROOT, "off"),
                        ("this tree, tracing on (all sampled)", ROOT, "on"),
                        ("this tree, tracing on (none sampled)", ROOT, "unsampled")]  # fmt: skip
            for _ in range(args.rounds):
                for name, tree, mode in variants:
                    us = in_subprocess(tree, args.requests, mode) * 1e6
                    runs.setdefault(name, []).append(us)
        finally:
            for _, base, _ in bases:
                subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                               check=False, capture_output=True)  # fmt: skip
    print(f"\nPart 2: whole non-streamed requests, CPU us per request over {args.rounds} "
          f"rounds x {args.requests}: the least (what the code costs; a busy host only adds) "
          "and the median")  # fmt: skip
    first = runs[bases[0][0]]
    base_min, base_med = min(first), statistics.median(first)
    for name, values in runs.items():
        least, med = min(values), statistics.median(values)
        print(f"  {name:40s} least {least:6.1f} ({least - base_min:+6.1f})  "
              f"median {med:6.1f} ({med - base_med:+6.1f})")


if __name__ == "__main__":
    main()
