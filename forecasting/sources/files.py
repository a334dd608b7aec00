"""Carbon intensity from files: Electricity Maps exports, CarbonCast/DACF CSVs, generic CSVs.

:func:`read_intensity_file` sniffs the format from the header and returns a frame indexed by
UTC period start with a ``g_per_kwh`` column plus whatever exogenous columns the file carries
(MW per source, weather forecasts, production forecasts, a published forecast).

:class:`FileSource` answers the :class:`CarbonSource` questions *as of its clock*: ``latest`` is
the period containing ``clock()``, ``history`` never looks past it, ``forecast`` uses a published
forecast column when the file has one and otherwise fits :class:`CarbonEnsemble` on the
history before ``clock()``; either way it carries q10/q50/q90 quantiles, calibrated on the
forecasts' errors over the weeks before ``clock()``. Driven by a simulated clock it is the
simulator's carbon source.
"""

from __future__ import annotations

import asyncio
import csv
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd

from forecasting.errors import SourceDataError, UnknownZoneError
from forecasting.sources.base import (
    LBS_PER_MWH_TO_G_PER_KWH,
    CarbonSource,
    Clock,
    Forecast,
    Intensity,
    Signal,
    clean_series,
    require_utc,
    utc_now,
)

if TYPE_CHECKING:
    from forecasting.ensemble import CarbonEnsemble

log = logging.getLogger(__name__)

FileFormat = Literal["electricitymaps", "carboncast", "generic"]
EmissionFactor = Literal["lifecycle", "direct"]
Unit = Literal["g_per_kwh", "lbs_per_mwh"]

EM_TIME = "Datetime (UTC)"
EM_COLUMNS: dict[str, str] = {
    "lifecycle": "Carbon intensity gCO₂eq/kWh (Life cycle)",
    "direct": "Carbon intensity gCO₂eq/kWh (direct)",
}
# Column the DACF files use for their own published day-ahead forecast.
PUBLISHED_FORECAST_COLUMN = "carbon_from_src_forecasts"


def sniff_format(path: Path) -> FileFormat:
    with path.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    if EM_TIME in header:
        return "electricitymaps"
    if "UTC time" in header and "carbon_intensity" in header:
        return "carboncast"
    if len(header) >= 2:
        return "generic"
    raise SourceDataError(
        f"{path}:1: cannot tell the format from the header {header!r}; expected an Electricity "
        "Maps export, a CarbonCast/DACF CSV, or a generic 'time,value' CSV",
        source="file",
    )


def _utc_index(raw: pd.Series, path: Path) -> pd.DatetimeIndex:
    """Parse mixed timestamp spellings ('MM/DD/YYYY HH:MM:SS', ISO with or without offset)."""
    text = raw.astype(str)
    try:
        if text.str.contains("/", regex=False).any():
            idx = pd.to_datetime(text, format="%m/%d/%Y %H:%M:%S", utc=True)
        else:
            idx = pd.to_datetime(text, format="ISO8601", utc=True)
    except (ValueError, TypeError) as e:
        raise SourceDataError(f"{path}: unreadable timestamps: {e}", source="file") from e
    return pd.DatetimeIndex(idx)


def read_intensity_file(
    path: str | Path,
    *,
    emission_factor: EmissionFactor = "lifecycle",
    unit: Unit = "g_per_kwh",
) -> pd.DataFrame:
    """Read any supported intensity file into a frame with a ``g_per_kwh`` column, UTC index."""
    path = Path(path)
    if not path.is_file():
        raise UnknownZoneError(f"no such file {path}", source="file")
    fmt = sniff_format(path)
    df = pd.read_csv(path)
    if fmt == "electricitymaps":
        index = _utc_index(df[EM_TIME], path)
        out = pd.DataFrame({"g_per_kwh": df[EM_COLUMNS[emission_factor]].to_numpy()}, index=index)
        for col in ("Carbon-free energy percentage (CFE%)", "Renewable energy percentage (RE%)"):
            if col in df:
                out[col] = df[col].to_numpy()
    elif fmt == "carboncast":
        index = _utc_index(df["UTC time"], path)
        drop = [c for c in df.columns if c.startswith("Unnamed") or c in ("UTC time", "")]
        out = df.drop(columns=drop).rename(columns={"carbon_intensity": "g_per_kwh"})
        out.index = index
    else:
        time_col, value_col = df.columns[0], df.columns[1]
        index = _utc_index(df[time_col], path)
        out = pd.DataFrame({"g_per_kwh": pd.to_numeric(df[value_col], errors="coerce")})
        out.index = index
        if unit == "lbs_per_mwh":
            out["g_per_kwh"] = out["g_per_kwh"] * LBS_PER_MWH_TO_G_PER_KWH
    out = out[~out.index.duplicated(keep="last")].sort_index()
    out.index.name = "time"
    out = out.apply(pd.to_numeric, errors="coerce")
    if out["g_per_kwh"].notna().sum() == 0:
        raise SourceDataError(f"{path}: no intensity values", source="file")
    if (out["g_per_kwh"] < 0).any():
        first = out.index[(out["g_per_kwh"] < 0).to_numpy()][0]
        raise SourceDataError(f"{path}: negative intensity at {first}", source="file")
    return out


@dataclass(frozen=True)
class ZoneFile:
    path: Path
    emission_factor: EmissionFactor = "lifecycle"
    unit: Unit = "g_per_kwh"


class FileSource(CarbonSource):
    """Historical files, one per zone, answered as of ``clock()``."""

    MAX_CACHED_FORECASTS = 64  # fits kept (zone, hour issued, horizon): bounded memory

    def __init__(
        self,
        files: Mapping[str, ZoneFile],
        *,
        signal: Signal = "average",
        clock: Clock = utc_now,
        name: str = "file",
        forecaster_history_days: int = 365,
    ) -> None:
        self.name = name
        self.signal = signal
        self._files = dict(files)
        self._clock = clock
        self._frames: dict[str, pd.DataFrame] = {}
        self._series: dict[str, pd.Series] = {}
        self._forecast_cache: dict[
            tuple[str, pd.Timestamp, int], tuple[pd.Series, pd.DataFrame]
        ] = {}
        self._fit_lock = threading.Lock()
        self._last_model: dict[str, tuple[pd.Timestamp, int, CarbonEnsemble]] = {}
        self._history_days = forecaster_history_days

    @property
    def zones(self) -> list[str]:
        return sorted(self._files)

    def frame(self, zone: str) -> pd.DataFrame:
        """The whole file of ``zone`` (loaded once), all columns."""
        if zone not in self._frames:
            spec = self._files.get(zone)
            if spec is None:
                raise UnknownZoneError(
                    f"no file configured; known zones: {', '.join(self.zones) or 'none'}",
                    source=self.name,
                    zone=zone,
                )
            self._frames[zone] = read_intensity_file(
                spec.path, emission_factor=spec.emission_factor, unit=spec.unit
            )
        return self._frames[zone]

    def series(self, zone: str) -> pd.Series:
        """The whole measured series of ``zone`` (no clock applied), NaN gaps dropped."""
        if zone not in self._series:  # cleaned once: replay and latest() ask for it every call
            self._series[zone] = clean_series(
                self.frame(zone)["g_per_kwh"], source=self.name, zone=zone
            )
        return self._series[zone]

    def _now(self) -> pd.Timestamp:
        return pd.Timestamp(require_utc(self._clock(), "clock()"))

    def _covering(self, zone: str, when: pd.Timestamp) -> tuple[pd.Timestamp, float]:
        s = self.series(zone)
        i = s.index.searchsorted(when, side="right") - 1
        if i < 0 or when - s.index[i] > timedelta(hours=2):
            raise UnknownZoneError(
                f"file covers {s.index[0]} .. {s.index[-1]}, nothing at {when}; "
                "use the replay source to play a historical file at the current time",
                source=self.name,
                zone=zone,
            )
        return s.index[i], float(s.iloc[i])

    async def latest(self, zone: str) -> Intensity:
        now = self._now()
        t, value = self._covering(zone, now)
        return Intensity(
            zone=zone,
            time=t.to_pydatetime(),
            g_per_kwh=value,
            signal=self.signal,
            source=self.name,
        )

    async def history(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        lo, hi = pd.Timestamp(require_utc(start)), pd.Timestamp(require_utc(end))
        hi = min(hi, self._now())
        s = self.series(zone)
        out = s[(s.index >= lo) & (s.index < hi)]
        if out.empty:
            raise UnknownZoneError(
                f"no data in [{lo}, {hi}); file covers {s.index[0]} .. {s.index[-1]}",
                source=self.name,
                zone=zone,
            )
        return out

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        now = self._now().floor("h")
        # a fit takes seconds of CPU: in a worker thread, so the event loop keeps serving
        series, quantiles = await asyncio.to_thread(self._forecast_pair, zone, now, horizon_h)
        return Forecast(
            zone=zone,
            issued_at=now.to_pydatetime(),
            g_per_kwh=series,
            signal=self.signal,
            source=self.name,
            quantiles=quantiles,
        )

    def forecast_at(self, zone: str, issued: pd.Timestamp, horizon_h: int) -> pd.Series:
        """Forecast issued at ``issued`` for ``horizon_h`` hours, using only what was known then.

        A published forecast column (DACF files) is used as is; otherwise
        :class:`CarbonEnsemble` is fitted on the year before ``issued`` (cached per hour).
        """
        return self._forecast_pair(zone, issued, horizon_h)[0]

    def forecast_quantiles_at(
        self, zone: str, issued: pd.Timestamp, horizon_h: int
    ) -> pd.DataFrame:
        """The q10/q50/q90 band of :meth:`forecast_at` (same fit, same cache): index = target
        hours, columns = :data:`~forecasting.forecaster.QUANTILES`, g/kWh."""
        return self._forecast_pair(zone, issued, horizon_h)[1]

    def _forecast_pair(
        self, zone: str, issued: pd.Timestamp, horizon_h: int
    ) -> tuple[pd.Series, pd.DataFrame]:
        # horizons share fits: one for up to 24 h, one for up to 48 h (the longest deferral),
        # so tenants choosing their own defer= cannot make a fit per horizon
        fit_h = 24 if horizon_h <= 24 else 48 if horizon_h <= 48 else horizon_h
        key = (zone, issued, fit_h)
        with self._fit_lock:  # one fit at a time; a second asker waits for the first's result
            cached = self._forecast_cache.get(key)
            if cached is None:
                cached = self._fit(zone, issued, fit_h)
                self._forecast_cache[key] = cached
                while len(self._forecast_cache) > self.MAX_CACHED_FORECASTS:
                    self._forecast_cache.pop(next(iter(self._forecast_cache)))  # the oldest
        return cached[0].iloc[:horizon_h], cached[1].iloc[:horizon_h]

    def known_at(self, zone: str, issued: pd.Timestamp, horizon_h: int) -> pd.DataFrame:
        """The file as known at ``issued``: actuals before it, exogenous columns (forecasts
        themselves) up to ``issued + horizon_h``, over the last ``forecaster_history_days``."""
        frame = self.frame(zone)
        since = issued - pd.Timedelta(days=self._history_days)
        end = issued + pd.Timedelta(hours=horizon_h)
        known = frame[(frame.index >= since) & (frame.index < end)].copy()
        known.loc[known.index >= issued, "g_per_kwh"] = float("nan")
        return known

    def _fit(
        self, zone: str, issued: pd.Timestamp, horizon_h: int
    ) -> tuple[pd.Series, pd.DataFrame]:
        # imported here: scikit-learn loads only when a forecast is fitted
        from forecasting.ensemble import CarbonEnsemble
        from forecasting.forecaster import QUANTILES

        frame = self.frame(zone)
        target = pd.date_range(issued, periods=horizon_h, freq="h")
        known = self.known_at(zone, issued, horizon_h)
        train = known[known.index < issued]
        if PUBLISHED_FORECAST_COLUMN in frame:
            published = frame[PUBLISHED_FORECAST_COLUMN].reindex(target)
            if published.notna().all():
                # the band from the published forecast's own recent errors
                band = CarbonEnsemble(max_horizon_h=max(horizon_h, 24), members=("published",))
                quantiles = band.fit(train).predict_quantiles(known, issued, horizon_h)
                self._last_model[zone] = (issued, horizon_h, band)
                return clean_series(published, source=self.name, zone=zone), quantiles
        model = CarbonEnsemble(max_horizon_h=max(horizon_h, 24)).fit(train)
        point, quants = model.predict_table(known, pd.DatetimeIndex([issued]), horizon_h)
        self._last_model[zone] = (issued, horizon_h, model)
        series = pd.Series(point[0], index=target, name="g_per_kwh")
        return series, pd.DataFrame(quants[0], index=target, columns=list(QUANTILES))

    def recent_error(self, zone: str, now: pd.Timestamp, days: int = 7) -> dict[str, Any]:
        """:func:`forecasting.backtest.recent_error` of this source's day-ahead forecasts over
        the ``days`` before ``now``. Reuses the model of the latest forecast issued at ``now``
        (its fit held those weeks out); otherwise fits one on the history before ``now - days``.
        """
        from forecasting.backtest import recent_error

        now = pd.Timestamp(now).floor("h")
        last = self._last_model.get(zone)
        model = last[2] if last is not None and last[0] == now else None
        known = self.known_at(zone, now, 0)
        return recent_error(known, now, days, model=model, horizon_h=24)
