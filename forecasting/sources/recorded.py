"""A remote source whose forecasts are recorded, and, where configured, ensembled.

:class:`RecordedSource` wraps a remote :class:`CarbonSource` (Electricity Maps, WattTime, UK
CI). Every forecast it fetches is written to a :class:`ForecastRecord`. With ``ensemble=False``
it returns the provider's forecast as it came. With ``ensemble=True`` it forecasts with
:class:`CarbonEnsemble` over the members ``model``, ``naive_24``, ``naive_168`` and
``published`` (the provider's forecast), weighted per horizon bucket by their error on the
trailing ``window_days``, with a q10/q50/q90 band, as the file sources do:

- actuals: the inner source's ``history()`` over the last ``history_days``, kept in the
  record's ``actual`` table; each fit fetches only the hours since the last one stored (and
  the day before, which providers revise), so an API is asked for the whole span once;
- the ``published`` member, by issue (:class:`LatestIssued`): at each issue time the window
  scores (and now), the value for each target hour from the latest forecast recorded in or
  before the issue hour; now, the forecast just fetched. So the provider is scored at each
  horizon on the forecasts it had issued that far ahead, as the model and the naive forecasts
  are. (A single column of, for each target hour, the latest issue before it, the DACF files'
  convention and :meth:`ForecastRecord.published`, would score it on its 1-2 h ahead forecasts
  at every horizon and flatter it on the day-ahead buckets.)
- at most one fit per zone per hour (cached; concurrent askers wait for the first), in a worker
  thread: a fit is seconds of CPU.

It degrades and says why (``Forecast.note`` and a warning in the log), never to a made-up value:

- too little history (the API failed or serves less than the ensemble needs), or too few
  recorded issues to weigh the provider on the window (under 95 % of its (issue, hour ahead)
  cells): the provider's forecast alone, as with ``ensemble=False``; likewise when the fit
  itself fails;
- the provider's forecast fetch failed: the ensemble of the other members (for the rest of
  that hour: the result is cached), if the history allows; else the fetch's error is raised
  (the router keeps its last forecast).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from forecasting.errors import CarbonSourceError, ForecastError, SourceUnavailable
from forecasting.sources.base import (
    CarbonSource,
    Clock,
    Forecast,
    Intensity,
    require_utc,
    utc_now,
)
from forecasting.sources.record import ForecastRecord, ForecastRecordError, hourly, to_hour

if TYPE_CHECKING:
    from forecasting.ensemble import CarbonEnsemble

log = logging.getLogger(__name__)

MIN_TRAIN_DAYS = 15  # the learned member's fit needs 14 days, and its holdout the window after
MIN_COVERAGE = 0.95  # share of the window's hours with a value, for a member to be weighed
REVISED_H = 24  # the last hours of actuals fetched again: providers revise their estimates
MAX_HORIZON_H = 96  # the ensemble's horizon buckets end there


@dataclasses.dataclass(frozen=True)
class _Fit:
    forecast: Forecast
    fit_h: int


class RecordedSource(CarbonSource):
    """``inner``'s answers; its forecasts recorded in ``record`` (None: not recorded) and, with
    ``ensemble``, combined with the learned and naive forecasts; see the module docstring."""

    MAX_CACHED = 64  # (zone, hour) forecasts kept: bounded memory

    def __init__(
        self,
        inner: CarbonSource,
        record: ForecastRecord | None,
        *,
        ensemble: bool = False,
        history_days: int = 60,
        window_days: int = 28,
        clock: Clock = utc_now,
    ) -> None:
        if ensemble and record is None:
            raise ValueError("the ensemble weighs the provider by its recorded issues: no record")
        need = window_days + MIN_TRAIN_DAYS + 2
        if ensemble and history_days < need:
            raise ValueError(f"history_days {history_days} < window_days + {need - window_days}")
        self.inner = inner
        self.name = inner.name
        self.signal = inner.signal
        self.record = record
        self.ensemble = ensemble
        self.history_days = history_days
        self.window_days = window_days
        self._clock = clock
        self._cache: dict[tuple[str, pd.Timestamp], _Fit] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.fits = 0  # ensembles fitted (for tests and the log)

    # ---- pass-through -----------------------------------------------------------------------

    async def latest(self, zone: str) -> Intensity:
        return await self.inner.latest(zone)

    async def history(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        return await self.inner.history(zone, start, end)

    async def aclose(self) -> None:
        await self.inner.aclose()
        if self.record is not None:
            self.record.close()

    # ---- forecast ---------------------------------------------------------------------------

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        if not self.ensemble:
            fc = await self.inner.forecast(zone, horizon_h)
            await self._record(zone, fc)
            return fc
        now = pd.Timestamp(require_utc(self._clock(), "clock()")).floor("h")
        fit_h = 48 if horizon_h <= 48 else horizon_h  # one fit serves every deferral window
        lock = self._locks.setdefault(zone, asyncio.Lock())
        async with lock:  # one fit per zone and hour: a second asker waits for the first
            got = self._cache.get((zone, now))
            if got is None or got.fit_h < horizon_h:
                got = _Fit(await self._make(zone, now, fit_h), fit_h)
                self._cache[zone, now] = got
                while len(self._cache) > self.MAX_CACHED:
                    self._cache.pop(next(iter(self._cache)))  # the oldest
        return _cut(got.forecast, horizon_h)

    async def _record(self, zone: str, fc: Forecast) -> None:
        """Write ``fc`` to the record, by the hour it was fetched; a record that cannot be
        written is logged, and the forecast stands."""
        if self.record is None:
            return
        fetched = pd.Timestamp(require_utc(self._clock())) - pd.Timedelta(seconds=fc.age_s)
        try:
            await asyncio.to_thread(self.record.add_issue, zone, fetched, fc.g_per_kwh)
        except ForecastRecordError as e:
            log.warning("%s zone %s: forecast not recorded: %s", self.name, zone, e)

    async def _make(self, zone: str, now: pd.Timestamp, fit_h: int) -> Forecast:
        fc: Forecast | None = None
        failure: CarbonSourceError | None = None
        try:
            fc = await self.inner.forecast(zone, fit_h)
        except CarbonSourceError as e:
            failure = e
        if fc is not None:
            await self._record(zone, fc)
        if fit_h > MAX_HORIZON_H:
            why = f"{fit_h} h is past the ensemble's {MAX_HORIZON_H} h"
            return self._alone(fc, failure, zone, why)
        history, short = await self._history(zone, now, fit_h)
        if history is None:
            return self._alone(fc, failure, zone, short)
        idx = pd.date_range(history.index[0], now + pd.Timedelta(hours=fit_h - 1), freq="h")
        frame = pd.DataFrame({"g_per_kwh": history.reindex(idx)}, index=idx)
        frame.loc[frame.index >= now, "g_per_kwh"] = np.nan
        table: LatestIssued | None = None
        if fc is not None:
            table, coverage = await self._by_issue(zone, now, fit_h, fc)
            if coverage < MIN_COVERAGE:
                return self._alone(
                    fc,
                    None,
                    zone,
                    f"recorded provider forecasts cover {coverage:.0%} of the "
                    f"{self.window_days} days it is weighed on (needs {MIN_COVERAGE:.0%})",
                )
            from forecasting.ensemble import MEMBERS

            members: tuple[str, ...] = MEMBERS
            note = ""
        else:
            members = ("model", "naive_24", "naive_168")
            note = f"provider forecast unavailable ({failure}); ensemble of {', '.join(members)}"
            log.warning("%s zone %s: %s", self.name, zone, note)
        try:
            point, band, weights = await asyncio.to_thread(
                self._fit, frame, now, fit_h, members, table
            )
        except ForecastError as e:
            return self._alone(fc, failure, zone, f"ensemble fit failed: {e}")
        except Exception as e:  # noqa: BLE001  # a fitting library's error: the provider stands
            log.exception("%s zone %s: the ensemble fit raised", self.name, zone)
            return self._alone(fc, failure, zone, f"ensemble fit failed: {type(e).__name__}: {e}")
        self.fits += 1
        return Forecast(
            zone=zone,
            issued_at=now.to_pydatetime(),
            g_per_kwh=point,
            signal=self.signal,
            source=self.name,
            stale=fc.stale if fc is not None else False,
            age_s=fc.age_s if fc is not None else 0.0,
            quantiles=band,
            weights=weights,
            note=note,
        )

    def _alone(
        self, fc: Forecast | None, failure: CarbonSourceError | None, zone: str, why: str
    ) -> Forecast:
        """The provider's forecast by itself, noting why; without one, the fetch's error."""
        if fc is None:
            assert failure is not None
            raise SourceUnavailable(
                f"{failure}; and no ensemble without it: {why}", source=self.name, zone=zone
            ) from failure
        note = f"provider forecast alone: {why}"
        log.warning("%s zone %s: %s", self.name, zone, note)
        return dataclasses.replace(fc, note=note)

    async def _history(
        self, zone: str, now: pd.Timestamp, fit_h: int
    ) -> tuple[pd.Series | None, str]:
        """Hourly actuals over the last ``history_days`` (the record's, topped up from the
        API), or None and why they do not suffice."""
        assert self.record is not None
        lo = now - pd.Timedelta(days=self.history_days)
        try:
            stored = await asyncio.to_thread(self.record.actuals, zone, lo, now)
        except ForecastRecordError as e:
            log.warning("%s zone %s: stored actuals unreadable: %s", self.name, zone, e)
            stored = pd.Series(dtype="float64")
        since = lo if stored.empty else max(lo, stored.index[-1] - pd.Timedelta(hours=REVISED_H))
        fetch_error = ""
        try:
            got = hourly(await self.inner.history(zone, since.to_pydatetime(), now.to_pydatetime()))
        except CarbonSourceError as e:
            fetch_error = f"; history fetch failed: {e}"
            log.warning("%s zone %s: history fetch failed, using stored: %s", self.name, zone, e)
            got = pd.Series(dtype="float64")
        if not got.empty:
            try:
                await asyncio.to_thread(self.record.add_actuals, zone, got)
            except ForecastRecordError as e:
                log.warning("%s zone %s: actuals not stored: %s", self.name, zone, e)
        parts = [p for p in (stored, got) if not p.empty]
        if not parts:
            return None, f"no history of actuals{fetch_error}"
        s = pd.concat(parts)
        s = s[~s.index.duplicated(keep="last")].sort_index()
        s = s[(s.index >= lo) & (s.index < now)]
        need_d = self.window_days + MIN_TRAIN_DAYS + (fit_h + 23) // 24
        span_h = (now - s.index[0]) / pd.Timedelta(hours=1)
        if span_h < need_d * 24 or len(s) < MIN_COVERAGE * span_h:
            return None, (
                f"{len(s)} hours of actuals since {s.index[0]:%Y-%m-%d %H:%M}Z; the ensemble "
                f"needs {need_d} days, {MIN_COVERAGE:.0%} of hours present{fetch_error}"
            )
        return s, ""

    async def _by_issue(
        self, zone: str, now: pd.Timestamp, fit_h: int, fc: Forecast
    ) -> tuple[LatestIssued, float]:
        """The provider's forecasts as issued (recorded, and the one just fetched as issued
        now), and the share of the scoring window's cells (issue, horizon) that have one."""
        assert self.record is not None
        span_h = self.window_days * 24 + fit_h
        lo = now - pd.Timedelta(hours=span_h + 48)  # an issue that still covers the window
        try:
            issued_h, target_h, values = await asyncio.to_thread(
                self.record.issued_table, zone, lo, now + pd.Timedelta(hours=1)
            )
        except ForecastRecordError as e:
            log.warning("%s zone %s: recorded forecasts unreadable: %s", self.name, zone, e)
            issued_h = target_h = np.empty(0, dtype=np.int64)
            values = np.empty(0)
        now_h = to_hour(now)
        fresh = hourly(fc.g_per_kwh)
        keep = issued_h != now_h  # the forecast just fetched is issued now, recorded or not
        table = LatestIssued(
            np.concatenate([issued_h[keep], np.full(len(fresh), now_h)]),
            np.concatenate([target_h[keep], [to_hour(t) for t in fresh.index]]).astype(np.int64),
            np.concatenate([values[keep], fresh.to_numpy(dtype="float64")]),
            first_h=to_hour(lo),
            now_h=now_h,
            horizon_h=fit_h,
        )
        # the cells the ensemble scores: issues every 3 h back over the window, targets past
        positions = pd.date_range(end=now, periods=span_h // 3 + 1, freq="3h")
        got = table(positions, fit_h)
        target = to_hour(positions[0]) + np.arange(len(positions))[:, None] * 3
        seen = (target + np.arange(fit_h)[None, :]) < now_h
        coverage = float(np.isfinite(got[seen]).mean()) if seen.any() else 0.0
        return table, coverage

    def _fit(
        self,
        frame: pd.DataFrame,
        now: pd.Timestamp,
        fit_h: int,
        members: tuple[str, ...],
        published: LatestIssued | None,
    ) -> tuple[pd.Series, pd.DataFrame, pd.DataFrame]:
        from threadpoolctl import threadpool_limits

        from forecasting.ensemble import CarbonEnsemble
        from forecasting.forecaster import QUANTILES, CarbonForecaster

        # the learned member reads no exogenous column: the provider's recorded forecasts are
        # younger than the history, missing in most of its training; the provider enters as
        # the "published" member
        horizon = max(fit_h, 24)
        model: CarbonEnsemble = CarbonEnsemble(
            max_horizon_h=horizon,
            window_days=self.window_days,
            members=members,
            forecaster=CarbonForecaster(max_horizon_h=horizon, use_exogenous=False),
            published_by_issue=published,
        )
        # one native thread: an OpenMP team on a busy host waits at every barrier for a
        # descheduled member (a 60-day fit: 3 s with one thread, 47 s with two on 2 loaded cores)
        with threadpool_limits(1):
            model.fit(frame[frame.index < now])
            point, quants = model.predict_table(frame, pd.DatetimeIndex([now]), fit_h)
        target = pd.date_range(now, periods=fit_h, freq="h")
        series = pd.Series(point[0], index=target, name="g_per_kwh")
        band = pd.DataFrame(quants[0], index=target, columns=list(QUANTILES))
        return series, band, model.last_weights_frame(fit_h)


class LatestIssued:
    """The provider's forecasts as the router had them: called with issue times and ``H``, the
    value for each of the next ``H`` target hours (the issue hour first) from the latest issue
    made in or before the issue hour that covers it; NaN where none does.

    Built from rows ``(issued hour, target hour, g/kWh)`` (hours since the epoch) on a dense
    grid of issue hours ``first_h .. now_h`` x target hours up to ``now_h + horizon_h``."""

    def __init__(
        self,
        issued_h: np.ndarray,
        target_h: np.ndarray,
        values: np.ndarray,
        *,
        first_h: int,
        now_h: int,
        horizon_h: int,
    ) -> None:
        n_i, n_t = now_h - first_h + 1, now_h - first_h + horizon_h
        i, t = issued_h - first_h, target_h - first_h
        ok = (i >= 0) & (i < n_i) & (t >= 0) & (t < n_t) & np.isfinite(values)
        grid = np.full((n_i, n_t), np.nan)
        grid[i[ok], t[ok]] = values[ok]
        # each cell from the latest issue at or before its row that has that target
        rows = np.where(np.isfinite(grid), np.arange(n_i)[:, None], 0)
        rows = np.maximum.accumulate(rows, axis=0)
        self._grid = grid[rows, np.arange(n_t)[None, :]]
        self._first_h = first_h

    def __call__(self, issued: pd.DatetimeIndex, horizon_h: int) -> np.ndarray:
        p = np.array([to_hour(t) for t in issued], dtype=np.int64) - self._first_h
        t = p[:, None] + np.arange(horizon_h)[None, :]
        n_i, n_t = self._grid.shape
        ok = (p[:, None] >= 0) & (p[:, None] < n_i) & (t >= 0) & (t < n_t)
        out = np.full(t.shape, np.nan)
        rows = np.broadcast_to(p[:, None], t.shape)
        out[ok] = self._grid[rows[ok], t[ok]]
        return out


def _cut(fc: Forecast, horizon_h: int) -> Forecast:
    """``fc`` for its first ``horizon_h`` hours (its weights for the buckets they reach)."""
    end = pd.Timestamp(fc.issued_at) + pd.Timedelta(hours=horizon_h)
    weights = fc.weights
    if weights is not None:
        weights = weights[weights.index <= horizon_h]
    band = None if fc.quantiles is None else fc.quantiles[fc.quantiles.index < end]
    return dataclasses.replace(
        fc, g_per_kwh=fc.g_per_kwh[fc.g_per_kwh.index < end], quantiles=band, weights=weights
    )
