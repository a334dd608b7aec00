"""One replica serving with continuous batching, two ways: an iteration-level discrete-event
reference (:func:`run_engine`) and the fast per-(hour, replica) model ``router simulate`` uses
for a year (:class:`ServingTable`). Both read the replica model
(:mod:`forecasting.replica_model`) through :class:`Engine`. No Ray.

**The engine** (vLLM's scheduler, simplified). Each step, every decoding sequence emits one
token and the step's token budget (``max_num_batched_tokens``, less one per decoding sequence)
goes to prompt tokens: first the prefills under way, then waiting requests in arrival order,
while the batch (decoding + prefilling sequences) is under the replica's batch limit. A long
prompt is prefilled in chunks over several steps (chunked prefill). A request's first token
comes at the end of the step that finishes its prompt; then it decodes one token per step
until its output is done. A request that arrives during a step joins at the next one.

**A step's time and energy.** With ``b`` sequences decoding and ``c`` prompt tokens in it:
``ITL(b) + c x s_p`` seconds, where ``s_p`` is the replica model's compute-bound prefill time
per token, drawing ``P(b)`` during the decode part and the model's prefill power during the
prompt part; a step of prompt tokens alone takes at least the model's prefill time of one
token (a read of the weights). An empty replica draws its static power. Time and energy are
exact at this level: between two changes of the batch (an arrival joining, a sequence
finishing, a prompt chunk) the reference jumps over the identical steps at once.

**The fast model.** A replica's behaviour depends on the rate of requests it receives and on the
traffic's mix of prompt and output lengths. For one replica model and one traffic mix,
:class:`ServingTable` runs the reference at stationary rates (a grid up to past the replica's
capacity, each an hour of arrivals drawn as the simulator draws them) and keeps, per rate: energy
per hour, the share of time with a request present (for attribution), mean batch, and the
distributions of time to first token and time per output token. An (hour, replica) cell of the
year is then read at its rate, interpolating between the two nearest rates (a mixture of their
distributions). This assumes each hour is stationary at its mean rate (no queue carried over
from the hour before); :func:`compare_day` checks that against the reference on a day of the
trace. A cell above the table's last rate is read at the last rate (all of it past capacity).

**Capacity** (:attr:`ServingTable.capacity_rps`): the highest rate at which at least
``attainment`` of the requests meet both SLOs (first token and time per output token, server
side), found by bisection with the reference.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import math
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forecasting.replica_model import ReplicaModel

log = logging.getLogger(__name__)

DEFAULT_CHUNK_TOKENS = 8192  # vLLM's max_num_batched_tokens with chunked prefill on large GPUs
TTFT_BIN_S = 0.005  # histograms of first-token time: 5 ms bins
TTFT_MAX_S = 120.0  # the last bin holds everything later
TPOT_BIN_S = 0.001
TPOT_MAX_S = 2.0
# the grid of rates a table runs the reference at, as shares of its capacity: dense where the
# latency tail turns up
GRID_SHARES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95,
               1.0, 1.05, 1.15, 1.3)  # fmt: skip


@dataclass(frozen=True)
class Engine:
    """A replica model as per-step lookups (index = sequences decoding)."""

    itl_s: tuple[float, ...]  # [b] one decode step with b sequences (b = 0 unused)
    power_w: tuple[float, ...]  # [b] watts during it
    prefill_s_per_token: float
    prefill_min_s: float
    prefill_w: float
    static_w: float
    max_batch: int
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def throughput_rps(self, traffic: Traffic) -> float:
        """The most requests/s of ``traffic`` the replica can process at all: the least of
        its prefill compute and its decode rate at the batch limit."""
        prefill = self.prefill_s_per_token * traffic.mean_prompt
        decode = traffic.mean_output * self.itl_s[self.max_batch] / self.max_batch
        return 1.0 / max(prefill, decode, 1e-9)

    @classmethod
    def of(cls, model: ReplicaModel, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> Engine:
        b = model.max_batch
        if chunk_tokens <= b:
            raise ValueError(f"chunk_tokens ({chunk_tokens}) must exceed the batch limit ({b})")
        big = 1_000_000
        return cls(
            itl_s=(0.0, *(model.itl_s(k) for k in range(1, b + 1))),
            power_w=(model.static_power_w, *(model.power_w(k) for k in range(1, b + 1))),
            prefill_s_per_token=model.prefill_s(big) / big,
            prefill_min_s=model.prefill_s(1),
            prefill_w=model.prefill_power_w,
            static_w=model.static_power_w,
            max_batch=b,
            chunk_tokens=chunk_tokens,
        )


@dataclass
class EngineRun:
    """What the reference saw: per request (seconds from the same origin as the arrivals) and
    for the replica over ``[0, end_s]``."""

    first_token_s: np.ndarray
    finish_s: np.ndarray
    energy_j: float
    busy_s: float  # time with a request present
    end_s: float
    steps: int
    decode_batch_s: float  # integral of the decoding batch over time

    def ttft_s(self, arrival_s: np.ndarray) -> np.ndarray:
        return np.asarray(self.first_token_s - arrival_s)

    def tpot_s(self, output: np.ndarray) -> np.ndarray:
        """Time per output token after the first (0 for one-token answers)."""
        return np.asarray(
            np.where(output > 1, (self.finish_s - self.first_token_s) / np.maximum(output - 1, 1),
                     0.0)
        )  # fmt: skip


def run_engine(
    engine: Engine,
    arrival_s: np.ndarray,
    prompt: np.ndarray,
    output: np.ndarray,
    *,
    until_s: float | None = None,
) -> EngineRun:
    """The iteration-level reference over requests sorted by arrival, from an empty replica at
    time 0; it runs until every request is done (and idles to ``until_s`` if later)."""
    arr = arrival_s.tolist()
    pro = [max(1, int(p)) for p in prompt.tolist()]
    out = [max(1, int(o)) for o in output.tolist()]
    n = len(arr)
    if n and any(arr[k] > arr[k + 1] for k in range(n - 1)):
        raise ValueError("arrivals must be sorted")
    itl, pw = engine.itl_s, engine.power_w
    slope, pmin, prefill_w, static_w = (engine.prefill_s_per_token, engine.prefill_min_s,
                                        engine.prefill_w, engine.static_w)  # fmt: skip
    maxb, chunk = engine.max_batch, engine.chunk_tokens
    first = [math.nan] * n
    finish = [math.nan] * n
    heap: list[tuple[int, int]] = []  # (step at which it finishes, request)
    waiting: deque[int] = deque()
    prefilling: deque[list[int]] = deque()  # [request, prompt tokens left]
    t, k, i, n_dec = 0.0, 0, 0, 0
    energy = busy = batch_s = 0.0
    steps = 0
    while True:
        while i < n and arr[i] <= t:
            waiting.append(i)
            i += 1
        while waiting and n_dec + len(prefilling) < maxb:
            j = waiting.popleft()
            prefilling.append([j, pro[j]])
        if prefilling:  # one step with prompt tokens
            budget = chunk - n_dec
            c = 0
            done: list[int] = []
            while prefilling and budget > 0:
                head = prefilling[0]
                take = min(budget, head[1])
                head[1] -= take
                budget -= take
                c += take
                if head[1]:
                    break
                done.append(head[0])
                prefilling.popleft()
            if n_dec:
                dt = itl[n_dec] + slope * c
                energy += pw[n_dec] * itl[n_dec] + prefill_w * slope * c
                batch_s += n_dec * dt
            else:
                dt = max(pmin, slope * c)
                energy += prefill_w * dt
            t += dt
            busy += dt
            k += 1
            steps += 1
            while heap and heap[0][0] <= k:
                finish[heapq.heappop(heap)[1]] = t
                n_dec -= 1
            for j in done:
                first[j] = t
                if out[j] == 1:
                    finish[j] = t
                else:
                    heapq.heappush(heap, (k + out[j] - 1, j))
                    n_dec += 1
            continue
        if not n_dec:  # empty: idle to the next arrival
            if i >= n:
                break
            energy += static_w * (arr[i] - t)
            t = arr[i]
            continue
        # decode steps only, all alike until a sequence finishes or a request can join
        m = heap[0][0] - k
        step = itl[n_dec]
        if i < n and n_dec < maxb and arr[i] - t < m * step:
            m = max(1, math.ceil((arr[i] - t) / step))
        dt = m * step
        energy += pw[n_dec] * dt
        batch_s += n_dec * dt
        t += dt
        busy += dt
        k += m
        steps += m
        while heap and heap[0][0] <= k:
            finish[heapq.heappop(heap)[1]] = t
            n_dec -= 1
    if until_s is not None and until_s > t:
        energy += static_w * (until_s - t)
        t = until_s
    return EngineRun(np.array(first), np.array(finish), energy, busy, t, steps, batch_s)


# ---- the traffic a replica receives -------------------------------------------------------------


@dataclass(frozen=True)
class Traffic:
    """The requests to draw from: offsets in their hour (s), prompt and output tokens."""

    offset_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    def __post_init__(self) -> None:
        if not len(self.offset_s):
            raise ValueError("the traffic has no requests")

    def hour(
        self, rate_rps: float, rng: np.random.Generator, hours: int = 1
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``hours`` hours of requests at ``rate_rps``: a Poisson count per hour, drawn with
        replacement, each keeping its offset in the hour and its tokens."""
        counts = rng.poisson(rate_rps * 3600.0, hours)
        hour_of = np.repeat(np.arange(hours), counts)
        pick = rng.integers(0, len(self.offset_s), len(hour_of))
        arrival = hour_of * 3600.0 + self.offset_s[pick]
        order = np.argsort(arrival, kind="stable")
        return arrival[order], self.prompt[pick][order], self.output[pick][order]

    @property
    def mean_prompt(self) -> float:
        return float(self.prompt.mean())

    @property
    def mean_output(self) -> float:
        return float(self.output.mean())


# ---- the fast model -------------------------------------------------------------------------


def _hist(values: np.ndarray, bin_s: float, max_s: float) -> np.ndarray:
    n = int(round(max_s / bin_s))
    idx = np.minimum((values / bin_s).astype(np.int64), n - 1)
    return np.bincount(np.maximum(idx, 0), minlength=n).astype(np.float64)


@dataclass
class ServingTable:
    """A replica's stationary behaviour by arrival rate (module docstring)."""

    rates_rps: np.ndarray  # [K] increasing, rates[0] = 0
    energy_j_per_h: np.ndarray  # [K]
    busy_share: np.ndarray  # [K]
    mean_batch: np.ndarray  # [K] decoding sequences, time-averaged
    ttft_hist: np.ndarray  # [K, bins] request counts (server side)
    ttft_ok_hist: np.ndarray  # [K, bins] the same, requests whose time per token met its SLO
    tpot_hist: np.ndarray  # [K, bins]
    capacity_rps: float
    slo_ttft_s: float
    slo_tpot_s: float
    static_w: float
    attainment: float = 0.99
    seconds: float = 0.0
    reference_requests: int = 0

    @classmethod
    def build(
        cls,
        engine: Engine,
        traffic: Traffic,
        *,
        slo_ttft_s: float,
        slo_tpot_s: float,
        attainment: float = 0.99,
        hours: int = 3,
        grid_requests: int = 250_000,
        seed: int = 0,
    ) -> ServingTable:
        """Run the reference around the capacity at ``slo_ttft_s`` (server side: the loosest
        a replica of this kind will be held to; :meth:`capacity_at` reads tighter ones off the
        grid): ``hours`` hours per try while finding the capacity, then at each grid rate
        enough hours for ``grid_requests`` requests (1 to 24: a tail percentile of three hours
        of bursty traffic moves by 10 % from draw to draw, of a day by 3 %)."""
        import time

        t0 = time.perf_counter()
        runs: dict[float, tuple[EngineRun, np.ndarray, np.ndarray]] = {}

        def run(rate: float, n_h: int = hours) -> tuple[EngineRun, np.ndarray, np.ndarray]:
            if rate not in runs:
                a, p, o = traffic.hour(rate, np.random.default_rng(seed), n_h)
                runs[rate] = (run_engine(engine, a, p, o, until_s=n_h * 3600.0), a, o)
            return runs[rate]

        def met(rate: float) -> float:
            r, a, o = run(rate)
            if not len(a):
                return 1.0
            return float(np.mean((r.ttft_s(a) <= slo_ttft_s) & (r.tpot_s(o) <= slo_tpot_s)))

        # capacity: grow until the SLOs fail, then bisect (to 2 %); never past what the
        # replica can process at all (its prefill compute, its decode rate at the batch
        # limit), where the queue grows without bound whatever the SLOs
        top = engine.throughput_rps(traffic)
        lo = 0.0
        hi = min(top, max(0.05, 0.05 / max(engine.prefill_s_per_token * traffic.mean_prompt,
                                           1e-6)))  # fmt: skip
        while met(hi) >= attainment:
            if hi >= top:
                lo = hi = top  # the SLOs never bind: the throughput is the capacity
                break
            lo, hi = hi, min(hi * 2, top)
        while hi - lo > 0.02 * hi:
            mid = (lo + hi) / 2
            if met(mid) >= attainment:
                lo = mid
            else:
                hi = mid
        if lo * 3600.0 < 1.0:  # under a request an hour: the SLOs cannot be met
            raise ValueError(
                f"the replica cannot meet the SLOs (first token {slo_ttft_s:.3g} s at the "
                f"replica, {slo_tpot_s * 1000:.0f} ms per token) even when nearly idle"
            )
        rates = np.array([s * lo for s in GRID_SHARES])
        k_n = len(rates)
        n_ttft, n_tpot = round(TTFT_MAX_S / TTFT_BIN_S), round(TPOT_MAX_S / TPOT_BIN_S)
        table = cls(
            rates_rps=rates,
            energy_j_per_h=np.zeros(k_n),
            busy_share=np.zeros(k_n),
            mean_batch=np.zeros(k_n),
            ttft_hist=np.zeros((k_n, n_ttft)),
            ttft_ok_hist=np.zeros((k_n, n_ttft)),
            tpot_hist=np.zeros((k_n, n_tpot)),
            capacity_rps=lo,
            slo_ttft_s=slo_ttft_s,
            slo_tpot_s=slo_tpot_s,
            static_w=engine.static_w,
            attainment=attainment,
        )
        runs.clear()  # the grid gets fresh draws
        seed += 1
        for k, rate in enumerate(rates):
            if rate == 0:
                table.energy_j_per_h[k] = engine.static_w * 3600.0
                continue
            n_h = min(24, max(1, math.ceil(grid_requests / (rate * 3600.0))))
            r, a, o = run(float(rate), n_h)
            table.reference_requests += len(a)
            # energy and busy time per hour of the arrivals (a queue still draining after
            # the hours is part of the hours' work)
            span = max(r.end_s, n_h * 3600.0)
            table.energy_j_per_h[k] = r.energy_j / span * 3600.0
            table.busy_share[k] = min(1.0, r.busy_s / span)
            table.mean_batch[k] = r.decode_batch_s / span
            ttft, tpot = r.ttft_s(a), r.tpot_s(o)
            table.ttft_hist[k] = _hist(ttft, TTFT_BIN_S, TTFT_MAX_S)
            table.ttft_ok_hist[k] = _hist(ttft[tpot <= slo_tpot_s], TTFT_BIN_S, TTFT_MAX_S)
            table.tpot_hist[k] = _hist(tpot[o > 1], TPOT_BIN_S, TPOT_MAX_S)
        table.seconds = time.perf_counter() - t0
        return table

    # ---- a table on disk (building one runs the reference for millions of requests) ----------

    TABLE_VERSION = 1

    @staticmethod
    def cache_key(engine: Engine, traffic: Traffic, **settings: Any) -> str:
        import hashlib

        h = hashlib.sha256(repr((ServingTable.TABLE_VERSION, engine, GRID_SHARES,
                                 sorted(settings.items()))).encode())  # fmt: skip
        for a in (traffic.offset_s, traffic.prompt, traffic.output):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:24]

    @classmethod
    def cached(cls, cache_dir: Path | None, engine: Engine, traffic: Traffic,
               **settings: Any) -> ServingTable:  # fmt: skip
        """:meth:`build`, kept in ``cache_dir`` (None: not kept)."""
        if cache_dir is None:
            return cls.build(engine, traffic, **settings)
        path = cache_dir / f"serving_{cls.cache_key(engine, traffic, **settings)}.npz"
        if path.is_file():
            try:
                with path.open("rb") as fh, np.load(fh) as z:  # ours to close, even if broken
                    fields = {k: z[k] for k in z.files}
                got = cls(**{k: (v if v.ndim else v.item()) for k, v in fields.items()})
                got.check()
                return got
            except Exception as e:  # noqa: BLE001 - any unreadable file is rebuilt
                log.warning("serving table %s unreadable (%s): building it again", path, e)
        table = cls.build(engine, traffic, **settings)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            arrays = {f.name: np.asarray(getattr(table, f.name)) for f in dataclasses.fields(table)}
            save: Any = np.savez_compressed
            save(tmp, **arrays)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot keep the serving table in %s (%s): not cached", cache_dir, e)
        return table

    def check(self) -> None:
        """Raise ValueError unless the table is whole (a file read back may not be)."""
        k_n = len(self.rates_rps)
        n_ttft, n_tpot = round(TTFT_MAX_S / TTFT_BIN_S), round(TPOT_MAX_S / TPOT_BIN_S)
        shapes = {
            "energy_j_per_h": (k_n,), "busy_share": (k_n,), "mean_batch": (k_n,),
            "ttft_hist": (k_n, n_ttft), "ttft_ok_hist": (k_n, n_ttft), "tpot_hist": (k_n, n_tpot),
        }  # fmt: skip
        for name, shape in shapes.items():
            a = np.asarray(getattr(self, name))
            if a.shape != shape or not np.isfinite(a).all() or (a < 0).any():
                raise ValueError(f"{name}: shape {a.shape} (want {shape}) or values out of range")
        if not (math.isfinite(self.capacity_rps) and self.capacity_rps > 0):
            raise ValueError(f"capacity_rps {self.capacity_rps}")

    def capacity_at(self, slo_ttft_s: float) -> float:
        """The capacity (requests/s) at a first-token SLO at the replica no looser than the
        table's: the highest grid rate meeting ``attainment``, interpolated to where it
        stops (the table's own capacity at its own SLO)."""
        if slo_ttft_s >= self.slo_ttft_s:
            return self.capacity_rps
        n = self.ttft_hist.sum(axis=1)
        met = np.array([
            mass_within(ok, slo_ttft_s, TTFT_BIN_S) / total if total else 1.0
            for ok, total in zip(self.ttft_ok_hist, n, strict=True)
        ])  # fmt: skip
        fails = np.flatnonzero(met < self.attainment)
        if not len(fails):
            return float(self.rates_rps[-1])
        k = int(fails[0])
        if k == 0:
            return 0.0
        x0, x1, y0, y1 = self.rates_rps[k - 1], self.rates_rps[k], met[k - 1], met[k]
        return float(x0 + (x1 - x0) * (y0 - self.attainment) / max(y0 - y1, 1e-12))

    def weights(self, rate_rps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(lower grid index, its weight, upper weight) for each rate: linear interpolation,
        clamped to the grid."""
        r = np.clip(np.asarray(rate_rps, float), 0.0, self.rates_rps[-1])
        hi = np.clip(np.searchsorted(self.rates_rps, r, side="right"), 1, len(self.rates_rps) - 1)
        lo = hi - 1
        span = self.rates_rps[hi] - self.rates_rps[lo]
        w_hi = np.where(span > 0, (r - self.rates_rps[lo]) / span, 0.0)
        return lo, 1.0 - w_hi, w_hi

    def at(self, rate_rps: np.ndarray, what: np.ndarray) -> np.ndarray:
        """A per-rate figure (``busy_share``, ``mean_batch``) at rates; past the last rate,
        the last rate's."""
        lo, w_lo, w_hi = self.weights(rate_rps)
        return np.asarray(w_lo * what[lo] + w_hi * what[lo + 1])

    def energy_at(self, rate_rps: np.ndarray) -> np.ndarray:
        """Joules per hour at rates. Past the last rate, energy grows with the requests (each
        costs what it costs there: the replica serves them later, from a queue)."""
        top = self.rates_rps[-1]
        scale = np.maximum(1.0, np.asarray(rate_rps, float) / top)
        return np.asarray(self.at(rate_rps, self.energy_j_per_h) * scale)

    def grid_weights(self, rate_rps: np.ndarray, requests: np.ndarray) -> np.ndarray:
        """[K + 1] how many requests each grid rate stands for, summed over cells: the
        mixture whose distributions the cells' requests follow. The last entry counts the
        requests past the table's last rate: they wait in a growing queue (latest bin)."""
        rate = np.asarray(rate_rps, float)
        lo, w_lo, w_hi = self.weights(rate)
        k_n = len(self.rates_rps)
        top = self.rates_rps[-1]
        within = requests * np.minimum(1.0, top / np.maximum(rate, 1e-300))
        return np.asarray(np.r_[
            np.bincount(lo, weights=within * w_lo, minlength=k_n)
            + np.bincount(lo + 1, weights=within * w_hi, minlength=k_n),
            float((requests - within).sum()),
        ])  # fmt: skip

    def distributions(self, grid_w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(TTFT, TTFT of those meeting the TPOT SLO, TPOT) histograms, in requests."""
        out = []
        for h in (self.ttft_hist, self.ttft_ok_hist, self.tpot_hist):
            n = self.ttft_hist.sum(axis=1)  # shares of all requests at that rate
            norm = np.divide(h, n[:, None], out=np.zeros_like(h), where=n[:, None] > 0)
            mix = grid_w[:-1] @ norm
            if h is self.ttft_hist:
                mix[-1] += grid_w[-1]  # past capacity: the latest bin, and never on time
            out.append(mix)
        return out[0], out[1], out[2]


def shifted(hist: np.ndarray, shift_s: float, bin_s: float) -> np.ndarray:
    """A histogram moved later by ``shift_s`` (a region's round trip)."""
    k = int(round(shift_s / bin_s))
    if k <= 0:
        return hist
    out = np.zeros_like(hist)
    out[k:] = hist[:-k]
    out[-1] += hist[-k:].sum()
    return out


def quantile(hist: np.ndarray, q: float, bin_s: float) -> float:
    """The ``q`` quantile of a histogram (bin upper edges, linear within a bin); ``inf`` when
    it falls in the last bin, which holds everything past the histogram's range."""
    total = hist.sum()
    if total <= 0:
        return math.nan
    cum = np.cumsum(hist)
    k = int(np.searchsorted(cum, q * total, side="left"))
    if k >= len(hist) - 1:
        return math.inf
    before = cum[k - 1] if k else 0.0
    inside = (q * total - before) / hist[k] if hist[k] > 0 else 1.0
    return float((k + inside) * bin_s)


def mass_within(hist: np.ndarray, limit_s: float, bin_s: float) -> float:
    """How much of a histogram lies at or below ``limit_s`` (linear within the bin)."""
    x = limit_s / bin_s
    k = int(math.floor(x))
    if k >= len(hist):
        return float(hist.sum())
    return float(hist[:k].sum() + hist[k] * (x - k))


@dataclass
class Histograms:
    """TTFT (with a region's RTT), TTFT among those meeting the TPOT SLO, and TPOT."""

    ttft: np.ndarray = field(default_factory=lambda: np.zeros(round(TTFT_MAX_S / TTFT_BIN_S)))
    ttft_ok: np.ndarray = field(default_factory=lambda: np.zeros(round(TTFT_MAX_S / TTFT_BIN_S)))
    tpot: np.ndarray = field(default_factory=lambda: np.zeros(round(TPOT_MAX_S / TPOT_BIN_S)))

    def add(self, other: Histograms) -> None:
        self.ttft += other.ttft
        self.ttft_ok += other.ttft_ok
        self.tpot += other.tpot

    @classmethod
    def of(cls, table: ServingTable, grid_w: np.ndarray, rtt_s: float) -> Histograms:
        ttft, ok, tpot = table.distributions(grid_w)
        return cls(shifted(ttft, rtt_s, TTFT_BIN_S), shifted(ok, rtt_s, TTFT_BIN_S), tpot)

    def attainment(self, slo_ttft_s: float) -> float:
        """Share of requests with first token within the SLO and time per token within its."""
        total = self.ttft.sum()
        if total <= 0:
            return math.nan
        return min(1.0, float(mass_within(self.ttft_ok, slo_ttft_s, TTFT_BIN_S) / total))

    def ttft_q(self, q: float) -> float:
        return quantile(self.ttft, q, TTFT_BIN_S)

    def tpot_q(self, q: float) -> float:
        return quantile(self.tpot, q, TPOT_BIN_S)
