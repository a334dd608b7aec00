"""The ``CarbonSource`` seam: grid carbon intensity for a zone, now, in the past, and ahead.

Units and conventions
---------------------
- Intensity is grams CO2-equivalent per kWh (``g_per_kwh``). Sources that speak another unit
  (WattTime: lbs/MWh) convert before returning.
- Every timestamp is timezone-aware UTC and names the *start* of the period it describes.
- ``signal`` is ``"average"`` (the grid mix, Electricity Maps, UK CI) or ``"marginal"`` (the
  emissions of the marginal generator, WattTime's MOER). Billing records which one was used.
- A source never turns a failure into a number. It either returns the last value it really
  saw, marked ``stale`` with its age, or raises a :class:`CarbonSourceError`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import pandas as pd

from forecasting.errors import SourceDataError

Signal = Literal["average", "marginal"]
Clock = Callable[[], datetime]

LBS_PER_MWH_TO_G_PER_KWH = 0.45359237  # 1 lb = 453.59237 g; 1 MWh = 1000 kWh


def utc_now() -> datetime:
    return datetime.now(UTC)


def require_utc(when: datetime, what: str = "time") -> datetime:
    """Return ``when`` if it is timezone-aware, converted to UTC; naive datetimes are refused."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware (UTC), got naive {when.isoformat()}")
    return when.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Intensity:
    """One intensity value for one zone and period."""

    zone: str
    time: datetime
    g_per_kwh: float
    signal: Signal
    source: str
    stale: bool = False
    age_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Forecast:
    """Forecast intensity for a zone: ``g_per_kwh`` is indexed by UTC period start.

    ``quantiles``, when the source has them: g/kWh, index = the same period starts, columns =
    quantile levels as floats (e.g. 0.1, 0.5, 0.9), non-decreasing across the columns.

    ``weights``, when the forecast is an ensemble's: the members' weights, index = the first
    hour ahead of each horizon bucket (1, 2, 4, 7, 13, 25, 49), columns = the members.
    ``note``: why the forecast is not what was configured (a member missing, a fallback), or "".
    """

    zone: str
    issued_at: datetime
    g_per_kwh: pd.Series
    signal: Signal
    source: str
    stale: bool = False
    age_s: float = 0.0
    quantiles: pd.DataFrame | None = None
    weights: pd.DataFrame | None = None
    note: str = ""

    def quantile_at(self, when: datetime, q: float) -> float:
        """The ``q`` quantile for the period containing ``when``."""
        when = require_utc(when)
        if self.quantiles is None:
            raise SourceDataError(
                "this forecast has no quantiles (only the file and replay sources give them); "
                "use at() for the point forecast",
                source=self.source,
                zone=self.zone,
            )
        if q not in self.quantiles.columns:
            raise SourceDataError(
                f"no {q} quantile; this forecast has {list(self.quantiles.columns)}",
                source=self.source,
                zone=self.zone,
            )
        return self._covering(self.quantiles[q], when)

    def at(self, when: datetime) -> float:
        """The forecast value for the period containing ``when``."""
        return self._covering(self.g_per_kwh, require_utc(when))

    def _covering(self, series: pd.Series, when: datetime) -> float:
        """The value of ``series`` (indexed by period start) for the period containing
        ``when``; before its first period, an error."""
        idx = series.index.searchsorted(pd.Timestamp(when), side="right") - 1
        if idx < 0:
            raise SourceDataError(
                f"forecast starts {series.index[0]}, asked for {when.isoformat()}",
                source=self.source,
                zone=self.zone,
            )
        return float(series.iloc[idx])


class CarbonSource(ABC):
    """Grid carbon intensity for zones. Implementations: files, replay, Electricity Maps v3,
    WattTime v3, UK Carbon Intensity.

    All methods are coroutines so that network sources and file sources share one interface.
    """

    name: str
    signal: Signal

    @abstractmethod
    async def latest(self, zone: str) -> Intensity:
        """The intensity of the current period (or the freshest one the source has)."""

    @abstractmethod
    async def history(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        """Measured intensity for periods starting in ``[start, end)``, g/kWh, UTC index."""

    @abstractmethod
    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        """Forecast intensity for the next ``horizon_h`` hours from now."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release network sessions; file sources hold nothing."""


def clean_series(values: pd.Series, *, source: str, zone: str) -> pd.Series:
    """Validate a series of g/kWh: float, sorted UTC index, no NaN, no negative, no duplicates.

    NaN rows are dropped (a gap, not a zero); negative values are a data error.
    """
    if not isinstance(values.index, pd.DatetimeIndex):
        raise SourceDataError("series has no datetime index", source=source, zone=zone)
    s = pd.to_numeric(values, errors="coerce").astype("float64")
    s.index = values.index.tz_convert("UTC") if values.index.tz else values.index.tz_localize("UTC")
    s = s[~s.index.duplicated(keep="last")].sort_index().dropna()
    if (s < 0).any():
        bad = s[s < 0]
        raise SourceDataError(
            f"negative intensity {bad.iloc[0]} at {bad.index[0]}", source=source, zone=zone
        )
    s.name = "g_per_kwh"
    return s


def checked_value(value: object, *, source: str, zone: str, field: str) -> float:
    """A finite, non-negative float from an API field, or :class:`SourceDataError`."""
    if value is None or isinstance(value, bool):
        raise SourceDataError(f"field {field!r} is {value!r}", source=source, zone=zone)
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise SourceDataError(
            f"field {field!r} is not a number: {value!r}", source=source, zone=zone
        ) from e
    if not math.isfinite(out) or out < 0:
        raise SourceDataError(f"field {field!r} is {out}", source=source, zone=zone)
    return out
