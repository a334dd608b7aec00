"""File formats, the forecaster and the backtest."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecasting.backtest import backtest
from forecasting.errors import ForecastError, SourceDataError, UnknownZoneError
from forecasting.forecaster import CarbonForecaster, implied_intensity
from forecasting.sources import FileSource, ZoneFile, read_intensity_file
from router.cli import main
from tests.conftest import FakeClock, loop_turns


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_carboncast_us_dates_are_utc(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "c.csv",
        ",UTC time,carbon_intensity,coal\n"
        "0,01/02/2020 00:00:00,330.62,12\n"
        "1,01/02/2020 01:00:00,389.74,15\n",
    )
    f = read_intensity_file(p)
    assert list(f.index) == [
        pd.Timestamp("2020-01-02 00:00", tz="UTC"),
        pd.Timestamp("2020-01-02 01:00", tz="UTC"),
    ]
    assert list(f["g_per_kwh"]) == [330.62, 389.74]
    assert list(f["coal"]) == [12, 15]


def test_electricitymaps_export_picks_the_emission_factor(tmp_path: Path) -> None:
    header = (
        "Datetime (UTC),Country,Zone name,Zone id,Carbon intensity gCO₂eq/kWh (direct),"
        "Carbon intensity gCO₂eq/kWh (Life cycle),Carbon-free energy percentage (CFE%),"
        "Renewable energy percentage (RE%),Data source,Data estimated,Data estimation method\n"
    )
    p = write(
        tmp_path,
        "e.csv",
        header
        + "2021-01-01 00:00:00,Germany,Germany,DE,450.9,528.24,49.97,29.22,entsoe.eu,False,\n",
    )
    assert read_intensity_file(p)["g_per_kwh"].iloc[0] == 528.24
    assert read_intensity_file(p, emission_factor="direct")["g_per_kwh"].iloc[0] == 450.9


def test_generic_csv_converts_lbs(tmp_path: Path) -> None:
    p = write(tmp_path, "g.csv", "time,value\n2023-06-08 00:00:00,1000\n")
    assert read_intensity_file(p, unit="lbs_per_mwh")["g_per_kwh"].iloc[0] == pytest.approx(
        453.59237
    )


def test_negative_intensity_is_a_data_error(tmp_path: Path) -> None:
    p = write(tmp_path, "g.csv", "time,value\n2023-06-08 00:00:00,100\n2023-06-08 01:00:00,-3\n")
    with pytest.raises(SourceDataError, match="negative intensity at 2023-06-08 01:00"):
        read_intensity_file(p)


def test_gaps_stay_gaps_not_zero(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        "g.csv",
        "time,value\n2023-06-08 00:00:00,100\n2023-06-08 01:00:00,\n2023-06-08 02:00:00,120\n",
    )
    s = FileSource({"Z": ZoneFile(p)}).series("Z")
    assert list(s) == [100.0, 120.0]


def test_file_source_never_answers_outside_its_file(tmp_path: Path) -> None:
    p = write(tmp_path, "g.csv", "time,value\n2023-06-08 00:00:00,100\n2023-06-08 01:00:00,110\n")
    src = FileSource({"Z": ZoneFile(p)}, clock=FakeClock(datetime(2025, 1, 1, tzinfo=UTC)))
    with pytest.raises(UnknownZoneError, match="use the replay source"):
        asyncio.run(src.latest("Z"))
    with pytest.raises(UnknownZoneError, match="known zones: Z"):
        asyncio.run(src.latest("Y"))


def test_implied_intensity_from_production_forecasts() -> None:
    frame = pd.DataFrame(
        {
            "avg_coal_production_forecast": [100.0, 0.0],
            "avg_nat_gas_production_forecast": [100.0, 50.0],
            "avg_wind_production_forecast": [200.0, 50.0],
        }
    )
    implied = implied_intensity(frame)
    assert implied is not None
    assert list(implied) == pytest.approx([(100 * 760 + 100 * 370) / 400, 50 * 370 / 100])


@pytest.fixture(scope="module")
def de_frame(data_dir: Path) -> pd.DataFrame:
    f = read_intensity_file(data_dir / "carbon/electricitymaps_hourly/DE.csv")
    return f[(f.index >= "2023-09-01") & (f.index < "2024-01-01")]


def test_forecast_uses_no_actuals_after_the_issue_time(de_frame: pd.DataFrame) -> None:
    issued = pd.Timestamp("2023-12-10 00:00", tz="UTC")
    model = CarbonForecaster(max_horizon_h=48, max_iter=60).fit(de_frame[de_frame.index < issued])
    before = model.predict(de_frame, issued, 48)
    tampered = de_frame.copy()
    tampered.loc[tampered.index >= issued, "g_per_kwh"] = 9999.0
    after = model.predict(tampered, issued, 48)
    pd.testing.assert_series_equal(before, after)
    assert list(before.index) == list(pd.date_range(issued, periods=48, freq="h"))
    assert (before > 50).all() and (before < 1000).all()
    # and the actuals before the issue time do matter
    shifted = de_frame.copy()
    shifted.loc[shifted.index < issued, "g_per_kwh"] *= 2
    assert (model.predict(shifted, issued, 48) > before * 1.3).mean() > 0.8


def test_forecaster_refuses_too_little_history(de_frame: pd.DataFrame) -> None:
    with pytest.raises(ForecastError, match="at least 14 days"):
        CarbonForecaster().fit(de_frame.iloc[:100])
    with pytest.raises(ForecastError, match="not fitted"):
        CarbonForecaster().predict(de_frame, de_frame.index[-1], 24)


def test_backtest_beats_seasonal_naive_with_exogenous_forecasts(data_dir: Path) -> None:
    r = backtest(data_dir / "carbon/dacf_2021/PJM_direct_emissions.csv")
    assert r.zone == "PJM" and r.issues == 184
    assert r.test_hours > 4000
    assert r.mape_day_ahead < r.naive_mape_day_ahead
    assert "avg_coal_production_forecast" in r.exogenous_columns
    assert set(r.mape_by_horizon) == set(range(1, 25))
    assert np.mean(list(r.mape_by_horizon.values())) == pytest.approx(r.mape_day_ahead, rel=0.02)


def test_backtest_cli_prints_json(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = data_dir / "carbon/electricitymaps_hourly/SE.csv"
    code = main(
        [
            "forecast",
            "backtest",
            "--data",
            str(path),
            "--train-end",
            "2024-06-01",
            "--test-end",
            "2024-07-01",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["zone"] == "SE" and out["issues"] == 30
    for key in ("mape_day_ahead", "naive_mape_day_ahead", "mape_by_horizon", "fit_seconds"):
        assert key in out
    assert 0 < out["mape_day_ahead"] < out["naive_mape_day_ahead"]
    # the 80 % band's coverage (percent of test hours) and the pinball loss (g/kWh)
    assert 65 <= out["coverage_80"] <= 95
    assert 0 < out["pinball_loss"] < 10  # SE's intensity is a few tens of g/kWh
    assert set(out["mape_by_member"]) == {"model", "naive_24", "naive_168"}
    assert out["mape_by_member"]["naive_24"] == out["naive_mape_day_ahead"]


def test_backtest_bad_period_is_clear(data_dir: Path) -> None:
    with pytest.raises(ForecastError, match="no data before --train-end 2019-01-01"):
        backtest(
            data_dir / "carbon/electricitymaps_hourly/SE.csv",
            train_end="2019-01-01",
            test_end="2019-02-01",
        )


async def test_tenants_asking_many_horizons_share_one_fit_run_off_the_event_loop(
    data_dir: Path,
) -> None:
    clock = FakeClock(datetime(2024, 6, 3, 12, tzinfo=UTC))
    src = FileSource(
        {"DE": ZoneFile(data_dir / "carbon/electricitymaps_hourly/DE.csv")},
        clock=clock,
        forecaster_history_days=60,
    )
    async with loop_turns(period_s=0.001) as turns:  # a fit runs in a thread: no spinning
        forecasts = [await src.forecast("DE", h) for h in range(2, 25)]  # defer=1h..23h
    assert [len(f.g_per_kwh) for f in forecasts] == list(range(2, 25))
    assert forecasts[-1].g_per_kwh.iloc[:2].tolist() == forecasts[0].g_per_kwh.tolist()
    assert len(src._forecast_cache) == 1  # one fit for all of them, not 23
    assert turns[0] >= 5  # the loop kept turning while it was fitted
    for day in range(40):  # a long-running router: the cache stays bounded
        clock.advance(3600)
        src._forecast_cache.setdefault(("DE", pd.Timestamp(clock()), 24 + day), pd.Series())
    assert len(src._forecast_cache) <= src.MAX_CACHED_FORECASTS + 1
