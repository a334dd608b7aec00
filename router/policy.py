"""Routing policies: rank the candidate replicas for a request.

The score of a candidate is the weighted geometric mean of what the user pays for,

    expected cost^(1-w) x expected emissions^w  =  kWh x PUE^w x price^(1-w) x intensity^w

with expected cost = kWh x price and expected emissions = kWh x PUE x intensity. kWh is the
request's marginal IT energy on that replica: what the replica's energy grows by when the
request joins its running batch, static power not charged
(:meth:`forecasting.replica_model.ReplicaModel.marginal_j`), or the energy predictor's
average figure on a replica without a model. At low load that packs requests onto busy
replicas (a larger batch makes a token for less energy) rather than waking idle ones.
w = 0.5 orders by price x carbon, w = 0 by price, w = 1 by carbon.

Constraints come first: healthy, allowed region (data residency globs), free capacity, the
per-request carbon cap, the first-token budget (RTT + expected queue wait + prefill) and the
time-per-token bound: near a replica's batch limit these spread the load. Candidates within
``tie_tolerance`` of the best score are near-ties: the best is compared with one rival drawn at
random, which wins only if a request decodes there faster by more than the tolerance
(``Candidates.slowdown``). Near-ties so spread where joining a batch slows a request (the
cleanest region is not flooded) and pack where it does not. When no candidate meets a latency
bound the fastest one is chosen and the decision says so.

Everything here is plain NumPy: the live router ranks one request at a time, the simulator
scores arrays of requests with the same functions (:func:`score`).
"""

from __future__ import annotations

import fnmatch
import random
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from router.errors import RouterError
from router.preference import Preference


class NoCandidateError(RouterError):
    """No replica can take the request under its constraints (the message says which)."""


class AtCapacity(NoCandidateError):
    """Every allowed replica is full (its slots and its queue): shed the request, to be
    retried after ``retry_after_s``."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def score(
    kwh: np.ndarray | float,
    pue: np.ndarray | float,
    price_usd_per_kwh: np.ndarray | float,
    intensity_g_per_kwh: np.ndarray | float,
    weight: np.ndarray | float,
) -> np.ndarray:
    """kWh x PUE^w x price^(1-w) x intensity^w, broadcasting over requests and candidates."""
    w = np.asarray(weight, dtype=float)
    return np.asarray(
        kwh * np.power(pue, w) * np.power(price_usd_per_kwh, 1.0 - w)
        * np.power(intensity_g_per_kwh, w)
    )  # fmt: skip


@dataclass
class Candidates:
    """The replicas a request may go to, as arrays (one entry per replica)."""

    names: list[str]
    regions: list[str]
    residency: list[tuple[str, ...]]
    healthy: np.ndarray
    has_capacity: np.ndarray
    # predicted IT energy of this request on each replica, the figure the score and the carbon
    # cap use: its marginal energy there (module docstring)
    kwh: np.ndarray
    pue: np.ndarray
    price_usd_per_kwh: np.ndarray
    intensity_g_per_kwh: np.ndarray
    rtt_ms: np.ndarray
    queue_wait_ms: np.ndarray
    service_ms: np.ndarray
    load: np.ndarray  # active / max concurrency
    # regions left out for missing data (carbon intensity, price): region -> why
    unavailable: dict[str, str] = field(default_factory=dict)
    # per replica, from the replica model (NaN: unknown), computed only when a request bounds
    # them: ms to prefill this prompt (max-latency-ms), and ms per output token at the batch
    # the request would join (max-tpot-ms)
    prefill_of: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    tpot_of: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    # per replica, how many times slower than alone a request would decode there (None: 1 +
    # load); near-ties are broken by it
    slowdown: np.ndarray | None = None
    # per replica, the energy predictor's figure for this request: what its bill is expected to
    # show (the energy attributed to it, a share of static power included), for budget holds
    # and deferral plans; None: kwh
    billed_kwh_of: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    # per replica, the figures that are stand-ins for a better source ("load", "prefill", ...)
    estimated: list[tuple[str, ...]] = field(default_factory=list)
    # the grid's average intensity, what bills use, where decisions use a marginal signal
    # (policy.decision_signal); None: intensity_g_per_kwh is the average
    billed_intensity_g_per_kwh: np.ndarray | None = None
    _allowed_cache: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict, repr=False)
    _billed_kwh: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def allowed(self, patterns: tuple[str, ...]) -> np.ndarray:
        """Which candidates match any glob in ``patterns`` (region name or residency tag)."""
        if not patterns:
            return np.ones(len(self.names), dtype=bool)
        hit = self._allowed_cache.get(patterns)
        if hit is None:
            hit = np.array(
                [
                    any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (r, *tags))
                    for r, tags in zip(self.regions, self.residency, strict=True)
                ]
            )
            self._allowed_cache[patterns] = hit
        return hit

    @property
    def ttft_ms(self) -> np.ndarray:
        """Each replica's expected time to first token: RTT + queue wait + prefill."""
        first = self.rtt_ms + self.queue_wait_ms
        return np.asarray(first if self.prefill_of is None else first + self.prefill_of())

    @property
    def tpot_ms(self) -> np.ndarray:
        """Each replica's time per output token (ms) at the batch this request would join."""
        if self.tpot_of is None:
            return np.full(len(self.names), np.nan)
        return self.tpot_of()

    @property
    def billed_kwh(self) -> np.ndarray:
        """The energy each replica's bill for this request is expected to show (computed
        once: the budget hold, the deferral plan and the receipt's baseline all read it)."""
        if self._billed_kwh is None:
            self._billed_kwh = self.kwh if self.billed_kwh_of is None else self.billed_kwh_of()
        return self._billed_kwh

    @property
    def billing_intensity(self) -> np.ndarray:
        """Each replica's intensity as bills use it: the grid's average."""
        if self.billed_intensity_g_per_kwh is None:
            return self.intensity_g_per_kwh
        return self.billed_intensity_g_per_kwh

    @property
    def carbon_g(self) -> np.ndarray:
        return np.asarray(self.kwh * self.pue * self.intensity_g_per_kwh)


@dataclass
class Decision:
    index: int
    replica: str
    region: str
    policy: str
    scores: np.ndarray
    feasible: np.ndarray
    binding: str  # the constraint that decided, or "score"
    latency_budget_met: bool = True
    note: str = ""
    estimated: tuple[str, ...] = ()  # the chosen replica's figures that were estimated

    def explain(self, c: Candidates) -> dict[str, Any]:
        """For logs and response headers: who won, each candidate's score, what bound."""
        return {
            "policy": self.policy,
            "replica": self.replica,
            "region": self.region,
            "binding": self.binding,
            "latency_budget_met": self.latency_budget_met,
            "note": self.note,
            "estimated": list(self.estimated),
            "candidates": {
                n: {
                    "score": float(s),
                    "feasible": bool(f),
                    "kwh": float(kwh),
                    "estimated": list(c.estimated[k]) if c.estimated else [],
                }
                for k, (n, s, f, kwh) in enumerate(
                    zip(c.names, self.scores, self.feasible, c.kwh, strict=True)
                )
            },
        }


def carbon_agnostic_baseline(
    c: Candidates, allowed: np.ndarray | list[bool], chosen: int
) -> tuple[str, float]:
    """What a carbon-agnostic choice would have emitted for this request: power of two
    choices over the ``allowed`` replicas (two drawn at random, the less loaded taken),
    expected over its draws, so a receipt's figure does not depend on a coin. Returns its
    likeliest pick and its g CO2e per kWh of IT energy the request used on ``chosen`` (each
    replica's predicted energy relative to the chosen one's, its PUE and its average
    intensity, the signal bills use); the receipt multiplies that by the energy measured.

    Among n allowed replicas the one of load rank r (0 the least loaded) is taken in
    n - 1 - r of the n(n - 1)/2 pairs; replicas of equal load share what they win. Plain
    Python over lists: n is a handful and this runs on every request."""
    billed = c.billed_kwh.tolist()
    pue, ci, load = c.pue.tolist(), c.billing_intensity.tolist(), c.load.tolist()
    ok = allowed.tolist() if isinstance(allowed, np.ndarray) else allowed
    idx = [k for k in range(len(ok)) if ok[k]]
    if not idx:
        return c.names[chosen], pue[chosen] * ci[chosen]
    n = len(idx)
    if n > 1:
        idx.sort(key=load.__getitem__)
    pairs = n * (n - 1) / 2
    g, a = 0.0, 0
    while a < n:  # a run of equal loads (ranks a..b) shares the pairs its ranks win
        b, level = a, load[idx[a]]
        while b + 1 < n and load[idx[b + 1]] == level:
            b += 1
        m = b - a + 1
        won = m * (n - 1) - (a + b) * m / 2  # sum of n - 1 - r over r = a..b
        share = (won / pairs if pairs else 1.0) / m
        for k in idx[a : b + 1]:
            g += share * billed[k] * pue[k] * ci[k]
        a = b + 1
    chosen_kwh = billed[chosen]
    if chosen_kwh <= 0:  # no energy predicted where it ran: per kWh of the allowed ones' mean
        chosen_kwh = sum(billed[k] for k in idx) / n or 1.0
    return c.names[idx[0]], g / chosen_kwh


# a request's bound -> (how a note names it, what the fallback picks)
BOUNDS = {"latency": ("latency budget", "fastest"), "tpot": ("max-tpot-ms", "quickest")}


class Policy(ABC):
    """Ranks candidates for one request; the router does queueing and retries."""

    name: str

    def __init__(self, *, tie_tolerance: float = 0.05, rng: random.Random | None = None) -> None:
        self.tie_tolerance = tie_tolerance
        self.rng = rng or random.Random()

    @abstractmethod
    def scores(self, c: Candidates, pref: Preference) -> np.ndarray:
        """Lower is better; one score per candidate."""

    def feasible(self, c: Candidates, pref: Preference) -> tuple[np.ndarray, str]:
        base = c.healthy & c.allowed(pref.regions)
        if not base.any():
            why = "no healthy replica" + (
                f" in the allowed regions {list(pref.regions)}" if pref.regions else ""
            )
            allowed = c.allowed(pref.regions)
            gaps = {r: w for k, r in enumerate(c.regions) if allowed[k]
                    for rr, w in c.unavailable.items() if rr == r}  # fmt: skip
            if gaps:
                why += "; " + "; ".join(gaps.values())
            raise NoCandidateError(why)
        ok = base & c.has_capacity
        if not ok.any():
            # the queue ahead drains in about one service time of the quickest allowed replica
            retry_s = float(np.min(c.service_ms[base])) / 1000.0
            raise AtCapacity(
                "every allowed replica is at capacity; retry later",
                retry_after_s=max(1.0, retry_s),
            )
        if pref.max_carbon_g is not None:
            under = ok & (c.carbon_g <= pref.max_carbon_g)
            if not under.any():
                best = float(c.carbon_g[ok].min())
                raise NoCandidateError(
                    f"max-carbon-g {pref.max_carbon_g:g} cannot be met now: the lowest expected "
                    f"is {best:.4g} g; allow more carbon or set defer to wait for a cleaner grid"
                )
            ok = under
        return ok, "capacity"

    def rank(self, c: Candidates, pref: Preference) -> Decision:
        d = self._rank(c, pref)
        if c.estimated:
            d.estimated = c.estimated[d.index]
        return d

    def tiebreak(self, c: Candidates, pref: Preference) -> np.ndarray | None:
        """What decides between candidates whose scores are all 0 (lower is better)."""
        return None

    def _rank(self, c: Candidates, pref: Preference) -> Decision:
        ok, _ = self.feasible(c, pref)
        s = self.scores(c, pref)
        binding = "score"
        met = True
        note = ""
        # a replica whose batch is full queues the request: while another has room, the wait
        # rules it out, however cheap its queue is at the margin (the saturated figure)
        roomy = ok & (c.load < 1.0)
        if roomy.any() and (roomy != ok).any():
            ok, binding = roomy, "batch"
        if pref.max_latency_ms is not None:  # a budget for the first token
            got = self._bound(c, s, ok, c.ttft_ms, pref.max_latency_ms, "latency")
            if isinstance(got, Decision):
                return got
            ok, binding = got[0], "latency" if got[1] else binding
        if pref.max_tpot_ms is not None:  # a bound on the time per output token
            got = self._bound(c, s, ok, c.tpot_ms, pref.max_tpot_ms, "tpot")
            if isinstance(got, Decision):
                return got
            ok, binding = got[0], "tpot" if got[1] else binding
        masked = np.where(ok, s, np.inf)
        second = self.tiebreak(c, pref) if masked.min() == 0.0 else None
        if second is not None:  # zero marginal energy: what a kWh would cost there decides
            i = self.pick(c, np.where(masked == 0.0, second, np.inf), ok & (masked == 0.0))
        else:
            i = self.pick(c, s, ok)
        return Decision(i, c.names[i], c.regions[i], self.name, s, ok, binding, met, note)

    def _bound(
        self, c: Candidates, s: np.ndarray, ok: np.ndarray, values: np.ndarray, limit: float,
        binding: str,
    ) -> tuple[np.ndarray, bool] | Decision:  # fmt: skip
        """The candidates whose ``values`` (ms) are within ``limit`` (unknown, NaN, never are)
        and whether that left any out; when none is, the decision for the best known one,
        whose note says so."""
        within = ok & (values <= limit)
        if within.any():
            return within, bool((within != ok).any())
        known = np.where(ok & ~np.isnan(values), values, np.inf)
        i = int(np.argmin(known)) if np.isfinite(known).any() else self.pick(c, s, ok)
        what, best = BOUNDS[binding]
        why = f"{known[i]:.0f} ms expected" if np.isfinite(known[i]) else "none is known"
        note = (
            f"{what} {limit:g} ms unmet by every candidate; chose the {best} ({c.names[i]}, {why})"
        )
        return Decision(i, c.names[i], c.regions[i], self.name, s, ok, binding, False, note)

    def pick(self, c: Candidates, s: np.ndarray, ok: np.ndarray) -> int:
        """The best score; among near-ties (within ``tie_tolerance`` of it), the best against
        one rival drawn at random: the rival wins only if a request would decode there faster
        by more than the tolerance (``Candidates.slowdown``, else load). So a near-tie never
        wakes an idle replica where joining the best one's batch costs no latency (packing),
        and spreads where it would (the cleanest region is not flooded)."""
        masked = np.where(ok, s, np.inf)
        best = int(np.argmin(masked))
        ties = np.flatnonzero(ok & (masked <= masked[best] * (1.0 + self.tie_tolerance)))
        if len(ties) < 2:
            return best
        rival = int(self.rng.choice([int(t) for t in ties if t != best]))
        slow = c.slowdown if c.slowdown is not None else 1.0 + c.load
        return rival if slow[rival] * (1.0 + self.tie_tolerance) < slow[best] else best


class PriceCarbonPolicy(Policy):
    """price x carbon, weighted by the request's preference (default 0.5)."""

    name = "price_carbon"
    fixed_weight: float | None = None

    def scores(self, c: Candidates, pref: Preference) -> np.ndarray:
        w = pref.weight if self.fixed_weight is None else self.fixed_weight
        return score(c.kwh, c.pue, c.price_usd_per_kwh, c.intensity_g_per_kwh, w)

    def tiebreak(self, c: Candidates, pref: Preference) -> np.ndarray:
        """The score of one kWh on each candidate: when a request's marginal energy is 0
        everywhere (no prompt, flat power), where energy is cleaner and cheaper still wins."""
        w = pref.weight if self.fixed_weight is None else self.fixed_weight
        return score(1.0, c.pue, c.price_usd_per_kwh, c.intensity_g_per_kwh, w)


class CheapestPolicy(PriceCarbonPolicy):
    name = "cheapest"
    fixed_weight = 0.0


class GreenestPolicy(PriceCarbonPolicy):
    name = "greenest"
    fixed_weight = 1.0


class RoundRobinPolicy(Policy):
    name = "round_robin"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._next = 0

    def scores(self, c: Candidates, pref: Preference) -> np.ndarray:
        n = len(c)
        order = (np.arange(n) - self._next) % n
        return order.astype(float)

    def pick(self, c: Candidates, s: np.ndarray, ok: np.ndarray) -> int:
        i = int(np.argmin(np.where(ok, s, np.inf)))
        self._next = (i + 1) % len(c)
        return i


class NearestPolicy(Policy):
    name = "nearest"

    def scores(self, c: Candidates, pref: Preference) -> np.ndarray:
        return np.asarray(c.rtt_ms, dtype=float)


class OraclePolicy(GreenestPolicy):
    """Perfect foresight of carbon: only the simulator can give it the actual intensities
    (routing now uses the same values as greenest; the difference is in deferral planning)."""

    name = "oracle"


POLICIES: dict[str, type[Policy]] = {
    p.name: p
    for p in (
        PriceCarbonPolicy,
        CheapestPolicy,
        GreenestPolicy,
        RoundRobinPolicy,
        NearestPolicy,
        OraclePolicy,
    )
}


def make_policy(name: str, **kw: Any) -> Policy:
    try:
        return POLICIES[name](**kw)
    except KeyError:
        raise RouterError(
            f"unknown policy {name!r}; choose from {', '.join(sorted(POLICIES))}"
        ) from None
