"""Replica state and the routing decision: the candidates a request could run on (predicted
energy, price, intensity, latency, load), the policy's choice among them, the deferral plan,
and the price of what a request used."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from forecasting.energy import EnergyPredictor, OutputLengths, ReplicaProfile
from forecasting.errors import ForecastingError
from forecasting.replica_calibration import ReplicaCalibration
from forecasting.replica_model import (
    GpuReplicaModel,
    ReplicaModel,
    ReplicaModelError,
    replica_model,
)
from forecasting.sources.base import CarbonSource, Forecast
from regions.config import Config, Region, Replica
from router.accounting import (
    ATTRIBUTION_METHOD,
    PREDICTION_METHOD,
    Routed,
    embodied_rate,
    prefill_share_j,
)
from router.billing import PriceError, PriceSchedule, bill_line, tariff_for
from router.errors import CarbonUnavailable
from router.ledger import LedgerRow, utc_iso
from router.policy import Candidates, Decision, Policy, carbon_agnostic_baseline, make_policy
from router.preference import Preference, parse_preference
from router.scheduler import PlanError, SlotBook, plan, slot_scores, worth_waiting
from router.service.carbon import CarbonView
from router.service.forecasts import ForecastView, forecast_rows, recent_error_of
from router.service.ports import LoadReport

log = logging.getLogger(__name__)


@dataclass
class ReplicaState:
    replica: Replica
    region: Region
    profile: ReplicaProfile
    prices: PriceSchedule
    active: int = 0  # requests this ingress has in flight there
    healthy: bool = True
    cooldown_until: float = 0.0
    service_s_per_token: float = 0.0
    model: ReplicaModel | None = None  # its physics by running batch (None: not modelled)
    report: LoadReport | None = None  # its last load report (router.service.load)
    report_at: float = -math.inf  # the router's clock when that report was asked for
    active_at_report: int = 0  # ``active`` then
    _itl_s: dict[int, float] = field(default_factory=dict, repr=False)  # by batch joined

    def __post_init__(self) -> None:
        # the figures that stand in for a better source whatever the load: no model, the
        # predictor's average J/token stands in for the marginal energy; a GPU model's prefill
        # time is a compute-bound estimate, not a measurement
        fixed: tuple[str, ...] = ("energy",) if self.model is None else ()
        fixed += ("prefill",) if isinstance(self.model, GpuReplicaModel) else ()
        self._estimated = (fixed, ("load", *fixed))
        self._max_batch = self.model.max_batch if self.model is not None else 0

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.cooldown_until

    def in_flight(self, now: float, fresh_s: float) -> tuple[int, bool]:
        """Requests running or queued on the replica, and whether that is estimated: its last
        report if asked for no more than ``fresh_s`` ago, plus the requests this ingress sent
        there less those it saw end since; else this ingress's own count (estimated: other
        ingresses' requests are missing, and its own may still be queued or already done)."""
        r = self.report
        if r is not None and now - self.report_at <= fresh_s:
            return max(0, r.running + r.waiting + self.active - self.active_at_report), False
        return self.active, True

    def estimated(self, load_estimated: bool) -> tuple[str, ...]:
        """The figures of this replica's candidacy that are estimates (see Decision)."""
        return self._estimated[load_estimated]

    def prefill_ms(self, prompt_tokens: int) -> float:
        """ms to prefill ``prompt_tokens`` (NaN: no model)."""
        if self.model is None:
            return float("nan")
        return self.model.prefill_s(prompt_tokens) * 1000.0

    def _itl(self, batch: int) -> float:
        itl = self._itl_s.get(batch)
        if itl is None:
            assert self.model is not None
            itl = self._itl_s[batch] = self.model.itl_s(batch)
        return itl

    def tpot_ms(self, active: int) -> float:
        """ms per output token for a request joining its ``active`` running sequences (at
        most its batch limit: beyond it a request queues, then decodes in a full batch)."""
        if self.model is None:
            return float("nan")
        return self._itl(min(active + 1, self._max_batch)) * 1000.0

    def slowdown(self, active: int) -> float:
        """How many times slower than alone a request decodes here with ``active`` requests
        ahead (ITL at the batch it joins over a lone sequence's; past the batch limit, also
        times the full batches it waits for); without a model, 1 + load."""
        if self.model is None:
            return 1.0 + active / self.replica.max_concurrency
        joined, top = active + 1, self._max_batch
        slow = self._itl(min(joined, top)) / self._itl(1)
        return slow * joined / top if joined > top else slow

    def queue_ms(self, active: int, output_tokens: float) -> float:
        """ms a request waits for a slot behind ``active`` requests: a modelled replica runs
        ``max_batch`` at once, and each of those ahead beyond it waits for one to end (a full
        batch ends requests of ``output_tokens`` at its decode rate); without a model, the
        configured rate's service time by the load beyond 1."""
        m = self.model
        if m is None:
            load = active / self.replica.max_concurrency
            per_tok = self.service_s_per_token or 1.0 / self.replica.tokens_per_s
            return max(0.0, load - 1.0) * output_tokens * per_tok * 1000.0
        ahead = active + 1 - self._max_batch
        if ahead <= 0:
            return 0.0
        return ahead * output_tokens / m.decode_tokens_per_s(self._max_batch) * 1000.0


_CALIBRATION: ReplicaCalibration | None = None


def gpu_calibration() -> ReplicaCalibration:
    """The ML.ENERGY calibration of GPU replicas, built once per process (a reload reuses it)."""
    global _CALIBRATION
    if _CALIBRATION is None:
        _CALIBRATION = ReplicaCalibration.from_mlenergy()
    return _CALIBRATION


def model_of(rep: Replica) -> ReplicaModel | None:
    """The replica's model, or None (said in the log) when it cannot be built: a GPU model
    with no parameter count, say. Requests bounding the time per token then avoid it."""
    try:
        return replica_model(rep, gpu_calibration() if rep.gpu.type != "cpu" else None)
    except ReplicaModelError as e:
        log.warning("replica %s has no replica model: %s", rep.name, e)
        return None


def profile_of(rep: Replica) -> ReplicaProfile:
    if rep.gpu.type == "cpu":
        return ReplicaProfile(
            name=rep.name,
            model=rep.backend.model,
            gpu="cpu",
            cpu_watts=rep.cpu_watts_per_core * 2,
            tokens_per_s=rep.tokens_per_s,
            prefill_weight=rep.prefill_weight,
        )
    return ReplicaProfile(
        name=rep.name,
        model=rep.backend.model,
        gpu=rep.gpu.type,
        gpu_count=rep.gpu.count,
        total_params_b=rep.model_params_b or 8.0,
        prefill_weight=rep.prefill_weight,
    )


@dataclass
class Router:
    """Chooses a replica for each request and prices what it used."""

    config: Config
    carbon: CarbonView
    predictor: EnergyPredictor
    policy: Policy
    cooldown_s: float = 30.0
    lengths: OutputLengths = field(default_factory=OutputLengths)
    clock: Callable[[], float] = time.monotonic
    states: list[ReplicaState] = field(default_factory=list)
    # deferral's forecasts, refreshed by the service's background loop (None: built without)
    forecasts: ForecastView | None = None
    marginal_forecasts: ForecastView | None = None
    _book: SlotBook = field(default_factory=lambda: SlotBook(np.zeros(0)))
    _book_hour: datetime | None = None
    _rng: np.random.Generator = field(default_factory=np.random.default_rng)
    _prefs: dict[str | None, Preference] = field(default_factory=dict)  # parsed headers
    _static: dict[str, Any] | None = None
    _models: frozenset[str] | None = None
    _embodied: list[tuple[float, str]] = field(default_factory=list)  # per replica
    # a marginal signal per region that has one (Region.marginal_source), read through its own
    # view: regions as that source names them
    marginal: CarbonView | None = None
    _marginal_regions: dict[str, Region] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        config: Config,
        sources: dict[str, CarbonSource],
        predictor: EnergyPredictor,
        base_dir: Any = None,
    ) -> Router:
        router = cls(
            config,
            CarbonView(config.regions, sources),
            predictor,
            make_policy(config.policy.name, tie_tolerance=config.policy.tie_tolerance),
            cooldown_s=config.policy.cooldown_s,
        )
        for region in config.regions:
            prices = PriceSchedule(region.price, base_dir=base_dir)
            for rep in region.replicas:
                router.states.append(
                    ReplicaState(rep, region, profile_of(rep), prices, model=model_of(rep))
                )
        router._book = SlotBook(
            np.array([s.replica.max_concurrency * 3600.0 for s in router.states])
        )
        router._embodied = [embodied_rate(s.replica, config.audit.embodied) for s in router.states]
        router._marginal_regions = {
            r.name: r.model_copy(
                update={"carbon_source": r.marginal_source, "zone": r.marginal_zone or r.zone}
            )
            for r in config.regions
            if r.marginal_source is not None
        }
        if router._marginal_regions:
            router.marginal = CarbonView(list(router._marginal_regions.values()), sources)
            router.marginal_forecasts = ForecastView(
                list(router._marginal_regions.values()), sources
            )
        router.forecasts = ForecastView(config.regions, sources, error_of=recent_error_of)
        return router

    @property
    def decides_on_marginal(self) -> bool:
        return self.config.policy.decision_signal == "marginal"

    async def marginal_g_per_kwh(self, region: Region) -> float | None:
        """The region's marginal signal now, for its receipts; None without one, or when its
        source fails (a receipt then records none: it is never made up)."""
        found = self._marginal_regions.get(region.name)
        if found is None or self.marginal is None:
            return None
        try:
            return (await self.marginal.get(found)).g_per_kwh
        except CarbonUnavailable:
            return None

    @property
    def models(self) -> frozenset[str]:
        """The models the replicas serve."""
        if self._models is None:
            self._models = frozenset(s.replica.backend.model for s in self.states)
        return self._models

    def preference(self, header: str | None) -> Preference:
        """The parsed header; clients send few distinct ones, so parses are kept (bounded)."""
        pref = self._prefs.get(header)
        if pref is not None:
            return pref
        pref = parse_preference(
            header,
            default_weight=self.config.policy.weight,
            default_max_latency_ms=self.config.policy.max_latency_ms,
        )
        if len(self._prefs) >= 4096:
            self._prefs.clear()
        self._prefs[header] = pref
        return pref

    async def candidates(self, prompt_tokens: int, output_tokens: float) -> Candidates:
        """Every replica as a candidate for a request of ``prompt_tokens`` and (expected)
        ``output_tokens``: its energy (the replica model's marginal energy at its load now, or
        the energy predictor's figure without a model), price, intensity and latency. Its load
        is its last report if fresh, else this ingress's own count (``estimated``)."""
        now = self.clock()
        wall = datetime.now(UTC)
        fresh_s = self.config.policy.load_report_s
        n = len(self.states)
        intensity = np.empty(n)
        price = np.empty(n)
        kwh = np.empty(n)
        service_ms = np.empty(n)
        queue_ms = np.empty(n)
        slowdown = np.empty(n)
        load = np.empty(n)
        has_capacity = np.empty(n, dtype=bool)
        ahead_tokens = self.lengths.prior_tokens  # what the requests ahead in a queue will say
        actives: list[int] = []
        estimated: list[tuple[str, ...]] = []
        missing: dict[str, str] = {}  # a region without data is unavailable, not the service
        billed = np.empty(n) if self.decides_on_marginal else intensity
        for i, st in enumerate(self.states):
            try:
                billed[i] = (await self.carbon.get(st.region)).g_per_kwh
                if self.decides_on_marginal:  # decided on the marginal signal, billed on both
                    assert self.marginal is not None  # the config requires one per region
                    marginal = self._marginal_regions[st.region.name]
                    intensity[i] = (await self.marginal.get(marginal)).g_per_kwh
                price[i] = st.prices.at(wall)
            except (CarbonUnavailable, PriceError) as e:
                missing[st.region.name] = str(e)
                intensity[i], billed[i], price[i] = np.inf, np.inf, np.inf
        # loads are read after the last await, so requests admitted together each see those
        # started before them (a region's first carbon fetch holds them all up)
        seen = self.clock()
        for i, st in enumerate(self.states):
            active, guessed = st.in_flight(seen, fresh_s)
            actives.append(active)
            estimated.append(st.estimated(guessed))
            if st.model is not None:
                kwh[i] = st.model.marginal_j(active, prompt_tokens, output_tokens) / 3.6e6
            else:
                kwh[i] = self._predicted_j(st, prompt_tokens, output_tokens, active) / 3.6e6
            per_tok = st.service_s_per_token or 1.0 / st.replica.tokens_per_s
            service_ms[i] = output_tokens * per_tok * 1000.0
            queue_ms[i] = st.queue_ms(active, ahead_tokens)
            slowdown[i] = st.slowdown(active)
            load[i] = active / st.replica.max_concurrency
            has_capacity[i] = active < 4 * st.replica.max_concurrency
        if self._static is None:  # what does not change while this router lives
            self._static = {
                "names": [s.replica.name for s in self.states],
                "regions": [s.region.name for s in self.states],
                "residency": [tuple(s.region.residency) for s in self.states],
                "pue": np.array([s.region.pue for s in self.states]),
                "rtt_ms": np.array([s.region.rtt_ms for s in self.states]),
            }
        static = self._static
        return Candidates(
            names=static["names"],
            regions=static["regions"],
            residency=static["residency"],
            healthy=np.array([s.usable(now) and s.region.name not in missing for s in self.states]),
            has_capacity=has_capacity,
            kwh=kwh,
            pue=static["pue"],
            price_usd_per_kwh=price,
            intensity_g_per_kwh=intensity,
            rtt_ms=static["rtt_ms"],
            queue_wait_ms=queue_ms,
            service_ms=service_ms,
            load=load,
            unavailable=missing,
            prefill_of=self._each(actives, lambda st, _: st.prefill_ms(prompt_tokens)),
            tpot_of=self._each(actives, lambda st, active: st.tpot_ms(active)),
            billed_kwh_of=self._each(
                actives,
                lambda st, active: (
                    self._predicted_j(st, prompt_tokens, output_tokens, active) / 3.6e6
                ),
            ),
            slowdown=slowdown,
            estimated=estimated,
            billed_intensity_g_per_kwh=billed if self.decides_on_marginal else None,
        )

    def _predicted_j(self, st: ReplicaState, prompt: int, output: float, active: int) -> float:
        """The energy predictor's figure: J/token averaged over the batch, static share in."""
        return self.predictor.predict_j(st.profile, prompt, output, batch=max(1, active))

    def _each(
        self, actives: list[int], f: Callable[[ReplicaState, int], float]
    ) -> Callable[[], np.ndarray]:
        """``f`` of each replica and its load seen now, evaluated only if a request asks."""
        states = self.states
        return lambda: np.array([f(st, a) for st, a in zip(states, actives, strict=True)])

    def decide(self, c: Candidates, pref: Preference, exclude: set[int] = frozenset()) -> Decision:  # type: ignore[assignment]
        if exclude:
            c.healthy = c.healthy & ~np.isin(np.arange(len(c)), list(exclude))
        return self.policy.rank(c, pref)

    async def _forecast(self, region: Region) -> Forecast:
        """The region's forecast as the background loop last made it (the first awaited)."""
        if self.decides_on_marginal:  # the hours ahead in the signal the hour now is in
            assert self.marginal_forecasts is not None
            return await self.marginal_forecasts.get(self._marginal_regions[region.name])
        if self.forecasts is None:
            self.forecasts = ForecastView(self.config.regions, self.carbon.sources)
        return await self.forecasts.get(region)

    async def plan_deferral(
        self, c: Candidates, pref: Preference, expected_output: float
    ) -> tuple[datetime, int, float, float] | None:
        """``(start_at, replica index, forecast score, g/kWh now)`` when waiting pays within
        the request's ``defer`` window, else ``None`` (run now); g/kWh now: intensity x PUE
        of the replica it would run on now (what a job planned again is held to)."""
        horizon = min(48, int(min(pref.defer_s, self.config.policy.max_defer_s) // 3600) + 1)
        ok = c.healthy & c.allowed(pref.regions) & c.has_capacity
        if horizon < 2 or not ok.any():
            return None
        now = datetime.now(UTC)
        hour0 = now.replace(minute=0, second=0, microsecond=0)
        hours = [hour0 + timedelta(hours=k) for k in range(horizon)]
        n = len(self.states)
        intensity = np.full((horizon, n), np.inf)
        upper = np.full((horizon, n), np.inf)
        q = self.config.policy.defer_quantile
        price = np.ones((horizon, n))
        for i, st in enumerate(self.states):
            if not ok[i]:
                continue
            # now is known, forecast or not: a region without a forecast is no later target
            # but still runs the request now (else the best now is a dirtier region's)
            intensity[0, i] = upper[0, i] = c.intensity_g_per_kwh[i]
            price[:, i] = [st.prices.at(h) for h in hours]
            try:
                fc = await self._forecast(st.region)
                # hours the forecast does not cover (past its end, before its start) are no
                # targets; the gain must hold at the stated quantile, read between the band's
                # columns (a source without a band, an API's point forecast, is taken at its
                # word)
                ahead, bound = forecast_rows(fc, hours[1:], q)
            except ForecastingError as e:  # unavailable, or no model can be made
                log.warning(
                    "no forecast for %s (%s): it is not a deferral target", st.region.name, e
                )
                continue
            intensity[1:, i] = ahead
            upper[1:, i] = bound
        # the batch a request joins hours from now is not today's: the predictor's figure
        # (an average over the batch), not the marginal energy at the load now
        s = slot_scores(c.billed_kwh, c.pue, price, intensity, pref.weight)
        s[:, ~ok] = np.inf
        gate = slot_scores(c.billed_kwh, c.pue, price, upper, pref.weight)
        gate[:, ~ok] = np.inf
        s = worth_waiting(s, self.config.policy.defer_min_gain, gate=gate)
        if not np.isfinite(s[1:]).any():
            return None
        work_s = float(c.service_ms.max()) / 1000.0
        try:
            k, r, best = plan(s, first_hour=0, work_s=work_s, book=self._book_for(hour0))
        except PlanError:
            return None
        if k == 0:
            return None
        # spread over the hour's first 10 minutes, never past the request's deadline
        latest = now + timedelta(seconds=min(pref.defer_s, self.config.policy.max_defer_s))
        spread_s = min(600.0, max(0.0, (latest - hours[k]).total_seconds()))
        start = hours[k] + timedelta(seconds=float(self._rng.uniform(0, spread_s)))
        now_i = int(np.argmin(s[0]))  # the best replica now (the only finite one in row 0)
        return start, r, best, float(c.pue[now_i] * c.intensity_g_per_kwh[now_i])

    def _book_for(self, hour0: datetime) -> SlotBook:
        """Bookings per (hour, replica), shifted as hours pass (in memory: a restart forgets
        the bookings, not the jobs)."""
        if self._book_hour != hour0:
            shift = (
                0
                if self._book_hour is None
                else int((hour0 - self._book_hour).total_seconds() // 3600)
            )
            self._book.booked = {
                (h - shift, r): v for (h, r), v in self._book.booked.items() if h - shift >= 0
            }
            self._book_hour = hour0
        return self._book

    def failed(self, index: int) -> None:
        self.states[index].cooldown_until = self.clock() + self.cooldown_s

    def baseline(self, c: Candidates, pref: Preference, chosen: int) -> tuple[str, float]:
        """The carbon-agnostic choice for this request at this moment: power of two over the
        replicas its preference allows that are up and have an intensity."""
        ok = c.healthy & c.allowed(pref.regions) & np.isfinite(c.billing_intensity)
        return carbon_agnostic_baseline(c, ok, chosen)

    def receipt_rates(self, index: int, routed: Routed | None) -> dict[str, float]:
        """The receipt's figures per unit on replica ``index``: static watts, embodied g per
        second held, the baseline's g per kWh (for a measurement that replaces a prediction:
        :func:`router.billing.rebill`)."""
        st = self.states[index]
        rates = {
            "static_w": st.model.static_power_w if st.model is not None else 0.0,
            "embodied_g_per_s": self._embodied[index][0],
        }
        if routed is not None:
            rates["baseline_g_per_kwh"] = routed.baseline_g_per_kwh
        return rates

    async def bill(
        self,
        *,
        request_id: str,
        tenant: str,
        index: int,
        started_at: datetime,
        ended_at: datetime,
        prompt_tokens: int,
        completion_tokens: int,
        energy_j: float,
        energy_source: str,
        first_token_at: datetime | None = None,
        prefill_j: float | None = None,
        held_s: float | None = None,
        routed: Routed | None = None,
    ) -> LedgerRow:
        """The request's ledger row: its energy priced at its replica's price, PUE and
        intensity now, with its receipt's figures. ``prefill_j`` and ``held_s`` come from the
        meter's attribution; without them (a predicted figure) they are estimated by the same
        work-share rule and the replica model."""
        st = self.states[index]
        carbon = await self.carbon.get(st.region)
        marginal = await self.marginal_g_per_kwh(st.region) if self.marginal else None
        metered = energy_source != "predicted"  # attributed from the replica's meter
        if prefill_j is None or not math.isfinite(prefill_j):
            prefill_j = prefill_share_j(energy_j, prompt_tokens, completion_tokens)
        if held_s is not None and not (math.isfinite(held_s) and held_s >= 0):
            held_s = None  # a meter's nonsense: estimated like a prediction's
        if held_s is None:  # its share of the replica's time, in its energy's share
            if st.model is not None:
                batch = min(max(1, st.active), st.model.max_batch)  # queued ones wait: not drawing
                held_s = energy_j / max(st.model.power_w(batch), 1e-9)
            else:
                held_s = (ended_at - started_at).total_seconds() / max(1, st.active + 1)
        static_w = st.model.static_power_w if st.model is not None else 0.0
        rate_g_per_s, basis = self._embodied[index]
        row = bill_line(
            request_id=request_id,
            tenant=tenant,
            region=st.region.name,
            replica=st.replica.name,
            model=st.replica.backend.model,
            started_at=started_at,
            ended_at=ended_at,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            energy_j=energy_j,
            energy_source=energy_source,
            pue=st.region.pue,
            intensity_g_per_kwh=carbon.g_per_kwh,
            signal=carbon.signal,
            carbon_stale=carbon.stale,
            price_usd_per_kwh=st.prices.at(started_at),
            tariff=tariff_for(self.config.billing),
            receipt={
                "zone": st.region.zone,
                "first_token_at": None if first_token_at is None else utc_iso(first_token_at),
                "prefill_j": min(max(prefill_j, 0.0), energy_j),
                "static_j": min(static_w * held_s, energy_j),
                "held_s": max(held_s, 0.0),
                "meter": st.replica.meter if metered else "energy-predictor",
                "method": ATTRIBUTION_METHOD if metered else PREDICTION_METHOD,
                "intensity_at": carbon.at_iso,
                "intensity_source": f"{carbon.source} ({st.region.zone})",
                "intensity_kind": carbon.kind,
                "marginal_g_per_kwh": marginal,
                "embodied_g": rate_g_per_s * max(held_s, 0.0),
                "embodied_basis": basis,
                **(
                    {
                        "policy": routed.policy,
                        "binding": routed.binding,
                        "baseline_replica": routed.baseline_replica,
                        "baseline_carbon_g": energy_j / 3.6e6 * routed.baseline_g_per_kwh,
                    }
                    if routed is not None
                    else {}
                ),
            },
        )
        return row
