"""An in-process provider that implements :class:`CarbonSource` over a known truth, and whose
forecasts are as good (or bad) as a test asks: the remote sources' interface without the wire,
for the tests of what is built on their forecasts (recording, ensembling).

Truth: a daily cycle, a weekday effect and a persistent random walk (so the seasonal naive
forecasts are imperfect). Forecasts are issued at each hour for the next ``horizon_h`` hours:
``quality="good"`` is the truth with 3 % noise, ``"bad"`` the truth of 12 hours later (the
cycle upside down) with 25 % noise, ``"fading"`` good for its first 12 hours and bad after.
Every answer is as of ``clock()``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import numpy as np
import pandas as pd

from forecasting.errors import SourceUnavailable, UnknownZoneError
from forecasting.sources.base import CarbonSource, Clock, Forecast, Intensity, require_utc

Quality = Literal["good", "bad", "fading"]


def truth(start: pd.Timestamp, hours: int, seed: int = 7) -> pd.Series:
    rng = np.random.default_rng(seed)
    idx = pd.date_range(start, periods=hours, freq="h")
    h = idx.hour.to_numpy()
    daily = 90 * np.sin(2 * np.pi * (h - 6) / 24)
    weekly = np.where(idx.day_of_week.to_numpy() >= 5, -60.0, 0.0)
    walk = np.cumsum(rng.normal(0, 6, hours))
    walk = walk - np.convolve(walk, np.ones(168) / 168, mode="same")  # stays near its level
    values = 320 + daily + weekly + walk + rng.normal(0, 8, hours)
    return pd.Series(np.maximum(values, 20.0), index=idx, name="g_per_kwh")


class FakeProvider(CarbonSource):
    name = "fakeprov"
    signal = "average"

    def __init__(
        self,
        clock: Clock,
        *,
        start: pd.Timestamp,
        hours: int,
        quality: Quality = "good",
        horizon_h: int = 48,
        history_from: pd.Timestamp | None = None,
        seed: int = 7,
    ) -> None:
        self.clock = clock
        self.truth = truth(start, hours, seed)
        self.quality = quality
        self.horizon_h = horizon_h
        self.history_from = history_from  # older history is not served (a short account)
        self.fail_forecast = False
        self.fail_history = False
        self.forecast_calls = 0
        self.history_calls = 0
        self._rng = np.random.default_rng(seed + 1)

    def _now(self) -> pd.Timestamp:
        return pd.Timestamp(require_utc(self.clock())).floor("h")

    async def latest(self, zone: str) -> Intensity:
        now = self._now()
        return Intensity(zone, now.to_pydatetime(), float(self.truth[now]), "average", self.name)

    async def history(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        self.history_calls += 1
        if self.fail_history:
            raise SourceUnavailable("HTTP 503 from /history", source=self.name, zone=zone)
        lo = pd.Timestamp(require_utc(start))
        if self.history_from is not None:
            lo = max(lo, self.history_from)
        hi = min(pd.Timestamp(require_utc(end)), self._now())
        s = self.truth[(self.truth.index >= lo) & (self.truth.index < hi)]
        if s.empty:
            raise UnknownZoneError(f"no data in [{lo}, {hi})", source=self.name, zone=zone)
        return s

    def issued(self, at: pd.Timestamp, horizon_h: int | None = None) -> pd.Series:
        """The forecast this provider issues at ``at`` (deterministic per hour)."""
        n = horizon_h or self.horizon_h
        target = pd.date_range(at, periods=n, freq="h")
        rng = np.random.default_rng(int(at.value // 3_600_000_000_000) % (2**32))
        good = self.truth.reindex(target).to_numpy() * (1 + rng.normal(0, 0.03, n))
        bad = self.truth.reindex(target + pd.Timedelta(hours=12)).to_numpy()
        bad = bad * (1 + rng.normal(0, 0.25, n))
        ahead = np.arange(n)
        cut = {"good": n, "bad": 0, "fading": 12}[self.quality]
        values = np.where(ahead < cut, good, bad)
        return pd.Series(np.maximum(values, 1.0), index=target, name="g_per_kwh")

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        self.forecast_calls += 1
        if self.fail_forecast:
            raise SourceUnavailable("HTTP 503 from /forecast", source=self.name, zone=zone)
        now = self._now()
        s = self.issued(now, max(horizon_h, self.horizon_h)).iloc[:horizon_h].dropna()
        return Forecast(zone, now.to_pydatetime(), s, "average", self.name)
