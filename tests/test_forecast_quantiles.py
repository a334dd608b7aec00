"""Probabilistic forecasts: the ensemble's quantiles and weights, the scores, the Forecast API."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecasting.backtest import coverage_pct, pinball_loss, recent_error
from forecasting.ensemble import CarbonEnsemble
from forecasting.errors import SourceDataError
from forecasting.forecaster import QUANTILES, CarbonForecaster
from forecasting.sources import FileSource, ReplaySource, ZoneFile
from forecasting.sources.base import Forecast
from router.cli import main
from tests.conftest import FakeClock

START = pd.Timestamp("2024-01-01", tz="UTC")


def lognormal_daily(days: int, sigma: float, seed: int = 0) -> pd.DataFrame:
    """A daily shape times independent log-normal noise: the q-quantile of each hour is known."""
    idx = pd.date_range(START, periods=24 * days, freq="h")
    shape = 300 + 100 * np.sin(2 * np.pi * idx.hour.to_numpy() / 24)
    noise = np.random.default_rng(seed).normal(0, sigma, len(idx))
    return pd.DataFrame({"g_per_kwh": shape * np.exp(noise)}, index=idx)


def test_quantiles_are_monotone_positive_and_cover_the_nominal_rate() -> None:
    frame = lognormal_daily(110, sigma=0.15)
    test_start = START + pd.Timedelta(days=80)
    model = CarbonEnsemble(max_horizon_h=24, forecaster=CarbonForecaster(max_iter=40))
    model.fit(frame[frame.index < test_start])
    issues = pd.date_range(test_start, periods=29, freq="D")
    points, quants = model.predict_table(frame, issues, 24, QUANTILES)
    assert quants.shape == (29, 24, 3)
    assert (quants > 0).all() and (np.diff(quants, axis=2) >= 0).all()
    y = frame["g_per_kwh"].to_numpy()[24 * 80 : 24 * 109].reshape(29, 24)
    covered = coverage_pct(y, quants[..., 0], quants[..., 2])
    assert 72 <= covered <= 88  # nominal 80 %; 696 hours of an i.i.d. noise
    below_median = float((y < quants[..., 1]).mean() * 100)
    assert 40 <= below_median <= 60
    # the band is as wide as the noise: q90/q10 of a log-normal is exp(2 * 1.2816 * sigma)
    width = np.median(quants[..., 2] / quants[..., 0])
    assert width == pytest.approx(np.exp(2 * 1.2816 * 0.15), rel=0.15)

    one = model.predict_quantiles(frame[frame.index < issues[3]], issues[3], 24)
    assert list(one.columns) == list(QUANTILES)
    assert list(one.index) == list(pd.date_range(issues[3], periods=24, freq="h"))
    np.testing.assert_allclose(one.to_numpy(), quants[3])
    point = model.predict(frame[frame.index < issues[3]], issues[3], 24)
    np.testing.assert_allclose(point.to_numpy(), points[3])


def test_wider_noise_gives_a_wider_band() -> None:
    narrow, wide = (
        CarbonEnsemble(max_horizon_h=24, members=("naive_24", "naive_168")).fit(
            lognormal_daily(60, sigma=s)
        )
        for s in (0.05, 0.3)
    )
    issued = START + pd.Timedelta(days=50)
    q_narrow = narrow.predict_quantiles(lognormal_daily(60, 0.05), issued, 24)
    q_wide = wide.predict_quantiles(lognormal_daily(60, 0.3), issued, 24)

    def ratio(q: pd.DataFrame) -> float:
        return float((q[0.9] / q[0.1]).median())

    assert ratio(q_wide) > 2 * ratio(q_narrow)


def test_the_band_is_wider_at_the_hours_whose_errors_are_wider() -> None:
    """Noise of 0.3 in the afternoon hours (UTC 12-17), 0.03 otherwise: the band follows."""
    idx = pd.date_range(START, periods=24 * 60, freq="h")
    hour = idx.hour.to_numpy()
    sigma = np.where((hour >= 12) & (hour < 18), 0.3, 0.03)
    noise = np.random.default_rng(2).normal(0, 1, len(idx)) * sigma
    frame = pd.DataFrame({"g_per_kwh": 300 * np.exp(noise)}, index=idx)
    model = CarbonEnsemble(max_horizon_h=24, members=("naive_24",)).fit(frame)
    band = model.predict_quantiles(frame, START + pd.Timedelta(days=50), 24)
    width = np.log(band[0.9] / band[0.1])
    noisy = (band.index.hour >= 13) & (band.index.hour < 17)
    calm = (band.index.hour < 9) | (band.index.hour >= 21)
    assert width[noisy].min() > 4 * width[calm].max()


def weekly(days: int, drift: bool) -> pd.DataFrame:
    """Weekdays high, weekends low; with ``drift``, the level also wanders day to day."""
    idx = pd.date_range(START, periods=24 * days, freq="h")
    weekend = idx.day_of_week.to_numpy() >= 5
    hour = idx.hour.to_numpy()
    y = np.where(weekend, 150.0, 400.0) + 30 * np.sin(2 * np.pi * hour / 24)
    if drift:  # a random walk of the daily level, no weekly pattern: yesterday is the best guess
        steps = np.random.default_rng(1).normal(0, 0.15, days)
        y = 300 * np.exp(np.cumsum(steps))[np.arange(len(idx)) // 24] + 30 * np.sin(
            2 * np.pi * hour / 24
        )
    return pd.DataFrame({"g_per_kwh": y}, index=idx)


@pytest.mark.parametrize(("drift", "best"), [(False, "naive_168"), (True, "naive_24")])
def test_the_weight_goes_to_the_member_that_was_better_recently(drift: bool, best: str) -> None:
    frame = weekly(70, drift)
    model = CarbonEnsemble(max_horizon_h=24, members=("naive_24", "naive_168")).fit(frame)
    issued = START + pd.Timedelta(days=60)
    w = model.weights(frame, issued, 24)
    assert list(w.columns) == ["naive_24", "naive_168"]
    assert (w[best] > 0.5).all()
    # and over the week that follows, the ensemble is no worse than either member alone
    issues = pd.date_range(issued, periods=7, freq="D")
    points, _ = model.predict_table(frame, issues, 24)
    y = frame["g_per_kwh"].to_numpy()[24 * 60 : 24 * 67].reshape(7, 24)
    alone = {
        name: CarbonEnsemble(max_horizon_h=24, members=(name,))
        .fit(frame)
        .predict_table(frame, issues, 24)[0]
        for name in ("naive_24", "naive_168")
    }

    def mape(p: np.ndarray) -> float:
        return float(np.mean(np.abs(p - y) / y))

    assert mape(points) <= min(mape(p) for p in alone.values()) + 1e-9


def test_pinball_and_coverage_by_hand() -> None:
    y = np.array([10.0, 20.0])
    quants = np.array([[8.0, 11.0, 12.0], [21.0, 22.0, 30.0]])
    # hour 1: q10 8 -> 0.1*2=0.2; q50 11 -> 0.5*1=0.5; q90 12 -> 0.1*2=0.2
    # hour 2: q10 21 -> 0.9*1=0.9; q50 22 -> 0.5*2=1.0; q90 30 -> 0.1*10=1.0
    assert pinball_loss(y, quants, (0.1, 0.5, 0.9)) == pytest.approx(3.8 / 6)
    assert coverage_pct(y, quants[:, 0], quants[:, 2]) == 50.0


def test_recent_error_scores_the_last_days_only() -> None:
    frame = lognormal_daily(60, sigma=0.1)
    now = START + pd.Timedelta(days=50)
    tampered = frame.copy()
    tampered.loc[tampered.index >= now, "g_per_kwh"] = 1e6  # the future is never read
    model = CarbonEnsemble(max_horizon_h=24, members=("naive_24", "naive_168")).fit(frame)
    a = recent_error(frame, now, days=7, model=model)
    b = recent_error(tampered, now, days=7, model=model)
    assert a == b
    assert a["days"] == 7 and a["until"] == now.isoformat()
    assert 0 < a["mape"] < 30 and 50 <= a["coverage_80"] <= 100 and a["pinball_loss"] > 0
    # 168 issues x 24 h, of which the targets before now are scored
    assert a["hours"] == sum(min(24, 168 - i) for i in range(168))


def test_forecast_quantile_at() -> None:
    idx = pd.date_range("2024-05-01", periods=3, freq="h", tz="UTC")
    band = pd.DataFrame({0.1: [1.0, 2.0, 3.0], 0.5: [2.0, 3.0, 4.0], 0.9: [3, 4, 5.0]}, index=idx)
    fc = Forecast("DE", idx[0].to_pydatetime(), band[0.5], "average", "test", quantiles=band)
    assert fc.quantile_at(datetime(2024, 5, 1, 1, 30, tzinfo=UTC), 0.9) == 4.0
    with pytest.raises(SourceDataError, match=r"no 0.95 quantile; this forecast has \[0.1"):
        fc.quantile_at(datetime(2024, 5, 1, 1, tzinfo=UTC), 0.95)
    bare = Forecast("DE", idx[0].to_pydatetime(), band[0.5], "average", "test")
    with pytest.raises(SourceDataError, match="has no quantiles"):
        bare.quantile_at(datetime(2024, 5, 1, 1, tzinfo=UTC), 0.5)


async def test_file_and_replay_forecasts_carry_the_band(data_dir: Path) -> None:
    clock = FakeClock(datetime(2024, 6, 3, 12, tzinfo=UTC))
    files = FileSource(
        {"DE": ZoneFile(data_dir / "carbon/electricitymaps_hourly/DE.csv")},
        clock=clock,
        forecaster_history_days=60,
    )
    fc = await files.forecast("DE", 12)
    assert fc.quantiles is not None and list(fc.quantiles.columns) == list(QUANTILES)
    assert list(fc.quantiles.index) == list(fc.g_per_kwh.index)
    assert (np.diff(fc.quantiles.to_numpy(), axis=1) >= 0).all()
    assert (fc.quantiles[0.1] <= fc.g_per_kwh * 1.001).mean() > 0.9
    issued = pd.Timestamp(fc.issued_at)
    same = files.forecast_quantiles_at("DE", issued, 12)
    pd.testing.assert_frame_equal(same, fc.quantiles)
    assert len(files._forecast_cache) == 1  # the band shares the point forecast's fit
    assert fc.quantile_at(fc.issued_at, 0.5) == pytest.approx(same[0.5].iloc[0])

    replay = ReplaySource(files, clock=FakeClock(datetime(2026, 6, 1, 12, tzinfo=UTC)))
    played = await replay.forecast("DE", 6)
    assert played.quantiles is not None
    assert list(played.quantiles.index) == list(played.g_per_kwh.index)
    assert played.quantiles.index[0] == pd.Timestamp("2026-06-01 12:00", tz="UTC")


@pytest.mark.slow
def test_forecast_show_prints_the_band_and_the_recent_error(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["forecast", "show", "--zone", "SE", "--hours", "4"]) == 0
    out = capsys.readouterr().out
    assert "80 % band (q10-q90)" in out
    assert "recent error (day-ahead forecasts, last 7 days): MAPE" in out
    rows = [line for line in out.splitlines() if line.endswith(("█", "cleanest"))]
    assert len(rows) == 4
    for line in rows:  # point, q10 - q90, bar
        parts = line.split()
        point, q10, q90 = float(parts[2]), float(parts[3]), float(parts[5])
        assert q10 <= q90 and q10 * 0.8 <= point <= q90 * 1.25
    assert main(["forecast", "show", "--zone", "SE", "--hours", "4", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert len(shown["quantiles"]) == 4 and set(shown["recent_error"]) >= {"mape", "coverage_80"}
