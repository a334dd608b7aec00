"""Day-ahead backtest of :class:`CarbonEnsemble` on one zone's file, and its recent error.

A forecast is issued at 00:00 UTC on every day of the test period for the 24 hours that follow,
from a model fitted only on data before ``train_end`` and fed only actuals before each issue
time (exogenous forecast columns of the target hours are allowed: they are forecasts too).
The seasonal-naive baseline predicts each hour with the same hour of the day before.

Probabilistic scores: ``coverage_80`` is the percentage of scored hours whose actual lies in
[q10, q90] (nominal 80 %); ``pinball_loss`` is the pinball (quantile) loss in g/kWh, averaged
over the hours and the quantiles 0.1, 0.5, 0.9.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from forecasting.ensemble import CarbonEnsemble
from forecasting.errors import ForecastError
from forecasting.forecaster import QUANTILES, exogenous_columns
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
    coverage_80: float
    pinball_loss: float
    mape_by_member: dict[str, float]
    exogenous_columns: list[str]
    fit_seconds: float
    backtest_seconds: float

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mape_by_horizon"] = {str(k): v for k, v in self.mape_by_horizon.items()}
        return out


def pinball_loss(y: np.ndarray, quants: np.ndarray, quantiles: tuple[float, ...]) -> float:
    """Mean pinball loss (units of ``y``) of ``quants`` (..., Q) for the actuals ``y`` (...)."""
    q = np.asarray(quantiles, dtype="float64")
    diff = y[..., None] - quants
    return float(np.maximum(q * diff, (q - 1) * diff).mean())


def coverage_pct(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    """Percentage of ``y`` inside ``[lo, hi]``."""
    return float(((y >= lo) & (y <= hi)).mean() * 100)


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
    forecaster: CarbonEnsemble | None = None,
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
    model = forecaster or CarbonEnsemble(max_horizon_h=HORIZON_H)
    t0 = time.perf_counter()
    model.fit(train)
    known = frame[frame.index < t_test]
    pred, quants = model.predict_table(known, issues, HORIZON_H, QUANTILES)

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
    lo, hi = QUANTILES.index(0.1), QUANTILES.index(0.9)
    by_member = {}
    for m, name in enumerate(model.members):
        f = model.last_members[m]
        if np.isfinite(f[ok]).all():
            by_member[name] = round(
                float((np.abs(f - y) / np.where(ok, y, 1.0))[ok].mean() * 100), 3
            )
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
        coverage_80=round(coverage_pct(y[ok], quants[..., lo][ok], quants[..., hi][ok]), 2),
        pinball_loss=round(pinball_loss(y[ok], quants[ok], QUANTILES), 3),
        mape_by_member=by_member,
        exogenous_columns=exogenous_columns(frame),
        fit_seconds=round(model.fit_seconds, 3),
        backtest_seconds=round(time.perf_counter() - t0, 3),
    )


def recent_error(
    history: pd.DataFrame | pd.Series,
    now: pd.Timestamp,
    days: int = 7,
    *,
    model: CarbonEnsemble | None = None,
    horizon_h: int = 24,
) -> dict[str, Any]:
    """How far the forecasts of the last ``days`` days were from the actuals.

    The forecasts are those ``model`` would have issued every hour in ``[now - days, now)`` for
    1..``horizon_h`` hours ahead, scored on every target hour before ``now`` (only actuals before
    each issue time feed each forecast). ``history``: a frame with a ``g_per_kwh`` column or a
    series of g/kWh, UTC index; nothing at or after ``now`` is read. Without ``model`` an
    ensemble is fitted on the history before ``now - days`` (seconds of CPU).

    Returns ``mape`` (percent), ``naive_mape`` (percent; the same hour of the day before),
    ``coverage_80`` (percent of actuals inside [q10, q90]), ``pinball_loss`` (g/kWh, mean over
    q10/q50/q90), ``hours`` (scored issue-hour x target-hour pairs), ``days``, ``horizon_h``,
    ``since`` and ``until`` (ISO UTC).
    """
    frame = history.to_frame("g_per_kwh") if isinstance(history, pd.Series) else history
    now = pd.Timestamp(now).floor("h")
    since = now - pd.Timedelta(days=days)
    known = frame[frame.index < now]
    if model is None:
        model = CarbonEnsemble(max_horizon_h=max(horizon_h, 24)).fit(known[known.index < since])
    issues = pd.date_range(since, now - pd.Timedelta(hours=1), freq="h")
    pred, quants = model.predict_table(known, issues, horizon_h, QUANTILES)
    actual = known["g_per_kwh"]
    targets = pd.DatetimeIndex(
        [t + pd.Timedelta(hours=h) for t in issues for h in range(horizon_h)]
    )
    y = actual.reindex(targets).to_numpy().reshape(pred.shape)
    naive = actual.reindex(targets - pd.Timedelta(hours=24)).to_numpy().reshape(pred.shape)
    ok = np.asarray(targets < now).reshape(pred.shape) & np.isfinite(y) & (y > 0)
    if not ok.any():
        raise ForecastError(f"no actuals between {since} and {now} to score the forecasts on")
    naive_ok = ok & np.isfinite(naive)
    lo, hi = QUANTILES.index(0.1), QUANTILES.index(0.9)
    return {
        "mape": round(float((np.abs(pred - y) / np.where(ok, y, 1.0))[ok].mean() * 100), 3),
        "naive_mape": round(
            float((np.abs(naive - y) / np.where(ok, y, 1.0))[naive_ok].mean() * 100), 3
        ),
        "coverage_80": round(coverage_pct(y[ok], quants[..., lo][ok], quants[..., hi][ok]), 2),
        "pinball_loss": round(pinball_loss(y[ok], quants[ok], QUANTILES), 3),
        "hours": int(ok.sum()),
        "days": days,
        "horizon_h": horizon_h,
        "since": since.isoformat(),
        "until": now.isoformat(),
    }
