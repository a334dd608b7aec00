"""The exception tree of the ``forecasting`` package (drawn in its ``__init__``)."""

from __future__ import annotations

from carbonrouter.errors import CarbonRouterError


class ForecastingError(CarbonRouterError):
    """Root of every error raised by :mod:`forecasting`."""


class DatasetError(ForecastingError):
    """A dataset file is missing, cannot be downloaded, or does not match its sha256."""


class ForecastError(ForecastingError):
    """A forecaster could not be fitted or asked for a forecast."""


class ForecastRecordError(ForecastingError):
    """The record of issued provider forecasts cannot be opened, read or written."""


class CarbonSourceError(ForecastingError):
    """A carbon-intensity source failed for ``zone``.

    The message always names the source and the zone, and says what to do about it.
    """

    def __init__(self, message: str, *, source: str, zone: str | None = None) -> None:
        where = f"{source}" + (f" zone {zone}" if zone else "")
        super().__init__(f"{where}: {message}")
        self.source = source
        self.zone = zone


class SourceAuthError(CarbonSourceError):
    """The API refused the credentials (HTTP 401/403)."""


class SourceUnavailable(CarbonSourceError):
    """Timeouts, connection errors, 429 or 5xx persisted through every retry."""


class SourceDataError(CarbonSourceError):
    """The answer could not be used: malformed JSON, null values, unknown units."""


class UnknownZoneError(CarbonSourceError):
    """The source has no data for this zone or period."""
