"""Carbon-intensity sources behind one interface, and the factory that builds them from config.

See :mod:`forecasting.sources.base` for the interface and its units.
"""

from __future__ import annotations

from pathlib import Path

from forecasting.datasets import dataset_path, zone_file
from forecasting.sources.base import CarbonSource, Clock, Forecast, Intensity, Signal, utc_now
from forecasting.sources.files import FileSource, ZoneFile, read_intensity_file
from forecasting.sources.http import HttpClient
from forecasting.sources.record import ForecastRecord
from forecasting.sources.recorded import RecordedSource
from forecasting.sources.remote import (
    ElectricityMapsSource,
    UKCarbonIntensitySource,
    WattTimeSource,
)
from forecasting.sources.replay import ReplaySource

__all__ = [
    "CarbonSource",
    "ElectricityMapsSource",
    "FileSource",
    "Forecast",
    "ForecastRecord",
    "Intensity",
    "RecordedSource",
    "ReplaySource",
    "UKCarbonIntensitySource",
    "WattTimeSource",
    "ZoneFile",
    "build_sources",
    "read_intensity_file",
    "record_path",
]


def _zone_files(spec: object, zones: list[str], base: Path) -> dict[str, ZoneFile]:
    out = {}
    for zone in zones:
        if getattr(spec, "dataset", None):
            path = dataset_path(zone_file(spec.dataset, zone))  # type: ignore[attr-defined]
        else:
            path = Path(str(spec.path).format(zone=zone))  # type: ignore[attr-defined]
            if not path.is_absolute():
                path = base / path
        out[zone] = ZoneFile(
            path,
            emission_factor=spec.emission_factor,  # type: ignore[attr-defined]
            unit=spec.unit,  # type: ignore[attr-defined]
        )
    return out


def record_path(config: object, base_dir: Path) -> Path:
    """Where the remote sources' forecasts are recorded: beside the ledger, ``<ledger stem>
    .forecasts.sqlite`` (the ledger's path resolved against the config's folder)."""
    ledger = Path(str(config.ledger))  # type: ignore[attr-defined]
    if not ledger.is_absolute():
        ledger = base_dir / ledger
    return ledger.with_suffix(".forecasts.sqlite")


def build_sources(
    config: object,
    *,
    clock: Clock = utc_now,
    base_dir: Path | None = None,
    records: Path | None = None,
) -> dict[str, CarbonSource]:
    """One :class:`CarbonSource` per entry of ``config.carbon_sources`` (a ``regions.Config``).

    File and replay sources are given the zones of the regions that use them; relative file
    paths are resolved against ``base_dir`` (the config file's folder). Remote sources are
    wrapped in :class:`RecordedSource` as their ``forecast:`` block says, their forecasts
    recorded in ``records`` (default: :func:`record_path`).
    """
    from regions.config import (
        Config,
        ElectricityMapsCarbon,
        FileCarbon,
        ReplayCarbon,
        UKCarbon,
        WattTimeCarbon,
    )

    assert isinstance(config, Config)
    base = base_dir or Path.cwd()
    out: dict[str, CarbonSource] = {}
    for name, spec in config.carbon_sources.items():
        regions = [r for r in config.regions if r.carbon_source == name]
        zones = sorted({r.zone for r in regions})
        signal: Signal = regions[0].signal if regions else "average"
        if isinstance(spec, ReplayCarbon):
            files = FileSource(_zone_files(spec, zones, base), signal=signal, name=name)
            out[name] = ReplaySource(files, clock=clock, name=name)
        elif isinstance(spec, FileCarbon):
            out[name] = FileSource(
                _zone_files(spec, zones, base), signal=signal, clock=clock, name=name
            )
        else:
            http = HttpClient(
                source=name, timeout_s=spec.timeout_s, cache_ttl_s=spec.cache_ttl_s, clock=clock
            )
            remote: CarbonSource
            if isinstance(spec, ElectricityMapsCarbon):
                remote = ElectricityMapsSource(
                    spec.api_key,
                    base_url=spec.base_url,
                    emission_factor=spec.emission_factor,
                    http=http,
                    clock=clock,
                )
            elif isinstance(spec, WattTimeCarbon):
                remote = WattTimeSource(
                    spec.username, spec.password, base_url=spec.base_url, http=http, clock=clock
                )
            else:
                assert isinstance(spec, UKCarbon)
                remote = UKCarbonIntensitySource(base_url=spec.base_url, http=http, clock=clock)
            fc = spec.forecast
            record = (
                ForecastRecord(
                    records or record_path(config, base),
                    name,
                    retention_days=fc.retention_days,
                    clock=clock,
                )
                if fc.record
                else None
            )
            out[name] = RecordedSource(
                remote,
                record,
                ensemble=fc.ensemble,
                history_days=fc.history_days,
                window_days=fc.window_days,
                clock=clock,
            )
    return out
