"""``CarbonForecaster``: day-ahead (1-96 h) carbon-intensity forecasts for one zone.

Model: one gradient-boosted tree ensemble (scikit-learn ``HistGradientBoostingRegressor``) over
(issue time, horizon) pairs. It predicts the log-ratio of the target hour's intensity to the
seasonal-naive reference (the same hour on the most recent day already observed), from

- lag features known at the issue time: the last observed hour, the same hour 1, 2 and 7 days
  before the target (when observed), the mean and spread of the last 24 h; the latest hours
  against the same hours a day and a week before (today's anomaly, and yesterday's), the last
  3 h's trend, the last 24 h against the 24 h before and against the last week
  (``recent_features``);
- calendar features of the target hour (hour, weekday, day of year) and the horizon;
- exogenous columns of the target hour when the data has them: weather and per-source
  production forecasts, the intensity implied by forecast production x emission factors, and a
  published forecast. These are forecasts themselves, so using them for the target hour does
  not leak actuals.

Only actuals strictly before the issue time enter the features.

The loss is the absolute error of that log-ratio, fitted on rows drawn with probability
proportional to reference / actual (``mape_weights``): the model's median is then the median of
the actual weighted by 1 / actual, which is the point forecast that minimises MAPE.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Self

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor

from forecasting.errors import ForecastError

log = logging.getLogger(__name__)

# Direct (operational) emission factors, g/kWh, as used by CarbonCast and DACF.
DIRECT_EMISSION_FACTORS_G_PER_KWH: dict[str, float] = {
    "coal": 760.0,
    "nat_gas": 370.0,
    "oil": 406.0,
    "other": 575.0,
    "nuclear": 0.0,
    "hydro": 0.0,
    "solar": 0.0,
    "wind": 0.0,
    "biomass": 0.0,
    "geothermal": 0.0,
    "unknown": 575.0,
}
PRODUCTION_FORECAST = "avg_{}_production_forecast"
EXOGENOUS_PREFIXES = ("forecast_", "avg_", "carbon_from_src_forecasts")
EPS = 1e-3
# the quantiles every probabilistic forecast carries (q10..q90 is the 80 % interval)
QUANTILES: tuple[float, ...] = (0.1, 0.5, 0.9)


def _log_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.log(np.maximum(a, EPS) / np.maximum(b, EPS))
    return out


def implied_intensity(frame: pd.DataFrame) -> pd.Series | None:
    """Intensity implied by per-source production forecasts x direct emission factors."""
    cols = {
        src: PRODUCTION_FORECAST.format(src)
        for src in DIRECT_EMISSION_FACTORS_G_PER_KWH
        if PRODUCTION_FORECAST.format(src) in frame
    }
    if len(cols) < 2:
        return None
    mw = frame[list(cols.values())].clip(lower=0)
    factors = np.array([DIRECT_EMISSION_FACTORS_G_PER_KWH[s] for s in cols])
    total = mw.sum(axis=1)
    return (mw.to_numpy() @ factors / total.where(total > 0)).rename("implied_g_per_kwh")


def exogenous_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith(EXOGENOUS_PREFIXES)]


@dataclass
class _Grid:
    """A zone's data on a complete hourly grid (gaps are NaN)."""

    start: pd.Timestamp
    y: np.ndarray
    exog: np.ndarray
    exog_names: list[str]

    @classmethod
    def build(cls, frame: pd.DataFrame, exog_names: list[str]) -> _Grid:
        if frame.empty:
            raise ForecastError("no history to forecast from")
        idx = pd.date_range(frame.index[0].floor("h"), frame.index[-1].floor("h"), freq="h")
        hourly = frame.groupby(frame.index.floor("h")).mean().reindex(idx)
        ex = hourly.reindex(columns=exog_names)
        implied = implied_intensity(hourly)
        if implied is not None:
            ex = ex.assign(implied_g_per_kwh=implied)
        return cls(
            start=idx[0],
            y=hourly["g_per_kwh"].to_numpy(dtype="float64"),
            exog=ex.to_numpy(dtype="float64"),
            exog_names=list(ex.columns),
        )

    def pos(self, when: pd.Timestamp) -> int:
        return int((when - self.start) // pd.Timedelta(hours=1))


@dataclass
class CarbonForecaster:
    """Fit on a zone's history, predict 1 to ``max_horizon_h`` hours ahead.

    ``fit(frame)`` takes a frame with a ``g_per_kwh`` column (UTC index, hourly or finer) and
    optional exogenous columns; ``predict(frame, issued_at, horizon_h)`` returns a series of
    g/kWh for the hours ``issued_at .. issued_at + horizon_h - 1``.
    """

    max_horizon_h: int = 96
    issue_every_h: int = 6
    max_iter: int = 300
    learning_rate: float = 0.06
    use_exogenous: bool = True
    recent_features: bool = True
    mape_weights: bool = True
    random_state: int = 0
    fit_seconds: float = field(default=0.0, init=False)
    _models: dict[int, HistGradientBoostingRegressor] = field(
        default_factory=dict, init=False, repr=False
    )
    _exog_names: list[str] = field(default_factory=list, init=False)

    # ---- features -------------------------------------------------------------------------

    def _features(
        self, grid: _Grid, issue_pos: np.ndarray, horizon: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Feature matrix and the naive reference for (issue position, horizon) pairs."""
        y = grid.y
        n = len(y)

        def at(p: np.ndarray) -> np.ndarray:
            ok = (p >= 0) & (p < n)
            out = np.full(p.shape, np.nan)
            out[ok] = y[p[ok]]
            return out

        target = issue_pos + horizon - 1
        days_back = (horizon + 23) // 24  # most recent day whose same hour is observed
        same_hour = at(target - 24 * days_back)
        same_hour_2 = at(target - 24 * (days_back + 1))
        same_hours = np.stack([at(target - 24 * (days_back + k)) for k in range(7)])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN lags: NaN features
            same_hour_median = np.nanmedian(same_hours, axis=0)
            same_hour_mean = np.nanmean(same_hours, axis=0)
        weeks_back = (horizon + 167) // 168
        same_hour_week = at(target - 168 * weeks_back)
        last = at(issue_pos - 1)
        # rolling stats of the 24 h before issue
        window = np.stack([at(issue_pos - k) for k in range(1, 25)])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean24 = np.nanmean(window, axis=0)
            std24 = np.nanstd(window, axis=0)
            min24 = np.nanmin(window, axis=0)
            max24 = np.nanmax(window, axis=0)
        # fall back through the lags so the reference is always a real observation if any
        ref = np.where(np.isfinite(same_hour), same_hour, np.where(np.isfinite(last), last, mean24))
        times = grid.start + pd.to_timedelta(target, unit="h")
        hour = times.hour.to_numpy()
        dow = times.day_of_week.to_numpy()
        doy = times.day_of_year.to_numpy()
        cols = [
            horizon,
            hour,
            dow,
            np.sin(2 * np.pi * doy / 365.25),
            np.cos(2 * np.pi * doy / 365.25),
            np.log(np.maximum(last, EPS) / np.maximum(ref, EPS)),
            np.log(np.maximum(same_hour_2, EPS) / np.maximum(ref, EPS)),
            np.log(np.maximum(same_hour_week, EPS) / np.maximum(ref, EPS)),
            np.log(np.maximum(same_hour_median, EPS) / np.maximum(ref, EPS)),
            np.log(np.maximum(same_hour_mean, EPS) / np.maximum(ref, EPS)),
            *(np.log(np.maximum(row, EPS) / np.maximum(ref, EPS)) for row in same_hours[2:]),
            np.log(np.maximum(mean24, EPS) / np.maximum(ref, EPS)),
            std24 / np.maximum(mean24, EPS),
            np.log(np.maximum(min24, EPS) / np.maximum(ref, EPS)),
            np.log(np.maximum(max24, EPS) / np.maximum(ref, EPS)),
            np.log(np.maximum(ref, EPS)),
        ]
        if self.recent_features:
            # how the latest hours compare with the same hours a day and a week earlier (today's
            # anomaly, which persists into the next hours), and the latest few hours' trend
            lr = _log_ratio
            day_anomaly = np.stack(
                [lr(at(issue_pos - k), at(issue_pos - k - 24)) for k in (1, 2, 3, 6)]
            )
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean_prev24 = np.nanmean(
                    np.stack([at(issue_pos - k) for k in range(25, 49)]), axis=0
                )
                mean_week = np.nanmean(
                    np.stack([at(issue_pos - k) for k in range(1, 169, 3)]), axis=0
                )
            cols += [
                *day_anomaly,
                lr(last, at(issue_pos - 169)),
                lr(last, at(issue_pos - 4)),
                lr(mean24, mean_prev24),
                lr(at(target - 168 * weeks_back - 24), at(target - 24 * days_back - 24)),
                lr(at(issue_pos - 25), at(issue_pos - 49)),
                lr(mean24, mean_week),
            ]
        if self.use_exogenous and grid.exog.shape[1]:
            ok = (target >= 0) & (target < n)
            ex = np.full((len(target), grid.exog.shape[1]), np.nan)
            ex[ok] = grid.exog[target[ok]]
            for j, name in enumerate(grid.exog_names):
                col = ex[:, j]
                if name in ("implied_g_per_kwh", "carbon_from_src_forecasts"):
                    # the exogenous forecast relative to the reference, and its recent bias:
                    # how far the same forecast was from the actuals on the last observed day
                    series = grid.exog[:, j]

                    def ex_at(p: np.ndarray, series: np.ndarray = series) -> np.ndarray:
                        ok = (p >= 0) & (p < n)
                        out = np.full(p.shape, np.nan)
                        out[ok] = series[p[ok]]
                        return out

                    lag = target - 24 * days_back
                    cols.append(np.log(np.maximum(col, EPS) / np.maximum(ref, EPS)))
                    cols.append(np.log(np.maximum(same_hour, EPS) / np.maximum(ex_at(lag), EPS)))
                    cols.append(
                        np.log(np.maximum(last, EPS) / np.maximum(ex_at(issue_pos - 1), EPS))
                    )
                cols.append(col)
        return np.column_stack(cols), ref

    # ---- fit / predict ----------------------------------------------------------------------

    def fit(self, frame: pd.DataFrame) -> Self:
        t0 = time.perf_counter()
        self._exog_names = exogenous_columns(frame) if self.use_exogenous else []
        grid = _Grid.build(frame, self._exog_names)
        n = len(grid.y)
        if n < 24 * 14:
            raise ForecastError(f"need at least 14 days of history to fit, got {n} hours")
        # issue times at every hour of the day (a random 1/issue_every_h of them, seeded) so
        # the model has seen forecasts issued at whatever hour it is asked at
        rng = np.random.default_rng(self.random_state)
        every = np.arange(24 * 8, n)
        issues = np.sort(
            rng.choice(every, size=max(1, len(every) // self.issue_every_h), replace=False)
        )
        self._models = {}
        # one model per day-ahead block (hours 1-24, 25-48, ...): a model trained on all
        # horizons at once was measurably worse on the first day, the one that matters most
        for block in range(1, (self.max_horizon_h + 23) // 24 + 1):
            hz = np.arange(24 * (block - 1) + 1, min(24 * block, self.max_horizon_h) + 1)
            issue_pos = np.repeat(issues, len(hz))
            horizon = np.tile(hz, len(issues))
            target = issue_pos + horizon - 1
            keep = target < n
            issue_pos, horizon, target = issue_pos[keep], horizon[keep], target[keep]
            x, ref = self._features(grid, issue_pos, horizon)
            y = grid.y[target]
            ok = np.isfinite(y) & np.isfinite(ref)
            if ok.sum() < 100:
                raise ForecastError(
                    f"too few observed hours to fit horizons {hz[0]}-{hz[-1]} h "
                    f"({int(ok.sum())} samples); give it more history"
                )
            z = np.log(np.maximum(y[ok], EPS) / np.maximum(ref[ok], EPS))
            model = HistGradientBoostingRegressor(
                loss="absolute_error",
                max_iter=self.max_iter,
                learning_rate=self.learning_rate,
                max_leaf_nodes=31,
                min_samples_leaf=40,
                l2_regularization=1.0,
                random_state=self.random_state,
            )
            x_fit = x[ok]
            if self.mape_weights:
                # rows drawn with probability ref / y: the fitted median is then the median of y
                # weighted by 1 / y, the MAPE-optimal point forecast (a little below the plain
                # median). Drawn, not passed as sample_weight: weighted leaf medians cost 4x.
                w = np.exp(-z)
                rows = rng.choice(len(z), size=len(z), p=w / w.sum())
                x_fit, z = x_fit[rows], z[rows]
            model.fit(x_fit, z)
            self._models[block] = model
        self.fit_seconds = time.perf_counter() - t0
        log.debug("fitted %d forecaster blocks in %.2fs", len(self._models), self.fit_seconds)
        return self

    def grid(self, frame: pd.DataFrame) -> _Grid:
        """``frame`` on the complete hourly grid, with the exogenous columns the fit used."""
        return _Grid.build(frame, self._exog_names)

    def predict_grid(self, grid: _Grid, issue_pos: np.ndarray, horizon_h: int) -> np.ndarray:
        """Forecasts (rows = issue positions on ``grid``, columns = horizon 1..H), g/kWh.

        NaN where no intensity was observed in the days before an issue position.
        """
        if not self._models:
            raise ForecastError("forecaster is not fitted; call fit() first")
        if not 1 <= horizon_h <= self.max_horizon_h:
            raise ForecastError(f"horizon_h must be 1..{self.max_horizon_h}, got {horizon_h}")
        hz = np.arange(1, horizon_h + 1)
        ip = np.repeat(np.asarray(issue_pos, dtype=np.int64), horizon_h)
        h = np.tile(hz, len(issue_pos))
        # _features reads actuals only at positions before each issue time (see the lags)
        x, ref = self._features(grid, ip, h)
        z = np.zeros(len(h))
        block = (h + 23) // 24
        for b in np.unique(block):
            sel = block == b
            z[sel] = self._models[int(b)].predict(x[sel])
        pred: np.ndarray = np.maximum(ref, EPS) * np.exp(z)
        return pred.reshape(len(issue_pos), horizon_h)

    def predict_many(
        self, frame: pd.DataFrame, issued_at: pd.DatetimeIndex, horizon_h: int
    ) -> pd.DataFrame:
        """Forecasts for several issue times at once: rows = issue time, columns = horizon 1..H.

        ``frame`` may extend past the issue times (a backtest passes the whole file): only rows
        strictly before each issue time are read as actuals, exogenous columns at the target hour.
        """
        if not self._models:
            raise ForecastError("forecaster is not fitted; call fit() first")
        grid = self.grid(frame)
        issue_pos = np.array([grid.pos(t) for t in issued_at], dtype=np.int64)
        pred = self.predict_grid(grid, issue_pos, horizon_h)
        if not np.isfinite(pred).all():
            raise ForecastError("no observed intensity in the days before the issue time")
        hz = np.arange(1, horizon_h + 1)
        return pd.DataFrame(pred, index=issued_at, columns=hz)

    def predict(self, frame: pd.DataFrame, issued_at: pd.Timestamp, horizon_h: int) -> pd.Series:
        """One forecast issued at ``issued_at`` (floored to the hour)."""
        issued = pd.Timestamp(issued_at).floor("h")
        table = self.predict_many(frame, pd.DatetimeIndex([issued]), horizon_h)
        return pd.Series(
            table.iloc[0].to_numpy(),
            index=pd.date_range(issued, periods=horizon_h, freq="h"),
            name="g_per_kwh",
        )
