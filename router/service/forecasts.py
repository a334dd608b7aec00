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

from forecasting.errors import ForecastingError
from forecasting.sources.base import CarbonSource, Forecast, require_utc
from regions.config import Region

log = logging.getLogger(__name__)

HORIZON_H = 48  # the longest deferral: one forecast per region serves every window


@dataclass
class ForecastState:
    forecast: Forecast
    made_at: float  # clock() when it landed
    error: dict[str, float] | None = None  # recent error: mape (%), coverage_80 (share)


class ForecastView:
    """The forecasts deferral plans with; see the module docstring."""

    def __init__(
        self,
        regions: list[Region],
        sources: dict[str, CarbonSource],
        *,
        max_age_s: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
        error_of: Callable[[CarbonSource, str], Any] | None = None,
    ) -> None:
        self.regions = {r.name: r for r in regions}
        self.sources = sources
        self.max_age_s = max_age_s
        self._clock = clock
        self._error_of = error_of
        self._state: dict[str, ForecastState] = {}
        self._inflight: dict[str, asyncio.Task[ForecastState]] = {}
        self.refits = 0
        self.failures = 0

    async def get(self, region: Region) -> Forecast:
        """The region's forecast: the last one made, refreshed beside the request once it is
        ``max_age_s`` old; the first is awaited. Raises :class:`ForecastingError` when the
        region has none (its source failed and nothing was made before)."""
        state = self._state.get(region.name)
        if state is None:
            return (await asyncio.shield(self._start(region))).forecast
        if self._clock() - state.made_at >= self.max_age_s:
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

    def adopt(self, old: ForecastView) -> None:
        """Keep the forecasts of ``old`` (the view before a reload) for each region whose zone
        and carbon source are the same, so a reload fits nothing on a request's path."""
        for name, region in self.regions.items():
            before = old.regions.get(name)
            state = old._state.get(name)
            if before is None or state is None:
                continue
            if (before.zone, before.carbon_source) == (region.zone, region.carbon_source):
                self._state[name] = state

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
        except BaseException:
            self.failures += 1
            raise
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


def recent_error_of(source: CarbonSource, zone: str, days: int = 7) -> dict[str, float] | None:
    """The forecaster's error over the last ``days`` for a file or replay source (the
    forecasts it would have issued each hour, against what happened), reusing the model of
    its latest forecast; ``None`` for an API's forecast, whose past issues the router does not
    keep. Seconds of CPU: run it in a thread."""
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
