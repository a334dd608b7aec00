"""Each region's carbon forecast for deferral, refitted off the request path.

A forecast from a file or replay source is a model fitted on the zone's history (seconds of
CPU); one from an API is an HTTP call. Neither belongs on a request's path: the service's
background loop (:meth:`ForecastView.refresh_all`, every ``refit_every_s``) refreshes every
region's forecast, and a request planning a deferral reads what is there. Only a region's first
forecast is waited for (single flight: concurrent requests share it); afterwards a forecast
issued in an earlier hour is still used while the next one is made beside the requests.

Each refresh also records the forecast's recent error (how far its forecasts of the last days
were from what happened), which ``/metrics`` and ``router forecast show`` report.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from forecasting.errors import ForecastingError
from forecasting.sources.base import CarbonSource, Forecast, require_utc
from regions.config import Region

log = logging.getLogger(__name__)

HORIZON_H = 48  # the longest deferral: one forecast per region serves every window


@dataclass
class ForecastState:
    forecast: Forecast
    made_at: float  # clock() when it landed
    error: dict[str, float] | None = None  # recent error: mape (%), coverage_80 (%)


class ForecastView:
    """The forecasts deferral plans with; see the module docstring."""

    def __init__(
        self,
        regions: list[Region],
        sources: dict[str, CarbonSource],
        *,
        max_age_s: float = 3600.0,
        retry_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        error_of: Callable[[CarbonSource, str], Any] | None = None,
    ) -> None:
        self.regions = {r.name: r for r in regions}
        self.sources = sources
        self.max_age_s = max_age_s
        self.retry_s = retry_s  # after a failure, requests start no refresh for this long
        self._clock = clock
        self._error_of = error_of
        self._state: dict[str, ForecastState] = {}
        self._inflight: dict[str, asyncio.Task[ForecastState]] = {}
        self._failed: dict[str, float] = {}  # when a region's last refresh failed
        self.refits = 0
        self.failures = 0

    async def get(self, region: Region) -> Forecast:
        """The region's forecast: the last one made, refreshed beside the request once it is
        ``max_age_s`` old; the first is awaited. Raises :class:`ForecastingError` when the
        region has none (its source failed and nothing was made before). Once a stale
        forecast's refresh failed, requests start none for ``retry_s`` (a failing source, or a
        fit that cannot be made, is not asked again by every request); the background loop's
        refresh always tries."""
        state = self._state.get(region.name)
        if state is None:
            return (await asyncio.shield(self._start(region))).forecast
        failed_at = self._failed.get(region.name)
        recent = failed_at is not None and self._clock() - failed_at < self.retry_s
        if self._clock() - state.made_at >= self.max_age_s and not recent:
            self._start(region)
        return state.forecast

    def error(self, region_name: str) -> dict[str, float] | None:
        state = self._state.get(region_name)
        return None if state is None else state.error

    def age_s(self, region_name: str) -> float | None:
        state = self._state.get(region_name)
        return None if state is None else self._clock() - state.made_at

    async def refresh_all(self) -> None:
        """Refresh every region's forecast (one at a time: each fit is seconds of CPU in a
        worker thread, and the router's requests need the rest). A failure keeps the last
        forecast and is logged."""
        for region in list(self.regions.values()):
            try:
                await asyncio.shield(self._start(region))
            except ForecastingError as e:
                log.warning("no forecast for %s: %s; keeping the last one", region.name, e)
            except Exception:  # noqa: BLE001  # a source's bug: logged, the loop goes on
                log.exception("forecast refresh for %s failed", region.name)
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if me is not None and me.cancelling():
                    raise  # the loop itself is stopped
                # the refresh was cancelled from inside (a source's library): a failure
                log.error("forecast refresh for %s was cancelled; the loop goes on", region.name)

    def adopt(self, old: ForecastView) -> None:
        """Keep the forecasts of ``old`` (the view before a reload) for each region whose zone
        and carbon source are the same, so a reload fits nothing on a request's path; a
        refresh of ``old`` in flight is shared, its forecast landing here too."""
        for name, region in self.regions.items():
            before = old.regions.get(name)
            if before is None:
                continue
            if (before.zone, before.carbon_source) != (region.zone, region.carbon_source):
                continue
            state = old._state.get(name)
            if state is not None:
                self._state[name] = state
            if name in old._failed:
                self._failed[name] = old._failed[name]
            task = old._inflight.get(name)
            if task is not None and name not in self._inflight:
                self._inflight[name] = task
                task.add_done_callback(self._landed(name))

    def _landed(self, name: str) -> Callable[[asyncio.Task[ForecastState]], None]:
        """A shared refresh of the view before a reload: its forecast is this view's too."""

        def done(task: asyncio.Task[ForecastState]) -> None:
            if self._inflight.get(name) is task:
                self._inflight.pop(name)
            if task.cancelled():
                return
            if task.exception() is not None:
                self._failed[name] = self._clock()
                return
            self._failed.pop(name, None)
            self._state[name] = task.result()

        return done

    def _start(self, region: Region) -> asyncio.Task[ForecastState]:
        task = self._inflight.get(region.name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._refresh(region))
            self._inflight[region.name] = task
            task.add_done_callback(self._finished(region.name))
        return task

    def _finished(self, name: str) -> Callable[[asyncio.Task[ForecastState]], None]:
        def done(task: asyncio.Task[ForecastState]) -> None:
            self._inflight.pop(name, None)
            if not task.cancelled():
                task.exception()  # retrieved: the caller or the log has it

        return done

    async def _refresh(self, region: Region) -> ForecastState:
        src = self.sources[region.carbon_source]
        try:
            fc = await src.forecast(region.zone, HORIZON_H)
        except Exception:
            self.failures += 1
            self._failed[region.name] = self._clock()
            raise
        except BaseException:
            self.failures += 1
            raise
        self._failed.pop(region.name, None)
        before = self._state.get(region.name)
        error = None
        if before is not None and before.forecast.issued_at == fc.issued_at:
            error = before.error  # the same issue hour: its error is known (a fit's worth)
        elif self._error_of is not None:
            try:
                error = await asyncio.to_thread(self._error_of, src, region.zone)
            except Exception as e:  # noqa: BLE001  # the forecast stands without its error
                log.warning("recent forecast error of %s unknown: %s", region.name, e)
        state = ForecastState(fc, self._clock(), error)
        self._state[region.name] = state
        self.refits += 1
        return state

    async def idle(self) -> None:
        """Until the refreshes under way have finished (for tests and an orderly stop)."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)


def forecast_rows(fc: Forecast, hours: list[Any], q: float) -> tuple[np.ndarray, np.ndarray]:
    """``(point, bound)`` [len(hours)]: the forecast for the period containing each hour, and
    the forecast at quantile ``q`` there, read between the band's columns (above its highest
    column, the highest: the strictest it has). An hour the forecast (or its band) does not
    cover, before its first period or after its last, and a value that is not a number >= 0, are
    ``inf``: no target. Without a band, or at ``q`` 0.5, the bound is the point forecast (an
    API's forecast is taken at its word)."""
    t = pd.DatetimeIndex(hours)

    def rows(index: pd.Index, values: np.ndarray) -> np.ndarray:
        if len(index) == 0 or len(t) == 0:
            return np.full(len(t), np.inf)
        pos = index.searchsorted(t, side="right") - 1
        covered = (pos >= 0) & (t <= index[-1])
        got = np.where(covered, values[np.clip(pos, 0, None)], np.inf)
        with np.errstate(invalid="ignore"):
            usable = np.isfinite(got) & (got >= 0)  # as the fleet scaler and the dashboard
        return np.where(usable, got, np.inf)

    point = rows(fc.g_per_kwh.index, fc.g_per_kwh.to_numpy(dtype=float))
    band = fc.quantiles
    if q <= 0.5 or band is None or band.empty:
        return point, point.copy()
    levels = np.array([float(c) for c in band.columns])
    order = np.argsort(levels)
    table = band.to_numpy(dtype=float)[:, order]
    at_q = np.array([np.interp(q, levels[order], row) for row in table])
    bound = rows(band.index, at_q)
    return point, np.where(np.isfinite(point), bound, np.inf)


def recent_error_of(source: CarbonSource, zone: str, days: int = 7) -> dict[str, float] | None:
    """The forecaster's error over the last ``days`` for a file or replay source (the
    forecasts it would have issued each hour, against what happened), reusing the model of
    its latest forecast; ``None`` for an API's forecast (its past issues are recorded, see
    :mod:`forecasting.sources.record`, and weighed by a source with ``forecast.ensemble``, but
    not scored here). Seconds of CPU: run it in a thread."""
    import pandas as pd

    from forecasting.sources.files import FileSource
    from forecasting.sources.replay import ReplaySource

    if isinstance(source, ReplaySource):
        files = source._files
        now = pd.Timestamp(require_utc(source._clock())) - source.offset(zone)
    elif isinstance(source, FileSource):
        files, now = source, source._now()
    else:
        return None
    got = files.recent_error(zone, now.floor("h"), days)
    return {k: float(got[k]) for k in ("mape", "naive_mape", "coverage_80", "pinball_loss")}
