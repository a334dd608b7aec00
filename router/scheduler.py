"""Deferral planning: when and where a request that may wait should run.

Given a request's window (now .. now + defer) and each region's forecast, :func:`plan` picks the
(start hour, replica) with the lowest forecast score, the same score the routing policy uses
(kWh x PUE^w x price^(1-w) x intensity^w), skipping slots whose capacity is already booked.
:class:`SlotBook` holds the booked work per (replica, hour). The plan is persisted by the
deferred-job store (SQLite), not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from router.errors import RouterError
from router.policy import score


class PlanError(RouterError):
    """No slot in the window has room, or the inputs do not line up."""


@dataclass
class SlotBook:
    """Work (slot-seconds) booked per replica and hour, against a capacity per replica-hour."""

    capacity_s: np.ndarray  # [R] slot-seconds available per hour
    booked: dict[tuple[int, int], float] = field(default_factory=dict)

    def free(self, hour: int, replica: int) -> float:
        return float(self.capacity_s[replica]) - self.booked.get((hour, replica), 0.0)

    def book(self, hour: int, replica: int, work_s: float) -> None:
        self.booked[(hour, replica)] = self.booked.get((hour, replica), 0.0) + work_s


def slot_scores(
    kwh: np.ndarray,  # [R] predicted IT kWh of the request on each replica
    pue: np.ndarray,  # [R]
    price: np.ndarray,  # [K, R] $/kWh in each future hour
    intensity: np.ndarray,  # [K, R] forecast g/kWh in each future hour
    weight: float,
) -> np.ndarray:
    """[K, R] forecast scores of running in hour k on replica r."""
    return score(kwh[None, :], pue[None, :], price, intensity, weight)


def worth_waiting(
    scores: np.ndarray, min_gain: float, gate: np.ndarray | None = None
) -> np.ndarray:
    """Mask [K, R] slot scores by the rule "waiting must pay": a later hour counts only where it
    beats the best replica now by ``min_gain``; now, only that best replica counts (a request
    that may wait would rather queue there than move to a dirtier region).

    ``gate`` [K, R], when given, holds the same slots scored at a stated quantile of the
    forecast (e.g. its 90 % bound): a later slot then counts only where the gain holds at that
    quantile too, so a gain the forecast is unsure of is not waited for. The slots that count
    keep their ``scores`` (the point forecast ranks them)."""
    s = np.array(scores, dtype=float)
    if gate is not None and np.shape(gate) != s.shape:
        raise ValueError(f"gate has shape {np.shape(gate)}, the scores {s.shape}")
    now_best = int(np.argmin(s[0]))
    bar = s[0, now_best] * (1 - min_gain)
    held = s[1:] if gate is None else np.asarray(gate)[1:]
    s[1:] = np.where(held < bar, s[1:], np.inf)
    s[0] = np.where(np.arange(s.shape[1]) == now_best, s[0], np.inf)
    return s


@dataclass(frozen=True)
class Regret:
    """Deferred requests against their arrival hour, in carbon (see :func:`deferral_regret`)."""

    deferred: float  # requests that ran in a later hour than they arrived in
    regretted: float  # of which ran dirtier than they would have at arrival
    excess_g: float  # the carbon those added
    saved_g: float  # the carbon the others saved


def deferral_regret(carbon_g: np.ndarray, booked: np.ndarray, now_g: float) -> Regret:
    """Regret of one arrival hour's deferred requests. ``carbon_g`` [K, R] is each request's
    actual carbon in hour k (0 = arrival) on replica r, ``booked`` [K, R] how many ran there,
    ``now_g`` a request's actual carbon had it run at arrival where the router would have put
    it then. A request that ran later and dirtier than ``now_g`` is a regret; requests that ran
    at arrival are not deferred."""
    later = np.asarray(booked)[1:]
    diff = np.asarray(carbon_g)[1:] - now_g
    worse = diff > 0
    return Regret(
        deferred=float(later.sum()),
        regretted=float(later[worse].sum()),
        excess_g=float((later * np.where(worse, diff, 0.0)).sum()),
        saved_g=float((later * np.where(worse, 0.0, -diff)).sum()),
    )


def plan(
    scores: np.ndarray,  # [K, R]
    *,
    first_hour: int,
    work_s: float,
    book: SlotBook,
    allowed: np.ndarray | None = None,  # [R]
) -> tuple[int, int, float]:
    """``(hour, replica, score)`` of the best slot with room, booking it; hours are absolute."""
    s = np.array(scores, dtype=float)
    if allowed is not None:
        s[:, ~allowed] = np.inf
    order = np.argsort(s, axis=None, kind="stable")
    k_n, r_n = s.shape
    for flat in order:
        k, r = divmod(int(flat), r_n)
        if not np.isfinite(s[k, r]):
            break
        if book.free(first_hour + k, r) >= work_s:
            book.book(first_hour + k, r, work_s)
            return first_hour + k, r, float(s[k, r])
    raise PlanError(f"no replica has {work_s:.1f} s of room in the next {k_n} h; run it now")
