"""Day-ahead backtest of :class:`CarbonForecaster` on one zone's file.

A forecast is issued at 00:00 UTC on every day of the test period for the 24 hours that follow,
from a model fitted only on data before ``train_end`` and fed only actuals before each issue
time (exogenous forecast columns of the target hours are allowed: they are forecasts too).
The seasonal-naive baseline predicts each hour with the same hour of the day before.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecasting.errors import ForecastError
from forecasting.forecaster import CarbonForecaster, exogenous_columns
from forecasting.sources.files import read_intensity_file

HORIZON_H = 24


@dataclass(frozen=True)
class BacktestResult:
    zone: str
    file: str
    train_end: str
    test_end: str
    issues: int
    test_hours: int
    mape_day_ahead: float
    naive_mape_day_ahead: float
    ratio_to_naive: float
    mape_by_horizon: dict[int, float]
    exogenous_columns: list[str]
    fit_seconds: float
    backtest_seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mape_by_horizon"] = {str(k): v for k, v in self.mape_by_horizon.items()}
        return out


def zone_of(path: Path, frame: pd.DataFrame) -> str:
    """The zone a file describes: the Electricity Maps 'Zone id' or the file name's prefix."""
    try:
        zone_ids = pd.read_csv(path, usecols=["Zone id"], nrows=1)["Zone id"]
        return str(zone_ids.iloc[0])
    except (ValueError, KeyError):
        return path.stem.split("_")[0]


def _utc(day: str) -> pd.Timestamp:
    ts = pd.Timestamp(day)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def backtest(
    path: str | Path,
    *,
    train_end: str = "2021-07-01",
    test_end: str = "2022-01-01",
    forecaster: CarbonForecaster | None = None,
) -> BacktestResult:
    path = Path(path)
    frame = read_intensity_file(path)
    t_train, t_test = _utc(train_end), _utc(test_end)
    if t_test <= t_train:
        raise ForecastError(f"--test-end {test_end} must be after --train-end {train_end}")
    train = frame[frame.index < t_train]
    if train.empty:
        raise ForecastError(
            f"{path}: no data before --train-end {train_end}; the file covers "
            f"{frame.index[0]} .. {frame.index[-1]}"
        )
    last_issue = min(t_test, frame.index[-1].floor("D") + pd.Timedelta(days=1)) - pd.Timedelta(
        hours=HORIZON_H
    )
    issues = pd.date_range(t_train, last_issue, freq="D")
    if len(issues) == 0:
        raise ForecastError(
            f"{path}: no full day between {train_end} and {test_end}; the file ends "
            f"{frame.index[-1]}"
        )
    model = forecaster or CarbonForecaster(max_horizon_h=HORIZON_H)
    t0 = time.perf_counter()
    model.fit(train)
    pred = model.predict_many(frame[frame.index < t_test], issues, HORIZON_H).to_numpy()

    actual = frame["g_per_kwh"]
    targets = pd.DatetimeIndex(
        [t + pd.Timedelta(hours=h) for t in issues for h in range(HORIZON_H)]
    )
    y = actual.reindex(targets).to_numpy().reshape(pred.shape)
    naive = actual.reindex(targets - pd.Timedelta(hours=24)).to_numpy().reshape(pred.shape)
    ok = np.isfinite(y) & (y > 0) & np.isfinite(naive)
    if not ok.any():
        raise ForecastError(f"{path}: no observed hours in the test period")
    ape = np.abs(pred - y) / np.where(ok, y, 1.0)
    naive_ape = np.abs(naive - y) / np.where(ok, y, 1.0)
    by_h = {h + 1: round(float(ape[:, h][ok[:, h]].mean() * 100), 3) for h in range(HORIZON_H)}
    mape = float(ape[ok].mean() * 100)
    naive_mape = float(naive_ape[ok].mean() * 100)
    return BacktestResult(
        zone=zone_of(path, frame),
        file=str(path),
        train_end=str(t_train.date()),
        test_end=str(t_test.date()),
        issues=len(issues),
        test_hours=int(ok.sum()),
        mape_day_ahead=round(mape, 3),
        naive_mape_day_ahead=round(naive_mape, 3),
        ratio_to_naive=round(mape / naive_mape, 4) if naive_mape else float("nan"),
        mape_by_horizon=by_h,
        exogenous_columns=exogenous_columns(frame),
        fit_seconds=round(model.fit_seconds, 3),
        backtest_seconds=round(time.perf_counter() - t0, 3),
    )
