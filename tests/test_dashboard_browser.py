"""The dashboard in a real browser: headless Chromium loads ``/dashboard`` from the router
(the Ray-free service on fakes, served by uvicorn on loopback) and the figures it shows are
checked against the JSON API; a tenant's key shows that tenant's line only; names that are
markup render as text and run nothing; the key never reaches a URL. A screenshot of each page
is saved in the test's tmp dir (``CARBON_ROUTER_DASHBOARD_PNG=docs/dashboard.png`` also
writes the admin's there, for the README).

Skipped, saying why, where Chromium is not installed; .ci/run installs it and sets
``CARBON_ROUTER_REQUIRE_BROWSER=1``, under which its absence is an error."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.dashboard_kit import (
    HOSTILE_REGION,
    HOSTILE_TENANT,
    HOSTILE_TENANT_2,
    TENANTS,
    on_clock,
    seed,
    serve,
)
from tests.headless import CHROMIUM, NO_CHROMIUM, Chromium, Page
from tests.service_kit import ADMIN, DEMO, service_kit

if CHROMIUM is None and os.environ.get("CARBON_ROUTER_REQUIRE_BROWSER") == "1":
    raise RuntimeError(f"CARBON_ROUTER_REQUIRE_BROWSER=1 and this test {NO_CHROMIUM}")

pytestmark = [pytest.mark.browser, pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)]

NOW = datetime.now(UTC).replace(minute=17, second=5, microsecond=0)
ADMIN_KEY, DEMO_KEY = ADMIN["Authorization"][7:], DEMO["Authorization"][7:]
# the static source's forecast, hour by hour from now: a day's swing
PROFILE = (1.0, 0.9, 0.75, 0.6, 0.55, 0.6, 0.7, 0.85, 1.0, 1.1, 1.2, 1.15, 1.05, 0.95, 0.9, 0.8,
           0.7, 0.65, 0.7, 0.8, 0.95, 1.1, 1.2, 1.1)  # fmt: skip
READY = "document.documentElement.dataset.state === 'ready'"

ROWS = """(sel) => [...document.querySelectorAll(sel + ' tbody tr')].map(tr =>
  Object.fromEntries([...tr.cells].map(td => [td.dataset.col, td.textContent])))"""
CARDS = """[...document.querySelectorAll('article.region')].map(a => {
  const t = (s) => { const e = a.querySelector(s); return e ? e.textContent : null; };
  const spark = a.querySelector('svg.spark');
  return {region: a.dataset.region, name: t('.name'), intensity: t('.intensity'),
    price: t('.price'), serving: t('.serving'), in_flight: t('.in-flight'),
    points: spark ? Number(spark.dataset.points) : 0, min: t('.fc-min'), max: t('.fc-max')};
})"""


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    browser = Chromium.start(tmp_path_factory.mktemp("chromium"))
    yield browser
    browser.close()


def shown(text: str) -> float:
    """A number as the page writes it (``12,345``, ``0.01234``, ``1.2e-7``, ``min 15``)."""
    return float(text.split()[-1].replace(",", ""))


def close(text: str, value: float) -> bool:
    """``text`` is ``value`` at the page's precision: 4 significant digits, whole from 1000."""
    return math.isclose(shown(text), value, rel_tol=1e-3, abs_tol=0.5 if abs(value) >= 1000 else 0)


async def rows(page: Page, table: str) -> list[dict[str, str]]:
    found: list[dict[str, str]] = await page.evaluate(f"({ROWS})('#{table}')")
    return found


async def open_dashboard(page: Page, url: str, key: str | None) -> None:
    await page.goto(f"{url}/dashboard" + (f"#key={key}" if key else ""))
    if key:
        await page.wait_for(READY)


async def api(url: str, path: str, key: str) -> Any:
    async with httpx.AsyncClient(base_url=url) as client:
        r = await client.get(path, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
        return r.json()


async def test_the_page_shows_the_figures_of_the_api(chromium: Chromium, tmp_path: Path) -> None:
    async with service_kit(tmp_path, profile=PROFILE) as kit:
        seed(kit.sink.ledger, kit.service.jobs, NOW)
        on_clock(kit.service, NOW)
        async with serve(kit.service) as served, chromium.page(height=1000) as page:
            await open_dashboard(page, served.url, ADMIN_KEY)
            hourly = await api(served.url, "/v1/dashboard/hourly?hours=24", ADMIN_KEY)
            regions = await api(served.url, "/v1/dashboard/regions", ADMIN_KEY)
            tenants = await api(served.url, "/v1/dashboard/tenants?limit=10", ADMIN_KEY)
            jobs = await api(served.url, "/v1/dashboard/jobs?limit=10", ADMIN_KEY)

            # hourly totals
            t = hourly["totals"]
            assert await page.evaluate(
                "document.getElementById('tot-requests').textContent"
            ) == str(t["requests"])
            for el, k in (("tot-kwh", "kwh"), ("tot-carbon", "carbon_g"),
                          ("tot-avoided", "avoided_g"), ("tot-cost", "cost_usd")):  # fmt: skip
                text = await page.evaluate(f"document.getElementById('{el}').textContent")
                assert close(text, t[k]), (el, text, t[k])
            # where requests went: per region (a region named as markup included) and binding
            by_region = {r["region"]: r for r in await rows(page, "by-region")}
            assert set(by_region) == {g["region"] for g in hourly["by_region"]}
            assert HOSTILE_REGION in by_region
            for g in hourly["by_region"]:
                shown_row = by_region[g["region"]]
                assert shown_row["requests"] == str(g["requests"])
                assert close(shown_row["kwh"], g["kwh"]) and close(
                    shown_row["carbon_g"], g["carbon_g"]
                )
            by_binding = {r["binding"]: r["requests"] for r in await rows(page, "by-binding")}
            assert by_binding == {(g["binding"] or "(none)"): str(g["requests"])
                                  for g in hourly["by_binding"]}  # fmt: skip
            # regions now: intensity, forecast, price, replicas serving
            cards = await page.evaluate(CARDS)
            assert [c["region"] for c in cards] == [r["region"] for r in regions["data"]]
            for card, r in zip(cards, regions["data"], strict=True):
                assert card["name"] == r["region"]
                assert close(card["intensity"], r["carbon"]["g_per_kwh"])
                assert close(card["price"], r["price_usd_per_kwh"])
                assert card["points"] == len(r["forecast"]["g_per_kwh"]) == 24
                assert close(card["min"], min(r["forecast"]["g_per_kwh"]))
                assert close(card["max"], max(r["forecast"]["g_per_kwh"]))
                assert card["serving"] == str(r["fleet"]["serving"])
                assert card["in_flight"] == str(r["load"]["in_flight"])
            # top tenants, names that are markup shown as the text they are
            top = await rows(page, "tenants")
            assert [x["tenant"] for x in top] == [d["tenant"] for d in tenants["data"]]
            assert {HOSTILE_TENANT, HOSTILE_TENANT_2} <= {x["tenant"] for x in top}
            for x, d in zip(top, tenants["data"], strict=True):
                assert x["requests"] == str(d["requests"]) and close(x["kwh"], d["kwh"])
                assert close(x["cost_usd"], d["cost_usd"])
            # the job queue
            for k in ("scheduled", "running", "overdue"):
                text = await page.evaluate(f"document.getElementById('jobs-{k}').textContent")
                assert text == str(jobs["totals"][k])
            nxt = await rows(page, "jobs-next")
            assert [x["id"] for x in nxt] == [j["id"][:16] for j in jobs["next"]]

            # nothing ran: no element a name could have made, no dialog, no error, no CSP report
            made = "document.querySelectorAll('img, b, [onerror], [onload], iframe').length"
            assert await page.evaluate(made) == 0
            assert page.dialogs == [] and page.exceptions == [] and page.console == []
            # the key left the address bar and never reached a URL
            assert await page.evaluate("location.hash") == ""
            assert all(ADMIN_KEY not in u for u in page.requests)
            assert all(ADMIN_KEY not in p for p in served.paths)
            assert served.paths[0] == "/dashboard?"
            png = await page.screenshot(tmp_path / "dashboard.png")
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
            if target := os.environ.get("CARBON_ROUTER_DASHBOARD_PNG"):
                shutil.copyfile(tmp_path / "dashboard.png", target)


async def test_a_tenant_key_shows_its_own_line_only(chromium: Chromium, tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        seed(kit.sink.ledger, kit.service.jobs, NOW)
        on_clock(kit.service, NOW)
        async with serve(kit.service) as served, chromium.page() as page:
            await open_dashboard(page, served.url, DEMO_KEY)
            own = await api(served.url, "/v1/dashboard/tenants?limit=10", DEMO_KEY)
            top = await rows(page, "tenants")
            assert [x["tenant"] for x in top] == ["demo"]
            assert close(top[0]["kwh"], own["data"][0]["kwh"])
            assert (
                await page.evaluate("document.getElementById('who').textContent") == "tenant demo"
            )
            html: str = await page.evaluate("document.documentElement.outerHTML")
            for other in [t for t in TENANTS if t != "demo"]:
                escaped = other.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                assert other not in html and escaped not in html, other
            assert "job-00-acme" not in html and "onerror" not in html
            hourly = await api(served.url, "/v1/dashboard/hourly?hours=24", DEMO_KEY)
            text = await page.evaluate("document.getElementById('tot-requests').textContent")
            assert text == str(hourly["totals"]["requests"])
            await page.screenshot(tmp_path / "dashboard-tenant.png")
            assert page.dialogs == [] and page.exceptions == [] and page.console == []


async def test_the_page_asks_for_a_key_and_refuses_a_wrong_one(
    chromium: Chromium, tmp_path: Path
) -> None:
    async with service_kit(tmp_path) as kit, serve(kit.service) as served, chromium.page() as page:
        await open_dashboard(page, served.url, None)
        await page.wait_for("document.documentElement.dataset.state === 'login'")
        assert await page.evaluate("document.getElementById('main').hidden") is True
        submit = ("document.getElementById('key').value = {key!r}; "
                  "document.getElementById('login').requestSubmit(); true")  # fmt: skip
        await page.evaluate(submit.format(key="sk-wrong"))
        await page.wait_for("document.getElementById('login-error').textContent")
        error = await page.evaluate("document.getElementById('login-error').textContent")
        assert "refused" in error
        assert await page.evaluate("sessionStorage.length") == 0  # a refused key is forgotten
        await page.evaluate(submit.format(key=DEMO_KEY))
        await page.wait_for(READY)
        assert await page.evaluate("document.getElementById('who').textContent") == "tenant demo"
        # the key went in the Authorization header, never in a URL
        assert any(h.get("authorization") == f"Bearer {DEMO_KEY}" for h in served.headers)
        assert all(DEMO_KEY not in p for p in served.paths)
