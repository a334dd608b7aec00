"""Replay: a historical file played back at the current time, for demos and the local default.

The wall clock is mapped into the file by a whole number of 52-week years (364 days), so the
weekday pattern is kept and the date stays within a couple of days of the same time of year.
The offset is the smallest such shift that puts ``now + max_horizon_h`` inside the file, so a
forecast never needs data the file lacks. Values are returned with real (current) timestamps.
"""

from __future__ import annotations

import asyncio
import math
from datetime import datetime
from typing import Any

import pandas as pd

from forecasting.errors import UnknownZoneError
from forecasting.sources.base import CarbonSource, Clock, Forecast, Intensity, require_utc, utc_now
from forecasting.sources.files import FileSource

YEAR_52W = pd.Timedelta(days=364)


class ReplaySource(CarbonSource):
    def __init__(
        self, files: FileSource, *, clock: Clock = utc_now, max_horizon_h: int = 96, name: str = ""
    ) -> None:
        self.name = name or f"replay({files.name})"
        self.signal = files.signal
        self._files = files
        self._clock = clock
        self._max_horizon = pd.Timedelta(hours=max_horizon_h)

    def offset(self, zone: str, when: datetime | None = None) -> pd.Timedelta:
        """How far back in the file ``when`` (default: now) is played from (a multiple of 364 d)."""
        now = pd.Timestamp(require_utc(when or self._clock()))
        series = self._files.series(zone)
        first, last = series.index[0], series.index[-1]
        years = max(0, math.ceil((now + self._max_horizon - last) / YEAR_52W))
        shift = YEAR_52W * years
        if now - shift < first + pd.Timedelta(days=8):
            raise UnknownZoneError(
                f"file covers {first} .. {last}, too short to replay at {now}",
                source=self.name,
                zone=zone,
            )
        return shift

    async def latest(self, zone: str) -> Intensity:
        shift = self.offset(zone)
        t, value = self._files._covering(zone, pd.Timestamp(require_utc(self._clock())) - shift)
        return Intensity(
            zone=zone,
            time=(t + shift).to_pydatetime(),
            g_per_kwh=value,
            signal=self.signal,
            source=self.name,
        )

    async def history(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        shift = self.offset(zone)
        now = pd.Timestamp(require_utc(self._clock()))
        lo = pd.Timestamp(require_utc(start)) - shift
        hi = min(pd.Timestamp(require_utc(end)), now) - shift
        s = self._files.series(zone)
        out = s[(s.index >= lo) & (s.index < hi)]
        if out.empty:
            raise UnknownZoneError(
                f"no replayed data in [{start}, {end})", source=self.name, zone=zone
            )
        out = out.copy()
        out.index = out.index + shift
        return out

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        shift = self.offset(zone)
        now = pd.Timestamp(require_utc(self._clock())).floor("h")
        # a fit takes seconds of CPU: in a worker thread, so the event loop keeps serving
        played, band = await asyncio.to_thread(
            self._files._forecast_pair, zone, now - shift, horizon_h
        )
        played, band = played.copy(), band.copy()
        played.index = played.index + shift
        band.index = band.index + shift
        return Forecast(
            zone=zone,
            issued_at=now.to_pydatetime(),
            g_per_kwh=played,
            signal=self.signal,
            source=self.name,
            quantiles=band,
        )

    def recent_error(self, zone: str, days: int = 7) -> dict[str, Any]:
        """:meth:`FileSource.recent_error` at the replayed now, times in the current year."""
        shift = self.offset(zone)
        now = pd.Timestamp(require_utc(self._clock())).floor("h")
        out = self._files.recent_error(zone, now - shift, days)
        for key in ("since", "until"):
            out[key] = (pd.Timestamp(out[key]) + shift).isoformat()
        return out
