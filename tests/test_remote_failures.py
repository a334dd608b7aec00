"""Remote sources against local servers that fail the way the real APIs do: 401, 429 with
Retry-After, 500, timeouts, malformed JSON and null fields; plus caching and stale fallback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from forecasting.errors import SourceAuthError, SourceDataError, SourceUnavailable, UnknownZoneError
from forecasting.sources import ElectricityMapsSource, UKCarbonIntensitySource, WattTimeSource
from forecasting.sources.base import LBS_PER_MWH_TO_G_PER_KWH
from forecasting.sources.http import HttpClient, RetryPolicy
from tests.conftest import FakeClock
from tests.fake_apis import FakeAPI, Fault, electricitymaps_app, ukci_app, watttime_app

LATEST = "/v3/carbon-intensity/latest"


class Sleeps:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
async def em(
    clock: FakeClock, sleeps: Sleeps
) -> AsyncIterator[tuple[FakeAPI, ElectricityMapsSource]]:
    api = electricitymaps_app(FakeAPI(clock))
    await api.start()
    http = HttpClient(
        source="electricitymaps",
        clock=clock,
        sleep=sleeps,
        timeout_s=0.3,
        cache_ttl_s=300,
        max_stale_s=3600,
        retry=RetryPolicy(attempts=3, backoff_s=0.5),
    )
    src = ElectricityMapsSource("em-key", base_url=f"{api.url}/v3", http=http, clock=clock)
    yield api, src
    await src.aclose()
    await api.stop()


async def test_401_is_an_auth_error_without_retries(
    em: tuple[FakeAPI, ElectricityMapsSource], clock: FakeClock, sleeps: Sleeps
) -> None:
    api, _ = em
    bad = ElectricityMapsSource(
        "wrong",
        base_url=f"{api.url}/v3",
        http=HttpClient(source="electricitymaps", clock=clock, sleep=sleeps),
        clock=clock,
    )
    with pytest.raises(SourceAuthError, match=r"electricitymaps zone DE: HTTP 401.*API key"):
        await bad.latest("DE")
    assert api.hits[LATEST] == 1 and sleeps.calls == []
    await bad.aclose()


async def test_429_honours_retry_after_then_succeeds(
    em: tuple[FakeAPI, ElectricityMapsSource], sleeps: Sleeps
) -> None:
    api, src = em
    api.fail(LATEST, Fault(429, headers={"Retry-After": "7"}))
    value = await src.latest("DE")
    assert value.g_per_kwh > 0 and not value.stale
    assert sleeps.calls == [7.0]
    assert api.hits[LATEST] == 2


async def test_retry_after_as_http_date(
    em: tuple[FakeAPI, ElectricityMapsSource], sleeps: Sleeps, clock: FakeClock
) -> None:
    api, src = em
    api.fail(LATEST, Fault(503, headers={"Retry-After": "Wed, 01 May 2024 02:00:12 GMT"}))
    await src.latest("DE")
    assert sleeps.calls == [12.0]


async def test_too_long_retry_after_fails_now(
    em: tuple[FakeAPI, ElectricityMapsSource], sleeps: Sleeps
) -> None:
    api, src = em
    api.fail(LATEST, Fault(429, headers={"Retry-After": "3600"}))
    with pytest.raises(SourceUnavailable, match="429.*Retry-After 3600s"):
        await src.latest("DE")
    assert sleeps.calls == []


async def test_500_retries_with_backoff_then_raises(
    em: tuple[FakeAPI, ElectricityMapsSource], sleeps: Sleeps
) -> None:
    api, src = em
    api.fail(LATEST, Fault(500), Fault(500), Fault(500))
    with pytest.raises(SourceUnavailable, match="HTTP 500"):
        await src.latest("DE")
    assert api.hits[LATEST] == 3
    assert len(sleeps.calls) == 2 and sleeps.calls[1] > sleeps.calls[0] * 1.0 - 1e-9
    assert all(0.25 <= s <= 1.0 for s in sleeps.calls)


async def test_timeout_is_unavailable_not_zero(em: tuple[FakeAPI, ElectricityMapsSource]) -> None:
    api, src = em
    api.fail(LATEST, *(Fault(200, body="{}", delay_s=1.0) for _ in range(3)))
    with pytest.raises(SourceUnavailable, match="Timeout"):
        await src.latest("DE")


async def test_malformed_json(em: tuple[FakeAPI, ElectricityMapsSource]) -> None:
    api, src = em
    api.override[LATEST] = '{"zone": "DE", "carbonIntensity": 12'
    with pytest.raises(SourceDataError, match="malformed JSON"):
        await src.latest("DE")


@pytest.mark.parametrize("value", [None, "n/a", -5, float("nan")])
async def test_null_or_bad_value_is_an_error_not_a_number(
    em: tuple[FakeAPI, ElectricityMapsSource], value: object
) -> None:
    api, src = em
    api.override[LATEST] = {
        "zone": "DE",
        "carbonIntensity": value,
        "datetime": "2024-05-01T02:00:00.000Z",
    }
    with pytest.raises(SourceDataError):
        await src.latest("DE")


async def test_cache_ttl_spares_the_api(
    em: tuple[FakeAPI, ElectricityMapsSource], clock: FakeClock
) -> None:
    api, src = em
    first = await src.latest("DE")
    clock.advance(200)
    second = await src.latest("DE")
    assert api.hits[LATEST] == 1
    assert second.g_per_kwh == first.g_per_kwh and second.age_s == 200 and not second.stale
    clock.advance(200)
    await src.latest("DE")
    assert api.hits[LATEST] == 2


async def test_failure_serves_last_known_value_marked_stale(
    em: tuple[FakeAPI, ElectricityMapsSource], clock: FakeClock
) -> None:
    api, src = em
    fresh = await src.latest("DE")
    clock.advance(900)
    api.fail(LATEST, Fault(500), Fault(500), Fault(500))
    stale = await src.latest("DE")
    assert stale.stale and stale.age_s == 900
    assert stale.g_per_kwh == fresh.g_per_kwh > 0


async def test_stale_value_expires(
    em: tuple[FakeAPI, ElectricityMapsSource], clock: FakeClock
) -> None:
    api, src = em
    await src.latest("DE")
    clock.advance(7200)
    api.fail(LATEST, Fault(500), Fault(500), Fault(500))
    with pytest.raises(SourceUnavailable, match="older than max_stale_s"):
        await src.latest("DE")


async def test_forecast_null_points_are_gaps(em: tuple[FakeAPI, ElectricityMapsSource]) -> None:
    api, src = em
    api.override["/v3/carbon-intensity/forecast"] = {
        "zone": "DE",
        "forecast": [
            {"datetime": "2024-05-01T02:00:00.000Z", "carbonIntensity": 100},
            {"datetime": "2024-05-01T03:00:00.000Z", "carbonIntensity": None},
            {"datetime": "2024-05-01T04:00:00.000Z", "carbonIntensity": 120},
        ],
    }
    fc = await src.forecast("DE", 24)
    assert list(fc.g_per_kwh) == [100.0, 120.0]
    api.override["/v3/carbon-intensity/forecast"] = {
        "zone": "DE",
        "forecast": [{"datetime": "2024-05-01T02:00:00.000Z", "carbonIntensity": None}],
    }
    with pytest.raises(SourceDataError, match="no non-null"):
        await src.forecast("FR", 24)


# ---- WattTime -----------------------------------------------------------------------------------


@pytest.fixture
async def wt(clock: FakeClock, sleeps: Sleeps) -> AsyncIterator[tuple[FakeAPI, WattTimeSource]]:
    api = watttime_app(FakeAPI(clock))
    await api.start()
    src = WattTimeSource(
        "u",
        "p",
        base_url=api.url,
        http=HttpClient(source="watttime", clock=clock, sleep=sleeps),
        clock=clock,
    )
    yield api, src
    await src.aclose()
    await api.stop()


async def test_watttime_converts_lbs_per_mwh(wt: tuple[FakeAPI, WattTimeSource]) -> None:
    _, src = wt
    value = await src.latest("CAISO_NORTH")
    assert value.g_per_kwh == pytest.approx(1000.0 * LBS_PER_MWH_TO_G_PER_KWH)
    assert value.signal == "marginal"


async def test_watttime_reuses_its_token_and_logs_in_again_on_401(
    wt: tuple[FakeAPI, WattTimeSource], clock: FakeClock
) -> None:
    api, src = wt
    await src.latest("CAISO_NORTH")
    await src.forecast("CAISO_NORTH")
    assert api.hits["/login"] == 1
    api.tokens.clear()  # type: ignore[attr-defined]  # the server forgets: token revoked
    clock.advance(600)
    await src.history("CAISO_NORTH", clock() - timedelta(hours=2), clock())
    assert api.hits["/login"] == 2


async def test_watttime_bad_credentials(clock: FakeClock, sleeps: Sleeps) -> None:
    api = watttime_app(FakeAPI(clock))
    await api.start()
    src = WattTimeSource(
        "u",
        "wrong",
        base_url=api.url,
        http=HttpClient(source="watttime", clock=clock, sleep=sleeps),
        clock=clock,
    )
    with pytest.raises(SourceAuthError, match="401"):
        await src.latest("CAISO_NORTH")
    await src.aclose()
    await api.stop()


async def test_watttime_refuses_percentile_units(wt: tuple[FakeAPI, WattTimeSource]) -> None:
    api, src = wt
    api.override["/v3/forecast"] = {
        "data": [{"point_time": "2024-05-01T02:00:00+00:00", "value": 62.0}],
        "meta": {"units": "percentile"},
    }
    with pytest.raises(SourceDataError, match="unsupported units 'percentile'"):
        await src.forecast("CAISO_NORTH")


# ---- UK Carbon Intensity ----------------------------------------------------------------------


@pytest.fixture
async def uk(
    clock: FakeClock, sleeps: Sleeps
) -> AsyncIterator[tuple[FakeAPI, UKCarbonIntensitySource]]:
    api = ukci_app(FakeAPI(clock))
    await api.start()
    src = UKCarbonIntensitySource(
        base_url=api.url, http=HttpClient(source="ukci", clock=clock, sleep=sleeps), clock=clock
    )
    yield api, src
    await src.aclose()
    await api.stop()


async def test_ukci_uses_actual_then_forecast(
    uk: tuple[FakeAPI, UKCarbonIntensitySource], clock: FakeClock
) -> None:
    api, src = uk
    api.override["/intensity"] = {
        "data": [
            {
                "from": "2024-05-01T02:00Z",
                "to": "2024-05-01T02:30Z",
                "intensity": {"forecast": 146, "actual": None, "index": "moderate"},
            }
        ]
    }
    assert (await src.latest("GB")).g_per_kwh == 146.0
    api.override["/intensity"] = {
        "data": [
            {
                "from": "2024-05-01T01:00Z",
                "to": "2024-05-01T01:30Z",
                "intensity": {"forecast": 146, "actual": 151, "index": "moderate"},
            }
        ]
    }
    history = await src.history("GB", clock() - timedelta(hours=1), clock())
    assert list(history) == [151.0]


async def test_ukci_both_null_is_an_error(uk: tuple[FakeAPI, UKCarbonIntensitySource]) -> None:
    api, src = uk
    api.override["/intensity"] = {
        "data": [
            {
                "from": "2024-05-01T02:00Z",
                "to": "2024-05-01T02:30Z",
                "intensity": {"forecast": None, "actual": None, "index": "moderate"},
            }
        ]
    }
    with pytest.raises(SourceDataError, match="no non-null"):
        await src.latest("GB")


async def test_ukci_unknown_zone(uk: tuple[FakeAPI, UKCarbonIntensitySource]) -> None:
    _, src = uk
    with pytest.raises(UnknownZoneError, match="GB-1' .. 'GB-17'"):
        await src.latest("GB-99")


async def test_history_outside_the_answer_is_an_error(
    uk: tuple[FakeAPI, UKCarbonIntensitySource], clock: FakeClock
) -> None:
    api, src = uk
    api.override["/intensity"] = {
        "data": [
            {
                "from": "2024-04-01T01:00Z",
                "to": "2024-04-01T01:30Z",
                "intensity": {"forecast": 146, "actual": 151, "index": "moderate"},
            }
        ]
    }
    with pytest.raises(UnknownZoneError, match="no data"):
        await src.history("GB", clock() - timedelta(hours=1), clock())
