"""The request path assembled from its parts, with no Ray and no HTTP: what the ASGI front
(:mod:`router.http.app`) calls, and what the Ray adapter (:mod:`router.ray_app`) builds with
its replica clients, bill sink and ledger reader. Tests build it with the shipped fakes
(:mod:`router.service.fakes`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from opentelemetry.trace import TracerProvider

from forecasting.energy import EnergyPredictor
from forecasting.sources.base import CarbonSource
from regions.config import Config, ConfigError, load_config
from router.billing import PriceError
from router.errors import Conflict, ModelNotFound, NotFound, PermissionDenied, RequestError
from router.jobs import JobStore
from router.ledger import LedgerError
from router.service import telemetry
from router.service.batches import Batches
from router.service.completions import Completions
from router.service.dashboard import Dashboard
from router.service.deferral import Deferral
from router.service.fleet import FleetScaler, Targets
from router.service.live import Live
from router.service.load import LoadPoller
from router.service.metrics import Metrics, RegionFigures
from router.service.ports import (
    BillSink,
    LedgerReader,
    LoadSource,
    ReplicaClient,
    UsageQuery,
    Wire,
)
from router.service.proxied import ProxiedMetering, SendTimelines
from router.service.settlement import Settlement
from router.service.tenants import Caller
from router.service.tracing import Tracing

log = logging.getLogger(__name__)

MAX_USAGE_PAGE = 1000  # rows in one page of GET /v1/usage

# the carbon sources of a config, files resolved against the config's folder
SourcesFactory = Callable[[Config, Path], dict[str, CarbonSource]]


class RouterService:
    """Everything behind the endpoints. ``replicas`` are in the config's order (regions, then
    their replicas), as :attr:`Live.router` ``.states`` are."""

    def __init__(
        self,
        config_path: str | Path,
        *,
        replicas: Sequence[ReplicaClient],
        sink: BillSink,
        ledger: LedgerReader,
        jobs: JobStore,
        wire: Wire,
        sources: SourcesFactory,
        predictor: EnergyPredictor,
        proxied: ProxiedMetering | None = None,
        fleet_targets: Targets | None = None,
        clock: Callable[[], float] = time.monotonic,
        loads: Sequence[LoadSource | None] | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config_path = Path(config_path)
        self._sources = sources
        config = load_config(self.config_path)
        self.live = Live.build(
            self.config_path, config, sources(config, self.config_path.parent), predictor
        )
        names = [s.replica.name for s in self.live.router.states]
        if [r.name for r in replicas] != names:
            raise ValueError(f"replica clients {[r.name for r in replicas]} != config {names}")
        self.replicas = replicas
        if (
            loads is not None
            and [s.name if s else r.name for s, r in zip(loads, replicas, strict=True)] != names
        ):
            raise ValueError(f"load sources {[s and s.name for s in loads]} != config {names}")
        # the replicas' load reports, read in the background (None: the ingress's own counts)
        self.loads = LoadPoller(self.current, loads) if loads is not None else None
        self.sink = sink
        self.ledger = ledger
        self.jobs = jobs
        self.proxied = proxied
        # tracer_provider: where request spans go; by default the config's telemetry block
        # asks for one, and without it tracing is off (read at start: a reload keeps it)
        self._exporting: telemetry.SheddingProcessor | None = None
        if tracer_provider is None and config.telemetry is not None:
            tracer_provider, self._exporting = telemetry.tracer_provider(config.telemetry)
        self.tracing = Tracing(tracer_provider)
        self.metrics = Metrics(self.region_figures, self._spans_dropped)
        current = self.current
        # fleet_targets: where the counts go (the Ray adapter scales its deployments by them);
        # clock: the fleet scaler's (tests advance it)
        self.fleet = FleetScaler(current, self.metrics, targets=fleet_targets, clock=clock)
        self.settlement = Settlement(
            current, replicas, sink, ledger, proxied, self.metrics, self.tracing
        )
        self.completions = Completions(
            current, replicas, self.settlement, arrived=self.fleet.arrived, metrics=self.metrics
        )
        self.deferral = Deferral(current, jobs, self.completions, wire, self.tracing)
        self.batches = Batches(current, jobs, self.deferral, wire)
        self.dashboard = Dashboard(current, ledger, jobs, self.fleet)

    def current(self) -> Live:
        return self.live

    def region_figures(self) -> list[RegionFigures]:
        """Each region's intensity and price as the router knows them now (for /metrics): the
        carbon view's last value, never a fetch; ``None`` for what it does not know."""
        router = self.live.router
        now = datetime.now(UTC)
        figures: dict[str, RegionFigures] = {}
        for st in router.states:
            if st.region.name in figures:
                continue
            reading = router.carbon.last(st.region)
            try:
                price: float | None = st.prices.at(now)
            except PriceError:
                price = None
            g = reading.g_per_kwh if reading is not None else None
            view = router.forecasts
            error = view.error(st.region.name) if view is not None else None
            figures[st.region.name] = RegionFigures(
                st.region.name, g, price,
                forecast_mape=error.get("mape") if error else None,
                forecast_coverage_80=error.get("coverage_80") if error else None,
                forecast_age_s=view.age_s(st.region.name) if view is not None else None,
            )  # fmt: skip
        return list(figures.values())

    def _spans_dropped(self) -> int:
        return self._exporting.dropped if self._exporting is not None else 0

    # -- small endpoints -----------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> Caller:
        return self.live.tenants.authenticate(authorization)

    async def usage(self, caller: Caller, tenant: str | None, query: UsageQuery) -> dict[str, Any]:
        """A page of the caller's ledger rows (the admin's: ``tenant``'s, or everyone's) and
        the period's totals, once the requests it was answered have reached the ledger."""
        if not 1 <= query.limit <= MAX_USAGE_PAGE:
            raise RequestError(f"limit must be 1..{MAX_USAGE_PAGE}", param="limit")
        tenant = tenant if caller.admin else caller.tenant
        await self.settlement.wait_settled(tenant)
        try:
            page = await self.ledger.usage(tenant, query)
        except LedgerError as e:  # a cursor that names no row
            raise RequestError(str(e), param="after") from e
        data = page["data"]
        return {
            "object": "list",
            "tenant": tenant,
            "data": data,
            "totals": page["totals"],
            "has_more": page["has_more"],
            "last_id": data[-1]["request_id"] if data else None,
        }

    async def receipt(self, caller: Caller, request_id: str) -> dict[str, Any]:
        """The receipt of one of the caller's requests (the admin: anyone's), once its bill
        has reached the ledger; another tenant's request reads as unknown."""
        tenant = None if caller.admin else caller.tenant
        await self.settlement.wait_settled(tenant)
        found = await self.ledger.receipt(tenant, request_id)
        if found is None:
            raise NotFound(f"no receipt for request {request_id!r}")
        return found

    async def receipt_head(self, caller: Caller, tenant: str | None) -> dict[str, Any]:
        """The caller's chain head and latest signed head (the admin's: ``tenant``'s)."""
        if tenant is not None and not caller.admin and tenant != caller.tenant:
            raise PermissionDenied("a tenant key reads its own chain head only")
        return await self.ledger.receipt_head(tenant if caller.admin and tenant else caller.tenant)

    def dead_letters(self, caller: Caller) -> dict[str, Any]:
        """Admin: the billed rows the ledger refused for good (set aside, not lost)."""
        if not caller.admin:
            raise PermissionDenied("admin key required")
        rows = self.sink.dead_letters()
        return {"object": "list", "data": rows}

    def check_model(self, model: str) -> None:
        """Refuse a model no replica serves (it would otherwise be kept as a key forever)."""
        served = self.live.router.models
        if model not in served:
            raise ModelNotFound(
                f"the model {model!r} does not exist here; this router serves "
                f"{', '.join(sorted(served))}"
            )

    def models(self) -> list[str]:
        return sorted({s.replica.backend.model for s in self.live.router.states})

    def ready(self) -> list[str]:
        """The replicas that can take a request now."""
        now = time.monotonic()
        return [s.replica.name for s in self.live.router.states if s.usable(now)]

    def reload(self, caller: Caller) -> dict[str, Any]:
        """Admin: re-read the config file and swap tenants, budgets, prices, carbon sources and
        policy. Requests in flight keep what they started with; none is dropped. The set of
        replicas is fixed by the deployment: changing it needs a redeploy."""
        if not caller.admin:
            raise PermissionDenied("admin key required")
        try:
            cfg = load_config(self.config_path)
        except ConfigError as e:
            raise RequestError(str(e), code="invalid_config") from e
        old_live = self.live
        old = [s.replica.name for s in old_live.router.states]
        new = [r.name for region in cfg.regions for r in region.replicas]
        if new != old:
            raise Conflict(
                f"replicas changed ({old} -> {new}); redeploy with router serve",
                code="redeploy_needed",
            )
        live = Live.build(
            self.config_path,
            cfg,
            self._sources(cfg, self.config_path.parent),
            old_live.router.predictor,
        )
        for st_new, st_old in zip(live.router.states, old_live.router.states, strict=True):
            st_new.active, st_new.cooldown_until = st_old.active, st_old.cooldown_until
            st_new.healthy = st_old.healthy  # switched off by the fleet scaler: stays off
            st_new.report, st_new.report_at = st_old.report, st_old.report_at
            st_new.active_at_report = st_old.active_at_report
        live.router.lengths = old_live.router.lengths
        live.router.carbon.adopt(old_live.router.carbon)
        if live.router.forecasts is not None and old_live.router.forecasts is not None:
            live.router.forecasts.adopt(old_live.router.forecasts)
        if live.router.marginal is not None and old_live.router.marginal is not None:
            live.router.marginal.adopt(old_live.router.marginal)
        self.live = live
        return {
            "reloaded": str(self.config_path),
            "tenants": len(cfg.tenants),
            "regions": [r.name for r in cfg.regions],
        }

    # -- background work -----------------------------------------------------------------------
    async def refit_loop(self, period_s: float = 600.0) -> None:
        """Refit each replica's energy model from its measured ledger rows on a schedule."""
        while True:
            await asyncio.sleep(period_s)
            router = self.live.router
            for st in router.states:
                try:
                    rows = await self.ledger.refit_rows(st.replica.name)
                    router.predictor.refit(st.replica.name, rows)
                except Exception:  # a failed refit keeps the previous model; say so
                    log.exception("energy refit for %s failed", st.replica.name)

    async def forecast_loop(self) -> None:
        """Every region's carbon forecast and its recent error, refreshed off the request path
        every ``policy.forecast_refit_s`` (the router of the moment: a reload swaps it)."""
        while True:
            router = self.live.router
            if router.forecasts is not None:
                await router.forecasts.refresh_all()
            if router.marginal_forecasts is not None:
                await router.marginal_forecasts.refresh_all()
            await asyncio.sleep(router.config.policy.forecast_refit_s)

    async def timelines_loop(self, send: SendTimelines, period_s: float = 0.1) -> None:
        """Every ``period_s``: proxied replicas get their timelines and predicted bills. The
        period is well inside the replicas' attribution lag (1 s) and bounds what a killed
        ingress loses; each call through a Serve handle costs the ingress ~1 ms of CPU."""
        if self.proxied is None:
            return
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.proxied.send(send)
            except Exception:
                log.exception("sending timelines failed")

    def background(self, send: SendTimelines | None = None) -> list[Coroutine[Any, Any, None]]:
        """The loops the service needs running beside it."""
        loops = [self.deferral.loop(), self.refit_loop(), self.fleet.loop(), self.forecast_loop()]
        if self.loads is not None:
            loops.append(self.loads.loop())
        if send is not None and self.proxied is not None:
            loops.append(self.timelines_loop(send))
        return loops
