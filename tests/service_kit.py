"""A RouterService on fakes behind the real ASGI front, for millisecond tests of the request
path: three regions (eu-north clean and cheap, eu-central dirty and dear, us-south dirty and
cheap), scripted replicas, a static carbon source and a real SQLite ledger."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.trace import TracerProvider

from forecasting.energy import EnergyPredictor
from router.http.app import make_api
from router.http.wire import OpenAIWire
from router.jobs import JobStore
from router.service.app import RouterService
from router.service.fakes import FakeReplicaClient, LedgerSink, StaticCarbonSource
from router.service.fleet import Targets
from router.service.ports import LoadSource
from router.service.proxied import ProxiedMetering

DEMO = {"Authorization": "Bearer sk-local-demo"}
ADMIN = {"Authorization": "Bearer sk-local-admin"}

TENANTS = """
tenants:
  - name: demo
    api_key_sha256: [4ff444b1a79536cc47732956cf5bc6256abf64bc1b8adff6843fac08bbb6be9f]
  - name: admin
    admin: true
    api_key_sha256: [dd64c8e8eaafa1abb74fd2a2ccad64f4dcb9f2bd6fae158f50e000958395a29e]
"""

CONFIG = (
    """
carbon_sources:
  grid: {kind: replay, dataset: electricitymaps_hourly}
regions:
  - name: eu-north
    zone: SE
    carbon_source: grid
    price: {flat_usd_per_kwh: 0.07}
    residency: [eu]
    replicas:
      - {name: eu-north-0, backend: {kind: llama_cpp, model: smollm2-135m}, meter: cpu}
  - name: eu-central
    zone: DE
    carbon_source: grid
    price: {flat_usd_per_kwh: 0.20}
    residency: [eu]
    replicas:
      - {name: eu-central-0, backend: {kind: llama_cpp, model: smollm2-135m}, meter: cpu}
  - name: us-south
    zone: US-TEX-ERCO
    carbon_source: grid
    price: {flat_usd_per_kwh: 0.06}
    residency: [us]
    replicas:
      - {name: us-south-0, backend: {kind: llama_cpp, model: smollm2-135m}, meter: cpu}
"""
    + TENANTS
    + """billing: {tariff: energy}
policy: {name: price_carbon, weight: 0.5}
ledger: ledger.sqlite
"""
)

_DEMO_KEY = "api_key_sha256: [4ff444b1a79536cc47732956cf5bc6256abf64bc1b8adff6843fac08bbb6be9f]"
# CONFIG with a budget for the demo tenant that it never reaches: its spend is counted per bill
BUDGETED = CONFIG.replace(_DEMO_KEY, _DEMO_KEY + "\n    budget: {period: day, kwh: 1000.0}", 1)

INTENSITY = {"SE": 30.0, "DE": 400.0, "US-TEX-ERCO": 450.0}


@dataclass
class Kit:
    service: RouterService
    client: httpx.AsyncClient
    replicas: dict[str, FakeReplicaClient]
    sink: LedgerSink

    def rows(self) -> list[Any]:
        return self.sink.ledger.tenant_rows(None)

    def assert_billed_once(self, rows: Sequence[Any]) -> None:
        """The ledger holds ``rows`` and nothing else, and the demo tenant's budget (with
        ``BUDGETED``) and the ``/metrics`` energy total counted each of them once: a second
        bill of a request id, which the ledger skips, shows there."""
        assert sorted(r.request_id for r in self.rows()) == sorted(r.request_id for r in rows)
        kwh = sum(r.kwh_billed for r in rows)
        spend = self.service.live.budgets.spend.get("demo")
        assert spend is not None, "the budget counted no bill"
        assert spend.kwh == pytest.approx(kwh, rel=1e-9), f"budget {spend.kwh} kWh, billed {kwh}"
        metered = sum(
            s.value
            for m in self.service.metrics.energy_total.collect()
            for s in m.samples
            if s.name == "router_energy_kwh_total"
        )
        assert metered == pytest.approx(kwh, rel=1e-9), f"/metrics {metered} kWh, billed {kwh}"


@asynccontextmanager
async def service_kit(
    tmp: Path,
    *,
    replicas: Sequence[FakeReplicaClient] | None = None,
    profile: Sequence[float] = (1.0,),
    config: str = CONFIG,
    source: StaticCarbonSource | None = None,
    clock: Callable[[], float] = time.monotonic,
    fleet_targets: Targets | None = None,
    predictor: EnergyPredictor | None = None,
    loads: Sequence[LoadSource | None] | None = None,
    more_sources: dict[str, StaticCarbonSource] | None = None,
    tracer_provider: TracerProvider | None = None,
    sink: LedgerSink | None = None,
    proxied: ProxiedMetering | None = None,
    jobs: JobStore | None = None,
) -> AsyncIterator[Kit]:
    """The service and an HTTP client on its ASGI app; ``profile`` shapes the forecast of the
    static carbon source (or ``source`` replaces it); ``clock`` is the fleet scaler's and
    ``fleet_targets`` where its counts go; ``loads``: the replicas' load sources (polled when a
    test calls ``service.loads``); ``more_sources``: carbon sources beside ``grid``, by name;
    ``tracer_provider``: where request spans go (default: the config's telemetry block, none:
    off); ``sink``: the ledger (made beside the config when not given); ``proxied``: the
    metering of proxied replicas, which hands them their bills; ``jobs``: the job store
    (``jobs.sqlite`` beside the config when not given). A second kit on the same folder is a
    fresh service on the same ledger and job store."""
    cfg = tmp / "router.yaml"
    cfg.write_text(config)
    fakes = list(replicas or [FakeReplicaClient(n) for n in
                              ("eu-north-0", "eu-central-0", "us-south-0")])  # fmt: skip
    predictor = predictor or EnergyPredictor()
    sink = sink or LedgerSink(tmp / "ledger.sqlite")
    source = source or StaticCarbonSource(INTENSITY, profile=profile)
    service = RouterService(
        cfg,
        replicas=fakes,
        sink=sink,
        ledger=sink,
        jobs=jobs or JobStore(tmp / "jobs.sqlite"),
        wire=OpenAIWire(),
        sources=lambda c, base: {"grid": source, **(more_sources or {})},
        clock=clock,
        fleet_targets=fleet_targets,
        predictor=predictor,
        loads=loads,
        tracer_provider=tracer_provider,
        proxied=proxied,
    )
    api = make_api()
    api.state.service = service
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
        yield Kit(service, client, {f.name: f for f in fakes}, sink)
    service.jobs.close()


def chat(**kw: Any) -> dict[str, Any]:
    return {
        "model": "smollm2-135m",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Name one fruit."}],
        **kw,
    }


async def upload(kit: Kit, content: bytes) -> Any:
    """Upload ``content`` as a batch input file, as the demo tenant."""
    return await kit.client.post(
        "/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"},
        headers=DEMO,
    )  # fmt: skip


async def create_batch(kit: Kit, file_id: str, **kw: Any) -> Any:
    """Create a chat-completions batch of ``file_id``, as the demo tenant."""
    body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", **kw}
    return await kit.client.post("/v1/batches", json=body, headers=DEMO)
