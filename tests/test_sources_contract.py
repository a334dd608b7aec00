"""One contract suite for the CarbonSource interface, run against every implementation."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from forecasting.sources import (
    CarbonSource,
    ElectricityMapsSource,
    FileSource,
    ReplaySource,
    UKCarbonIntensitySource,
    WattTimeSource,
    ZoneFile,
)
from forecasting.sources.http import HttpClient
from tests.conftest import FakeClock
from tests.fake_apis import FakeAPI, electricitymaps_app, ukci_app, watttime_app


async def _no_sleep(_: float) -> None:
    return None


class CarbonSourceContract:
    """Subclasses provide the ``source`` fixture and the zone; tests here must hold for all."""

    zone: str = ""
    signal: str = "average"

    async def test_latest_is_a_real_utc_value(self, source: CarbonSource) -> None:
        now = await source.latest(self.zone)
        assert now.zone == self.zone
        assert now.time.tzinfo is not None and now.time.utcoffset() == timedelta(0)
        assert math.isfinite(now.g_per_kwh) and now.g_per_kwh > 0
        assert now.signal == self.signal == source.signal
        assert now.stale is False

    async def test_history_is_sorted_utc_within_window(
        self, source: CarbonSource, clock: FakeClock
    ) -> None:
        end = clock()
        start = end - timedelta(hours=36)
        s = await source.history(self.zone, start, end)
        assert len(s) >= 24
        assert str(s.index.tz) == "UTC"
        assert s.index.is_monotonic_increasing and s.index.is_unique
        assert s.index[0] >= pd.Timestamp(start) and s.index[-1] < pd.Timestamp(end)
        assert (s > 0).all() and s.notna().all()

    async def test_forecast_covers_the_coming_hours(
        self, source: CarbonSource, clock: FakeClock
    ) -> None:
        fc = await source.forecast(self.zone, horizon_h=24)
        s = fc.g_per_kwh
        now_hour = pd.Timestamp(clock()).floor("h")
        assert str(s.index.tz) == "UTC"
        assert s.index[0] >= now_hour
        assert s.index[-1] < now_hour + pd.Timedelta(hours=24)
        assert s.index[-1] >= now_hour + pd.Timedelta(hours=20)
        assert (s > 0).all() and s.notna().all()
        assert fc.at(clock() + timedelta(hours=3)) > 0

    async def test_naive_datetimes_are_refused(self, source: CarbonSource) -> None:
        with pytest.raises(ValueError, match="timezone-aware"):
            await source.history(self.zone, datetime(2024, 1, 1), datetime(2024, 1, 2))  # noqa: DTZ001


# ---- files --------------------------------------------------------------------------------------


@pytest.fixture
def em_clock() -> FakeClock:
    return FakeClock(datetime(2024, 3, 10, 13, 30, tzinfo=UTC))


class TestElectricityMapsExportFile(CarbonSourceContract):
    zone = "DE"

    @pytest.fixture
    def clock(self, em_clock: FakeClock) -> FakeClock:
        return em_clock

    @pytest.fixture
    def source(self, data_dir: Path, clock: FakeClock) -> CarbonSource:
        path = data_dir / "carbon/electricitymaps_hourly/DE.csv"
        return FileSource({"DE": ZoneFile(path)}, clock=clock)


class TestCarbonCastFile(CarbonSourceContract):
    zone = "US-CAL-CISO"

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock(datetime(2021, 8, 15, 6, 0, tzinfo=UTC))

    @pytest.fixture
    def source(self, data_dir: Path, clock: FakeClock) -> CarbonSource:
        path = data_dir / "carbon/carboncast_2020_2021/US-CAL-CISO.csv"
        return FileSource({self.zone: ZoneFile(path)}, clock=clock)


class TestDacfFileWithPublishedForecast(CarbonSourceContract):
    zone = "PJM"

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock(datetime(2021, 9, 1, 0, 0, tzinfo=UTC))

    @pytest.fixture
    def source(self, data_dir: Path, clock: FakeClock) -> CarbonSource:
        path = data_dir / "carbon/dacf_2021/PJM_carbon_from_src_prod_forecasts_direct.csv"
        return FileSource({self.zone: ZoneFile(path)}, clock=clock)

    async def test_uses_the_published_forecast(
        self, source: FileSource, data_dir: Path, clock: FakeClock
    ) -> None:
        fc = await source.forecast(self.zone, 24)
        raw = pd.read_csv(
            data_dir / "carbon/dacf_2021/PJM_carbon_from_src_prod_forecasts_direct.csv"
        )
        first = raw.loc[raw["UTC time"] == "2021-09-01 00:00:00", "carbon_from_src_forecasts"]
        assert fc.g_per_kwh.iloc[0] == pytest.approx(float(first.iloc[0]))


class TestGenericCsvInLbsPerMwh(CarbonSourceContract):
    zone = "CAISO_NORTH"
    signal = "marginal"

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock(datetime(2023, 6, 25, 12, 0, tzinfo=UTC))

    @pytest.fixture
    def source(self, data_dir: Path, clock: FakeClock) -> CarbonSource:
        path = data_dir / "carbon/watttime_caiso_north_2023/watttime2023_caiso-north_actual.csv"
        return FileSource(
            {self.zone: ZoneFile(path, unit="lbs_per_mwh")},
            clock=clock,
            signal="marginal",
            forecaster_history_days=17,
        )


class TestReplay(CarbonSourceContract):
    zone = "SE"

    @pytest.fixture
    def clock(self) -> FakeClock:
        return FakeClock(datetime(2026, 11, 26, 19, 20, tzinfo=UTC))

    @pytest.fixture
    def source(self, data_dir: Path, clock: FakeClock) -> CarbonSource:
        path = data_dir / "carbon/electricitymaps_hourly/SE.csv"
        return ReplaySource(FileSource({"SE": ZoneFile(path)}), clock=clock)

    async def test_plays_the_same_weekday_and_time_of_year(
        self, source: ReplaySource, clock: FakeClock, data_dir: Path
    ) -> None:
        shift = source.offset("SE")
        assert shift % pd.Timedelta(days=364) == pd.Timedelta(0)
        played = pd.Timestamp(clock()) - shift
        assert played.day_of_week == pd.Timestamp(clock()).day_of_week
        assert abs(played.day_of_year - pd.Timestamp(clock()).day_of_year) <= 7
        now = await source.latest("SE")
        raw = FileSource({"SE": ZoneFile(data_dir / "carbon/electricitymaps_hourly/SE.csv")})
        assert now.g_per_kwh == raw.series("SE")[played.floor("h")]


# ---- remote APIs --------------------------------------------------------------------------------


@pytest.fixture
async def em_api(clock: FakeClock) -> AsyncIterator[FakeAPI]:
    api = electricitymaps_app(FakeAPI(clock))
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def wt_api(clock: FakeClock) -> AsyncIterator[FakeAPI]:
    api = watttime_app(FakeAPI(clock))
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def uk_api(clock: FakeClock) -> AsyncIterator[FakeAPI]:
    api = ukci_app(FakeAPI(clock))
    await api.start()
    yield api
    await api.stop()


def http_for(name: str, clock: FakeClock, **kw: float) -> HttpClient:
    return HttpClient(source=name, clock=clock, sleep=_no_sleep, timeout_s=kw.get("timeout_s", 2.0))


class TestElectricityMapsV3(CarbonSourceContract):
    zone = "NL"

    @pytest.fixture
    async def source(self, em_api: FakeAPI, clock: FakeClock) -> AsyncIterator[CarbonSource]:
        src = ElectricityMapsSource(
            "em-key", base_url=f"{em_api.url}/v3", http=http_for("em", clock), clock=clock
        )
        yield src
        await src.aclose()


class TestWattTimeV3(CarbonSourceContract):
    zone = "CAISO_NORTH"
    signal = "marginal"

    @pytest.fixture
    async def source(self, wt_api: FakeAPI, clock: FakeClock) -> AsyncIterator[CarbonSource]:
        src = WattTimeSource("u", "p", base_url=wt_api.url, http=http_for("wt", clock), clock=clock)
        yield src
        await src.aclose()


class TestUKCarbonIntensityNational(CarbonSourceContract):
    zone = "GB"

    @pytest.fixture
    async def source(self, uk_api: FakeAPI, clock: FakeClock) -> AsyncIterator[CarbonSource]:
        src = UKCarbonIntensitySource(base_url=uk_api.url, http=http_for("uk", clock), clock=clock)
        yield src
        await src.aclose()


class TestUKCarbonIntensityRegional(TestUKCarbonIntensityNational):
    zone = "GB-13"
