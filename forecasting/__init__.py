"""Carbon intensity data, carbon forecasting and per-request energy prediction.

Exceptions (all derive from :class:`forecasting.errors.ForecastingError`)::

    ForecastingError
    ├── DatasetError            a data file is missing, offline, or fails its sha256
    ├── ForecastError           a forecaster cannot fit or predict (too little history ...)
    ├── EnergyModelError        the energy predictor cannot answer (unknown GPU, no data ...)
    ├── ForecastRecordError     the record of issued provider forecasts cannot be opened/written
    └── CarbonSourceError       a carbon-intensity source could not answer (zone, source named)
        ├── SourceAuthError     401/403: credentials wrong or missing
        ├── SourceUnavailable   timeout, connection error, 429 or 5xx after retries
        ├── SourceDataError     the answer was malformed, null or in an unknown unit
        └── UnknownZoneError    the source has no data for that zone / period

Domain code only: nothing here imports Ray.
"""
