"""The request path's domain logic, without Ray: tenants, request validation, the carbon view,
replica state, the routing decision and the bill. ``router.serve_app`` wraps it in Ray Serve.

Errors on this path are :class:`ApiError` (an HTTP status and an OpenAI-format body).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import orjson

from forecasting.energy import EnergyPredictor, OutputLengths, ReplicaProfile
from forecasting.errors import CarbonSourceError
from forecasting.sources.base import CarbonSource
from regions.backends import CompletionRequest
from regions.config import Config, Region, Replica, Tenant
from router.billing import PriceSchedule, bill_line, tariff_for
from router.errors import RouterError
from router.ledger import LedgerRow
from router.policy import Candidates, Decision, NoCandidateError, Policy, make_policy
from router.preference import Preference, PreferenceError, parse_preference
from router.scheduler import PlanError, SlotBook, plan, slot_scores, worth_waiting

log = logging.getLogger(__name__)

ADMIN_KEY_ENV = "CARBON_ROUTER_ADMIN_KEY"
MAX_BODY_BYTES = 1 << 20
MAX_TOKENS_CEILING = 1024


class ApiError(RouterError):
    """An HTTP error with an OpenAI-style body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = headers or {}


# ---- tenants -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool


class Tenants:
    """API keys to tenants; keys are compared as sha256 digests in constant time."""

    def __init__(self, tenants: list[Tenant], env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        self._entries: list[tuple[bytes, Tenant]] = [
            (bytes.fromhex(h), t) for t in tenants for h in t.api_key_sha256
        ]
        admin = env.get(ADMIN_KEY_ENV)
        self._admin_digest = hashlib.sha256(admin.encode()).digest() if admin else None

    def authenticate(self, authorization: str | None) -> Caller:
        if not authorization or not authorization.startswith("Bearer "):
            raise ApiError(
                401,
                "missing API key: send 'Authorization: Bearer <key>'",
                type_="authentication_error",
                code="invalid_api_key",
            )
        digest = hashlib.sha256(authorization[7:].strip().encode()).digest()
        found: Tenant | None = None
        for stored, tenant in self._entries:  # every entry is compared: no early exit
            if hmac.compare_digest(stored, digest):
                found = tenant
        if self._admin_digest is not None and hmac.compare_digest(self._admin_digest, digest):
            return Caller("admin", True)
        if found is None:
            raise ApiError(
                401, "invalid API key", type_="authentication_error", code="invalid_api_key"
            )
        return Caller(found.name, found.admin)


# ---- budgets ---------------------------------------------------------------------------------


def period_start(now: datetime, period: str) -> datetime:
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day if period == "day" else day.replace(day=1)


def period_end(start: datetime, period: str) -> datetime:
    if period == "day":
        return start + timedelta(days=1)
    return start.replace(year=start.year + (start.month == 12), month=start.month % 12 + 1)


@dataclass
class Spend:
    since: datetime
    kwh: float = 0.0
    co2_g: float = 0.0
    usd: float = 0.0


class Budgets:
    """Each tenant's spend in its budget period (kWh, g CO2e, $), checked before a request runs.

    Totals start from the ledger and grow with every billed row; a request whose predicted
    spend would cross a limit is refused with 402 and the time the budget resets.
    """

    def __init__(self, tenants: list[Tenant]) -> None:
        self.limits = {t.name: t.budget for t in tenants if t.budget is not None}
        self.spend: dict[str, Spend] = {}

    def _current(self, tenant: str, now: datetime) -> Spend:
        budget = self.limits[tenant]
        start = period_start(now, budget.period)
        sp = self.spend.get(tenant)
        if sp is None or sp.since != start:
            sp = self.spend[tenant] = Spend(start)
        return sp

    def load(self, tenant: str, rows: list[LedgerRow], now: datetime) -> None:
        if tenant not in self.limits:
            return
        sp = self._current(tenant, now)
        sp.kwh = sum(r.kwh_billed for r in rows)
        sp.co2_g = sum(r.carbon_g for r in rows)
        sp.usd = sum(r.cost_usd for r in rows)

    def check(self, tenant: str, kwh: float, co2_g: float, usd: float, now: datetime) -> None:
        budget = self.limits.get(tenant)
        if budget is None:
            return
        sp = self._current(tenant, now)
        reset = period_end(sp.since, budget.period).isoformat()
        for name, used, add, limit, unit in (
            ("energy", sp.kwh, kwh, budget.kwh, "kWh"),
            ("carbon", sp.co2_g, co2_g, budget.co2_g, "g CO2e"),
            ("cost", sp.usd, usd, budget.usd, "USD"),
        ):
            if limit is not None and used + add > limit:
                raise ApiError(
                    402,
                    f"{name} budget of tenant {tenant} exceeded: {used:.6g} of {limit:g} {unit} "
                    f"used this {budget.period}, this request needs about {add:.3g} more; the "
                    f"budget resets at {reset}",
                    type_="insufficient_quota", code="budget_exceeded",
                    headers={"X-Budget-Reset": reset},
                )  # fmt: skip

    def add(self, row: LedgerRow, now: datetime) -> None:
        if row.tenant in self.limits:
            sp = self._current(row.tenant, now)
            sp.kwh += row.kwh_billed
            sp.co2_g += row.carbon_g
            sp.usd += row.cost_usd


# ---- request bodies ------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedRequest:
    model: str
    stream: bool
    include_usage: bool
    completion: CompletionRequest
    chat: bool


def parse_body(
    raw: bytes, *, chat: bool, max_tokens_ceiling: int = MAX_TOKENS_CEILING
) -> ParsedRequest:
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes")
    try:
        body = orjson.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")

    def field_(
        name: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False
    ) -> Any:
        if name not in body or body[name] is None:
            if required:
                raise ApiError(400, f"'{name}' is required", param=name)
            return default
        v = body[name]
        if not isinstance(v, kind) or (
            isinstance(v, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
        ):
            raise ApiError(400, f"'{name}' has the wrong type", param=name)
        return v

    model = field_("model", str, required=True)
    max_tokens = field_("max_completion_tokens", int) or field_("max_tokens", int, 256)
    if not 1 <= max_tokens <= max_tokens_ceiling:
        raise ApiError(
            400,
            f"'max_tokens' must be 1..{max_tokens_ceiling}, got {max_tokens}",
            param="max_tokens",
        )
    temperature = float(field_("temperature", (int, float), 0.7))
    if not 0 <= temperature <= 2:
        raise ApiError(400, "'temperature' must be 0..2", param="temperature")
    top_p = float(field_("top_p", (int, float), 1.0))
    stop = field_("stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    seed = field_("seed", int)
    stream = bool(field_("stream", bool, False))
    opts = field_("stream_options", dict, {})
    if chat:
        messages = field_("messages", list, required=True)
        if not messages or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ApiError(
                400,
                "'messages' must be a non-empty list of {role, content} strings",
                param="messages",
            )
        req = CompletionRequest(
            messages=[{"role": m["role"], "content": m["content"]} for m in messages],
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
        )
    else:
        prompt = field_("prompt", str, required=True)
        req = CompletionRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
        )
    return ParsedRequest(model, stream, bool(opts.get("include_usage", True)), req, chat)


# ---- carbon and replica state -------------------------------------------------------------


@dataclass
class CarbonReading:
    g_per_kwh: float
    signal: str
    stale: bool
    source: str
    age_s: float


class CarbonView:
    """Each region's intensity now, cached for ``ttl_s``. On a source failure it keeps the
    last value (marked stale) and, lacking one, uses the forecast; it never invents a value."""

    def __init__(
        self,
        regions: list[Region],
        sources: dict[str, CarbonSource],
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.regions = regions
        self.sources = sources
        self.ttl_s = ttl_s
        self._clock = clock
        self._values: dict[str, tuple[float, CarbonReading]] = {}

    async def get(self, region: Region) -> CarbonReading:
        now = self._clock()
        cached = self._values.get(region.name)
        if cached and now - cached[0] < self.ttl_s:
            return cached[1]
        src = self.sources[region.carbon_source]
        try:
            latest = await src.latest(region.zone)
            reading = CarbonReading(
                latest.g_per_kwh, latest.signal, latest.stale, src.name, latest.age_s
            )
        except CarbonSourceError as e:
            if cached:
                old = cached[1]
                reading = CarbonReading(
                    old.g_per_kwh, old.signal, True, old.source, old.age_s + now - cached[0]
                )
                log.warning("%s; using the last value, %.0f s old", e, reading.age_s)
            else:
                try:
                    fc = await src.forecast(region.zone, 1)
                except CarbonSourceError:
                    raise ApiError(
                        503,
                        f"no carbon intensity for region {region.name}: {e}",
                        type_="server_error",
                        code="carbon_unavailable",
                    ) from e
                reading = CarbonReading(
                    float(fc.g_per_kwh.iloc[0]), fc.signal, True, f"{src.name} forecast", 0.0
                )
        self._values[region.name] = (now, reading)
        return reading


@dataclass
class ReplicaState:
    replica: Replica
    region: Region
    profile: ReplicaProfile
    prices: PriceSchedule
    active: int = 0
    healthy: bool = True
    cooldown_until: float = 0.0
    service_s_per_token: float = 0.0

    def usable(self, now: float) -> bool:
        return self.healthy and now >= self.cooldown_until


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
    _forecasts: dict[tuple[str, int], tuple[float, Any]] = field(default_factory=dict)
    _book: SlotBook = field(default_factory=lambda: SlotBook(np.zeros(0)))
    _book_hour: datetime | None = None
    _rng: np.random.Generator = field(default_factory=np.random.default_rng)
    _prefs: dict[str | None, Preference] = field(default_factory=dict)  # parsed headers
    _static: dict[str, Any] | None = None

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
        )
        for region in config.regions:
            prices = PriceSchedule(region.price, base_dir=base_dir)
            for rep in region.replicas:
                router.states.append(ReplicaState(rep, region, profile_of(rep), prices))
        router._book = SlotBook(
            np.array([s.replica.max_concurrency * 3600.0 for s in router.states])
        )
        return router

    def preference(self, header: str | None) -> Preference:
        """The parsed header; clients send few distinct ones, so parses are kept (bounded)."""
        pref = self._prefs.get(header)
        if pref is not None:
            return pref
        try:
            pref = parse_preference(header, default_weight=self.config.policy.weight)
        except PreferenceError as e:
            raise ApiError(400, str(e), param="X-Carbon-Preference") from e
        if len(self._prefs) >= 4096:
            self._prefs.clear()
        self._prefs[header] = pref
        return pref

    async def candidates(self, prompt_tokens: int, output_tokens: float) -> Candidates:
        now = self.clock()
        wall = datetime.now(UTC)
        n = len(self.states)
        intensity = np.empty(n)
        price = np.empty(n)
        kwh = np.empty(n)
        service_ms = np.empty(n)
        for i, st in enumerate(self.states):
            intensity[i] = (await self.carbon.get(st.region)).g_per_kwh
            price[i] = st.prices.at(wall)
            kwh[i] = (
                self.predictor.predict_j(
                    st.profile, prompt_tokens, output_tokens, batch=max(1, st.active)
                )
                / 3.6e6
            )
            per_tok = st.service_s_per_token or 1.0 / st.replica.tokens_per_s
            service_ms[i] = output_tokens * per_tok * 1000.0
        load = np.array([st.active / st.replica.max_concurrency for st in self.states])
        queue_ms = np.maximum(0, load - 1) * service_ms
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
            healthy=np.array([s.usable(now) for s in self.states]),
            has_capacity=np.array([s.active < 4 * s.replica.max_concurrency for s in self.states]),
            kwh=kwh,
            pue=static["pue"],
            price_usd_per_kwh=price,
            intensity_g_per_kwh=intensity,
            rtt_ms=static["rtt_ms"],
            queue_wait_ms=queue_ms,
            service_ms=service_ms,
            load=load,
        )

    def decide(self, c: Candidates, pref: Preference, exclude: set[int] = frozenset()) -> Decision:  # type: ignore[assignment]
        if exclude:
            c.healthy = c.healthy & ~np.isin(np.arange(len(c)), list(exclude))
        try:
            return self.policy.rank(c, pref)
        except NoCandidateError as e:
            raise ApiError(503, str(e), type_="server_error", code="no_replica") from e

    async def _forecast(self, region: Region, hours: int) -> Any:
        key = (region.name, hours)
        hit = self._forecasts.get(key)
        if hit and self.clock() - hit[0] < 900:
            return hit[1]
        fc = await self.carbon.sources[region.carbon_source].forecast(region.zone, hours)
        self._forecasts[key] = (self.clock(), fc)
        return fc

    async def plan_deferral(
        self, c: Candidates, pref: Preference, expected_output: float
    ) -> tuple[datetime, int, float, float] | None:
        """``(start_at, replica index, forecast score, score now)`` when waiting pays within
        the request's ``defer`` window, else ``None`` (run now)."""
        horizon = min(48, int(min(pref.defer_s, self.config.policy.max_defer_s) // 3600) + 1)
        ok = c.healthy & c.allowed(pref.regions) & c.has_capacity
        if horizon < 2 or not ok.any():
            return None
        now = datetime.now(UTC)
        hour0 = now.replace(minute=0, second=0, microsecond=0)
        hours = [hour0 + timedelta(hours=k) for k in range(horizon)]
        n = len(self.states)
        intensity = np.full((horizon, n), np.inf)
        price = np.ones((horizon, n))
        for i, st in enumerate(self.states):
            if not ok[i]:
                continue
            try:
                fc = await self._forecast(st.region, horizon)
            except CarbonSourceError as e:
                log.warning(
                    "no forecast for %s (%s): it is not a deferral target", st.region.name, e
                )
                continue
            intensity[0, i] = c.intensity_g_per_kwh[i]  # now is known
            intensity[1:, i] = [fc.at(h) for h in hours[1:]]
            price[:, i] = [st.prices.at(h) for h in hours]
        s = slot_scores(c.kwh, c.pue, price, intensity, pref.weight)
        s[:, ~ok] = np.inf
        s = worth_waiting(s, self.config.policy.defer_min_gain)
        if not np.isfinite(s[1:]).any():
            return None
        work_s = float(c.service_ms.max()) / 1000.0
        try:
            k, r, best = plan(s, first_hour=0, work_s=work_s, book=self._book_for(hour0))
        except PlanError:
            return None
        if k == 0:
            return None
        start = hours[k] + timedelta(seconds=float(self._rng.uniform(0, 600)))
        return start, r, best, float(np.nanmin(s[0]))

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
    ) -> LedgerRow:
        st = self.states[index]
        carbon = await self.carbon.get(st.region)
        return bill_line(
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
        )


def usage_fields(row: LedgerRow) -> dict[str, Any]:
    """What ``usage`` gains beyond the OpenAI token counts."""
    return {
        "energy_kwh": row.kwh_billed,
        "carbon_g": row.carbon_g,
        "cost_usd": row.cost_usd,
        "region": row.region,
        "replica": row.replica,
        "energy_source": row.energy_source,
    }
