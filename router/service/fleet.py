"""The live fleet scaler: how many replicas each region keeps on, decided every
``fleet.interval_s`` by :func:`router.scaling.desired_on` (the rule ``router simulate`` uses)
from forecast load and forecast intensity, applied to the router and published.

Inputs
------
- **Load**: requests started here (live, deferred and batch ones, as they run), counted per
  minute by model and the regions they may use (their ``regions`` preference), over the last
  25 h; each such load goes only to regions that serve its model and it may use. The forecast
  for a time ``T`` is, per (model, allowed set), the larger of the rate over the last 15
  complete minutes and the rate in the hour around ``T`` yesterday (once 24 h of counts
  cover it): the higher of "now" and "the same time yesterday", so a daily peak is met
  before it comes (:mod:`router.service.arrivals`). Until one complete minute is counted the
  scaler holds every count.
- **Score**: what a request costs in each region at ``T``, the routing policy's
  ``kWh x PUE^w x price^(1-w) x intensity^w`` with the config's default weight, for a
  reference request (the energy predictor's, :data:`REF_PROMPT_TOKENS` in and the output
  prior out). Intensity now is the router's :class:`CarbonView` reading (last value, marked
  stale, while within its age); ahead, the carbon source's forecast (the router's cached one);
  a forecast that fails falls back to the reading now, and says so.
- Decisions are taken for now and for each region's ``startup_s`` ahead; a region keeps on
  the most it needs over that window (one switched on now serves from ``startup_s`` on).

Failures never drain a region: a region whose intensity or price is unavailable (or all of
them, while the load is unknown) keeps the count it has (its replicas fill first, as they are
on anyway), and the published view says why. A region not yet decided since the router started
publishes no count (``desired`` is null, no gauge) and writes none to its deployments, so what
runs keeps running rather than what a fresh router believes is on.

The router routes to the first ``on`` listed replicas of a region, each once its
``startup_s`` has passed since it was switched on; the rest drain (requests in flight finish).
The counts go to ``targets`` (the Ray adapter sets its deployments' replica counts from them)
and to the gauge ``router_desired_replicas{region}``; :meth:`FleetScaler.view` is
``GET /v1/fleet``.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from forecasting.energy import GPUS, EnergyModelError, canonical_gpu
from forecasting.errors import CarbonSourceError, ForecastingError
from regions.config import Region, Replica, Scaling
from router.billing import PriceError
from router.errors import CarbonUnavailable
from router.policy import score
from router.scaling import RegionFleet, desired_on
from router.service.arrivals import Arrivals, LoadUnknown
from router.service.live import Live
from router.service.metrics import Metrics
from router.service.routing import ReplicaState

log = logging.getLogger(__name__)

REF_PROMPT_TOKENS = 512  # the reference request's prompt, for the score

Targets = Callable[[dict[str, int]], Awaitable[None]]  # replica name -> 1 on, 0 off


@dataclass
class RegionPlan:
    """One region's inputs and decision, as the view shows it."""

    region: Region
    fleet: RegionFleet | None  # None: no replicas, or no capacity figure
    scalable: bool
    intensity: list[float]
    price: list[float]
    score: list[float]
    carbon: dict[str, Any]
    held: str | None = None


def standby_w(rep: Replica, sc: Scaling | None) -> float:
    """Watts a replica that is switched off still draws: ``scaling.standby_w_per_gpu`` or
    its GPU type's default, times its GPUs; a stopped CPU replica draws nothing of its own.
    Raises EnergyModelError for a GPU type without a default."""
    if rep.gpu.type == "cpu":
        return 0.0
    per_gpu = sc.standby_w_per_gpu if sc is not None else None
    if per_gpu is None:
        per_gpu = GPUS[canonical_gpu(rep.gpu.type)].standby_w
    return per_gpu * rep.gpu.count


def region_fleet(region: Region, states: list[ReplicaState], prior_tokens: float) -> RegionFleet:
    """The region as the policy sees it (its replicas' mean figures). A replica's capacity is
    ``scaling.capacity_rps``, else what its model gives a reference request
    (:data:`REF_PROMPT_TOKENS` prefilled, ``prior_tokens`` decoded at its batch limit).
    Raises ValueError when a replica has neither, or has a GPU of unknown standby power."""
    sc = region.scaling
    owned = len(states)
    caps, standby = [], []
    for st in states:
        model, rep = st.model, st.replica
        if sc is not None and sc.capacity_rps is not None:
            caps.append(sc.capacity_rps)
        elif model is not None:  # the reference request's prefill, then its share of
            # decoding at the batch limit: an upper bound (no latency SLO, no bursts; router
            # simulate's fleet.csv gives the capacity at the SLOs, for scaling.capacity_rps)
            caps.append(
                1.0
                / (
                    model.prefill_s(REF_PROMPT_TOKENS)
                    + prior_tokens / model.decode_tokens_per_s(model.max_batch)
                )
            )
        else:
            raise ValueError(f"replica {rep.name} has no replica model: set scaling.capacity_rps")
        try:
            standby.append(standby_w(rep, sc))
        except EnergyModelError as e:
            raise ValueError(f"replica {rep.name}: {e}; or set scaling.standby_w_per_gpu") from e
    scalable = sc is not None and sc.scalable
    return RegionFleet(
        name=region.name,
        replicas=owned,
        min_on=min(sc.min_replicas, owned) if scalable and sc is not None else owned,
        capacity_rps=float(np.mean(caps)),
        startup_s=sc.startup_s if sc is not None else 0.0,
        standby_w=float(np.mean(standby)),
    )


class FleetScaler:
    """Decides, applies and publishes the count of replicas on per region (module doc)."""

    def __init__(
        self,
        live: Callable[[], Live],
        metrics: Metrics,
        *,
        targets: Targets | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._live = live
        self._metrics = metrics
        self._targets = targets
        self._clock = clock
        self._wall = wall
        self.arrivals = Arrivals(clock)
        self._off: set[str] = set()  # replicas switched off (all are on at the start)
        self._on_since: dict[str, float] = {}  # replica -> clock when switched on again
        self._offsets: list[float] = [0.0]
        self._plans: list[RegionPlan] = []
        self._decided: dict[str, list[int]] = {}
        self._counts: dict[str, int] = {}
        self._decided_once: set[str] = set()  # regions whose count is the router's own
        self._load: dict[str, Any] = {}
        self._updated: tuple[float, datetime] | None = None
        self._error: str | None = None

    def arrived(self, model: str, patterns: tuple[str, ...]) -> None:
        """A request for ``model`` started that may run in the regions ``patterns`` match
        (empty: any). Counted by the set of region names they match (every region: anywhere),
        so that distinct patterns for the same regions are one key (a tenant cannot fill
        :data:`router.service.arrivals.MAX_SETS` with spellings of one set)."""
        if patterns:
            regions = self._live().config.regions
            names = tuple(sorted(r.name for r in regions if _matches(r, patterns)))
            if not names:
                return  # no region may serve it: it is refused, not served
            if len(names) == len(regions):
                names = ()
        else:
            names = ()
        self.arrivals.add((model, names))

    # -- deciding ---------------------------------------------------------------------------
    async def step(self) -> dict[str, int]:
        """Decide and apply once; the count of replicas on per region."""
        live = self._live()
        router, cfg = live.router, live.config
        by_region = [
            (r, [s for s in router.states if s.region.name == r.name]) for r in cfg.regions
        ]
        on_now = [self._on_count(states) for _, states in by_region]
        plans = [self._fleet_of(region, states, router.lengths.prior_tokens)
                 for region, states in by_region]  # fmt: skip
        offsets = sorted({0.0} | {p.fleet.startup_s for p in plans if p.fleet and p.scalable})
        for plan, (_, states) in zip(plans, by_region, strict=True):
            if plan.held is None and plan.fleet is not None:
                await self._inputs(live, plan, states[0], offsets)
        try:
            load, how = self._load_columns(cfg.regions, offsets)
        except LoadUnknown as e:
            load, how = None, {"held": str(e)}
        fleets, scores = [], []
        for p, n in zip(plans, on_now, strict=True):
            if load is None and p.held is None:
                p.held = f"load unknown ({how['held']}): the count is kept"
            if p.fleet is None or p.held is not None:  # kept at n: on anyway, so it takes
                known = p.fleet is not None  # load first, what it carries (unknown: nothing)
                cap = p.fleet.capacity_rps if p.fleet is not None else 1.0
                fleets.append(RegionFleet(p.region.name, n, n, cap, 0.0, 0.0))
                scores.append([-math.inf if known else math.inf] * len(offsets))
            else:
                fleets.append(p.fleet)
                scores.append(p.score)
        if load is None:
            rows = np.array([on_now] * len(offsets))
        else:
            rps, masks = load
            rows = desired_on(
                rps, np.array(scores).T, fleets,
                target_utilization=cfg.fleet.target_utilization, allowed=masks,
            )  # fmt: skip
        counts: dict[str, int] = {}
        self._decided = {}
        for g, (p, f) in enumerate(zip(plans, fleets, strict=True)):
            # on now: the most it needs before a replica switched on now would serve
            counts[p.region.name] = int(max(rows[h, g] for h, o in enumerate(offsets)
                                            if o <= f.startup_s))  # fmt: skip
            self._decided[p.region.name] = [int(r) for r in rows[:, g]]
        self._offsets, self._counts = offsets, counts
        self._plans, self._load = plans, how
        self._updated = (self._clock(), self._wall())
        self._error = None
        await self._apply(by_region, counts, plans)
        return counts

    def _fleet_of(self, region: Region, states: list[ReplicaState], prior: float) -> RegionPlan:
        sc = region.scaling
        plan = RegionPlan(region, None, bool(sc and sc.scalable), [], [], [], {})
        if not states:
            plan.held = "no replicas"
            return plan
        try:
            plan.fleet = region_fleet(region, states, prior)
        except ValueError as e:
            log.warning("fleet: region %s has no capacity or standby figure: %s", region.name, e)
            plan.held = "no capacity or standby power figure: the count is kept"
        return plan

    async def _inputs(
        self, live: Live, plan: RegionPlan, st: ReplicaState, offsets: list[float]
    ) -> None:
        """The region's intensity, price and score at each offset from now, or ``held``."""
        router, region, now = live.router, plan.region, self._wall()
        try:
            reading = await router.carbon.get(region)
        except CarbonUnavailable as e:
            log.warning("fleet: region %s: carbon intensity unavailable: %s", region.name, e)
            plan.held = "carbon intensity unavailable: the count is kept"
            return
        plan.carbon = {"source": reading.source, "signal": reading.signal,
                       "stale": reading.stale, "age_s": round(reading.age_s, 1)}  # fmt: skip
        intensity = [reading.g_per_kwh]
        if len(offsets) > 1:
            try:
                fc = await router._forecast(region)
                ahead = [fc.at(now + timedelta(seconds=o)) for o in offsets[1:]]
                if not all(math.isfinite(i) and i >= 0 for i in ahead):
                    raise CarbonSourceError(f"forecast {ahead} is not a number >= 0",
                                           source=fc.source, zone=region.zone)  # fmt: skip
                intensity += ahead
                plan.carbon["forecast"] = {"source": fc.source, "stale": fc.stale,
                                           "issued_at": fc.issued_at.isoformat()}  # fmt: skip
            except ForecastingError as e:  # failed, or not an intensity: the one now, ahead
                log.warning("fleet: region %s: forecast unavailable: %s", region.name, e)
                intensity += [reading.g_per_kwh] * (len(offsets) - 1)
                plan.carbon["forecast"] = "unavailable: the intensity now is used ahead"
        if not all(math.isfinite(i) and i >= 0 for i in intensity):
            plan.held = f"carbon intensity {intensity} is not a number >= 0: the count is kept"
            return
        try:
            price = [st.prices.at(now + timedelta(seconds=o)) for o in offsets]
        except PriceError as e:
            log.warning("fleet: region %s: price unavailable: %s", region.name, e)
            plan.held = "price unavailable: the count is kept"
            return
        kwh = router.predictor.predict_j(
            st.profile, REF_PROMPT_TOKENS, router.lengths.prior_tokens,
            batch=max(1, st.replica.max_concurrency // 2),
        ) / 3.6e6  # fmt: skip
        weight = live.config.policy.weight
        plan.intensity, plan.price = intensity, price
        plan.score = [float(score(kwh, region.pue, p, i, weight))
                      for p, i in zip(price, intensity, strict=True)]  # fmt: skip

    def _load_columns(
        self, regions: list[Region], offsets: list[float]
    ) -> tuple[tuple[np.ndarray, np.ndarray], dict[str, Any]]:
        """[H, K] forecast requests/s per (model, allowed set) at each offset, their [K, G]
        region masks (regions serving the model that the set allows), and how the forecast was
        made."""
        per_offset = [self.arrivals.forecast(o) for o in offsets]
        keys = sorted({k for est, _ in per_offset for k in est})
        models = [{rep.backend.model for rep in r.replicas} for r in regions]
        masks, kept = [], []
        for model, names in keys:  # names: the regions the requests may use (() = any)
            mask = [
                model in m and (not names or r.name in names)
                for r, m in zip(regions, models, strict=True)
            ]
            if any(mask):  # a request no region can serve was refused, not served
                masks.append(mask)
                kept.append((model, names))
        if not kept:  # no requests: an all-regions column of 0
            kept, masks = [("", ())], [[True] * len(regions)]
        rps = np.array([[est.get(k, 0.0) for k in kept] for est, _ in per_offset])
        how: dict[str, Any] = {
            "estimate": "per model and allowed region set, max(rate over the last 15 complete "
            "minutes, rate in the hour around the same time yesterday)",
            "history_s": round(self._clock() - self.arrivals.started_at, 1),
            **per_offset[0][1],
            "sets": [
                {
                    "model": model,
                    "regions": list(names) or ["*"],
                    "rps": [round(float(x), 4) for x in rps[:, j]],
                }
                for j, (model, names) in enumerate(kept)
                if model
            ],  # fmt: skip
        }
        return (rps, np.array(masks, dtype=bool)), how

    # -- applying ---------------------------------------------------------------------------
    def _on_count(self, states: list[ReplicaState]) -> int:
        return sum(1 for s in states if s.replica.name not in self._off)

    async def _apply(
        self,
        by_region: list[tuple[Region, list[ReplicaState]]],
        counts: dict[str, int],
        plans: list[RegionPlan],
    ) -> None:
        now = self._clock()
        targets: dict[str, int] = {}
        for (region, states), plan in zip(by_region, plans, strict=True):
            startup_s = plan.fleet.startup_s if plan.fleet is not None else 0.0
            for i, st in enumerate(states):
                name = st.replica.name
                on = i < counts[region.name]
                if on and name in self._off:
                    self._off.discard(name)
                    self._on_since[name] = now
                elif not on:
                    self._off.add(name)
                since = self._on_since.get(name, -math.inf)
                st.healthy = on and now - since >= startup_s
                drained = not on and st.active == 0  # its deployment stops once drained
                if plan.held is None or drained:  # held: what runs keeps running (after a
                    targets[name] = 0 if drained else 1  # restart the router knows no better)
            if plan.held is None:
                self._decided_once.add(region.name)
            if region.name in self._decided_once:  # else it publishes nothing: what runs stays
                self._metrics.desired_replicas.labels(region.name).set(counts[region.name])
        if self._targets is not None:
            await self._targets(targets)

    async def loop(self) -> None:
        """Decide every ``fleet.interval_s``; a failed step keeps every count and says why."""
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("fleet scaling failed: every count is kept")
                # GET /v1/fleet is public: the detail (a source's URL, ...) stays in the log
                self._error = "fleet scaling failed: every count is kept"
            await asyncio.sleep(self._live().config.fleet.interval_s)

    # -- publishing -------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        """``GET /v1/fleet``: per region the count wanted on, on and serving now, owned, and
        the inputs of the last decision with their age."""
        live = self._live()
        plans = {p.region.name: p for p in self._plans}
        out = []
        for region in live.config.regions:
            states = [s for s in live.router.states if s.region.name == region.name]
            plan, sc = plans.get(region.name), region.scaling
            fleet = plan.fleet if plan is not None else None
            on = self._on_count(states)
            entry: dict[str, Any] = {
                "region": region.name,
                # None: not yet decided since the router started (it keeps what runs)
                "desired": self._counts.get(region.name)
                if region.name in self._decided_once
                else None,
                "on": on,
                "serving": sum(1 for s in states if s.healthy),
                "owned": len(states),
                "scalable": bool(sc and sc.scalable),
                "min_replicas": fleet.min_on if fleet is not None else len(states),
                "startup_s": fleet.startup_s if fleet is not None else None,
                "capacity_rps": None if fleet is None else round(fleet.capacity_rps, 4),
                "standby_w": None if fleet is None else round(fleet.standby_w, 1),
                "held": None if plan is None else plan.held,
            }
            if plan is not None:
                entry["decided"] = [
                    {"in_s": o, "replicas": n}
                    for o, n in zip(self._offsets, self._decided.get(region.name, []), strict=True)
                ]
                entry["inputs"] = {
                    "in_s": self._offsets if plan.intensity else [],
                    "intensity_g_per_kwh": plan.intensity,
                    "price_usd_per_kwh": plan.price,
                    "score": plan.score,
                    "carbon": plan.carbon,
                }
            out.append(entry)
        updated = self._updated
        return {
            "object": "fleet",
            "updated_at": None if updated is None else updated[1].isoformat(),
            "age_s": None if updated is None else round(self._clock() - updated[0], 1),
            "interval_s": live.config.fleet.interval_s,
            "target_utilization": live.config.fleet.target_utilization,
            "weight": live.config.policy.weight,
            "error": self._error,
            "load": self._load,
            "regions": out,
        }


def _matches(region: Region, patterns: tuple[str, ...]) -> bool:
    """Whether a request allowed ``patterns`` (region names or residency tags, globs; none:
    anywhere) may run in ``region``: the rule of :meth:`router.policy.Candidates.allowed`."""
    if not patterns:
        return True
    names = (region.name, *region.residency)
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)
