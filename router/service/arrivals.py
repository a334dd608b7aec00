"""The fleet scaler's load forecast, from the requests the router started itself.

Requests are counted per minute by model and the regions they may use (the region names their
``regions`` preference patterns match, sorted; none: anywhere), over the last 25 h, bounded
(:data:`MAX_SETS` keys a minute; past it a request counts under a key whose regions it may use,
never as "anywhere": the bound never drops a residency restriction). The forecast for
a time ``T`` is, per key, the larger of the rate over the last 15 complete minutes and
the rate in the hour around ``T`` yesterday (once counts cover that hour whole): the higher of
"now" and "the same time yesterday", so a daily peak is met before it comes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

RECENT_S = 900  # "now": the last 15 complete minutes
YESTERDAY_S = 86400
AROUND_S = 1800  # the hour around the same time yesterday: +- 30 min
MINUTE_S = 60
KEEP_MINUTES = (YESTERDAY_S + 2 * AROUND_S) // MINUTE_S + 30  # plus the longest lead's room
MAX_SETS = 64  # distinct (model, regions) counted per minute (see Arrivals.add past it)

Key = tuple[str, tuple[str, ...]]  # (model, the region names it may use, sorted; () = anywhere)


class LoadUnknown(Exception):
    """Not enough counts yet to forecast the load."""


class Arrivals:
    """Requests started per minute, by model and the regions they were allowed; bounded (25 h
    of minutes, :data:`MAX_SETS` keys a minute, see :meth:`add`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started_at = clock()
        self._minutes: deque[tuple[int, dict[Key, int]]] = deque()
        self._warned = False

    def add(self, key: Key) -> None:
        """Count a request. Past :data:`MAX_SETS` keys this minute, a new key is counted under
        the largest existing key of its model whose regions it may all use, else under its
        first region alone (at most one key per model and region more): capacity planned
        there serves it, so a residency restriction is never lost."""
        minute = int(self._clock() // MINUTE_S)
        if not self._minutes or self._minutes[-1][0] != minute:
            self._minutes.append((minute, {}))
            while self._minutes[0][0] < minute - KEEP_MINUTES:
                self._minutes.popleft()
        counts = self._minutes[-1][1]
        if key not in counts and len(counts) >= MAX_SETS:
            if not self._warned:
                log.warning("over %d region sets a minute: the rest count under a set they "
                            "may use", MAX_SETS)  # fmt: skip
                self._warned = True
            key = _inside(key, counts)
        counts[key] = counts.get(key, 0) + 1

    def rates(self, lo_s: float, hi_s: float) -> dict[Key, float] | None:
        """Requests/s per key over the complete minutes in [``lo_s``, ``hi_s``) of the
        clock, or None when none of them was counted whole."""
        lo = max(math.ceil(lo_s / MINUTE_S), int(self.started_at // MINUTE_S) + 1)
        hi = min(int(hi_s // MINUTE_S), int(self._clock() // MINUTE_S))
        if hi <= lo:
            return None
        out: dict[Key, float] = {}
        for minute, counts in self._minutes:
            if lo <= minute < hi:
                for key, n in counts.items():
                    out[key] = out.get(key, 0.0) + n
        span = (hi - lo) * MINUTE_S
        return {k: v / span for k, v in out.items()}

    def forecast(self, ahead_s: float) -> tuple[dict[Key, float], dict[str, Any]]:
        """The forecast rate per key ``ahead_s`` from now, and how it was made."""
        now = self._clock()
        recent = self.rates(now - RECENT_S, now)
        if recent is None:
            raise LoadUnknown(f"warming up: {now - self.started_at:.0f} s of counts")
        then = now + ahead_s - YESTERDAY_S
        yesterday = None
        if then - AROUND_S >= self.started_at + MINUTE_S:  # the window was counted whole
            yesterday = self.rates(then - AROUND_S, then + AROUND_S)
        keys = set(recent) | set(yesterday or {})
        est = {k: max(recent.get(k, 0.0), (yesterday or {}).get(k, 0.0)) for k in keys}
        how = {
            "rps_last_15min": sum(recent.values()),
            "rps_same_hour_yesterday": None if yesterday is None else sum(yesterday.values()),
        }
        return est, how


def _inside(key: Key, counts: dict[Key, int]) -> Key:
    """The largest key in ``counts`` of ``key``'s model whose regions ``key`` may all use
    (``()``: any region), else ``key``'s first region alone (or ``key`` when it is anywhere)."""
    model, regions = key
    allowed = set(regions)
    best: Key | None = None
    for k in counts:
        if k[0] != model or not k[1] or not (not regions or set(k[1]) <= allowed):
            continue
        if best is None or len(k[1]) > len(best[1]):
            best = k
    if best is not None:
        return best
    return (model, regions[:1]) if regions else key
