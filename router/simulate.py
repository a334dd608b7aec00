"""``router simulate``: offline what-if runs of routing policies over a trace and real carbon
data, on a model of GPU serving (:mod:`router.replica_sim`, calibrated by
:mod:`forecasting.replica_model`).

How a run works (hour by hour, vectorized over hours and replicas):

1. Fleet. Each configured replica (``count`` of them) is a replica model (model, GPU type and
   count, ``max_concurrency`` = the engine's batch limit, ``max_num_batched_tokens``). For each
   kind of replica and region, a :class:`router.replica_sim.ServingTable` gives its energy, busy
   share and latency distributions by arrival rate, and its capacity: the highest rate at which
   ``slo_attainment`` of requests meet both SLOs (first token, with the region's RTT; time per
   output token).
2. Traffic. The Azure LLM traces cover one hour each; listed together they are pooled, each at its
   own rate (the conversation and code mixes). Hour h expects ``rate x (1 + a cos(2 pi (hour -
   14) / 24))`` requests (a daily shape peaking at 14:00 UTC, amplitude ``diurnal_amplitude``);
   ``rate`` is ``requests_per_hour``, or ``mean_utilization`` of the fleet's capacity. A replica
   receiving a share of an hour receives requests drawn from the pool with their offsets in the
   hour (the trace's own burstiness) and token counts. A JSONL trace gives its own hourly counts.
   ``deferrable_share`` of requests may wait ``defer_window_h`` (policies with ``+defer``).
3. World. Actual intensity per region and hour from the historical files (as of each hour),
   prices from the config's schedules, day-ahead forecasts issued every hour by
   :class:`~forecasting.ensemble.CarbonEnsemble` fitted on the data before the period, with
   the quantile deferral waits on (``defer_quantile``; the oracle sees actuals).
4. Routing. An hour's immediate requests are ranked with :func:`router.policy.score` (the live
   router's code) using each replica's energy per request at ``target_utilization`` of its
   capacity, and filled into replicas best first up to that utilization, then spilled to the
   next; near-ties share by capacity. ``power_of_two`` (the carbon-agnostic baseline: Ray
   Serve's default, power of two choices, keeps replicas equally loaded) shares by capacity;
   ``round_robin`` equally. Deferrable requests are planned by the live planner's rule
   (:func:`router.scheduler.worth_waiting`) into the (hour, replica) cells with the best forecast
   score and room left; ``cleanest_hour`` moves them to the hour with the cleanest forecast fleet
   average and places them carbon-agnostically; ``oracle`` plans with actual intensity.
5. Serving. Each (hour, replica) cell is read from its table at the cell's rate: energy (static
   power included; an off replica draws its standby power), busy share, and the distributions of
   time to first token (plus the region's RTT) and time per output token. Energy is split between
   requests and idle by the live attributor's rule (:mod:`router.metering.attribution`).

:func:`compare_day` runs the iteration-level reference over one day of the same cells, request by
request, and compares it with the fast model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecasting.datasets import dataset_path
from forecasting.ensemble import CarbonEnsemble
from forecasting.errors import ForecastingError
from forecasting.replica_model import ReplicaModelError, replica_model
from regions.config import Config, Replica
from router.billing import J_PER_KWH, PriceSchedule
from router.errors import RouterError
from router.metering.attribution import request_work, split_busy_idle
from router.policy import POLICIES, score
from router.replica_sim import (
    Engine,
    Histograms,
    ServingTable,
    Traffic,
    run_engine,
)
from router.scheduler import Regret, deferral_regret, worth_waiting

log = logging.getLogger(__name__)

TRACES = {
    "azure_conv": "traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv",
    "azure_code": "traces/azure_llm_2023/AzureLLMInferenceTrace_code.csv",
}
WEIGHTS = {"cheapest": 0.0, "greenest": 1.0, "oracle": 1.0, "cleanest_hour": 1.0}
BASELINES = ("power_of_two", "cleanest_hour")  # simulator-only policies
DEFAULT_REQUESTS_PER_HOUR = 120.0
MAX_TOKENS = 10_000_000  # a request's prompt or output: more is a broken trace


class SimulationError(RouterError):
    """Bad simulation input: trace columns, carbon coverage, policy names, fleet."""


# ---- traffic ---------------------------------------------------------------------------------


def load_trace(trace: str) -> pd.DataFrame:
    """A trace as ``offset_s, prompt_tokens, output_tokens`` (Azure CSV), or a JSONL's rows."""
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
            f"unknown trace {trace!r}: use azure_conv, azure_code (or both, as a list), "
            "synthetic or a .jsonl file"
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
    for col in ("prompt_tokens", "output_tokens"):
        v = pd.to_numeric(df[col], errors="coerce")
        bad_rows = v.isna() | (v < 1) | (v > MAX_TOKENS)
        if bad_rows.any():
            bad = int(bad_rows.to_numpy().argmax())
            raise SimulationError(
                f"{path}:{bad + 1}: {col} must be a number of tokens, 1 to {MAX_TOKENS:,}; "
                f"got {df[col].tolist()[bad]!r}"
            )
        df[col] = v
    t = df["time"]
    if pd.api.types.is_numeric_dtype(t):  # seconds since the epoch
        times = pd.to_datetime(t, unit="s", utc=True, errors="coerce")
    else:
        times = pd.to_datetime(t, utc=True, format="mixed", errors="coerce")
    if times.isna().any():
        bad = int(times.isna().to_numpy().argmax())
        raise SimulationError(
            f"{path}:{bad + 1}: time must be an ISO 8601 time or seconds since the epoch, "
            f"got {t.tolist()[bad]!r}"
        )
    df["time"] = times
    return df


@dataclass
class Demand:
    """Expected requests per hour of the period, and the requests they are drawn from."""

    per_hour: np.ndarray  # [H]
    traffic: Traffic

    @property
    def mean_output(self) -> float:
        return self.traffic.mean_output

    @property
    def mean_prompt(self) -> float:
        return self.traffic.mean_prompt


def traffic_pool(cfg: Config, hours: pd.DatetimeIndex) -> tuple[Traffic, np.ndarray | None]:
    """The pool requests are drawn from, and a JSONL trace's own hourly counts (else None)."""
    sim = cfg.simulation
    names = [sim.trace] if isinstance(sim.trace, str) else list(sim.trace)
    if not names:
        raise SimulationError("simulation.trace: name at least one trace")
    if "synthetic" in names and len(names) > 1:
        raise SimulationError("simulation.trace: synthetic cannot be pooled with other traces")
    if names == ["synthetic"]:
        rng = np.random.default_rng(sim.seed)
        return Traffic(
            rng.uniform(0, 3600, 10_000),
            np.maximum(1, rng.lognormal(6.6, 0.8, 10_000)).astype(np.int64),
            np.maximum(1, rng.lognormal(5.0, 0.7, 10_000)).astype(np.int64),
        ), None
    frames = [load_trace(n) for n in names]
    if len(frames) > 1 and any("time" in f.columns for f in frames):
        raise SimulationError("simulation.trace: a JSONL trace cannot be pooled with others")
    pool = pd.concat(frames, ignore_index=True)
    counts = None
    if "time" in pool.columns:  # a JSONL trace, at its own times
        arrival = (pool["time"] - hours[0]).dt.total_seconds().to_numpy()
        keep = (arrival >= 0) & (arrival < len(hours) * 3600)
        if not keep.any():
            raise SimulationError(f"trace {names[0]}: no request inside {hours[0]} .. {hours[-1]}")
        pool = pool[keep].assign(offset_s=arrival[keep] % 3600.0)
        counts = np.bincount((arrival[keep] // 3600).astype(np.int64), minlength=len(hours))
    return Traffic(
        pool["offset_s"].to_numpy(float),
        pool["prompt_tokens"].to_numpy(np.int64),
        pool["output_tokens"].to_numpy(np.int64),
    ), counts


def diurnal(hours: pd.DatetimeIndex, amplitude: float) -> np.ndarray:
    hod = hours.hour.to_numpy()
    return np.asarray(1 + amplitude * np.cos(2 * np.pi * (hod - 14) / 24))


# ---- the world -------------------------------------------------------------------------------


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
    tables: list[ServingTable]  # one per kind of replica and region
    replica_table: np.ndarray  # [R] index into tables
    capacity_rps: np.ndarray  # [R] at the SLOs
    j_per_request: np.ndarray  # [R] at target utilization (IT energy)
    static_w: np.ndarray  # [R]
    prefill_weight: np.ndarray  # [R] the attributor's weight of a prompt token
    demand: Demand
    forecast_seconds: float = 0.0
    table_seconds: float = 0.0
    forecast_mape: dict[str, float] = field(default_factory=dict)
    # [H, W, G] the forecast at the deferral's stated quantile (its upper bound: a gain must
    # hold there too); None when deferral trusts the point forecast (quantile 0.5)
    forecast_gate: np.ndarray | None = None
    gate_quantile: float = 0.5
    gate_coverage: dict[str, float] = field(default_factory=dict)  # share of actuals under it

    @property
    def fleet_capacity_rps(self) -> float:
        return float(self.capacity_rps.sum())


def _hourly_actuals(
    cfg: Config, hours: pd.DatetimeIndex, base_dir: Path
) -> dict[str, pd.DataFrame]:
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


def _replica_kind(rep: Replica) -> tuple[Any, ...]:
    return (rep.backend.model, rep.gpu.type, rep.gpu.count, rep.max_concurrency,
            rep.model_params_b, rep.static_power_w_per_gpu, rep.max_num_batched_tokens,
            rep.tokens_per_s, rep.cpu_watts_per_core, rep.prefill_weight)  # fmt: skip


def _engine(rep: Replica) -> Engine:
    from router.service.routing import gpu_calibration

    try:
        model = replica_model(rep, gpu_calibration() if rep.gpu.type != "cpu" else None)
        return Engine.of(model, rep.max_num_batched_tokens)
    except (ReplicaModelError, ValueError) as e:
        raise SimulationError(f"replica {rep.name}: {e}") from e


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
    q = sim.defer_quantile
    gate = np.empty((len(hours), w, len(regions))) if q > 0.5 else None
    price = np.empty((len(hours), len(regions)))
    t0 = time.perf_counter()
    mape, coverage = {}, {}
    done: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}
    for g, region in enumerate(regions):
        if region.zone not in done:
            frame = frames[region.zone]
            actual = frame["g_per_kwh"].groupby(frame.index.floor("h")).mean().reindex(hours)
            actual = actual.interpolate(limit_direction="both").to_numpy()
            fc, fq = _forecasts(frame, hours, w, region.zone, cache_dir,
                                quantile=q if gate is not None else None)  # fmt: skip
            done[region.zone] = (actual, fc, fq)
            if len(hours) > w:
                target = np.stack([np.roll(actual, -k) for k in range(w)], axis=1)[: len(hours) - w]
                mape[region.zone] = round(
                    float(np.mean(np.abs(fc[: len(hours) - w] - target) / target) * 100), 2
                )
                if fq is not None:
                    coverage[region.zone] = round(
                        float(np.mean(target[:, 1:] <= fq[: len(hours) - w, 1:])), 4
                    )
        intensity[:, g], forecast[:, :, g], fq = done[region.zone]
        if gate is not None:
            assert fq is not None
            gate[:, :, g] = fq
        schedule = PriceSchedule(region.price, base_dir=base_dir)
        price[:, g] = [schedule.at(t.to_pydatetime()) for t in hours]
    fc_s = time.perf_counter() - t0
    replicas = [(g, rep) for g, region in enumerate(regions) for rep in region.replicas]
    if not replicas:
        raise SimulationError("the config has no replicas to simulate")
    traffic, counts = traffic_pool(cfg, hours)
    t1 = time.perf_counter()
    tables: list[ServingTable] = []
    kinds: dict[tuple[Any, ...], int] = {}
    names, region_of, table_of, cap_of = [], [], [], []
    min_rtt = {_replica_kind(rep): min(regions[g].rtt_ms for g, r in replicas
                                       if _replica_kind(r) == _replica_kind(rep))
               for _, rep in replicas}  # fmt: skip
    for g, rep in replicas:
        kind = _replica_kind(rep)
        server_slo_s = (sim.slo_ttft_ms - regions[g].rtt_ms) / 1000.0
        if server_slo_s <= 0:
            raise SimulationError(
                f"region {regions[g].name}: its RTT ({regions[g].rtt_ms} ms) leaves nothing "
                f"of the first-token SLO ({sim.slo_ttft_ms} ms)"
            )
        if kind not in kinds:
            try:
                tables.append(ServingTable.cached(
                    cache_dir, _engine(rep), traffic,
                    slo_ttft_s=(sim.slo_ttft_ms - min_rtt[kind]) / 1000.0,
                    slo_tpot_s=sim.slo_tpot_ms / 1000.0, attainment=sim.slo_attainment,
                    seed=sim.seed,
                ))  # fmt: skip
            except ValueError as e:
                raise SimulationError(f"replica {rep.name} in {regions[g].name}: {e}") from e
            kinds[kind] = len(tables) - 1
        cap_r = tables[kinds[kind]].capacity_at(server_slo_s)
        if cap_r <= 0:
            raise SimulationError(
                f"replica {rep.name} in {regions[g].name}: it cannot meet the SLOs with the "
                f"region's RTT ({regions[g].rtt_ms} ms) even when nearly idle"
            )
        for k in range(rep.count):
            names.append(rep.name if rep.count == 1 else f"{rep.name}-{k}")
            region_of.append(g)
            table_of.append(kinds[kind])
            cap_of.append(cap_r)
    table_s = time.perf_counter() - t1
    table_idx = np.array(table_of)
    cap = np.array(cap_of)
    at_target = cap * sim.target_utilization
    jpr = np.array([
        float(tables[k].energy_at(np.array([lam]))[0]) / (lam * 3600.0)
        for k, lam in zip(table_of, at_target, strict=True)
    ])  # fmt: skip
    if counts is not None:
        per_hour = counts.astype(float)
    else:
        if sim.mean_utilization is not None:
            rate = sim.mean_utilization * float(cap.sum()) * 3600.0
        else:
            rate = sim.requests_per_hour or DEFAULT_REQUESTS_PER_HOUR
        per_hour = rate * diurnal(hours, sim.diurnal_amplitude)
    return World(
        hours=hours,
        region_names=[r.name for r in regions],
        zones=[r.zone for r in regions],
        replica_names=names,
        replica_region=np.array(region_of),
        intensity=intensity,
        forecast=forecast,
        price=price,
        pue=np.array([r.pue for r in regions]),
        rtt_ms=np.array([r.rtt_ms for r in regions]),
        tables=tables,
        replica_table=table_idx,
        capacity_rps=cap,
        j_per_request=jpr,
        static_w=np.array([tables[k].static_w for k in table_of]),
        prefill_weight=np.array(
            [rep.prefill_weight for _, rep in replicas for _ in range(rep.count)]
        ),
        demand=Demand(per_hour, traffic),
        forecast_seconds=fc_s,
        table_seconds=table_s,
        forecast_mape=mape,
        forecast_gate=gate,
        gate_quantile=q if gate is not None else 0.5,
        gate_coverage=coverage,
    )


# quantiles whose tables are made with any gate's, so that comparing gates refits nothing
GATE_QUANTILES = (0.7, 0.8, 0.9, 0.95)
# the forecaster's version in the cache's file names: a table from another model is not reused
FORECAST_MODEL = "ensemble2"


def _forecasts(
    frame: pd.DataFrame,
    hours: pd.DatetimeIndex,
    w: int,
    zone: str,
    cache_dir: Path | None,
    *,
    quantile: float | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """[H, W] forecasts issued at every hour of the period, from a model fitted before it, and
    with ``quantile``, the same hours' forecast at that quantile (else None). Both are cached
    in ``cache_dir`` by the data they came from (with the tables of :data:`GATE_QUANTILES`)."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(frame["g_per_kwh"].to_numpy(float)).tobytes())
    digest.update(np.ascontiguousarray(frame.index.asi8).tobytes())
    stem = f"{zone}_{hours[0]:%Y%m%d%H}_{len(hours)}_{w}_{FORECAST_MODEL}_{digest.hexdigest()[:16]}"

    def name(q: float | None) -> str:
        return f"{stem}.npy" if q is None else f"{stem}_q{round(q * 1000):03d}.npy"

    shape = (len(hours), w)
    point, gate = _cached_table(cache_dir, name(None), shape), None
    if quantile is not None:
        gate = _cached_table(cache_dir, name(quantile), shape)
    if point is not None and (quantile is None or gate is not None):
        return point, gate
    history = frame[frame.index < hours[0]].iloc[-24 * 365 * 2 :]
    upto = frame[frame.index < hours[-1] + pd.Timedelta(hours=w)]
    qs = tuple(sorted({*GATE_QUANTILES, *([quantile] if quantile is not None else [])}))
    try:
        model = CarbonEnsemble(max_horizon_h=w).fit(history)
        table, quants = model.predict_table(upto, hours, w, qs)
    except ForecastingError as e:
        raise SimulationError(f"zone {zone}: cannot forecast the period: {e}") from e
    _cache_table(cache_dir, name(None), table)
    for k, q in enumerate(qs):
        _cache_table(cache_dir, name(q), quants[:, :, k])
    gate = None if quantile is None else quants[:, :, qs.index(quantile)]
    return np.asarray(table), gate


def _cached_table(cache_dir: Path | None, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    cached = cache_dir / name if cache_dir else None
    if cached is None or not cached.is_file():
        return None
    try:
        with cached.open("rb") as fh:
            got = np.asarray(np.load(fh))
    except (OSError, ValueError, EOFError) as e:
        log.warning("cached forecast %s unreadable (%s): forecasting again", cached, e)
        return None
    return got if got.shape == shape and np.isfinite(got).all() else None


def _cache_table(cache_dir: Path | None, name: str, table: np.ndarray) -> None:
    import os

    if cache_dir is None:
        return
    cached = cache_dir / name
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, table)
        os.replace(tmp, cached)
    except OSError as e:
        log.warning("cannot cache the forecast in %s (%s): not cached", cached.parent, e)


# ---- one policy --------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One policy's run, per (hour, replica) cell."""

    policy: str
    requests: np.ndarray  # [H, R] expected requests served in the cell
    deferred: np.ndarray  # [H, R] of which deferred from an earlier hour or waiting in it
    delay_h: float  # total request-hours of deferral
    on: np.ndarray  # [H, R] bool: replica up
    energy_j: np.ndarray  # [H, R] IT energy
    static_j: np.ndarray  # [H, R] of which static power (standby and start-ups included)
    extra_j: np.ndarray  # [H, R] of which standby and start-ups (fleet scaling)
    attributed_j: np.ndarray  # [H, R] of which attributed to requests (the attributor's rule)
    kwh: np.ndarray  # [H, R] facility energy (x PUE)
    carbon_g: np.ndarray  # [H, R]
    cost_usd: np.ndarray  # [H, R] the energy tariff
    energy_cost_usd: np.ndarray  # [H, R] what the energy cost the operator
    region_hists: list[Histograms]
    route_seconds: float
    serve_seconds: float
    regret: Regret | None = None  # deferred requests against their arrival hour (deferral)

    @property
    def fleet_hist(self) -> Histograms:
        h = Histograms()
        for rh in self.region_hists:
            h.add(rh)
        return h


def parse_policy(spec: str) -> tuple[str, bool, bool]:
    """(base policy, defers, scales the fleet) of ``base[+defer][+scale]``."""
    base, *flags = spec.split("+")
    known = sorted({*POLICIES, *BASELINES})
    if (
        base not in known
        or any(f not in ("defer", "scale") for f in flags)
        or len(set(flags)) < len(flags)
    ):
        raise SimulationError(
            f"unknown policy {spec!r}; choose from {', '.join(known)}, optionally with +defer "
            "and/or +scale (oracle and cleanest_hour always defer)"
        )
    return base, "defer" in flags or base in ("oracle", "cleanest_hour"), "scale" in flags


def _water_fill(scores: np.ndarray, demand: np.ndarray, cap: np.ndarray, tie: float) -> np.ndarray:
    """[H, R] share of each hour's demand per replica: best first up to capacity. Replicas
    whose scores are near-ties share their fill by capacity (as the live router's near-ties,
    broken by load): scores are grouped in steps of ``1 + tie`` from the best, so the first
    group is the live rule's (within ``tie`` of the best) and equal scores always share. Demand
    above all capacity goes by capacity. ``cap`` is [R] or [H, R] (0 for a replica that is
    off)."""
    h_n, r_n = scores.shape
    cap2 = np.broadcast_to(cap, (h_n, r_n)).astype(float)
    scores = np.where(cap2 > 0, scores, np.inf)
    order = np.argsort(scores, axis=1, kind="stable")
    ranked = np.take_along_axis(scores, order, axis=1)
    caps = np.take_along_axis(cap2, order, axis=1)  # [H, R]
    best = ranked[:, :1]
    with np.errstate(divide="ignore", invalid="ignore"):
        step = np.log(ranked / best) / np.log1p(max(tie, 1e-9))
    bucket = np.where(np.isfinite(step), np.floor(step + 1e-9), np.inf)
    new = np.ones((h_n, r_n), bool)
    new[:, 1:] = bucket[:, 1:] != bucket[:, :-1]
    gidx = np.cumsum(new, axis=1) - 1  # group of each ranked replica, 0 .. R-1
    rows = np.arange(h_n)[:, None] * r_n
    group_cap = np.bincount((rows + gidx).ravel(), weights=caps.ravel(),
                            minlength=h_n * r_n).reshape(h_n, r_n)  # fmt: skip
    before = np.cumsum(group_cap, axis=1) - group_cap
    took = np.clip(demand[:, None] - before, 0.0, group_cap)  # per group
    mine = np.take_along_axis(group_cap, gidx, axis=1)
    alloc = np.take_along_axis(took, gidx, axis=1) * np.divide(
        caps, mine, out=np.zeros_like(caps), where=mine > 0
    )
    over = demand - alloc.sum(axis=1)
    total = np.maximum(caps.sum(axis=1, keepdims=True), 1e-12)
    alloc += np.where(over[:, None] > 1e-9, caps / total * over[:, None], 0)
    out = np.empty_like(alloc)
    np.put_along_axis(out, order, alloc, axis=1)
    return np.asarray(out / np.maximum(demand, 1e-12)[:, None])


def _capacity_share(cap: np.ndarray) -> np.ndarray:
    """[H, R] shares proportional to capacity (0 where off)."""
    return np.asarray(cap / np.maximum(cap.sum(axis=1, keepdims=True), 1e-12))


def run_policy(
    spec: str,
    world: World,
    cfg: Config,
    *,
    on: np.ndarray | None = None,
    standby_j: np.ndarray | None = None,
) -> Outcome:
    """One policy over the period. ``on`` [H, R] says which replicas are up (default all);
    ``standby_j`` [H, R] is the energy of replicas that are off or starting (fleet scaling)."""
    base, defer, _ = parse_policy(spec)
    sim = cfg.simulation
    t0 = time.perf_counter()
    h_n, r_n = len(world.hours), len(world.replica_names)
    g_of = world.replica_region
    up = np.ones((h_n, r_n), bool) if on is None else on
    room = np.where(up, world.capacity_rps * sim.target_utilization * 3600.0, 0.0)  # req / h
    weight: float = WEIGHTS.get(base, cfg.policy.weight)
    share_deferrable = sim.deferrable_share if defer else 0.0
    immediate = world.demand.per_hour * (1 - share_deferrable)
    dark = (world.demand.per_hour > 0) & (room.sum(axis=1) == 0)
    if dark.any():
        raise SimulationError(
            f"{spec}: no replica is on at {world.hours[int(np.argmax(dark))]} while requests "
            "arrive; they would be lost"
        )
    kwh_unit = world.j_per_request / J_PER_KWH
    if base == "power_of_two":
        share = _capacity_share(room)
    elif base == "round_robin":
        share = _capacity_share(up.astype(float))
    else:
        if base == "nearest":
            hs = np.broadcast_to(world.rtt_ms[g_of], (h_n, r_n)).astype(float)
        else:
            hs = score(kwh_unit[None, :], world.pue[g_of][None, :], world.price[:, g_of],
                       world.intensity[:, g_of], weight)  # fmt: skip
        spill = base == "cleanest_hour"  # places carbon-agnostically: by capacity
        share = (
            _capacity_share(room)
            if spill
            else _water_fill(hs, immediate, room, cfg.policy.tie_tolerance)
        )
    served = immediate[:, None] * share
    deferred = np.zeros((h_n, r_n))
    delay_h = 0.0
    regret = None
    if defer:
        deferred, delay_h, regret = _plan_deferred(
            world, world.demand.per_hour * share_deferrable, served, room, up, weight,
            oracle=base == "oracle", spatial=base != "cleanest_hour", min_gain=sim.defer_min_gain,
            replan=sim.defer_replan,
        )  # fmt: skip
    n = served + deferred
    route_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    energy = np.zeros((h_n, r_n))
    busy = np.zeros((h_n, r_n))
    rate = n / 3600.0
    for k, table in enumerate(world.tables):
        cols = np.flatnonzero(world.replica_table == k)
        energy[:, cols] = table.energy_at(rate[:, cols])
        busy[:, cols] = table.at(rate[:, cols], table.busy_share)
    hists = region_hists(world, n)
    static = np.where(up, world.static_w * 3600.0, 0.0)
    energy = np.where(up, energy, 0.0)
    extra = np.zeros((h_n, r_n)) if standby_j is None else standby_j
    energy = energy + extra
    static = static + extra
    work = request_work(n * world.demand.mean_output, n * world.demand.mean_prompt,
                        world.prefill_weight)  # fmt: skip
    attributed, _idle = split_busy_idle(np.where(work > 0, energy, 0.0), busy)
    g_cells = np.broadcast_to(g_of, (h_n, r_n))
    kwh = energy / J_PER_KWH * world.pue[g_cells]
    carbon = kwh * world.intensity[:, g_of]
    energy_cost = kwh * world.price[:, g_of]
    tariff = np.maximum(n * cfg.billing.min_charge_usd, energy_cost * (1 + cfg.billing.markup))
    serve_s = time.perf_counter() - t1
    return Outcome(spec, n, deferred, delay_h, up, energy, static, extra, attributed, kwh,
                   carbon, tariff, energy_cost, hists, route_s, serve_s, regret)  # fmt: skip


def region_hists(world: World, n: np.ndarray) -> list[Histograms]:
    """Each region's latency distributions (its RTT added) for ``n`` [H, R] requests per
    (hour, replica) cell, each cell read from its replica's table at the cell's rate."""
    hists = [Histograms() for _ in world.region_names]
    for k, table in enumerate(world.tables):
        for g in range(len(world.region_names)):
            sel = np.flatnonzero((world.replica_table == k) & (world.replica_region == g))
            if len(sel):
                gw = table.grid_weights(n[:, sel].ravel() / 3600.0, n[:, sel].ravel())
                hists[g].add(Histograms.of(table, gw, world.rtt_ms[g] / 1000.0))
    return hists


def _plan_deferred(
    world: World,
    demand: np.ndarray,  # [H] deferrable requests arriving per hour
    booked_now: np.ndarray,  # [H, R] immediate requests already placed
    room: np.ndarray,  # [H, R] requests per hour each cell takes at target utilization
    up: np.ndarray,
    weight: float,
    *,
    oracle: bool,
    spatial: bool,
    min_gain: float,
    replan: bool = True,
) -> tuple[np.ndarray, float, Regret]:
    """Book each hour's deferrable requests into the best forecast (hour, replica) cells with
    room: ([H, R] requests booked, request-hours of waiting, regret: the deferred requests
    that ran dirtier than they would have at arrival, counted in the hours when some replica
    had room at arrival, so that waiting was a choice). With ``spatial`` off, the hour is
    chosen by the fleet's mean forecast intensity and requests spread by capacity. With
    ``world.forecast_gate``, a later cell counts only where its gain holds at the gate's
    quantile too (the live planner's rule); the oracle needs no gate.

    ``replan`` (spatial only; the live job runner's rule): requests whose hour comes with their
    replica's grid (intensity x PUE) dirtier than where they would have run at arrival are
    planned again, from that hour to the end of their window, on the forecast issued then; the
    window's last hour runs them whatever its grid."""
    h_n, r_n = booked_now.shape
    g_of = world.replica_region
    w = world.forecast.shape[1]
    booked = booked_now.copy()
    out = np.zeros((h_n, r_n))
    kwh_unit = world.j_per_request / J_PER_KWH
    pue = world.pue[g_of]
    s_now = np.where(up, score(kwh_unit[None, :], pue[None, :], world.price[:, g_of],
                               world.intensity[:, g_of], weight), np.inf)  # fmt: skip
    carbon_unit = kwh_unit[None, :] * pue[None, :] * world.intensity[:, g_of]  # [H, R] actual
    g_now = pue[None, :] * world.intensity[:, g_of]  # [H, R] g/kWh x PUE: what a re-plan checks
    gate_fc = None if oracle else world.forecast_gate
    # where the deferrable requests of each arrival hour ran: (arrival, hour, replica, count)
    placed: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    # requests booked into a later hour, by that hour: (arrival, replica, count, window end,
    # g/kWh x PUE where they would have run at arrival)
    pending: dict[int, list[tuple[int, int, float, int, float]]] = {}
    choice: dict[int, float] = {}  # arrival hour -> a request's actual carbon had it run then
    arrival_best: dict[int, float] = {}  # arrival hour -> g/kWh x PUE where it would have run

    def book_from(h: int, end: int, left: float, arrival: int) -> float:
        """Book ``left`` requests from hour ``h`` on; the best actual score now."""
        k_n = min(w, end - h)
        # this hour's intensity is known (the live router reads it); later hours are the
        # forecast issued now, or the actuals for the oracle
        seen = world.intensity[h : h + k_n] if oracle else world.forecast[h, :k_n].copy()
        seen[0] = world.intensity[h]
        free = np.maximum(room[h : h + k_n] - booked[h : h + k_n], 0.0)
        s = score(kwh_unit[None, :], pue[None, :], world.price[h : h + k_n][:, g_of],
                  seen[:, g_of], weight)  # fmt: skip
        s = np.where(up[h : h + k_n], s, np.inf)
        # now, a replica without room is no candidate (the live planner's has_capacity)
        s[0] = np.where(free[0] > 0, s[0], np.inf)
        gate = None
        if gate_fc is not None:
            bound = gate_fc[h, :k_n].copy()
            bound[0] = world.intensity[h]
            gate = score(kwh_unit[None, :], pue[None, :], world.price[h : h + k_n][:, g_of],
                         bound[:, g_of], weight)  # fmt: skip
            gate = np.where(up[h : h + k_n], gate, np.inf)
            gate[0] = s[0]
        best_now = float(np.min(s[0]))
        s = worth_waiting(s, min_gain, gate=gate)  # the live planner's rule
        order = np.argsort(s, axis=None, kind="stable")
        order = order[np.isfinite(s.ravel()[order])]
        room_sorted = free.ravel()[order]
        before = np.cumsum(room_sorted) - room_sorted
        take = np.clip(left - before, 0.0, room_sorted)
        kk, rr = np.divmod(order, r_n)
        some = take > 0
        kk, rr, take = kk[some], rr[some], take[some]
        np.add.at(out, (h + kk, rr), take)
        np.add.at(booked, (h + kk, rr), take)
        placed.append((arrival, h + kk, rr, take))
        left -= float(take.sum())
        if left > 1e-9:  # no room in any better slot: now, as immediate requests go
            rem = np.maximum(room[h] - booked[h], 0.0)
            if rem.sum() >= left:
                add = left * _water_fill(s_now[h : h + 1], np.array([left]), rem, 0.0)[0]
            else:  # the fleet is full: over capacity, by capacity
                add = rem + (left - rem.sum()) * _capacity_share(room[h : h + 1])[0]
            out[h] += add
            booked[h] += add
            placed.append((arrival, np.full(r_n, h), np.arange(r_n), add))
        later = kk > 0
        if replan and not oracle:
            for k, r, n in zip(kk[later].tolist(), rr[later].tolist(), take[later].tolist(),
                               strict=True):  # fmt: skip
                pending.setdefault(h + k, []).append((arrival, r, n, end, arrival_best[arrival]))
        return best_now

    for h in range(h_n):
        for arrival, r, n, end, best in pending.pop(h, ()):
            if g_now[h, r] <= best or h + 1 >= end:
                continue  # no dirtier than at arrival, or its window's last hour: it runs
            out[h, r] -= n  # planned again from this hour, on the forecast issued now
            booked[h, r] -= n
            placed.append((arrival, np.array([h]), np.array([r]), np.array([-n])))
            book_from(h, end, n, arrival)
        if demand[h] <= 0:
            continue
        end = min(h + w, h_n)
        k_n = end - h
        free = np.maximum(room[h : h + k_n] - booked[h : h + k_n], 0.0)
        left = float(demand[h])
        if spatial:
            s0 = np.where(up[h] & (free[0] > 0), s_now[h], np.inf)
            now_r = int(np.argmin(s0))  # where it would run now (when some replica has room)
            arrival_best[h] = float(g_now[h, now_r]) if np.isfinite(s0[now_r]) else np.inf
            book_from(h, end, left, h)
        else:
            seen = world.intensity[h : h + k_n] if oracle else world.forecast[h, :k_n].copy()
            seen[0] = world.intensity[h]
            fleet = (seen[:, g_of] * free).sum(axis=1) / np.maximum(free.sum(axis=1), 1e-12)
            fleet = np.where(free.sum(axis=1) > 0, fleet, np.inf)
            held = fleet
            if gate_fc is not None:  # the gain must hold at the gate's quantile too
                held = (gate_fc[h, :k_n][:, g_of] * free).sum(axis=1) / np.maximum(
                    free.sum(axis=1), 1e-12
                )
            fleet[1:] = np.where(held[1:] < fleet[0] * (1 - min_gain), fleet[1:], np.inf)
            for k in np.argsort(fleet, kind="stable"):
                if left <= 1e-9 or not np.isfinite(fleet[k]):
                    break
                total = free[k].sum()
                take_k = min(left, total)
                add = free[k] / total * take_k
                out[h + k] += add
                booked[h + k] += add
                placed.append((h, np.full(r_n, h + k), np.arange(r_n), add))
                left -= take_k
            if left > 1e-9:
                add = _capacity_share(up[h : h + 1].astype(float))[0] * left
                out[h] += add
                booked[h] += add
        if not (free[0] > 0)[up[h]].any():
            continue  # no room at arrival: waiting was no choice, so no regret either
        if spatial:
            choice[h] = float(carbon_unit[h, now_r])
        else:  # placed by capacity at arrival too
            share_now = _capacity_share(up[h : h + 1].astype(float))[0]
            choice[h] = float((carbon_unit[h] * share_now).sum())
    delay = 0.0
    ran: dict[int, np.ndarray] = {}  # arrival hour -> [K, R] where its requests ran at last
    for arrival, hours, reps, count in placed:
        delay += float((count * (hours - arrival)).sum())
        if arrival in choice:
            cells = ran.setdefault(arrival, np.zeros((min(w, h_n - arrival), r_n)))
            np.add.at(cells, (hours - arrival, reps), count)
    regrets = [
        deferral_regret(carbon_unit[a : a + len(cells)], cells, choice[a])
        for a, cells in ran.items()
    ]
    total = Regret(
        deferred=sum(r.deferred for r in regrets),
        regretted=sum(r.regretted for r in regrets),
        excess_g=sum(r.excess_g for r in regrets),
        saved_g=sum(r.saved_g for r in regrets),
    )
    return out, delay, total


# ---- many policies ----------------------------------------------------------------------------


@dataclass
class SimulationResult:
    world: World
    outcomes: dict[str, Outcome]
    summary: pd.DataFrame
    by_region: pd.DataFrame
    seconds: float

    @property
    def requests(self) -> float:
        return float(self.world.demand.per_hour.sum())


def _figures(o: Outcome, sel: np.ndarray | None, hist: Histograms, world: World,
             cfg: Config) -> dict[str, Any]:  # fmt: skip
    cols = slice(None) if sel is None else sel
    n = float(o.requests[:, cols].sum())
    out_tokens = n * world.demand.mean_output
    energy = float(o.energy_j[:, cols].sum())
    tokens = n * (world.demand.mean_output + world.demand.mean_prompt)
    slo = cfg.simulation.slo_ttft_ms / 1000.0
    return {
        "requests": n,
        "kwh": float(o.kwh[:, cols].sum()),
        "it_kwh_active": (energy - float(o.static_j[:, cols].sum())) / J_PER_KWH,
        "it_kwh_static": float(o.static_j[:, cols].sum()) / J_PER_KWH,
        "j_per_token": energy / out_tokens if out_tokens else math.nan,
        "attributed_j_per_request": float(o.attributed_j[:, cols].sum()) / n if n else math.nan,
        "t_co2e": float(o.carbon_g[:, cols].sum() / 1e6),
        "g_co2e_per_request": float(o.carbon_g[:, cols].sum()) / n if n else math.nan,
        "energy_cost_usd": float(o.energy_cost_usd[:, cols].sum()),
        "energy_tariff_usd": float(o.cost_usd[:, cols].sum()),
        "token_tariff_usd": tokens / 1000 * cfg.billing.token_price_usd_per_1k,
        "slo_attainment": hist.attainment(slo),
        "ttft_p50_ms": hist.ttft_q(0.5) * 1000,
        "ttft_p99_ms": hist.ttft_q(0.99) * 1000,
        "tpot_p50_ms": hist.tpot_q(0.5) * 1000,
        "tpot_p99_ms": hist.tpot_q(0.99) * 1000,
        "replicas_on_mean": float(o.on[:, cols].sum(axis=1).mean()),
    }


def summarize(
    world: World, outcomes: dict[str, Outcome], cfg: Config
) -> tuple[pd.DataFrame, pd.DataFrame]:
    rows, regions = [], []
    for name, o in outcomes.items():
        row = {"policy": name, **_figures(o, None, o.fleet_hist, world, cfg)}
        total = row["requests"]
        row["share_deferred"] = float(o.deferred.sum()) / total if total else 0.0
        row["mean_delay_h"] = o.delay_h / float(o.deferred.sum()) if o.deferred.sum() else 0.0
        # regret: deferred requests that ran dirtier than they would have at arrival
        r = o.regret
        row["deferral_regret"] = r.regretted / r.deferred if r and r.deferred else 0.0
        row["regret_t_co2e"] = r.excess_g / 1e6 if r else 0.0
        rows.append(row)
        for gi, region in enumerate(world.region_names):
            sel = np.flatnonzero(world.replica_region == gi)
            regions.append({"policy": name, "region": region,
                            **_figures(o, sel, o.region_hists[gi], world, cfg)})  # fmt: skip
    df = pd.DataFrame(rows).set_index("policy")
    for base in ("power_of_two", "greenest", "cleanest_hour"):
        if base in df.index:
            df[f"co2_saved_vs_{base}"] = 1 - df["t_co2e"] / df.loc[base, "t_co2e"]
    main = "power_of_two" if "power_of_two" in df.index else None
    if main and "oracle" in df.index and df.loc[main, "t_co2e"] > df.loc["oracle", "t_co2e"]:
        ref = df.loc[main, "t_co2e"]
        df["share_of_oracle_saving"] = (ref - df["t_co2e"]) / (ref - df.loc["oracle", "t_co2e"])
    return df.reset_index(), pd.DataFrame(regions)


def simulate(
    cfg: Config,
    *,
    base_dir: Path,
    policies: list[str] | None = None,
    cache_dir: Path | None = None,
    progress: Callable[[str], Any] | None = None,
    world: World | None = None,
) -> SimulationResult:
    t0 = time.perf_counter()
    specs = policies or cfg.simulation.policies
    for spec in specs:
        parse_policy(spec)
    world = world or build_world(cfg, base_dir=base_dir, cache_dir=cache_dir)
    outcomes = {}
    for spec in specs:
        outcomes[spec] = run_spec(spec, world, cfg)
        if progress is not None:
            progress(spec)
    summary, by_region = summarize(world, outcomes, cfg)
    return SimulationResult(world, outcomes, summary, by_region, time.perf_counter() - t0)


def run_spec(spec: str, world: World, cfg: Config) -> Outcome:
    """A policy spec, with fleet scaling when it asks for it."""
    _, _, scales = parse_policy(spec)
    if not scales:
        return run_policy(spec, world, cfg)
    from router.fleet import fleet_schedule

    on, standby = fleet_schedule(spec, world, cfg)
    return run_policy(spec, world, cfg, on=on, standby_j=standby)


def deferral_capture(summary: pd.DataFrame) -> float | None:
    """Share of the oracle's deferral saving that forecast-driven deferral captures:
    (greenest - greenest+defer) / (greenest - oracle), all carbon."""
    s = summary.set_index("policy")["t_co2e"]
    if not {"greenest", "greenest+defer", "oracle"} <= set(s.index):
        return None
    gain = s["greenest"] - s["oracle"]
    return float((s["greenest"] - s["greenest+defer"]) / gain) if gain > 0 else math.nan


# ---- the reference on one day ------------------------------------------------------------------


def compare_day(world: World, cfg: Config, spec: str, day: int, *, seed: int = 1) -> pd.DataFrame:
    """The fast model against the iteration-level reference on day ``day`` of the period: both
    serve the same (hour, replica) cells of ``spec``; the reference draws each cell's requests
    (Poisson count, offsets and tokens from the pool) and runs every replica through the day,
    its queue carried from hour to hour. Rows: energy kWh, TTFT p50/p99 ms, TPOT p50/p99 ms,
    SLO attainment, seconds."""
    o = run_spec(spec, world, cfg)
    hrs = slice(day * 24, day * 24 + 24)
    if day < 0 or (day + 1) * 24 > len(world.hours):
        raise SimulationError(f"day {day} is outside the period ({len(world.hours) // 24} days)")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    ref_energy = 0.0
    ttft_all, tpot_all = [], []
    ok_all = []
    traffic = world.demand.traffic
    slo = cfg.simulation.slo_ttft_ms / 1000.0
    tpot_slo = cfg.simulation.slo_tpot_ms / 1000.0
    engines: dict[int, Engine] = {}  # by kind of replica (its table)
    reps = [rep for region in cfg.regions for rep in region.replicas for _ in range(rep.count)]
    requests = 0
    for r in range(len(world.replica_names)):
        lam = o.requests[hrs, r] / 3600.0
        arrivals, prompts, outputs = [], [], []
        for k, rate in enumerate(lam):
            a, p, q = traffic.hour(float(rate), rng)
            arrivals.append(a + k * 3600.0)
            prompts.append(p)
            outputs.append(q)
        a, p, q = np.concatenate(arrivals), np.concatenate(prompts), np.concatenate(outputs)
        kind = int(world.replica_table[r])
        if kind not in engines:
            engines[kind] = _engine(reps[r])
        run = run_engine(engines[kind], a, p, q, until_s=24 * 3600.0)
        on_s = float(o.on[hrs, r].sum()) * 3600.0
        # an off replica serves nothing; the reference idles it at static power all day, so
        # take its off hours back out and add the standby and start-ups the schedule costs
        ref_energy += run.energy_j - engines[kind].static_w * (24 * 3600.0 - on_s)
        ref_energy += float(o.extra_j[hrs, r].sum())  # standby and start-ups, as booked
        rtt = world.rtt_ms[world.replica_region[r]] / 1000.0
        ttft = run.ttft_s(a) + rtt
        tpot = run.tpot_s(q)
        ttft_all.append(ttft)
        tpot_all.append(tpot[q > 1])
        ok_all.append((ttft <= slo) & (tpot <= tpot_slo))
        requests += len(a)
    ref_s = time.perf_counter() - t0
    ttft, tpot, ok = np.concatenate(ttft_all), np.concatenate(tpot_all), np.concatenate(ok_all)
    t1 = time.perf_counter()
    hist = Histograms()  # the fast model's day: the same cells, read from the tables
    for h in region_hists(world, o.requests[hrs]):
        hist.add(h)
    fast_s = time.perf_counter() - t1
    fast_energy = float(o.energy_j[hrs].sum())
    rows = [
        ("energy kWh", fast_energy / J_PER_KWH, ref_energy / J_PER_KWH),
        ("TTFT p50 ms", hist.ttft_q(0.5) * 1000, float(np.percentile(ttft, 50)) * 1000),
        ("TTFT p99 ms", hist.ttft_q(0.99) * 1000, float(np.percentile(ttft, 99)) * 1000),
        ("TPOT p50 ms", hist.tpot_q(0.5) * 1000, float(np.percentile(tpot, 50)) * 1000),
        ("TPOT p99 ms", hist.tpot_q(0.99) * 1000, float(np.percentile(tpot, 99)) * 1000),
        ("SLO attainment %", hist.attainment(slo) * 100, float(ok.mean()) * 100),
        ("requests", float(o.requests[hrs].sum()), float(requests)),
        ("seconds", fast_s, ref_s),
    ]
    df = pd.DataFrame(rows, columns=["figure", "fast", "reference"])
    df["error"] = df["fast"] / df["reference"] - 1
    return df
