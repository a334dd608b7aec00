"""Each region's carbon intensity now, as the request path sees it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from forecasting.errors import CarbonSourceError
from forecasting.sources.base import CarbonSource
from regions.config import Region
from router.errors import CarbonUnavailable

log = logging.getLogger(__name__)


@dataclass
class CarbonReading:
    g_per_kwh: float
    signal: str
    stale: bool
    source: str
    age_s: float


class CarbonView:
    """Each region's intensity now, cached for ``ttl_s``. On a source failure it keeps the
    last value (marked stale) and, lacking one, uses the forecast; it never invents a value."""

    def __init__(
        self,
        regions: list[Region],
        sources: dict[str, CarbonSource],
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.regions = regions
        self.sources = sources
        self.ttl_s = ttl_s
        self._clock = clock
        self._values: dict[str, tuple[float, CarbonReading]] = {}

    async def get(self, region: Region) -> CarbonReading:
        now = self._clock()
        cached = self._values.get(region.name)
        if cached and now - cached[0] < self.ttl_s:
            return cached[1]
        src = self.sources[region.carbon_source]
        try:
            latest = await src.latest(region.zone)
            reading = CarbonReading(
                latest.g_per_kwh, latest.signal, latest.stale, src.name, latest.age_s
            )
        except CarbonSourceError as e:
            if cached:
                old = cached[1]
                reading = CarbonReading(
                    old.g_per_kwh, old.signal, True, old.source, old.age_s + now - cached[0]
                )
                log.warning("%s; using the last value, %.0f s old", e, reading.age_s)
            else:
                try:
                    fc = await src.forecast(region.zone, 1)
                except CarbonSourceError:
                    raise CarbonUnavailable(
                        f"no carbon intensity for region {region.name}: {e}"
                    ) from e
                reading = CarbonReading(
                    float(fc.g_per_kwh.iloc[0]), fc.signal, True, f"{src.name} forecast", 0.0
                )
        self._values[region.name] = (now, reading)
        return reading
