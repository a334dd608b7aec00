"""The operator's view over HTTP: the page ``GET /dashboard`` and the JSON it reads, also for
scripts (README 'The operator's view').

- ``GET /dashboard``: one static HTML file (``dashboard.html``, package data: vanilla JS and
  inline SVG, nothing fetched from elsewhere, so it works offline). It asks for an API key and
  keeps it in the tab's ``sessionStorage``, or takes it from the URL's fragment
  (``/dashboard#key=...``: a fragment is never sent to a server, so never logged) and removes it
  from the address bar. It sends the key only in the ``Authorization`` header. Served with a
  Content-Security-Policy that allows its own inline script and style (by hash) and requests to
  this origin only: no inline event handler, injected script or other host can run or be reached.
- ``GET /v1/dashboard/regions``: per region, carbon intensity now and the next 24 hours, price
  now, replicas and load.
- ``GET /v1/dashboard/hourly?hours=24[&tenant=NAME]``: the last ``hours`` (1-168) whole UTC
  hours: requests, kWh, g CO2e, g avoided, embodied g, USD per hour, per region and per binding
  constraint (``tenant``: the admin's filter; a tenant key gets its own figures only).
- ``GET /v1/dashboard/tenants?hours=24&limit=10``: the admin: the ``limit`` (1-100) tenants
  that used most kWh; a tenant key: its own line.
- ``GET /v1/dashboard/jobs?limit=10``: the deferred jobs waiting or running (a tenant key: its
  own), per status and region, and the next ``limit`` (1-100) to run.

Every ``/v1/dashboard`` answer needs a key (401 without one), says who it was answered for
(``viewer``), is ``Cache-Control: no-store``, and refuses a bad parameter with a 400 naming it
and what it allows. What each figure means is in :mod:`router.service.dashboard`.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from router.http.auth import Auth, service_of
from router.http.errors import JSONResponse

PAGE = resources.files("router.http").joinpath("dashboard.html").read_bytes()


def _csp_hash(tag: str) -> str:
    """The CSP source of the page's one inline ``<tag>`` block: its SHA-256."""
    found = re.findall(rb"<%s>(.*?)</%s>" % (tag.encode(), tag.encode()), PAGE, re.DOTALL)
    if len(found) != 1:
        raise RuntimeError(f"dashboard.html must hold one <{tag}> block, found {len(found)}")
    return "'sha256-" + base64.b64encode(hashlib.sha256(found[0]).digest()).decode() + "'"


CSP = (
    f"default-src 'none'; script-src {_csp_hash('script')}; style-src {_csp_hash('style')}; "
    "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}
NO_STORE = {"Cache-Control": "no-store"}  # a tenant's figures stay out of shared caches


Viewer = Auth

router = APIRouter()


@router.get("/dashboard", include_in_schema=False)
async def dashboard_page() -> Response:
    return Response(PAGE, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)


@router.get("/v1/dashboard/regions")
async def dashboard_regions(request: Request, caller: Viewer) -> JSONResponse:
    """Per region: carbon intensity now (``carbon``: ``ok``, ``stale``, ``pending`` or
    ``unavailable``) and its forecast for the next 24 hours, price now (USD/kWh), the fleet's
    replica counts and the load in flight against the replicas' capacity."""
    return JSONResponse(await service_of(request).dashboard.regions(caller), headers=NO_STORE)


@router.get("/v1/dashboard/hourly")
async def dashboard_hourly(
    request: Request, caller: Viewer, hours: str | None = None, tenant: str | None = None
) -> JSONResponse:
    """The last ``hours`` (1-168, default 24) whole UTC hours, the current one included:
    requests, kWh, g CO2e, g CO2e avoided, embodied g and USD per hour (``by_hour``), per region
    (``by_region``), per binding constraint (``by_binding``), per all three (``data``) and in
    all (``totals``). ``tenant``: the admin's filter; a tenant key reads its own figures only."""
    body = await service_of(request).dashboard.hourly(caller, hours, tenant)
    return JSONResponse(body, headers=NO_STORE)


@router.get("/v1/dashboard/tenants")
async def dashboard_tenants(
    request: Request, caller: Viewer, hours: str | None = None, limit: str | None = None
) -> JSONResponse:
    """The admin: the ``limit`` (1-100, default 10) tenants that used most kWh in the last
    ``hours`` (1-168, default 24) hours; a tenant key: its own line only."""
    body = await service_of(request).dashboard.tenants(caller, hours, limit)
    return JSONResponse(body, headers=NO_STORE)


@router.get("/v1/dashboard/jobs")
async def dashboard_jobs(
    request: Request, caller: Viewer, limit: str | None = None
) -> JSONResponse:
    """Deferred jobs waiting or running (a tenant key: its own): counts per status and region
    (``overdue``: past their start time, not yet claimed) and the next ``limit`` (1-100,
    default 10) to run, without their bodies or answers."""
    body = await service_of(request).dashboard.jobs(caller, limit)
    return JSONResponse(body, headers=NO_STORE)
