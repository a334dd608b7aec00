"""Carbon-aware fleet scaling: how many replicas to keep on, per interval and region.

Plain NumPy, no Ray: the live router (:mod:`router.service.fleet`) and ``router simulate`` run
the same code.

The rule (:func:`desired_on`)
-----------------------------
Each interval, the load the fleet must serve (requests/s) is handed out to regions
**cleanest first**: the region with the lowest score (the forecast cost of serving a request
there: carbon, or price x carbon, per request) takes as much as its owned replicas carry at the
target utilization, then the next, until the load is placed. A region then keeps
``ceil(assigned / (capacity_rps x target_utilization))`` replicas on, never fewer than its
``min_on`` (the per-region minimum: residency, latency, warm capacity), never more than it owns.
So clean regions stay up and dirty ones drain to their minimum; load above what the whole fleet
carries turns everything on. Load that may only run in some regions (data residency) is placed
within them first, most restricted first, cleanest first, before load that may run anywhere.

Start-up (:func:`with_startup`)
-------------------------------
A replica needed in interval ``h`` must be switched on ``startup_s`` earlier (model load), and
draws its static power meanwhile; so the decision for ``h`` is taken ``startup_s`` before ``h``,
from the forecasts issued then (:func:`lead_intervals`, :func:`issued_before` for a persistence
forecast). A dip in the count shorter than a start-up cannot be switched off and on again, and
a longer one is idled through when idling costs no more than a restart.

Energy (:func:`schedule_energy`)
--------------------------------
What a schedule costs beyond the requests' own (batch) energy: replicas up draw their static
power, a start-up draws static power for ``startup_s``, and replicas off still draw
``standby_w``. Units are in the names: ``_rps`` requests/s, ``_s`` seconds, ``_w`` watts,
``_j`` joules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_EPS = 1e-9  # a count a rounding error above an integer is that integer


@dataclass(frozen=True)
class RegionFleet:
    """One region's replicas, as the scaling policy sees them (all alike)."""

    name: str
    replicas: int  # replicas owned in the region (the most that can be on)
    min_on: int  # never fewer on
    capacity_rps: float  # requests/s one replica serves at its SLO, at target utilization 100 %
    startup_s: float  # from switch-on to serving (model load); it draws static power meanwhile
    standby_w: float  # what an off replica still draws (whole replica)

    def __post_init__(self) -> None:
        if self.replicas < 0:
            raise ValueError(f"region {self.name}: replicas must be >= 0, got {self.replicas}")
        if not 0 <= self.min_on <= self.replicas:
            raise ValueError(
                f"region {self.name}: min_on must be in [0, replicas={self.replicas}], "
                f"got {self.min_on}"
            )
        if not self.capacity_rps > 0 or not math.isfinite(self.capacity_rps):
            raise ValueError(
                f"region {self.name}: capacity_rps must be > 0 and finite, got {self.capacity_rps}"
            )
        if not self.startup_s >= 0:
            raise ValueError(f"region {self.name}: startup_s must be >= 0, got {self.startup_s}")
        if not self.standby_w >= 0:
            raise ValueError(f"region {self.name}: standby_w must be >= 0, got {self.standby_w}")


def desired_on(
    load_rps: np.ndarray,
    score: np.ndarray,
    fleets: Sequence[RegionFleet],
    *,
    target_utilization: float,
    groups: Sequence[int] | None = None,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """[H, G] int replicas on per interval and region. load_rps: [H] forecast requests/s the
    fleet must serve per interval (or [H, K] per residency group K with groups[g] = K of region g);
    score: [H, G] forecast cost of serving there (lower is better: carbon, or price x carbon,
    per request); regions are filled cleanest-first up to replicas x capacity_rps x
    target_utilization, each region gets ceil(assigned / (capacity_rps x target_utilization))
    replicas, never below min_on, never above replicas; load above the whole fleet turns
    everything on.

    ``allowed`` ([K, G] bool), instead of ``groups``: the regions each load column may run in,
    sets that may overlap (a request allowed everywhere is a row of ``True``). Columns are
    placed most restricted first (fewest regions), each cleanest first on the capacity the
    columns before it left. Ties in score go to the region listed first. ``score`` may hold
    ``+inf`` (fill last) or ``-inf`` (fill first), never NaN."""
    if not 0 < target_utilization <= 1:
        raise ValueError(f"target_utilization must be in (0, 1], got {target_utilization}")
    n = len(fleets)
    score = np.asarray(score, dtype=float)
    load = np.asarray(load_rps, dtype=float)
    if load.ndim == 1:
        load = load[:, None]
    if load.ndim != 2:
        raise ValueError(f"load_rps must be [H] or [H, K], got shape {load.shape}")
    hours, k = load.shape
    if score.shape != (hours, n):
        raise ValueError(f"score must be [H={hours}, G={n}], got shape {score.shape}")
    if np.isnan(score).any():
        raise ValueError("score holds NaN: a region without a forecast needs a number or +inf")
    if (load < 0).any() or not np.isfinite(load).all():
        raise ValueError("load_rps must be finite and >= 0")
    masks = _masks(k, n, groups, allowed)
    per_replica = np.array([f.capacity_rps for f in fleets]) * target_utilization  # [G]
    owned = np.array([f.replicas for f in fleets])
    floor = np.array([f.min_on for f in fleets])
    free = np.broadcast_to(owned * per_replica, (hours, n)).copy()  # [H, G] capacity left
    assigned = np.zeros((hours, n))
    for col in sorted(range(k), key=lambda c: (int(masks[c].sum()), c)):
        placed = _fill(load[:, col], np.where(masks[col], score, np.inf), free * masks[col])
        assigned += placed
        free -= placed
    count = np.ceil(assigned / per_replica - _EPS).astype(int)
    out: np.ndarray = np.clip(count, floor, owned)
    return out


def _masks(k: int, n: int, groups: Sequence[int] | None, allowed: np.ndarray | None) -> np.ndarray:
    """[K, G] bool: the regions each load column may use."""
    if groups is not None and allowed is not None:
        raise ValueError("give groups or allowed, not both")
    if allowed is not None:
        masks = np.asarray(allowed, dtype=bool)
        if masks.shape != (k, n):
            raise ValueError(f"allowed must be [K={k}, G={n}], got shape {masks.shape}")
        return masks
    if groups is not None:
        g = np.asarray(groups)
        if g.shape != (n,) or (g < 0).any() or (g >= k).any():
            raise ValueError(f"groups must give each of the {n} regions a group in [0, {k})")
        partition: np.ndarray = g[None, :] == np.arange(k)[:, None]
        return partition
    if k != 1:
        raise ValueError(f"load_rps has {k} columns: give groups (or allowed) for them")
    return np.ones((1, n), dtype=bool)


def _fill(load: np.ndarray, score: np.ndarray, free: np.ndarray) -> np.ndarray:
    """[H, G] of ``load`` [H] placed on ``free`` [H, G] capacity, lowest ``score`` first."""
    order = np.argsort(score, axis=1, kind="stable")
    cap = np.take_along_axis(free, order, axis=1)
    before = np.cumsum(cap, axis=1) - cap  # capacity of the cleaner regions
    took = np.clip(load[:, None] - before, 0.0, cap)
    placed: np.ndarray = np.empty_like(took)
    np.put_along_axis(placed, order, took, axis=1)
    return placed


# ---- start-up -----------------------------------------------------------------------------


def lead_intervals(fleets: Sequence[RegionFleet], step_s: float) -> int:
    """How many intervals before ``h`` its decision is taken: the longest start-up in the fleet,
    in whole intervals (0 when no region has one). A replica must be switched on by then."""
    if not step_s > 0:
        raise ValueError(f"step_s must be > 0, got {step_s}")
    longest = max((f.startup_s for f in fleets), default=0.0)
    return math.ceil(longest / step_s - _EPS) if longest > 0 else 0


def issued_before(series: np.ndarray, lead: int) -> np.ndarray:
    """A persistence forecast: row ``h`` is what was known ``lead`` intervals earlier
    (``series[h - lead]``; the first ``lead`` rows repeat row 0). The forecast to give
    :func:`desired_on` for a schedule when no better one exists."""
    series = np.asarray(series)
    if lead <= 0:
        return series.copy()
    head = np.repeat(series[:1], min(lead, len(series)), axis=0)
    return np.concatenate([head, series[: max(0, len(series) - lead)]])


@dataclass(frozen=True)
class Schedule:
    """Replicas per interval and region once start-up is applied."""

    on: np.ndarray  # [H, G] up in interval h: serving, or idling through a short dip
    started: np.ndarray  # [H, G] switched on for interval h (startup_s before it begins)
    step_s: float


def with_startup(
    desired: np.ndarray,
    fleets: Sequence[RegionFleet],
    *,
    step_s: float,
    initial_on: Sequence[int] | None = None,
    static_w: Sequence[float] | None = None,
) -> Schedule:
    """Apply start-up to ``desired`` [H, G] (from :func:`desired_on`, whose forecasts for row
    ``h`` must be those issued :func:`lead_intervals` before ``h``).

    A count that goes up at ``h`` starts its new replicas ``startup_s`` before ``h``
    (``started``). A count that dips and comes back is not switched off for the dip when the
    dip is shorter than the region's start-up (the replica would have to start before it
    stopped), nor when idling through it costs no more than a restart: dip x (static_w -
    standby_w) <= static_w x startup_s, given ``static_w`` (the whole replica's static power
    while up, per region). A dip at the end of the schedule is switched off. ``initial_on``
    (default: the first row) is what is on before the first interval."""
    desired = np.asarray(desired, dtype=int)
    hours, n = desired.shape
    if n != len(fleets):
        raise ValueError(f"desired has {n} regions, fleets {len(fleets)}")
    if not step_s > 0:
        raise ValueError(f"step_s must be > 0, got {step_s}")
    before = np.asarray(desired[0] if initial_on is None else initial_on, dtype=int)
    if before.shape != (n,):
        raise ValueError(f"initial_on must give {n} counts")
    on = desired.copy()
    for g, fleet in enumerate(fleets):
        # a dip this many intervals long (or shorter) is idled through
        bridge = fleet.startup_s / step_s
        if static_w is not None:
            static = float(static_w[g])
            bridge = (
                math.inf  # standby draws as much as up: never worth switching off
                if static <= fleet.standby_w
                else max(bridge, static * fleet.startup_s / (step_s * (static - fleet.standby_w)))
            )
        col = np.concatenate([before[g : g + 1], desired[:, g]])
        for level in range(1, int(col.max(initial=0)) + 1):
            for start, end in _dips(col >= level):
                if end - start <= bridge + _EPS:  # col index i is row i - 1
                    on[start - 1 : end - 1, g] = np.maximum(on[start - 1 : end - 1, g], level)
    prev = np.concatenate([before[None, :], on[:-1]])
    started = np.maximum(on - prev, 0)
    return Schedule(on=on, started=started, step_s=step_s)


def _dips(up: np.ndarray) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of False in ``up`` with True on both sides."""
    edges = np.flatnonzero(np.diff(up.astype(np.int8)))  # last index before each change
    downs = edges[~up[edges + 1]] + 1  # first False of a run
    ups = edges[up[edges + 1]] + 1  # first True after a run
    after = np.searchsorted(ups, downs)  # the run's end: the first rise after its start
    ok = after < len(ups)
    return list(zip(downs[ok].tolist(), ups[after[ok]].tolist(), strict=True))


@dataclass(frozen=True)
class FleetEnergy:
    """Joules per interval and region [H, G] that a schedule costs beyond the requests' own
    (batch-dependent) energy. ``up_j``: static power of the replicas up (leave it out where the
    replica model already counts static power while up); ``startup_j``: what start-ups draw
    beyond standby (static power for ``startup_s``, booked in the interval they start for);
    ``standby_j``: replicas off x ``standby_w``."""

    up_j: np.ndarray
    startup_j: np.ndarray
    standby_j: np.ndarray

    @property
    def total_j(self) -> np.ndarray:
        total: np.ndarray = self.up_j + self.startup_j + self.standby_j
        return total


def schedule_energy(
    schedule: Schedule, fleets: Sequence[RegionFleet], *, static_w: Sequence[float]
) -> FleetEnergy:
    """The energy of ``schedule``: on replicas x ``static_w`` (the whole replica's static power
    while up, per region) x the interval, start-ups x (static_w - standby_w) x ``startup_s``,
    off replicas x ``standby_w`` x the interval."""
    static = np.asarray(static_w, dtype=float)
    if static.shape != (len(fleets),) or (static < 0).any():
        raise ValueError(f"static_w must give {len(fleets)} values >= 0")
    owned = np.array([f.replicas for f in fleets])
    standby = np.array([f.standby_w for f in fleets])
    startup = np.array([f.startup_s for f in fleets])
    step = schedule.step_s
    return FleetEnergy(
        up_j=schedule.on * static * step,
        startup_j=schedule.started * np.maximum(static - standby, 0.0) * startup,
        standby_j=(owned - schedule.on) * standby * step,
    )
