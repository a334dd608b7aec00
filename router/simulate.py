"""``router simulate``: offline what-if runs of routing policies over a trace and real carbon data.

How a run works (all hourly, all vectorized over requests):

1. Traffic. The Azure LLM traces cover one hour. Each simulated hour draws a Poisson number of
   requests with mean ``requests_per_hour x (1 + a cos(2 pi (hour - 14) / 24))`` (a daily shape
   peaking at 14:00 UTC, amplitude ``diurnal_amplitude``) and samples that many requests of the
   trace with replacement, keeping each one's offset in its hour and its token counts. A JSONL
   trace is used as it is. ``deferrable_share`` of the requests may wait ``defer_window_h``.
2. World. Actual intensity per region and hour from the historical files (as of each hour),
   prices from the config's schedules, day-ahead forecasts issued every hour by
   :class:`CarbonForecaster` fitted on the data before the period (the oracle sees actuals).
   Energy per request is the energy predictor's: J/token of the replica (GPU prior at half its
   concurrency) x (output + prefill_weight x prompt tokens).
3. Routing. Immediate requests of an hour are ranked with :func:`router.policy.score` (the live
   router's code) and filled into replicas in score order up to ``target_utilization`` of each
   replica's hourly capacity, then spill to the next; near-ties share by capacity. Round-robin
   cycles. Deferred requests are planned by :func:`router.scheduler.plan`'s rule into the
   (hour, replica) with the best forecast score and room left, and start at a random time in
   that hour.
4. Queueing. Each replica has ``max_concurrency`` slots of ``tokens_per_s / max_concurrency``
   tokens/s; requests take slots in turn and wait when theirs is busy (a FIFO queue per slot,
   solved exactly by Lindley's recursion). Latency and SLO violations come out of this.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecasting.datasets import dataset_path
from forecasting.errors import ForecastingError
from forecasting.forecaster import CarbonForecaster
from regions.config import Config
from router.billing import J_PER_KWH, PriceSchedule
from router.errors import RouterError
from router.policy import POLICIES, score
from router.scheduler import worth_waiting

log = logging.getLogger(__name__)

TRACES = {
    "azure_conv": "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
    "azure_code": "traces/azure_llm_2023/AzureLLMInferenceTrace_code.csv",
}
WEIGHTS = {"cheapest": 0.0, "greenest": 1.0, "oracle": 1.0, "price_carbon": None}


class SimulationError(RouterError):
    """Bad simulation input: trace columns, carbon coverage, policy names."""


# ---- inputs ----------------------------------------------------------------------------------


@dataclass
class Requests:
    arrival_s: np.ndarray  # float64 seconds since the period start, sorted
    prompt: np.ndarray  # int32
    output: np.ndarray  # int32
    deferrable: np.ndarray  # bool
    window_h: np.ndarray  # int16 hours each deferrable request may wait

    def __len__(self) -> int:
        return len(self.arrival_s)


def load_trace(trace: str) -> pd.DataFrame:
    """A trace as ``offset_s, prompt_tokens, output_tokens`` (Azure CSV or JSONL)."""
    if trace in TRACES:
        df = pd.read_csv(dataset_path(TRACES[trace]))
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if missing := need - set(df.columns):
            raise SimulationError(f"trace {trace}: missing columns {sorted(missing)}")
        t = pd.to_datetime(df["TIMESTAMP"], format="mixed", utc=True)
        return pd.DataFrame(
            {
                "offset_s": (t - t.min()).dt.total_seconds().to_numpy() % 3600.0,
                "prompt_tokens": df["ContextTokens"].to_numpy(),
                "output_tokens": df["GeneratedTokens"].to_numpy(),
            }
        )
    path = Path(trace)
    if path.suffix != ".jsonl":
        raise SimulationError(
            f"unknown trace {trace!r}: use azure_conv, azure_code, synthetic or a .jsonl file"
        )
    try:
        df = pd.read_json(path, lines=True)
    except (OSError, ValueError) as e:
        raise SimulationError(f"{path}: cannot read the JSONL trace: {e}") from e
    need = {"time", "prompt_tokens", "output_tokens"}
    if missing := need - set(df.columns):
        raise SimulationError(
            f"{path}: missing columns {sorted(missing)}; each line needs time (ISO or seconds), "
            "prompt_tokens, output_tokens (tenant and preference optional)"
        )
    if df[["prompt_tokens", "output_tokens"]].isna().any().any():
        bad = int(df[["prompt_tokens", "output_tokens"]].isna().any(axis=1).to_numpy().argmax())
        raise SimulationError(f"{path}:{bad + 1}: prompt_tokens/output_tokens missing")
    return df


def make_requests(cfg: Config, hours: pd.DatetimeIndex, rng: np.random.Generator) -> Requests:
    sim = cfg.simulation
    if sim.trace == "synthetic":
        pool = pd.DataFrame(
            {
                "offset_s": rng.uniform(0, 3600, 10_000),
                "prompt_tokens": np.maximum(1, rng.lognormal(6.6, 0.8, 10_000)).astype(int),
                "output_tokens": np.maximum(1, rng.lognormal(5.0, 0.7, 10_000)).astype(int),
            }
        )
    else:
        pool = load_trace(sim.trace)
    if "time" in pool.columns:  # a JSONL trace, used as it is
        t = pd.to_datetime(pool["time"], utc=True, format="mixed")
        arrival = (t - hours[0]).dt.total_seconds().to_numpy()
        keep = (arrival >= 0) & (arrival < len(hours) * 3600)
        if not keep.any():
            raise SimulationError(f"trace {sim.trace}: no request inside {hours[0]} .. {hours[-1]}")
        pool = pool[keep]
        arrival = arrival[keep]
        order = np.argsort(arrival, kind="stable")
        n = len(order)
        defer = rng.random(n) < sim.deferrable_share
        return Requests(
            arrival[order],
            pool["prompt_tokens"].to_numpy(np.int32)[order],
            pool["output_tokens"].to_numpy(np.int32)[order],
            defer,
            np.full(n, sim.defer_window_h, np.int16),
        )
    hod = hours.hour.to_numpy()
    mean = sim.requests_per_hour * (1 + sim.diurnal_amplitude * np.cos(2 * np.pi * (hod - 14) / 24))
    counts = rng.poisson(mean)
    hour_of = np.repeat(np.arange(len(hours)), counts)
    pick = rng.integers(0, len(pool), len(hour_of))
    arrival = hour_of * 3600.0 + pool["offset_s"].to_numpy()[pick]
    order = np.argsort(arrival, kind="stable")
    n = len(order)
    return Requests(
        arrival[order],
        pool["prompt_tokens"].to_numpy(np.int32)[pick][order],
        pool["output_tokens"].to_numpy(np.int32)[pick][order],
        rng.random(n) < sim.deferrable_share,
        np.full(n, sim.defer_window_h, np.int16),
    )


@dataclass
class World:
    hours: pd.DatetimeIndex
    region_names: list[str]
    zones: list[str]
    replica_names: list[str]
    replica_region: np.ndarray  # [R] region index
    intensity: np.ndarray  # [H, G] actual g/kWh
    forecast: np.ndarray  # [H, W, G] forecast issued at hour h for h .. h + W - 1
    price: np.ndarray  # [H, G] $/kWh
    pue: np.ndarray  # [G]
    rtt_ms: np.ndarray  # [G]
    j_per_token: np.ndarray  # [R]
    prefill_weight: np.ndarray  # [R]
    slots: np.ndarray  # [R]
    slot_rate: np.ndarray  # [R] tokens/s per slot
    forecast_seconds: float = 0.0
    forecast_mape: dict[str, float] = field(default_factory=dict)


def _hourly_actuals(cfg: Config, hours: pd.DatetimeIndex, base_dir: Path) -> dict[str, pd.Series]:
    from forecasting.sources import FileSource, ReplaySource, build_sources

    sources = build_sources(cfg, base_dir=base_dir)
    out = {}
    for region in cfg.regions:
        src = sources[region.carbon_source]
        if isinstance(src, ReplaySource):
            src = src._files
        if not isinstance(src, FileSource):
            raise SimulationError(
                f"region {region.name}: the simulator needs historical files (kind file or "
                f"replay), not {type(src).__name__}"
            )
        full = src.frame(region.zone)
        s = full["g_per_kwh"]
        s = s.groupby(s.index.floor("h")).mean()
        covered = s.reindex(hours)
        if covered.isna().mean() > 0.05:
            raise SimulationError(
                f"region {region.name} (zone {region.zone}): the carbon data covers "
                f"{s.index[0]} .. {s.index[-1]}, missing {covered.isna().mean():.0%} of the period "
                f"{hours[0]} .. {hours[-1]}; choose a period inside the data"
            )
        out[region.zone] = full.assign(g_per_kwh=s.reindex(full.index.floor("h")).to_numpy())
    return out


def build_world(cfg: Config, *, base_dir: Path, cache_dir: Path | None = None) -> World:
    sim = cfg.simulation
    start, end = pd.Timestamp(sim.start, tz="UTC"), pd.Timestamp(sim.end, tz="UTC")
    if end <= start:
        raise SimulationError(f"simulation end {sim.end} must be after start {sim.start}")
    hours = pd.date_range(start, end, freq="h", inclusive="left")
    frames = _hourly_actuals(cfg, hours, base_dir)
    regions = cfg.regions
    w = sim.defer_window_h
    intensity = np.empty((len(hours), len(regions)))
    forecast = np.empty((len(hours), w, len(regions)))
    price = np.empty((len(hours), len(regions)))
    t0 = time.perf_counter()
    mape = {}
    done: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for g, region in enumerate(regions):
        if region.zone not in done:
            frame = frames[region.zone]
            actual = frame["g_per_kwh"].groupby(frame.index.floor("h")).mean().reindex(hours)
            actual = actual.interpolate(limit_direction="both").to_numpy()
            fc = _forecasts(frame, hours, w, region.zone, cache_dir)
            done[region.zone] = (actual, fc)
            target = np.stack([np.roll(actual, -k) for k in range(w)], axis=1)[: len(hours) - w]
            mape[region.zone] = round(
                float(np.mean(np.abs(fc[: len(hours) - w] - target) / target) * 100), 2
            )
        intensity[:, g], forecast[:, :, g] = done[region.zone]
        schedule = PriceSchedule(region.price, base_dir=base_dir)
        price[:, g] = [schedule.at(t.to_pydatetime()) for t in hours]
    fc_s = time.perf_counter() - t0
    replicas = [(g, rep) for g, region in enumerate(regions) for rep in region.replicas]
    if not replicas:
        raise SimulationError("the config has no replicas to simulate")
    jpt = _j_per_token([rep for _, rep in replicas])
    return World(
        hours=hours,
        region_names=[r.name for r in regions],
        zones=[r.zone for r in regions],
        replica_names=[rep.name for _, rep in replicas],
        replica_region=np.array([g for g, _ in replicas]),
        intensity=intensity,
        forecast=forecast,
        price=price,
        pue=np.array([r.pue for r in regions]),
        rtt_ms=np.array([r.rtt_ms for r in regions]),
        j_per_token=jpt,
        prefill_weight=np.array([rep.prefill_weight for _, rep in replicas]),
        slots=np.array([rep.max_concurrency for _, rep in replicas]),
        slot_rate=np.array([rep.tokens_per_s / rep.max_concurrency for _, rep in replicas]),
        forecast_seconds=fc_s,
        forecast_mape=mape,
    )


def _forecasts(
    frame: pd.DataFrame, hours: pd.DatetimeIndex, w: int, zone: str, cache_dir: Path | None
) -> np.ndarray:
    """[H, W] forecasts issued at every hour of the period, from a model fitted before it."""
    key = f"{zone}_{hours[0]:%Y%m%d%H}_{len(hours)}_{w}_{len(frame)}.npy"
    cached = cache_dir / key if cache_dir else None
    if cached is not None and cached.is_file():
        return np.asarray(np.load(cached))
    history = frame[frame.index < hours[0]].iloc[-24 * 365 * 2 :]
    try:
        model = CarbonForecaster(max_horizon_h=w).fit(history)
        table = model.predict_many(frame[frame.index < hours[-1] + pd.Timedelta(hours=w)],
                                   hours, w).to_numpy()  # fmt: skip
    except ForecastingError as e:
        raise SimulationError(f"zone {zone}: cannot forecast the period: {e}") from e
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, table)
    return np.asarray(table)


def _j_per_token(replicas: list[Any]) -> np.ndarray:
    from forecasting.energy import EnergyPredictor, ReplicaProfile

    predictor: EnergyPredictor | None = None
    out = []
    for rep in replicas:
        if rep.gpu.type == "cpu":
            out.append(rep.cpu_watts_per_core * 2 / rep.tokens_per_s)
            continue
        if rep.model_params_b is None:
            raise SimulationError(
                f"replica {rep.name}: set model_params_b (model size in billions) so the "
                "energy predictor can price its tokens"
            )
        predictor = predictor or EnergyPredictor.from_mlenergy()
        profile = ReplicaProfile(name=rep.name, model=rep.backend.model, gpu=rep.gpu.type,
                                 gpu_count=rep.gpu.count, total_params_b=rep.model_params_b,
                                 prefill_weight=0.0)  # fmt: skip
        batch = max(1.0, rep.max_concurrency / 2)
        out.append(predictor.predict_j(profile, 0, 200, batch=batch) / 200)
    return np.array(out)


# ---- one policy --------------------------------------------------------------------------------


@dataclass
class Outcome:
    policy: str
    replica: np.ndarray  # [N]
    start_s: np.ndarray
    wait_s: np.ndarray
    service_s: np.ndarray
    energy_j: np.ndarray
    kwh: np.ndarray
    carbon_g: np.ndarray
    cost_usd: np.ndarray
    token_cost_usd: np.ndarray
    deferred: np.ndarray
    slo_violation: np.ndarray
    latency_ms: np.ndarray  # added: RTT + queue wait
    route_seconds: float
    queue_seconds: float


def parse_policy(spec: str) -> tuple[str, bool]:
    base, _, flag = spec.partition("+")
    if base not in POLICIES or flag not in ("", "defer"):
        raise SimulationError(
            f"unknown policy {spec!r}; choose from {', '.join(sorted(POLICIES))}, "
            "optionally with +defer (oracle always defers, with perfect foresight)"
        )
    return base, flag == "defer" or base == "oracle"


def _water_fill(scores: np.ndarray, demand: np.ndarray, cap: np.ndarray, tie: float) -> np.ndarray:
    """[H, R] share of each hour's demand per replica: best first up to capacity; near-ties
    (within ``tie`` of the best) share by capacity; demand above all capacity by capacity."""
    h_n, r_n = scores.shape
    order = np.argsort(scores, axis=1, kind="stable")
    best = np.take_along_axis(scores, order[:, :1], axis=1)
    ranked_scores = np.take_along_axis(scores, order, axis=1)
    caps = cap[order]  # [H, R]
    tied = ranked_scores <= best * (1 + tie)
    # the tie group acts as one candidate with the summed capacity
    group_cap = np.where(tied, caps, 0).sum(axis=1)
    alloc = np.zeros((h_n, r_n))
    take = np.minimum(demand, group_cap)
    alloc += np.where(tied, caps / np.maximum(group_cap, 1e-12)[:, None] * take[:, None], 0)
    left = demand - take
    rest_caps = np.where(tied, 0, caps)
    before = np.cumsum(rest_caps, axis=1) - rest_caps
    alloc += np.clip(left[:, None] - before, 0, rest_caps)
    over = demand - alloc.sum(axis=1)
    alloc += np.where(
        over[:, None] > 1e-9, caps / caps.sum(axis=1, keepdims=True) * over[:, None], 0
    )
    out = np.empty_like(alloc)
    np.put_along_axis(out, order, alloc, axis=1)
    return np.asarray(out / np.maximum(demand, 1e-12)[:, None])


def _lindley(start: np.ndarray, service: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Finish times of FIFO single-server queues (one per group), by Lindley's recursion:
    finish_n = S_n + max_{j <= n} (a_j - S_{j-1}) within a group, S the cumulative service."""
    span = float(start.max() - start.min() + service.sum() + 1.0) if len(start) else 1.0
    order = np.argsort(group * span + start, kind="stable")  # by (group, start)
    a, s, g = start[order], service[order], group[order]
    cum = np.cumsum(s)
    first = np.r_[True, g[1:] != g[:-1]]
    offset = np.maximum.accumulate(np.where(first, np.arange(len(g)), 0))
    cum_before = cum - s - np.where(offset > 0, cum[offset - 1], 0.0)  # work before, in group
    lift = g * (span * 4)  # keeps the running max from leaking across groups
    run = np.maximum.accumulate((a - cum_before) + lift) - lift
    finish = np.empty_like(a)
    finish[order] = cum_before + s + run
    return np.asarray(finish)


def run_policy(
    spec: str, world: World, req: Requests, cfg: Config, rng: np.random.Generator
) -> Outcome:
    base, defer = parse_policy(spec)
    sim = cfg.simulation
    t0 = time.perf_counter()
    n, r_n = len(req), len(world.replica_names)
    hour = (req.arrival_s // 3600).astype(np.int64)
    h_n = len(world.hours)
    g_of = world.replica_region
    work_tokens = req.output + world.prefill_weight.mean() * req.prompt  # one value per request
    cap_s = world.slots * 3600.0 * sim.target_utilization  # slot-seconds per replica-hour
    fixed = WEIGHTS.get(base)
    weight: float = cfg.policy.weight if fixed is None else fixed
    # per replica static parts of the score (per request it only scales by its tokens)
    kwh_unit = world.j_per_token / J_PER_KWH  # kWh per work token
    immediate = ~(req.deferrable & defer)
    replica = np.empty(n, np.int64)
    start = req.arrival_s.copy()
    # demand in slot-seconds per hour and replica (service time differs per replica)
    if base == "round_robin":
        idx = np.flatnonzero(immediate)
        replica[idx] = np.arange(len(idx)) % r_n
    else:
        if base == "nearest":
            hs = np.broadcast_to(world.rtt_ms[g_of], (h_n, r_n)).astype(float)
        else:
            hs = score(kwh_unit[None, :], world.pue[g_of][None, :], world.price[:, g_of],
                       world.intensity[:, g_of], weight)  # fmt: skip
        inv_rate = float(np.mean(1.0 / world.slot_rate))  # slot-seconds per work token
        demand = inv_rate * np.bincount(
            hour[immediate], weights=work_tokens[immediate], minlength=h_n
        ).astype(float)
        share = _water_fill(hs, demand, cap_s, cfg.policy.tie_tolerance)
        cum = np.cumsum(share, axis=1)
        u = rng.random(n)
        pick = (u[:, None] > cum[hour]).sum(axis=1)
        replica[immediate] = np.minimum(pick[immediate], r_n - 1)
    if defer:
        _plan_deferred(world, req, immediate, replica, start, hour, work_tokens, cap_s, weight,
                       oracle=base == "oracle", rng=rng,
                       min_gain=sim.defer_min_gain)  # fmt: skip
    route_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    service = work_tokens / world.slot_rate[replica]
    # each request takes the next slot of its replica in turn (round-robin over slots)
    span = float(start.max() + 1.0)
    order = np.argsort(replica * span + start, kind="stable")  # by (replica, start)
    rank = np.empty(n, np.int64)
    counts = np.bincount(replica, minlength=r_n)
    first = np.cumsum(counts) - counts
    rank[order] = np.arange(n) - first[replica[order]]
    group = replica * int(world.slots.max()) + rank % world.slots[replica]
    finish = _lindley(start, service, group)
    wait = finish - service - start
    queue_s = time.perf_counter() - t1
    g = g_of[replica]
    h_run = np.minimum((start // 3600).astype(np.int64), h_n - 1)
    energy_j = world.j_per_token[replica] * work_tokens
    kwh = energy_j / J_PER_KWH * world.pue[g]
    carbon = kwh * world.intensity[h_run, g]
    cost = np.maximum(cfg.billing.min_charge_usd,
                      kwh * world.price[h_run, g] * (1 + cfg.billing.markup))  # fmt: skip
    tokens = req.prompt + req.output
    latency_ms = world.rtt_ms[g] + wait * 1000.0
    deferred = ~immediate
    prefill_ms = world.prefill_weight[replica] * req.prompt / world.slot_rate[replica] * 1000.0
    slo = np.where(
        deferred,
        finish > req.arrival_s + req.window_h * 3600.0,  # a deferred request: its window
        latency_ms + prefill_ms > sim.slo_ms,  # now: time to first token
    )
    return Outcome(spec, replica, start, wait, service, energy_j, kwh, carbon, cost,
                   tokens / 1000 * cfg.billing.token_price_usd_per_1k, deferred, slo, latency_ms,
                   route_s, queue_s)  # fmt: skip


def _plan_deferred(
    world: World,
    req: Requests,
    immediate: np.ndarray,
    replica: np.ndarray,
    start: np.ndarray,
    hour: np.ndarray,
    work_tokens: np.ndarray,
    cap_s: np.ndarray,
    weight: float,
    *,
    oracle: bool,
    rng: np.random.Generator,
    min_gain: float,
) -> None:
    """Book deferred requests, arrival hour by arrival hour, into the best forecast slots."""
    h_n, r_n = len(world.hours), len(world.replica_names)
    g_of = world.replica_region
    w = world.forecast.shape[1]
    svc_mean = work_tokens / world.slot_rate.mean()
    booked = np.zeros((h_n + w, r_n))
    imm = np.flatnonzero(immediate)
    np.add.at(booked, (hour[imm], replica[imm]), work_tokens[imm] / world.slot_rate[replica[imm]])
    kwh_unit = world.j_per_token / J_PER_KWH
    deferred = np.flatnonzero(~immediate)
    bounds = np.searchsorted(hour[deferred], np.arange(h_n + 1))
    pue = world.pue[g_of]
    for h in range(h_n):
        ids = deferred[bounds[h] : bounds[h + 1]]
        if not len(ids):
            continue
        k_n = min(w, h_n - h)
        # the current hour's intensity is known (the live router reads it); later hours are
        # the forecast issued now, or the actuals for the oracle
        seen = world.intensity[h : h + k_n] if oracle else world.forecast[h, :k_n].copy()
        seen[0] = world.intensity[h]
        s = score(kwh_unit[None, :], pue[None, :], world.price[h : h + k_n][:, g_of],
                  seen[:, g_of], weight)  # fmt: skip
        s = worth_waiting(s, min_gain)  # the live planner's rule
        now_best = int(np.argmin(s[0]))
        order = np.argsort(s, axis=None, kind="stable")
        order = order[np.isfinite(s.ravel()[order])]
        need = svc_mean[ids]
        free = (cap_s[None, :] - booked[h : h + k_n]).ravel()[order]
        # fill slots best-first: request j goes to the first slot whose free room covers the
        # work booked before it (the requests of one arrival hour share one ranking)
        cum_need = np.cumsum(need)
        cum_free = np.cumsum(np.maximum(free, 0))
        slot_pos = np.searchsorted(cum_free, cum_need, side="left")
        # no room left in any better slot: it runs now, on the best replica for now
        flat = np.where(
            slot_pos < len(order), order[np.minimum(slot_pos, len(order) - 1)], now_best
        )
        k, r = np.divmod(flat, r_n)
        replica[ids] = r
        np.add.at(booked, (h + k, r), need)
        offset = rng.random(len(ids)) * 3000.0
        start[ids] = np.where(k == 0, req.arrival_s[ids], (h + k) * 3600.0 + offset)


# ---- many policies ----------------------------------------------------------------------------


@dataclass
class SimulationResult:
    world: World
    requests: Requests
    outcomes: dict[str, Outcome]
    summary: pd.DataFrame
    by_region: pd.DataFrame
    seconds: float


def summarize(
    world: World, req: Requests, outcomes: dict[str, Outcome]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, regions = [], []
    for name, o in outcomes.items():
        rows.append({
            "policy": name,
            "requests": len(o.kwh),
            "kwh": float(o.kwh.sum()),
            "t_co2e": float(o.carbon_g.sum() / 1e6),
            "energy_tariff_usd": float(o.cost_usd.sum()),
            "token_tariff_usd": float(o.token_cost_usd.sum()),
            "mean_added_latency_ms": float(o.latency_ms[~o.deferred].mean())
            if (~o.deferred).any() else 0.0,
            "p99_added_latency_ms": float(np.percentile(o.latency_ms[~o.deferred], 99))
            if (~o.deferred).any() else 0.0,
            "slo_violations": int(o.slo_violation.sum()),
            "share_deferred": float(o.deferred.mean()),
            "mean_delay_s": float((o.start_s - req.arrival_s)[o.deferred].mean())
            if o.deferred.any() else 0.0,
        })  # fmt: skip
        g = world.replica_region[o.replica]
        for gi, region in enumerate(world.region_names):
            sel = g == gi
            regions.append({"policy": name, "region": region, "requests": int(sel.sum()),
                            "kwh": float(o.kwh[sel].sum()),
                            "t_co2e": float(o.carbon_g[sel].sum() / 1e6),
                            "energy_tariff_usd": float(o.cost_usd[sel].sum())})  # fmt: skip
    df = pd.DataFrame(rows).set_index("policy")
    if "round_robin" in df.index:
        rr = df.loc["round_robin", "t_co2e"]
        df["co2_saved_vs_round_robin"] = 1 - df["t_co2e"] / rr
        if "oracle" in df.index and rr > df.loc["oracle", "t_co2e"]:
            df["share_of_oracle_saving"] = (rr - df["t_co2e"]) / (rr - df.loc["oracle", "t_co2e"])
    return df.reset_index(), pd.DataFrame(regions)


def simulate(
    cfg: Config,
    *,
    base_dir: Path,
    policies: list[str] | None = None,
    cache_dir: Path | None = None,
    progress: Any = None,
) -> SimulationResult:
    t0 = time.perf_counter()
    specs = policies or cfg.simulation.policies
    for spec in specs:
        parse_policy(spec)
    world = build_world(cfg, base_dir=base_dir, cache_dir=cache_dir)
    rng = np.random.default_rng(cfg.simulation.seed)
    req = make_requests(cfg, world.hours, rng)
    # requests that arrive within the window of the period end may run after it: cap them
    req.window_h = np.minimum(
        req.window_h, np.maximum(1, (len(world.hours) - req.arrival_s // 3600).astype(np.int16))
    )
    outcomes = {}
    for spec in specs:
        outcomes[spec] = run_policy(
            spec, world, req, cfg, np.random.default_rng(cfg.simulation.seed)
        )
        if progress is not None:
            progress(spec)
    summary, by_region = summarize(world, req, outcomes)
    return SimulationResult(world, req, outcomes, summary, by_region, time.perf_counter() - t0)


def deferral_capture(summary: pd.DataFrame) -> float | None:
    """Share of the oracle's deferral saving that forecast-driven deferral captures:
    (greenest - greenest+defer) / (greenest - oracle), all carbon."""
    s = summary.set_index("policy")["t_co2e"]
    if not {"greenest", "greenest+defer", "oracle"} <= set(s.index):
        return None
    gain = s["greenest"] - s["oracle"]
    return float((s["greenest"] - s["greenest+defer"]) / gain) if gain > 0 else math.nan
