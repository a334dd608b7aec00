"""The Prometheus exposition: bounded labels only (no tenant, key, request or job id ever, after
requests from several tenants), the decisions by their binding constraint, the carbon avoided
and added as two counters, and each region's intensity and price as the router knows them."""

from __future__ import annotations

import asyncio
import hashlib
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from router.service.fakes import FakeReplicaClient
from router.service.metrics import Metrics, RegionFigures
from tests.service_kit import ADMIN, CONFIG, DEMO, Kit, chat, service_kit

ACME_KEY = "sk-acme-secret-key"
ACME = {"Authorization": f"Bearer {ACME_KEY}"}
THREE_TENANTS = CONFIG.replace(
    "tenants:\n",
    "tenants:\n  - name: acme-corp\n"
    f"    api_key_sha256: [{hashlib.sha256(ACME_KEY.encode()).hexdigest()}]\n",
)
REGIONS = {"eu-north", "eu-central", "us-south", "none"}
LABELS = {"region", "policy", "binding", "status", "le"}


def samples(exposition: str) -> list[Any]:
    return [s for f in text_string_to_metric_families(exposition) for s in f.samples]


def value(exposition: str, name: str, **labels: str) -> float | None:
    for s in samples(exposition):
        if s.name == name and s.labels == labels:
            return float(s.value)
    return None


async def test_no_tenant_key_request_or_job_id_ever_reaches_the_exposition(tmp_path: Path) -> None:
    ids: list[str] = []
    async with service_kit(tmp_path, config=THREE_TENANTS, profile=(1.0, 0.2)) as kit:
        for headers in (DEMO, ADMIN, ACME):
            for stream in (False, True):
                r = await kit.client.post(
                    "/v1/chat/completions", json=chat(stream=stream), headers=headers
                )
                assert r.status_code == 200, r.text
            ids.append(r.text.split('"id":"')[1].split('"')[0])
        deferred = {**ACME, "X-Carbon-Preference": "defer=7200"}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=deferred)
        assert r.status_code == 202
        ids.append(r.json()["id"])
        refused = await kit.client.post("/v1/chat/completions", json=chat(),
                                        headers={"Authorization": "Bearer sk-wrong"})  # fmt: skip
        assert refused.status_code == 401
        ids += [row.request_id for row in kit.rows()]
        exposition = (await kit.client.get("/metrics")).text
    for secret in ("demo", "admin", "acme", ACME_KEY, "sk-local", "sk-wrong", *ids):
        assert secret not in exposition
    for s in samples(exposition):
        assert set(s.labels) <= LABELS, s
        assert s.labels.get("region", "none") in REGIONS, s
        assert s.labels.get("status", "ok") in {"ok", "401"}, s
        assert s.labels.get("binding", "score") in {"score", "batch", "latency", "tpot"}, s
    assert value(exposition, "router_requests_total", region="none", status="401") == 1.0
    assert value(exposition, "router_requests_total", region="eu-north", status="ok") == 6.0


async def test_each_decision_is_counted_by_its_region_policy_and_binding(tmp_path: Path) -> None:
    # eu-north is down: each request is decided there first, then on the next replica
    fakes = [FakeReplicaClient("eu-north-0", fail="down"), FakeReplicaClient("eu-central-0"),
             FakeReplicaClient("us-south-0")]  # fmt: skip
    async with service_kit(tmp_path, replicas=fakes) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200
        exposition = (await kit.client.get("/metrics")).text
    decided = {
        (s.labels["region"], s.labels["policy"], s.labels["binding"]): s.value
        for s in samples(exposition)
        if s.name == "router_decisions_total"
    }
    region = r.headers["x-carbon-region"]
    assert decided == {
        ("eu-north", "price_carbon", "score"): 1.0,  # failed before the first byte
        (region, "price_carbon", r.headers["x-carbon-binding"]): 1.0,
    }


async def test_a_deferred_jobs_run_is_a_planned_decision(tmp_path: Path) -> None:
    async with service_kit(tmp_path, profile=(1.0, 0.2)) as kit:
        deferred = {**DEMO, "X-Carbon-Preference": "defer=7200"}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=deferred)
        job = r.json()
        await kit.client.post(f"/v1/jobs/{job['id']}/run", headers=ADMIN)
        kit.service.deferral.run_due()
        await asyncio.gather(*kit.service.deferral._running)
        exposition = (await kit.client.get("/metrics")).text
    planned = value(exposition, "router_decisions_total", region=job["region"],
                    policy="price_carbon", binding="planned")  # fmt: skip
    assert planned == 1.0


def billed(kit: Kit, **extra: Any) -> Any:
    """The kit's one ledger row with ``extra`` figures, without an ``avoided_g`` but theirs (a
    row from before the receipts has none)."""
    (row,) = kit.rows()
    figures = {k: v for k, v in vars(row).items() if k != "avoided_g"}
    return SimpleNamespace(**{**figures, **extra})


async def test_carbon_avoided_and_added_are_two_counters_that_only_go_up(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200
        metrics = Metrics()
        for avoided in (3.0, -1.25, 0.5, None, math.nan, math.inf):
            metrics.billed(billed(kit, avoided_g=avoided))
        metrics.billed(billed(kit))  # a row from before the receipts: nothing avoided
    exposition = metrics.exposition().decode()
    assert value(exposition, "router_carbon_avoided_g_total", region="eu-north") == 3.5
    assert value(exposition, "router_carbon_added_g_total", region="eu-north") == 1.25
    assert value(exposition, "router_requests_total", region="eu-north", status="ok") == 7.0
    cost = value(exposition, "router_cost_usd_total", region="eu-north")
    assert cost == pytest.approx(7 * kit.rows()[0].cost_usd)


async def test_each_regions_intensity_and_price_are_read_when_scraped(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        before = (await kit.client.get("/metrics")).text
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200
        after = (await kit.client.get("/metrics")).text
    # none fetched yet: no sample (never a 0); every region's once a request was routed
    assert "router_carbon_intensity_g_per_kwh{" not in before
    intensity = {"eu-north": 30.0, "eu-central": 400.0, "us-south": 450.0}  # service_kit's
    price = {"eu-north": 0.07, "eu-central": 0.20, "us-south": 0.06}
    for region in intensity:
        assert value(after, "router_carbon_intensity_g_per_kwh", region=region) == intensity[region]
        assert value(after, "router_price_usd_per_kwh", region=region) == price[region]
        assert value(before, "router_price_usd_per_kwh", region=region) == price[region]


def test_a_region_without_figures_has_no_sample() -> None:
    metrics = Metrics(lambda: [RegionFigures("eu-north", None, 0.07)])
    exposition = metrics.exposition().decode()
    assert "router_carbon_intensity_g_per_kwh{" not in exposition
    assert value(exposition, "router_price_usd_per_kwh", region="eu-north") == 0.07
    assert value(exposition, "router_trace_spans_dropped_total") == 0.0
