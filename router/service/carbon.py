"""Each region's carbon intensity now, as the request path sees it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from forecasting.errors import CarbonSourceError
from forecasting.sources.base import CarbonSource
from regions.config import Region
from router.errors import CarbonUnavailable
from router.ledger import utc_iso

log = logging.getLogger(__name__)


@dataclass
class CarbonReading:
    g_per_kwh: float
    signal: str
    stale: bool
    source: str
    age_s: float
    at: datetime | None = None  # the period the value is for (UTC), when the source says
    forecast: bool = False  # a forecast of the period, not a measurement of it

    @cached_property
    def at_iso(self) -> str:
        """``at`` as the ledger writes times ("" when unknown), formatted once per reading:
        every request billed while it is the region's value carries it on its receipt."""
        return "" if self.at is None else utc_iso(self.at)

    @property
    def kind(self) -> str:
        """What a receipt calls it: ``forecast`` (the source had no measurement), ``stale``
        (the last measurement, kept while its source is down) or ``actual``."""
        return "forecast" if self.forecast else "stale" if self.stale else "actual"


class CarbonView:
    """Each region's intensity now, cached for ``ttl_s``, never invented.

    Concurrent requests for a region share one fetch (single flight). Only the first fetch of
    a region is waited for; later ones run beside the requests, which meanwhile use the last
    value (or the failure on record). When the source fails,
    the last value is used, marked stale, while it is at most ``max_stale_s`` old; lacking
    one, the source's forecast for this hour; lacking that, the region is unavailable
    (:class:`CarbonUnavailable`), and the failure is remembered for ``fail_ttl_s`` so that a
    dead API is not asked again by every request. Other regions are not affected. A refresh
    that has not landed ``fail_ttl_s`` after the value's ``ttl_s`` ran out counts as failed
    meanwhile (the value is served stale, and not past ``max_stale_s``), and a source's error
    of another type than :class:`CarbonSourceError` is a failure too, logged.
    """

    def __init__(
        self,
        regions: list[Region],
        sources: dict[str, CarbonSource],
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_stale_s: float = 3 * 3600.0,
        fail_ttl_s: float = 10.0,
    ) -> None:
        self.regions = regions
        self.sources = sources
        self.ttl_s = ttl_s
        self.max_stale_s = max_stale_s
        self.fail_ttl_s = fail_ttl_s
        self._clock = clock
        self._values: dict[str, tuple[float, CarbonReading]] = {}  # fetched at, reading
        self._failed: dict[str, tuple[float, CarbonUnavailable]] = {}  # failed at, why
        self._inflight: dict[str, asyncio.Task[CarbonReading]] = {}

    async def get(self, region: Region) -> CarbonReading:
        now = self._clock()
        cached = self._values.get(region.name)
        if cached and now - cached[0] < self.ttl_s:
            return cached[1]
        failed = self._failed.get(region.name)
        if cached is None and failed is None:  # nothing known yet: the first fetch is awaited
            return await asyncio.shield(self._start(region))
        # known: refreshed beside the requests, which answer from what is known meanwhile (a
        # slow or dead API of one region must not hold the requests of every region)
        if failed is None or now - failed[0] >= self.fail_ttl_s:
            self._start(region)
        if failed is not None:
            return self._stale_or(region, now, failed[1])
        assert cached is not None
        if now - cached[0] >= self.ttl_s + self.fail_ttl_s:  # its refresh has not landed
            why = CarbonUnavailable(
                f"no carbon intensity for region {region.name}: its refresh has not answered "
                f"and its last value is over {self.max_stale_s:.0f} s old"
            )
            return self._stale_or(region, now, why)
        return cached[1]

    def _start(self, region: Region) -> asyncio.Task[CarbonReading]:
        """The region's refresh under way, started if none is (single flight)."""
        task = self._inflight.get(region.name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._refresh(region))
            self._inflight[region.name] = task
            task.add_done_callback(self._finished(region.name))
        return task

    def _finished(self, name: str) -> Callable[[asyncio.Task[CarbonReading]], None]:
        def done(task: asyncio.Task[CarbonReading]) -> None:
            self._inflight.pop(name, None)
            if not task.cancelled():
                task.exception()  # retrieved: a failure is on record in _failed, not lost

        return done

    def last(self, region: Region) -> CarbonReading | None:
        """The region's last value as requests would use it now (marked stale once its
        refresh is due), without fetching; ``None`` when there is none or it is too old."""
        cached = self._values.get(region.name)
        if cached is None:
            return None
        now = self._clock()
        fetched_at, reading = cached
        if now - fetched_at < self.ttl_s and region.name not in self._failed:
            return reading
        age_s = reading.age_s + now - fetched_at
        if age_s > self.max_stale_s:
            return None
        return CarbonReading(reading.g_per_kwh, reading.signal, True, reading.source, age_s)

    def adopt(self, old: CarbonView) -> None:
        """Keep what ``old`` (the view before a reload) knew of each region whose zone is the
        same: its last value and its failure on record, so the reload waits for no API."""
        zones = {r.name: r.zone for r in old.regions}
        for region in self.regions:
            if zones.get(region.name) != region.zone:
                continue
            if (value := old._values.get(region.name)) is not None:
                self._values[region.name] = value
            if (failed := old._failed.get(region.name)) is not None:
                self._failed[region.name] = failed

    async def idle(self) -> None:
        """Until the refreshes under way have finished (for tests and an orderly stop)."""
        while self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)

    async def _refresh(self, region: Region) -> CarbonReading:
        src = self.sources[region.carbon_source]
        try:
            latest = await src.latest(region.zone)
        except Exception as e:  # noqa: BLE001  # any source error: the region has no value
            if not isinstance(e, CarbonSourceError):
                log.error("carbon source %s failed for %s", src.name, region.zone, exc_info=e)
            now = self._clock()
            cached = self._values.get(region.name)
            if cached is None:  # never had a value: this hour's forecast, if the source has one
                try:
                    fc = await src.forecast(region.zone, 1)
                except Exception as fe:  # noqa: BLE001
                    if not isinstance(fe, CarbonSourceError):
                        log.error("carbon source %s failed for %s", src.name, region.zone,
                                  exc_info=fe)  # fmt: skip
                    why = CarbonUnavailable(f"no carbon intensity for region {region.name}: {e}")
                    self._failed[region.name] = (now, why)
                    raise why from e
                reading = CarbonReading(
                    float(fc.g_per_kwh.iloc[0]), fc.signal, True, f"{src.name} forecast", 0.0,
                    fc.g_per_kwh.index[0].to_pydatetime(), forecast=True,
                )  # fmt: skip
                self._values[region.name] = (now, reading)
                return reading
            why = CarbonUnavailable(
                f"no carbon intensity for region {region.name}: {e}; its last value is over "
                f"{self.max_stale_s:.0f} s old"
            )
            self._failed[region.name] = (now, why)
            log.warning("%s; using the last value while it is under %.0f s old", e,
                        self.max_stale_s)  # fmt: skip
            return self._stale_or(region, now, why)
        reading = CarbonReading(latest.g_per_kwh, latest.signal, latest.stale, src.name,
                                latest.age_s, latest.time)  # fmt: skip
        self._values[region.name] = (self._clock(), reading)
        self._failed.pop(region.name, None)
        return reading

    def _stale_or(self, region: Region, now: float, why: CarbonUnavailable) -> CarbonReading:
        """The last value, marked stale with its age, while it is within ``max_stale_s``."""
        cached = self._values.get(region.name)
        if cached is None:
            raise why
        fetched_at, old = cached
        age_s = old.age_s + now - fetched_at
        if age_s > self.max_stale_s:
            raise why
        return CarbonReading(old.g_per_kwh, old.signal, True, old.source, age_s, old.at,
                             old.forecast)  # fmt: skip
