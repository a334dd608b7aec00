"""The fleet scaler's load forecast, from the requests the router started itself.

Requests are counted per minute by model and the regions they may use (their ``regions``
preference patterns), over the last 25 h, bounded (:data:`MAX_SETS` keys a minute). The forecast for
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
MAX_SETS = 64  # distinct (model, patterns) counted per minute (more count as "anywhere")

Key = tuple[str, tuple[str, ...]]  # (model, the request's regions patterns; () = anywhere)


class LoadUnknown(Exception):
    """Not enough counts yet to forecast the load."""


class Arrivals:
    """Requests started per minute, by model and the ``regions`` patterns they were allowed;
    bounded (25 h of minutes, :data:`MAX_SETS` keys a minute)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started_at = clock()
        self._minutes: deque[tuple[int, dict[Key, int]]] = deque()
        self._warned = False

    def add(self, key: Key) -> None:
        minute = int(self._clock() // MINUTE_S)
        if not self._minutes or self._minutes[-1][0] != minute:
            self._minutes.append((minute, {}))
            while self._minutes[0][0] < minute - KEEP_MINUTES:
                self._minutes.popleft()
        counts = self._minutes[-1][1]
        if key not in counts and len(counts) >= MAX_SETS:
            if not self._warned:
                log.warning("over %d region sets a minute: the rest count as 'anywhere'", MAX_SETS)
                self._warned = True
            key = (key[0], ())
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
