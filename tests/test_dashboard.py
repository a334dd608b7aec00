"""The operator's view's JSON (``/v1/dashboard/*``) and its page, without a browser: the figures
against sums of the seeded rows, who sees what, bounded parameters, the live region state, a
slow or failing carbon source, the job queue, and a page that never writes markup."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from forecasting.errors import CarbonSourceError
from forecasting.sources.base import Forecast, Intensity
from router.http.dashboard import PAGE
from router.service.dashboard import FORECAST_RETRY_S, MAX_HOURS, MAX_LIMIT
from router.service.fakes import FakeReplicaClient, StaticCarbonSource
from tests.dashboard_kit import (
    HOSTILE_TENANT,
    SECRET,
    TENANTS,
    hour_of,
    on_clock,
    seed,
    sums,
)
from tests.service_kit import ADMIN, DEMO, INTENSITY, chat, service_kit

NOW = datetime.now(UTC).replace(minute=17, second=5, microsecond=0)
FIGURES = ("requests", "kwh", "carbon_g", "avoided_g", "embodied_g", "cost_usd")


def same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert {"requests", "kwh", "carbon_g", "avoided_g", "cost_usd"} <= set(got)
    for k in FIGURES:
        if k in got:
            assert math.isclose(got[k], want[k], rel_tol=1e-9, abs_tol=1e-12), (k, got, want)


async def test_hourly_figures_are_the_sums_of_the_rows(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        seeded = seed(kit.sink.ledger, kit.service.jobs, NOW)
        on_clock(kit.service, NOW)
        for hours in (24, 6, 48):
            r = await kit.client.get(f"/v1/dashboard/hourly?hours={hours}", headers=ADMIN)
            assert r.status_code == 200, r.text
            assert r.headers["cache-control"] == "no-store"
            body = r.json()
            rows = seeded.window_rows(hours)
            assert body["tenant"] is None and body["hours"] == hours
            same(body["totals"], sums(rows))
            assert [b["hour"] for b in body["by_hour"]] == [
                (NOW - timedelta(hours=hours - 1 - k)).strftime("%Y-%m-%dT%H") for k in range(hours)
            ]
            for b in body["by_hour"]:
                same(b, sums([x for x in rows if hour_of(x) == b["hour"]]))
            assert {g["region"] for g in body["by_region"]} == {x.region for x in rows}
            for g in body["by_region"]:
                same(g, sums([x for x in rows if x.region == g["region"]]))
            for g in body["by_binding"]:
                same(g, sums([x for x in rows if x.binding == g["binding"]]))
            counts = [g["requests"] for g in body["by_region"]]
            assert counts == sorted(counts, reverse=True)
        # the 30-hour-old rows are in the 48-hour view only
        assert body["totals"]["requests"] == len(seeded.window_rows(24)) + 5


async def test_a_tenant_key_sees_only_its_own_figures(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        seeded = seed(kit.sink.ledger, kit.service.jobs, NOW)
        on_clock(kit.service, NOW)
        get = kit.client.get
        hourly = (await get("/v1/dashboard/hourly", headers=DEMO)).json()
        assert hourly["tenant"] == "demo" and hourly["viewer"] == {"tenant": "demo", "admin": False}
        same(hourly["totals"], sums(seeded.window_rows(24, "demo")))
        tenants = (await get("/v1/dashboard/tenants", headers=DEMO)).json()
        assert tenants["scope"] == "own"
        assert [t["tenant"] for t in tenants["data"]] == ["demo"]
        same(tenants["data"][0], sums(seeded.window_rows(24, "demo")))
        jobs = (await get("/v1/dashboard/jobs", headers=DEMO)).json()
        assert {j["tenant"] for j in jobs["next"]} == {"demo"}
        assert jobs["totals"] == {"scheduled": 1, "running": 1, "overdue": 0}
        answers = [
            await get(p, headers=DEMO)
            for p in ("/v1/dashboard/regions", "/v1/dashboard/hourly?hours=168",
                      "/v1/dashboard/tenants?limit=100", "/v1/dashboard/jobs?limit=100",
                      "/v1/dashboard/hourly?tenant=demo")
        ]  # fmt: skip
        for r in answers:
            assert r.status_code == 200, r.text
            for other in [t for t in TENANTS if t != "demo"]:
                assert other not in r.text and other.encode() not in r.content
        # naming another tenant is refused, not answered with one's own figures
        for other in ("acme", HOSTILE_TENANT):
            r = await get("/v1/dashboard/hourly", params={"tenant": other}, headers=DEMO)
            assert r.status_code == 403 and "acme" not in r.text
        # the admin may narrow to any one tenant
        acme = (await get("/v1/dashboard/hourly?tenant=acme", headers=ADMIN)).json()
        assert acme["tenant"] == "acme"
        same(acme["totals"], sums(seeded.window_rows(24, "acme")))


async def test_top_tenants_rank_by_energy_and_list_at_most_limit(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        seeded = seed(kit.sink.ledger, kit.service.jobs, NOW)
        on_clock(kit.service, NOW)
        body = (await kit.client.get("/v1/dashboard/tenants?limit=3", headers=ADMIN)).json()
        rows = seeded.window_rows(24)
        want = sorted({r.tenant for r in rows}, key=lambda t: -sums(
            [r for r in rows if r.tenant == t])["kwh"])[:3]  # fmt: skip
        assert body["scope"] == "all"
        assert [t["tenant"] for t in body["data"]] == want
        for t in body["data"]:
            same(t, sums([r for r in rows if r.tenant == t["tenant"]]))


@pytest.mark.parametrize(
    ("path", "param", "value", "allowed"),
    [
        ("hourly", "hours", "0", f"1..{MAX_HOURS}"),
        ("hourly", "hours", str(MAX_HOURS + 1), f"1..{MAX_HOURS}"),
        ("hourly", "hours", "-1", f"1..{MAX_HOURS}"),
        ("hourly", "hours", "abc", f"1..{MAX_HOURS}"),
        ("hourly", "hours", "1e3", f"1..{MAX_HOURS}"),
        ("hourly", "hours", "", f"1..{MAX_HOURS}"),
        ("hourly", "hours", "99999999999999999999999", f"1..{MAX_HOURS}"),
        ("tenants", "hours", "1000000", f"1..{MAX_HOURS}"),
        ("tenants", "limit", "0", f"1..{MAX_LIMIT}"),
        ("tenants", "limit", str(MAX_LIMIT + 1), f"1..{MAX_LIMIT}"),
        ("jobs", "limit", "x", f"1..{MAX_LIMIT}"),
        ("jobs", "limit", "100000", f"1..{MAX_LIMIT}"),
    ],
)
async def test_a_bad_parameter_is_a_400_naming_what_is_allowed(
    tmp_path: Path, path: str, param: str, value: str, allowed: str
) -> None:
    async with service_kit(tmp_path) as kit:
        r = await kit.client.get(f"/v1/dashboard/{path}", params={param: value}, headers=ADMIN)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param and allowed in err["message"]


async def test_every_answer_needs_a_key(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        for p in ("regions", "hourly", "tenants", "jobs"):
            for headers in ({}, {"Authorization": "Bearer sk-nobody"}):
                r = await kit.client.get(f"/v1/dashboard/{p}", headers=headers)
                assert r.status_code == 401, (p, r.text)


async def test_regions_show_the_routers_live_state(tmp_path: Path) -> None:
    gate = asyncio.Event()
    fakes = [FakeReplicaClient(n, gate=gate) for n in ("eu-north-0", "eu-central-0", "us-south-0")]
    async with service_kit(tmp_path, replicas=fakes, profile=(1.0, 0.5)) as kit:
        running = asyncio.ensure_future(kit.client.post(
            "/v1/chat/completions", json=chat(), headers=DEMO))  # fmt: skip

        async def started() -> None:
            while not any(s.active for s in kit.service.live.router.states):
                await asyncio.sleep(0.01)

        await asyncio.wait_for(started(), 10)
        kit.service.live.router.failed(1)  # eu-central-0 cools down
        body = (await kit.client.get("/v1/dashboard/regions", headers=DEMO)).json()
        gate.set()
        assert (await running).status_code == 200
    regions = {r["region"]: r for r in body["data"]}
    assert list(regions) == ["eu-north", "eu-central", "us-south"]
    prices = {"eu-north": 0.07, "eu-central": 0.20, "us-south": 0.06}
    for name, r in regions.items():
        g = INTENSITY[r["zone"]]
        assert r["carbon"]["status"] == "ok" and r["carbon"]["g_per_kwh"] == g
        fc = r["forecast"]
        assert fc["status"] == "ok" and len(fc["hours"]) == 24
        assert fc["g_per_kwh"] == [g] + [g * 0.5] * 23  # the source's profile, hour by hour
        assert fc["hours"][0] == datetime.now(UTC).replace(minute=0, second=0, microsecond=0
                                                           ).isoformat()  # fmt: skip
        assert r["price_usd_per_kwh"] == prices[name]
        assert r["fleet"]["owned"] == 1 and r["fleet"]["on"] == 1
        assert r["load"]["capacity"] == r["replicas"][0]["max_concurrency"]
    assert sum(r["load"]["in_flight"] for r in regions.values()) == 1
    central = regions["eu-central"]["replicas"][0]
    assert central["cooling_down"] and not central["serving"] and central["on"]
    assert regions["eu-north"]["replicas"][0]["serving"]


class SlowAndBrokenSource(StaticCarbonSource):
    """DE's forecast never answers until ``release`` is set; US's source fails with an error
    that names a URL with a password, as a real one could."""

    def __init__(self) -> None:
        super().__init__(INTENSITY)
        self.release = asyncio.Event()
        self.forecasts: dict[tuple[str, int], int] = {}  # (zone, hours) -> calls

    async def latest(self, zone: str) -> Intensity:
        if zone == "US-TEX-ERCO":
            raise CarbonSourceError("https://user:hunter2@internal:8443 said 500", source="em",
                                    zone=zone)  # fmt: skip
        return await super().latest(zone)

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        self.forecasts[zone, horizon_h] = self.forecasts.get((zone, horizon_h), 0) + 1
        if zone == "DE":
            await self.release.wait()
        if zone == "US-TEX-ERCO":
            raise CarbonSourceError("https://user:hunter2@internal:8443 said 500", source="em",
                                    zone=zone)  # fmt: skip
        return await super().forecast(zone, horizon_h)


async def test_a_slow_or_failing_source_does_not_hold_the_view_or_leak(tmp_path: Path) -> None:
    source = SlowAndBrokenSource()
    clock = [0.0]
    async with service_kit(tmp_path, source=source) as kit:
        on_clock(kit.service, datetime.now(UTC), wait_s=0.2, clock=lambda: clock[0])
        for _ in range(3):
            t0 = time.monotonic()
            r = await kit.client.get("/v1/dashboard/regions", headers=ADMIN)
            assert r.status_code == 200 and time.monotonic() - t0 < 1.0
            assert "hunter2" not in r.text and "internal" not in r.text
        regions = {x["region"]: x for x in r.json()["data"]}
        assert regions["eu-central"]["forecast"] == {"status": "pending"}
        assert regions["eu-central"]["carbon"]["status"] == "ok"
        assert regions["us-south"]["carbon"] == {
            "status": "unavailable", "reason": "carbon intensity unavailable"}  # fmt: skip
        assert regions["us-south"]["forecast"]["status"] == "unavailable"
        assert regions["eu-north"]["forecast"]["status"] == "ok"
        # the router's forecasts are 48 h (the longest deferral), whatever the view shows
        assert source.forecasts["DE", 48] == 1  # one fetch, however many views waited for it
        assert source.forecasts["US-TEX-ERCO", 48] == 1  # a failure is not asked again at once
        source.release.set()
        await asyncio.sleep(0.05)
        r = await kit.client.get("/v1/dashboard/regions", headers=ADMIN)
        assert r.json()["data"][1]["forecast"]["status"] == "ok"
        clock[0] += FORECAST_RETRY_S  # a minute on: the failed one is asked again
        await kit.client.get("/v1/dashboard/regions", headers=ADMIN)
        assert source.forecasts["US-TEX-ERCO", 48] == 2


async def test_the_job_queue_counts_and_orders_and_never_shows_bodies(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        seed(kit.sink.ledger, kit.service.jobs, NOW)
        on_clock(kit.service, NOW)
        r = await kit.client.get("/v1/dashboard/jobs?limit=3", headers=ADMIN)
        body = r.json()
        assert SECRET not in r.text
        assert body["totals"] == {"scheduled": 4, "running": 1, "overdue": 1}
        assert [j["id"] for j in body["next"]] == ["job-04-demo", "job-02-acme", "job-00-acme"]
        counts = {(c["status"], c["region"]): (c["jobs"], c["overdue"]) for c in body["counts"]}
        assert counts == {
            ("running", "eu-north"): (1, 0), ("scheduled", "eu-central"): (1, 0),
            ("scheduled", "eu-north"): (2, 0), ("scheduled", "us-south"): (1, 1),
        }  # fmt: skip
        assert set(body["next"][0]) == {
            "id",
            "tenant",
            "status",
            "region",
            "replica",
            "created_at",
            "start_at",
            "deadline",
            "forecast_score",
        }


async def test_the_page_is_one_offline_file_that_never_writes_markup(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        r = await kit.client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.content == PAGE
    html = r.text
    # everything is in the file: no script, style, font or picture from anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"@import|url\(", html)
    assert [u for u in re.findall(r"https?://[^\s\"']+", html) if u != "http://www.w3.org/2000/svg"
            ] == []  # fmt: skip
    # strings become text nodes or attribute values, never parsed as markup
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "new Function", "srcdoc", "javascript:"):  # fmt: skip
        assert sink not in html, sink
    assert not re.search(r"<[^>]+\son\w+\s*=", html)  # no inline event handlers
    # the CSP allows this page's own script and style, by hash, and this origin only
    csp = r.headers["content-security-policy"]
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        block = re.search(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
        assert block is not None
        digest = base64.b64encode(hashlib.sha256(block.group(1).encode()).digest()).decode()
        assert f"{directive} 'sha256-{digest}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_the_job_queue_is_read_off_the_event_loop(tmp_path: Path) -> None:
    # the job counts were read from SQLite on the event loop: with a long queue or a busy disk,
    # every request of every tenant waited for the operator's page
    import threading

    async with service_kit(tmp_path) as kit:
        store = kit.service.jobs
        real = store.queue
        reading, other_answered = threading.Event(), threading.Event()
        waited: list[bool] = []

        def slow(*a: Any, **kw: Any) -> dict[str, Any]:
            # holds until another request has been answered (or 10 s: then the loop was held)
            reading.set()
            waited.append(other_answered.wait(10.0))
            return real(*a, **kw)

        store.queue = slow  # type: ignore[method-assign]
        page = asyncio.create_task(kit.client.get("/v1/dashboard/jobs", headers=ADMIN))
        while not reading.is_set() and not page.done():  # until the page reads the queue
            await asyncio.sleep(0.01)
        r = await kit.client.get("/healthz")
        other_answered.set()
        assert r.status_code == 200
        assert (await page).status_code == 200
        assert waited == [True], "the job queue's read held the event loop"
