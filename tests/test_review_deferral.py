"""Review of deferral's forecasts (issue 14): quantile gates the forecast has no column for,
forecasts that do not cover the hours asked, and a failing source once a forecast exists."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from forecasting.errors import CarbonSourceError
from forecasting.sources.base import Forecast
from router.service.fakes import StaticCarbonSource
from router.service.forecasts import ForecastView
from tests.service_kit import CONFIG, DEMO, chat, service_kit
from tests.test_faults import FakeMonotonic, load_config_text

VALUES = {"SE": 30.0, "DE": 400.0, "US-TEX-ERCO": 450.0}


def with_quantile(q: float) -> str:
    text = CONFIG.replace(
        "policy: {name: price_carbon, weight: 0.5}",
        f"policy: {{name: price_carbon, weight: 0.5, defer_quantile: {q}}}",
    )
    assert text != CONFIG
    return text


async def post_deferrable(kit: Any) -> int:
    pref = {**DEMO, "X-Carbon-Preference": 'defer=7200, regions=("eu-north")'}
    r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
    return r.status_code


@pytest.mark.parametrize("q", [0.95, 0.99])
async def test_a_quantile_the_forecast_has_no_column_for_is_not_the_point_forecast(
    tmp_path: Path, q: float
) -> None:
    # the median says half as dirty, the 90 % bound 10 % dirtier: at 0.9 the request runs now.
    # At 0.95 (stricter still) the band (0.1, 0.5, 0.9) has no such column, and the planner
    # silently took the point forecast: the strictest setting waited the most.
    unsure = StaticCarbonSource(VALUES, profile=(1.0, 0.5), upper=(1.0, 1.1))
    async with service_kit(tmp_path, source=unsure, config=with_quantile(q)) as kit:
        assert await post_deferrable(kit) == 200


async def test_a_quantile_between_the_columns_is_read_between_them(tmp_path: Path) -> None:
    # median 0.5, q90 1.1: q 0.7 is about 0.8 x now, a 20 % gain that holds: it waits
    unsure = StaticCarbonSource(VALUES, profile=(1.0, 0.5), upper=(1.0, 1.1))
    async with service_kit(tmp_path, source=unsure, config=with_quantile(0.7)) as kit:
        assert await post_deferrable(kit) == 202


class Shifted(StaticCarbonSource):
    """A forecast whose hours start ``lead_h`` hours from now (issued "in the future"), or whose
    band starts ``band_lead_h`` hours after its point forecast."""

    def __init__(self, *a: Any, lead_h: int = 0, band_lead_h: int = 0, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.lead_h, self.band_lead_h = lead_h, band_lead_h

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        fc = await super().forecast(zone, horizon_h)
        series = fc.g_per_kwh.copy()
        series.index = series.index + timedelta(hours=self.lead_h)
        band = None
        if fc.quantiles is not None:
            band = fc.quantiles.copy()
            band.index = band.index + timedelta(hours=self.lead_h + self.band_lead_h)
        return Forecast(zone, fc.issued_at + timedelta(hours=self.lead_h), series, fc.signal,
                        fc.source, quantiles=band)  # fmt: skip


async def test_a_forecast_that_starts_after_the_next_hour_is_no_500(tmp_path: Path) -> None:
    # a forecast issued "in the future" (a clock ahead, a bad feed): the hours before its
    # first period raised SourceDataError past the planner, a 500 for a request that can run
    source = Shifted(VALUES, profile=(0.5,), lead_h=3)
    async with service_kit(tmp_path, source=source) as kit:
        assert await post_deferrable(kit) in (200, 202)


async def test_a_band_that_does_not_cover_the_hours_is_no_500(tmp_path: Path) -> None:
    source = Shifted(VALUES, profile=(1.0, 0.5), upper=(1.0, 0.6), band_lead_h=3)
    async with service_kit(tmp_path, source=source) as kit:
        assert await post_deferrable(kit) in (200, 202)


class Failing(StaticCarbonSource):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.calls = 0
        self.down = False

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        self.calls += 1
        if self.down:
            raise CarbonSourceError("HTTP 503", source=self.name, zone=zone)
        return await super().forecast(zone, horizon_h)


async def test_a_failing_source_is_not_asked_again_by_every_request() -> None:
    # once a forecast is stale and its source fails, each request started another refit (an
    # HTTP call or seconds of CPU for a model fit), back to back, for as long as it failed
    clock = FakeMonotonic()
    source = Failing({"SE": 30.0})
    region = load_config_text(CONFIG).regions[0]
    view = ForecastView([region], {"grid": source}, max_age_s=3600, clock=clock)
    fc = await view.get(region)
    source.down = True
    clock.t += 3600
    for _ in range(20):
        assert (await view.get(region)) is fc  # the last forecast serves
        await view.idle()
        clock.t += 1
    assert source.calls <= 2  # one retry, not one per request
    # ... and the loop's refresh, or a later request, tries again
    source.down = False
    clock.t += 3600
    assert (await view.get(region)) is fc
    await view.idle()
    assert (await view.get(region)) is not fc


async def test_a_reload_keeps_the_marginal_forecasts_too(tmp_path: Path) -> None:
    # a router deciding on the marginal signal defers on its forecasts (an API's: an HTTP call
    # each); a reload kept the average forecasts of unchanged regions but dropped these, so the
    # next deferrable request waited for a fetch on its path
    from tests.service_kit import ADMIN
    from tests.test_receipts import _marginal_config

    marginal = StaticCarbonSource({"SE": 900.0, "DE": 100.0, "US-TEX-ERCO": 500.0})
    async with service_kit(tmp_path, config=_marginal_config("marginal"),
                           more_sources={"wt": marginal}) as kit:  # fmt: skip
        before = kit.service.live.router
        assert before.marginal_forecasts is not None
        await before.marginal_forecasts.refresh_all()
        r = await kit.client.post("/v1/admin/reload", headers=ADMIN)
        assert r.status_code == 200, r.text
        after = kit.service.live.router
        assert after is not before and after.marginal_forecasts is not None
        assert after.marginal_forecasts.age_s("eu-north") is not None


async def test_a_reload_while_a_refresh_is_in_flight_shares_it() -> None:
    # the background loop's refit is seconds per region, so a reload often lands during one:
    # its forecast landed in the old view only, and the new view fetched (fitted) it again
    import asyncio

    from tests.test_forecast_view import SlowForecasts

    region = load_config_text(CONFIG).regions[0]
    source = SlowForecasts({"SE": 30.0})
    source.gate = asyncio.Event()
    old = ForecastView([region], {"grid": source})
    first = asyncio.create_task(old.get(region))
    await asyncio.sleep(0.01)
    new = ForecastView([region], {"grid": source})
    new.adopt(old)
    second = asyncio.create_task(new.get(region))
    await asyncio.sleep(0.01)
    source.gate.set()
    assert (await first) is (await second)
    assert source.calls == 1
    await new.idle()
    assert new.age_s("eu-north") is not None


class Counting(StaticCarbonSource):
    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.forecasts = 0

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        self.forecasts += 1
        return await super().forecast(zone, horizon_h)


@pytest.mark.parametrize(("decide_on", "fetched"), [("average", 0), ("marginal", 3)])
async def test_the_marginal_forecasts_are_fetched_only_when_decisions_use_them(
    tmp_path: Path, decide_on: str, fetched: int
) -> None:
    # a marginal source (WattTime: a metered API) beside the average one, decisions on the
    # average: the background loop fetched its forecast for every region every
    # forecast_refit_s, though nothing plans with it
    import asyncio

    from tests.test_receipts import _marginal_config

    marginal = Counting({"SE": 900.0, "DE": 100.0, "US-TEX-ERCO": 500.0})
    async with service_kit(tmp_path, config=_marginal_config(decide_on),
                           more_sources={"wt": marginal}) as kit:  # fmt: skip
        loop = asyncio.create_task(kit.service.forecast_loop())
        try:
            for _ in range(200):
                await asyncio.sleep(0.01)
                view = kit.service.live.router.forecasts
                if view is not None and view.age_s("us-south") is not None and not view._inflight:
                    break
            await asyncio.sleep(0.05)
        finally:
            loop.cancel()
        assert marginal.forecasts == fetched


async def test_a_region_without_a_forecast_still_competes_now(tmp_path: Path) -> None:
    # eu-north (30 g/kWh, cheap) has no forecast; eu-central (400 g, dear) is forecast at 200 g
    # next hour. eu-north was left out of the hour now too, so the "best now" was eu-central's
    # 400 g and the request waited for 200 g in eu-central rather than run at 30 g now
    from forecasting.errors import ForecastError

    class NoForecastForSE(StaticCarbonSource):
        async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
            if zone == "SE":
                raise ForecastError("not enough history to fit: 3 days, need 14")
            return await super().forecast(zone, horizon_h)

    source = NoForecastForSE(VALUES, profile=(1.0, 0.5))
    pref = {**DEMO, "X-Carbon-Preference": 'defer=7200, regions=("eu-north" "eu-central")'}
    async with service_kit(tmp_path, source=source) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
        assert r.status_code == 200, r.text
        (row,) = kit.rows()
        assert row.zone == "SE"


@pytest.mark.parametrize("spatial", [True, False])
def test_the_simulated_deferral_waits_only_for_gains_that_hold_at_the_gate(spatial: bool) -> None:
    # router simulate's cleanest_hour+defer (spatial off) chose its hour on the point forecast
    # alone: the gate (defer_quantile) was applied to the spatial planner only
    from types import SimpleNamespace

    import numpy as np

    from router.simulate import _plan_deferred

    h_n, w = 4, 3
    intensity = np.full((h_n, 1), 100.0)
    point = np.full((h_n, w, 1), 50.0)  # the median: half as dirty in every later hour
    bound = np.full((h_n, w, 1), 120.0)  # its 90 % bound: dirtier
    world = SimpleNamespace(replica_region=np.array([0]), forecast=point, intensity=intensity,
                            price=np.ones((h_n, 1)), j_per_request=np.array([3600.0]),
                            pue=np.ones(1), forecast_gate=bound)  # fmt: skip
    up = np.ones((h_n, 1), dtype=bool)
    room = np.full((h_n, 1), 100.0)
    demand = np.array([10.0, 0.0, 0.0, 0.0])
    out, delay, _ = _plan_deferred(world, demand, np.zeros((h_n, 1)), room, up, 1.0,  # type: ignore[arg-type]
                                   oracle=False, spatial=spatial, min_gain=0.05)  # fmt: skip
    assert delay == 0.0 and out[0, 0] == pytest.approx(10.0)
    world.forecast_gate = np.full((h_n, w, 1), 80.0)  # the gain holds at the bound: it waits
    out, delay, _ = _plan_deferred(world, demand, np.zeros((h_n, 1)), room, up, 1.0,  # type: ignore[arg-type]
                                   oracle=False, spatial=spatial, min_gain=0.05)  # fmt: skip
    assert delay > 0.0 and out[0, 0] == 0.0


@pytest.mark.parametrize("later", [-0.5, float("nan"), float("inf")])
async def test_a_forecast_value_that_is_no_intensity_is_no_target(
    tmp_path: Path, later: float
) -> None:
    # the fleet scaler and the dashboard refuse a forecast value that is not a number >= 0;
    # the deferral planner took a negative one as the cleanest hour there is and waited for it
    source = StaticCarbonSource(VALUES, profile=(1.0, later), upper=(1.0, later))
    async with service_kit(tmp_path, source=source) as kit:
        assert await post_deferrable(kit) == 200


def test_an_endless_forecast_refit_period_is_a_config_error() -> None:
    # forecast_refit_s .inf passed: the background loop refreshed once and slept forever
    from regions.config import ConfigError

    text = CONFIG.replace(
        "policy: {name: price_carbon, weight: 0.5}",
        "policy: {name: price_carbon, weight: 0.5, forecast_refit_s: .inf}",
    )
    with pytest.raises(ConfigError, match=r"c\.yaml:\d+ policy\.forecast_refit_s"):
        load_config_text(text)


async def test_a_deferred_job_starts_before_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # defer=3600 at 10:01: the deadline is 11:01, the cleaner hour 11:00, and the planner's
    # jitter (up to 10 min, so that jobs do not all start on the hour) put the start up to
    # 11:10, past the deadline the tenant set
    from datetime import UTC, datetime

    import router.service.deferral as deferral_mod
    import router.service.routing as routing_mod

    real = datetime
    fixed = real.now(UTC).replace(minute=1, second=0, microsecond=0)

    class At(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return fixed

    monkeypatch.setattr(routing_mod, "datetime", At)
    monkeypatch.setattr(deferral_mod, "datetime", At)

    class MaxJitter:
        def uniform(self, lo: float, hi: float) -> float:
            return hi

    source = StaticCarbonSource(VALUES, profile=(1.0, 0.5))
    pref = {**DEMO, "X-Carbon-Preference": 'defer=3600, regions=("eu-north")'}
    async with service_kit(tmp_path, source=source) as kit:
        kit.service.live.router._rng = MaxJitter()  # type: ignore[assignment]
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
        assert r.status_code == 202, r.text
        job = r.json()
        assert real.fromisoformat(job["start_at"]) <= real.fromisoformat(job["deadline"])


class Cancels(StaticCarbonSource):
    """Lets a CancelledError out of its next forecast(), as a source's HTTP library may."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.cancel_next = True

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        import asyncio

        if self.cancel_next:
            self.cancel_next = False
            raise asyncio.CancelledError()
        return await super().forecast(zone, horizon_h)


async def test_a_source_that_raises_cancelled_does_not_end_the_refresh_loop() -> None:
    # the CancelledError cancelled the shared refresh; refresh_all, which catches Exception
    # only, passed it on and the service's forecast loop ended for good
    import asyncio

    source = Cancels(VALUES)
    view = ForecastView(list(load_config_text(CONFIG).regions), {"grid": source})
    await view.refresh_all()  # eu-north's refresh was cancelled; the others go on
    assert view.age_s("eu-north") is None and view.age_s("us-south") is not None
    await view.refresh_all()
    assert view.age_s("eu-north") is not None
    # the loop's own cancellation (the service stopping) still ends it
    task = asyncio.create_task(view.refresh_all())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
