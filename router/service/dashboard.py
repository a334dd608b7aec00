"""The operator's view: what ``GET /dashboard`` shows and ``/v1/dashboard/*`` answers.

- :meth:`Dashboard.regions`: per region, the carbon intensity now and its forecast for the next
  24 hours, the price now, the replicas on and serving and their load: the router's live state,
  as the request path sees it;
- :meth:`Dashboard.hourly`: where requests went and why (per region and per binding
  constraint) and the energy, carbon, carbon avoided and cost of each hour, from the ledger's
  hourly sums (:meth:`router.ledger.Ledger.hourly`), never its rows;
- :meth:`Dashboard.jobs`: the deferred-job queue (:meth:`router.jobs.JobStore.queue`);
- :meth:`Dashboard.tenants`: the tenants that used most energy.

Who sees what: the admin key sees everything and may narrow the hourly figures to one tenant.
A tenant key sees the regions (which hold nothing of any tenant), and of the rest only its own:
its hourly figures, its own line among the tenants, its own jobs; naming another tenant is
refused (403), not answered with its own figures.

Bounded: a period is the last ``hours`` whole UTC hours, the current one included, at most
:data:`MAX_HOURS`; lists are at most :data:`MAX_LIMIT` long. A region's carbon source or
forecast that has not answered within ``wait_s`` is reported ``pending`` (the fetch goes on
beside, once per region) and a failed one ``unavailable``, with a fixed reason: a source's own
error text (its URL, credentials) goes to the log, never to a tenant. A failed forecast is not
asked for again within :data:`FORECAST_RETRY_S`, however many pages are open (the intensity
now has the carbon view's own back-off).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from forecasting.errors import ForecastingError
from forecasting.sources.base import Forecast
from regions.config import Region
from router.billing import PriceError
from router.errors import CarbonUnavailable, PermissionDenied, RequestError
from router.jobs import JobStore
from router.service.carbon import CarbonReading
from router.service.fleet import FleetScaler
from router.service.live import Live
from router.service.ports import LedgerReader
from router.service.routing import ReplicaState
from router.service.tenants import Caller

log = logging.getLogger(__name__)

MAX_HOURS = 168  # a week of hours in one answer
DEFAULT_HOURS = 24
MAX_LIMIT = 100  # tenants or jobs in one answer
DEFAULT_LIMIT = 10
FORECAST_HOURS = 24
FORECAST_RETRY_S = 60.0  # a failed forecast is asked for again after this, however many views
FIGURES = ("requests", "kwh", "carbon_g", "avoided_g", "embodied_g", "cost_usd")
TENANT_FIGURES = ("requests", "kwh", "carbon_g", "avoided_g", "cost_usd")

T = TypeVar("T")


def bounded(raw: str | int | None, name: str, lo: int, hi: int, default: int) -> int:
    """A query parameter as a whole number in ``lo..hi`` (``default`` when absent); anything
    else is a 400 naming the parameter and what it allows."""
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise RequestError(f"'{name}' must be a whole number {lo}..{hi}, got {raw!r}", param=name)
    return value


@dataclass(frozen=True)
class Window:
    """The last ``hours`` whole UTC hours, the current one included: ``[start, end)``."""

    start: datetime
    end: datetime
    hours: int

    @classmethod
    def last(cls, now: datetime, hours: int) -> Window:
        end = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        return cls(end - timedelta(hours=hours), end, hours)

    def labels(self) -> list[str]:
        """Each hour as the ledger keys it, ``YYYY-MM-DDTHH``, oldest first."""
        return [
            (self.start + timedelta(hours=k)).strftime("%Y-%m-%dT%H") for k in range(self.hours)
        ]

    def public(self) -> dict[str, Any]:
        return {"hours": self.hours, "start": self.start.isoformat(), "end": self.end.isoformat()}


def _sums(rows: list[dict[str, Any]], names: tuple[str, ...] = FIGURES) -> dict[str, Any]:
    out: dict[str, Any] = {n: 0 if n == "requests" else 0.0 for n in names}
    for r in rows:
        for n in names:
            out[n] += r[n]
    return out


def _grouped(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Sums per value of ``key``, most requests first."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    out = [{key: k, **_sums(v)} for k, v in groups.items()]
    return sorted(out, key=lambda g: (-g["requests"], g[key]))


def _viewer(caller: Caller) -> dict[str, Any]:
    return {"tenant": caller.tenant, "admin": caller.admin}


class Dashboard:
    """The operator's view over the live router, the ledger and the job store (module doc).
    ``wall`` is the UTC clock of periods and forecasts, ``clock`` the monotonic one of its
    back-off; the replicas' cooldowns and load reports are on the router's own clock."""

    def __init__(
        self,
        live: Callable[[], Live],
        ledger: LedgerReader,
        jobs: JobStore,
        fleet: FleetScaler,
        *,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
        wait_s: float = 0.25,
    ) -> None:
        self._live = live
        self._ledger = ledger
        self._jobs = jobs
        self._fleet = fleet
        self._wall = wall
        self._clock = clock
        self.wait_s = wait_s
        self._pending: dict[tuple[str, str], asyncio.Task[Any]] = {}  # (what, region) -> fetch
        self._failed: dict[str, float] = {}  # region -> when its forecast last failed

    # -- regions ------------------------------------------------------------------------------
    async def regions(self, caller: Caller) -> dict[str, Any]:
        """Per region: intensity now and ahead, price now, replicas and load."""
        live = self._live()
        fleet = {r["region"]: r for r in self._fleet.view()["regions"]}
        regions = live.config.regions
        out = await asyncio.gather(*(self._region(live, r, fleet.get(r.name, {})) for r in regions))
        return {
            "object": "dashboard.regions",
            "viewer": _viewer(caller),
            "at": self._wall().isoformat(),
            "weight": live.config.policy.weight,
            "data": out,
        }

    async def _region(self, live: Live, region: Region, fleet: dict[str, Any]) -> dict[str, Any]:
        router, wall = live.router, self._wall()
        states = [s for s in router.states if s.region.name == region.name]
        carbon, forecast = await asyncio.gather(
            self._carbon_now(live, region), self._forecast(live, region, wall)
        )
        price: float | None = None
        if states:
            try:
                price = states[0].prices.at(wall)
            except PriceError as e:
                log.warning("dashboard: region %s: price unavailable: %s", region.name, e)
        now, fresh_s = router.clock(), live.config.policy.load_report_s
        replicas = [self._replica(st, now, fresh_s) for st in states]
        capacity = sum(r["max_concurrency"] for r in replicas)
        in_flight = sum(r["in_flight"] for r in replicas)
        return {
            "region": region.name,
            "zone": region.zone,
            "residency": list(region.residency),
            "pue": region.pue,
            "carbon": carbon,
            "forecast": forecast,
            "price_usd_per_kwh": price,
            "fleet": {
                k: fleet.get(k) for k in ("desired", "on", "serving", "owned", "scalable", "held")
            },
            "load": {
                "in_flight": in_flight,
                "capacity": capacity,
                "utilization": in_flight / capacity if capacity else None,
                "estimated": any(r["estimated"] for r in replicas),
            },
            "replicas": replicas,
        }

    @staticmethod
    def _replica(st: ReplicaState, now: float, fresh_s: float) -> dict[str, Any]:
        in_flight, estimated = st.in_flight(now, fresh_s)
        return {
            "replica": st.replica.name,
            "model": st.replica.backend.model,
            "on": st.healthy,  # the fleet scaler's: switched on and started
            "cooling_down": now < st.cooldown_until,  # failed lately: skipped until then
            "serving": st.usable(now),
            "in_flight": in_flight,
            "max_concurrency": st.replica.max_concurrency,
            "estimated": estimated,  # this ingress's own count, no fresh load report
        }

    async def _within(self, key: tuple[str, str], start: Callable[[], Awaitable[T]]) -> T:
        """``start()``'s answer if it comes within ``wait_s`` (TimeoutError if not); one fetch
        per key at a time, and one that outlives the wait goes on for the next call."""
        task = self._pending.get(key)
        if task is None:

            async def run() -> T:
                return await start()

            task = asyncio.get_running_loop().create_task(run())
            self._pending[key] = task

            def done(t: asyncio.Task[Any]) -> None:
                if self._pending.get(key) is t:
                    del self._pending[key]
                if not t.cancelled():
                    t.exception()  # retrieved: the caller that waited saw it, or none did

            task.add_done_callback(done)
        result: T = await asyncio.wait_for(asyncio.shield(task), self.wait_s)
        return result

    async def _carbon_now(self, live: Live, region: Region) -> dict[str, Any]:
        try:
            reading: CarbonReading = await self._within(
                ("carbon", region.name), lambda: live.router.carbon.get(region)
            )
        except TimeoutError:
            return {"status": "pending"}
        except CarbonUnavailable as e:  # its text may name the source's URL: the log has it
            log.warning("dashboard: region %s: %s", region.name, e)
            return {"status": "unavailable", "reason": "carbon intensity unavailable"}
        return {
            "status": "stale" if reading.stale else "ok",
            "g_per_kwh": reading.g_per_kwh,
            "signal": reading.signal,
            "source": reading.source,
            "age_s": round(reading.age_s, 1),
        }

    async def _forecast(self, live: Live, region: Region, wall: datetime) -> dict[str, Any]:
        failed_at = self._failed.get(region.name)
        if failed_at is not None and self._clock() - failed_at < FORECAST_RETRY_S:
            return {"status": "unavailable", "reason": "forecast unavailable"}
        try:
            fc: Forecast = await self._within(
                ("forecast", region.name), lambda: live.router._forecast(region)
            )
            hour0 = wall.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
            last = fc.g_per_kwh.index[-1]
            hours, values = [], []
            for k in range(FORECAST_HOURS):
                at = hour0 + timedelta(hours=k)
                if at > last:  # past its end: not repeated as if forecast
                    break
                try:
                    value = fc.at(at)
                except ForecastingError:  # before its start: from the hour it covers
                    continue
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(f"forecast value {value} is not a number >= 0")
                hours.append(at.isoformat())
                values.append(value)
        except TimeoutError:
            return {"status": "pending"}
        except Exception as e:  # any source's failure: this region's forecast, not the view
            if isinstance(e, ForecastingError | ValueError):
                log.warning("dashboard: region %s: forecast unavailable: %s", region.name, e)
            else:
                log.error("dashboard: region %s: forecast failed", region.name, exc_info=e)
            self._failed[region.name] = self._clock()  # not asked again for a while
            return {"status": "unavailable", "reason": "forecast unavailable"}
        return {
            "status": "stale" if fc.stale else "ok",
            "source": fc.source,
            "issued_at": fc.issued_at.isoformat(),
            "hours": hours,
            "g_per_kwh": values,
        }

    # -- the ledger's hours -------------------------------------------------------------------
    def _scope(self, caller: Caller, tenant: str | None) -> str | None:
        """Whose figures: the admin's choice (None: everyone's), a tenant's own only."""
        if caller.admin:
            return tenant
        if tenant is not None and tenant != caller.tenant:
            raise PermissionDenied("a tenant key reads its own figures only ('tenant')")
        return caller.tenant

    async def hourly(
        self, caller: Caller, hours: str | int | None, tenant: str | None = None
    ) -> dict[str, Any]:
        """The last ``hours`` hours: the ledger's sums per (hour, region, binding) as ``data``,
        and per hour (every hour, 0 when none ran), per region, per binding and in all."""
        hours = bounded(hours, "hours", 1, MAX_HOURS, DEFAULT_HOURS)
        scope = self._scope(caller, tenant)
        window = Window.last(self._wall(), hours)
        rows = await self._ledger.hourly(window.start, window.end, scope)
        per_hour: dict[str, list[dict[str, Any]]] = {h: [] for h in window.labels()}
        for r in rows:
            per_hour.setdefault(r["hour"], []).append(r)
        return {
            "object": "dashboard.hourly",
            "viewer": _viewer(caller),
            "tenant": scope,
            **window.public(),
            "totals": _sums(rows),
            "by_hour": [{"hour": h, **_sums(v)} for h, v in per_hour.items()],
            "by_region": _grouped(rows, "region"),
            "by_binding": _grouped(rows, "binding"),
            "data": rows,
        }

    async def tenants(
        self, caller: Caller, hours: str | int | None, limit: str | int | None
    ) -> dict[str, Any]:
        """The admin: the ``limit`` tenants that used most kWh in the last ``hours`` hours. A
        tenant: its own line only (zeros when it used nothing)."""
        hours = bounded(hours, "hours", 1, MAX_HOURS, DEFAULT_HOURS)
        limit = bounded(limit, "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
        window = Window.last(self._wall(), hours)
        if caller.admin:
            data = await self._ledger.top_tenants(window.start, window.end, limit)
        else:
            own = await self._ledger.hourly(window.start, window.end, caller.tenant)
            data = [{"tenant": caller.tenant, **_sums(own, TENANT_FIGURES)}]
        return {
            "object": "dashboard.tenants",
            "viewer": _viewer(caller),
            "scope": "all" if caller.admin else "own",
            **window.public(),
            "data": data,
        }

    # -- the job queue ------------------------------------------------------------------------
    async def jobs(self, caller: Caller, limit: str | int | None) -> dict[str, Any]:
        """The deferred jobs waiting or running (a tenant: its own), counted per status and
        region, and the next ``limit`` to run; never their bodies or answers. Read in a worker
        thread: a long queue or a busy disk must not hold the event loop's requests."""
        limit = bounded(limit, "limit", 1, MAX_LIMIT, DEFAULT_LIMIT)
        tenant = None if caller.admin else caller.tenant
        q = await asyncio.to_thread(self._jobs.queue, self._wall(), tenant=tenant, limit=limit)
        totals = {
            s: sum(c["jobs"] for c in q["counts"] if c["status"] == s)
            for s in ("scheduled", "running")
        }
        totals["overdue"] = sum(c["overdue"] for c in q["counts"])
        return {
            "object": "dashboard.jobs",
            "viewer": _viewer(caller),
            "tenant": tenant,
            "at": self._wall().isoformat(),
            "totals": totals,
            "counts": q["counts"],
            "next": q["next"],
        }
