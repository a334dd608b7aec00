"""``CarbonEnsemble``: point and quantile forecasts from several members, weighted by recent error.

Members (each a forecast of g/kWh for the target hour, from what is known at the issue time):

- ``model``: the learned :class:`~forecasting.forecaster.CarbonForecaster`;
- ``naive_24``: the same hour on the most recent day already observed;
- ``naive_168``: the same hour on the most recent week already observed;
- ``published``: the provider's own forecast, where the data has one (the DACF files'
  ``carbon_from_src_forecasts`` column, the same value at every horizon), or, given
  ``published_by_issue``, the forecast the provider had issued by each issue time (a recorded
  API's: its error then grows with the horizon as the provider's own does).

At each issue time the ensemble looks back over a trailing window (``window_days``) of forecasts
it would have issued every ``window_stride_h`` hours, scored against the actuals observed before
the issue time. Per horizon bucket it keeps the learned model unless a single member, or the
members' mean weighted by inverse squared MAPE, had a MAPE lower by more than ``margin`` (10 %)
on that window: on the window it is then within that margin of its best member, and a few weeks'
luck does not move the weight off the model.

Quantiles are split-conformal: the empirical quantiles of the log-ratio actual / ensemble over
the same window and bucket, among target hours within ``hour_band_h`` of the hour forecast
(errors differ by hour of day), applied to the new point forecast. Where the last
``recent_days`` alone give a wider band, the band moves halfway towards it, by at most
``recent_cap`` of its half-width: a trailing window lags a turn to volatile weather (without
this the 80 % band covered 74-77 % of test hours on several zones). The learned model is fitted
on the history before the window, so those residuals are out of sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Self

import numpy as np
import pandas as pd

from forecasting.errors import ForecastError
from forecasting.forecaster import EPS, QUANTILES, CarbonForecaster, _Grid

log = logging.getLogger(__name__)

MEMBERS = ("model", "naive_24", "naive_168", "published")
PUBLISHED_COLUMN = "carbon_from_src_forecasts"
# horizon buckets (first hour of each): 1, 2-3, 4-6, 7-12, 13-24, 25-48, 49-96 h
BUCKET_STARTS = np.array([1, 2, 4, 7, 13, 25, 49])
MIN_RESIDUALS = 48  # fewer in a bucket: its quantiles come from all buckets pooled
# (issue times, H) -> (issue, H) g/kWh: the published forecast issued by each time for its next
# H hours (the first is the issue hour itself), NaN where there is none
PublishedByIssue = Callable[[pd.DatetimeIndex, int], np.ndarray]


def bucket_of(horizon: np.ndarray) -> np.ndarray:
    return np.searchsorted(BUCKET_STARTS, horizon, side="right") - 1


@dataclass
class _Table:
    """Member forecasts for sorted issue positions ``pos``: (member, issue, horizon)."""

    pos: np.ndarray  # (n,)
    start_hour: int  # hour of day (UTC) of grid position 0
    members: np.ndarray  # (M, n, H)
    actual: np.ndarray  # (n, H): the actual of each target hour, NaN where unobserved


@dataclass
class CarbonEnsemble:
    """Fit on a zone's history; point forecasts with :meth:`predict`, bands with
    :meth:`predict_quantiles`. Same frame conventions as :class:`CarbonForecaster`."""

    max_horizon_h: int = 96
    window_days: int = 28
    window_stride_h: int = 3  # the window's forecasts are issued every this many hours
    margin: float = 0.10  # how much better (relative MAPE) a challenger must be than the model
    recent_days: int | None = 7
    recent_weight: float = 0.5  # how far towards the last week's band where that is wider...
    recent_cap: float | None = 0.3  # ... by at most this share of the window band's half-width
    hour_band_h: int | None = 2  # quantiles from residuals of target hours within this of the hour
    members: tuple[str, ...] = MEMBERS
    forecaster: CarbonForecaster | None = None
    published_by_issue: PublishedByIssue | None = None  # else the published column, see above
    fit_seconds: float = field(default=0.0, init=False)
    _has_published: bool = field(default=False, init=False)
    _fitted: bool = field(default=False, init=False)
    # the members' own forecasts at the issues of the latest predict_table: (member, issue, H)
    last_members: np.ndarray = field(default_factory=lambda: np.empty((0, 0, 0)), init=False)
    # the member weights (bucket, member) at the last issue of the latest predict_table
    last_weights: np.ndarray = field(default_factory=lambda: np.empty((0, 0)), init=False)

    # ---- fit --------------------------------------------------------------------------------

    def fit(self, history: pd.DataFrame) -> Self:
        """Fit the learned member on ``history`` before its last ``window_days`` (+ horizon).

        With less than that plus 14 days of history, the holdout shrinks (down to nothing: then
        the quantiles are calibrated in sample and are too narrow, which is logged).
        """
        t0 = time.perf_counter()
        unknown = set(self.members) - set(MEMBERS)
        if unknown:
            raise ForecastError(f"unknown ensemble members {sorted(unknown)}; known: {MEMBERS}")
        if history.empty:
            raise ForecastError("no history to forecast from")
        self._has_published = PUBLISHED_COLUMN in history and "published" in self.members
        if self.published_by_issue is not None and "published" in self.members:
            self._has_published = False  # the grid needs no column: the member has its table
        if "model" in self.members:
            if self.forecaster is None:
                self.forecaster = CarbonForecaster(max_horizon_h=self.max_horizon_h)
            self.forecaster.max_horizon_h = max(self.forecaster.max_horizon_h, self.max_horizon_h)
            end = history.index[-1]
            span_h = (end - history.index[0]) / pd.Timedelta(hours=1)
            holdout_h = min(self.window_days * 24 + self.max_horizon_h, span_h - 24 * 15)
            if holdout_h < 24:
                log.warning(
                    "%.0f h of history: quantiles calibrated in sample (too narrow); give it "
                    "%d days or more",
                    span_h,
                    15 + self.window_days + self.max_horizon_h // 24,
                )
                train = history
            else:
                train = history[history.index < end - pd.Timedelta(hours=holdout_h)]
            self.forecaster.fit(train)
        self._fitted = True
        self.fit_seconds = time.perf_counter() - t0
        return self

    # ---- members ----------------------------------------------------------------------------

    def _grid(self, frame: pd.DataFrame) -> _Grid:
        # a learned member without exogenous features reads no column: the grid is the
        # published member's (a provider's record, shorter than the history it is fitted on)
        model = self.forecaster
        if model is not None and "model" in self.members and model.use_exogenous:
            return model.grid(frame)
        return _Grid.build(frame, [PUBLISHED_COLUMN] if self._has_published else [])

    def _window_positions(self, issue_pos: np.ndarray, horizon_h: int) -> np.ndarray:
        """The issue positions themselves and every ``window_stride_h`` hours back from each
        over the trailing window (sorted, unique, not before the grid's start)."""
        back = np.arange(0, self.window_days * 24 + horizon_h + 1, self.window_stride_h)
        pos = np.unique((np.asarray(issue_pos)[:, None] - back[None, :]).ravel())
        return pos[pos >= 0]

    def _table(self, grid: _Grid, pos: np.ndarray, horizon_h: int) -> _Table:
        """Member forecasts issued at the positions ``pos`` for 1..H hours."""
        hz = np.arange(1, horizon_h + 1)
        target = pos[:, None] + hz[None, :] - 1
        n = len(grid.y)

        def at(series: np.ndarray, p: np.ndarray) -> np.ndarray:
            ok = (p >= 0) & (p < n)
            out = np.full(p.shape, np.nan)
            out[ok] = series[p[ok]]
            return out

        out = np.full((len(self.members), len(pos), horizon_h), np.nan)
        for m, name in enumerate(self.members):
            if name == "model" and self.forecaster is not None:
                out[m] = self.forecaster.predict_grid(grid, pos, horizon_h)
            elif name == "naive_24":
                out[m] = at(grid.y, target - 24 * ((hz + 23) // 24)[None, :])
            elif name == "naive_168":
                out[m] = at(grid.y, target - 168 * ((hz + 167) // 168)[None, :])
            elif name == "published" and self.published_by_issue is not None:
                times = grid.start + pd.to_timedelta(pos, unit="h")
                out[m] = self.published_by_issue(pd.DatetimeIndex(times), horizon_h)
            elif name == "published" and PUBLISHED_COLUMN in grid.exog_names:
                j = grid.exog_names.index(PUBLISHED_COLUMN)
                out[m] = at(grid.exog[:, j], target)
        actual = at(grid.y, target)
        return _Table(pos=pos, start_hour=grid.start.hour, members=out, actual=actual)

    # ---- combination ------------------------------------------------------------------------

    def _weights_and_residuals(
        self, table: _Table, issue_pos: int, horizon_h: int
    ) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
        """Per bucket: member weights (B, M), the log residuals of the combination, the hour of
        day (UTC) of each residual's target hour, and whether it was issued in the last
        ``recent_days``."""
        lo = issue_pos - self.window_days * 24 - horizon_h
        rows = slice(*np.searchsorted(table.pos, [lo, issue_pos]))
        f = table.members[:, rows, :]
        y = table.actual[rows, :]
        pos = table.pos[rows]
        hz = np.arange(1, horizon_h + 1)
        seen = (pos[:, None] + hz[None, :] - 1 < issue_pos) & np.isfinite(y) & (y > 0)
        buckets = bucket_of(hz)
        n_b, n_m = len(BUCKET_STARTS), len(self.members)
        weights = np.zeros((n_b, n_m))
        residuals: list[np.ndarray] = [np.empty(0) for _ in range(n_b)]
        target_hour = (table.start_hour + pos[:, None] + hz[None, :] - 1) % 24
        hours: list[np.ndarray] = [np.empty(0, dtype=np.int64) for _ in range(n_b)]
        recent_h = 24 * (self.recent_days or 0)
        recent = np.broadcast_to((pos >= issue_pos - recent_h)[:, None], seen.shape)
        is_recent: list[np.ndarray] = [np.empty(0, dtype=bool) for _ in range(n_b)]
        for b in np.unique(buckets):
            cols = buckets == b
            fb, yb, ok = f[:, :, cols], y[:, cols], seen[:, cols]
            avail = (
                [m for m in range(n_m) if np.isfinite(fb[m][ok]).mean() > 0.95] if ok.any() else []
            )
            if not avail:
                # nothing scored yet: the learned model if there is one, else the first member
                m0 = self.members.index("model") if "model" in self.members else 0
                weights[b, m0] = 1.0
                continue
            both = ok & np.all(np.isfinite(fb[avail]), axis=0)
            ape = {m: np.abs(fb[m][both] - yb[both]) / yb[both] for m in avail}
            mape = {m: float(ape[m].mean()) for m in avail}
            inv = np.array([1.0 / max(mape[m], 1e-6) ** 2 for m in avail])
            # the incumbent is the learned model (else the first member); a single member or the
            # inverse-squared-MAPE mix replaces it only if it was better by more than `margin`
            # on the window: a few weeks' luck should not move the weight off the model
            first = (
                avail.index(self.members.index("model"))
                if "model" in self.members and (self.members.index("model") in avail)
                else 0
            )
            order = [first] + [i for i in range(len(avail)) if i != first]
            candidates = [np.eye(len(avail))[i] for i in order]
            if len(avail) > 1:
                candidates.append(inv / inv.sum())
            best, best_err, best_pred = None, np.inf, None
            for w in candidates:
                pred = np.tensordot(w, fb[avail][:, both], axes=1)
                err = float((np.abs(pred - yb[both]) / yb[both]).mean())
                if best is None or err < best_err * (1 - self.margin):
                    best, best_err, best_pred = w, err, pred
            assert best is not None and best_pred is not None
            weights[b, avail] = best
            residuals[b] = np.log(yb[both] / np.maximum(best_pred, EPS))
            hours[b] = target_hour[:, cols][both]
            is_recent[b] = recent[:, cols][both]
        return weights, residuals, hours, is_recent

    def _combine(
        self, table: _Table, issue_pos: int, horizon_h: int, quantiles: Sequence[float]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Point forecast (H,) and quantiles (H, Q) issued at ``issue_pos``."""
        weights, residuals, hours, is_recent = self._weights_and_residuals(
            table, issue_pos, horizon_h
        )
        self.last_weights = weights
        hz = np.arange(1, horizon_h + 1)
        buckets = bucket_of(hz)
        f = table.members[:, int(np.searchsorted(table.pos, issue_pos)), :]  # (M, H)
        w = weights[buckets].T  # (M, H)
        w = np.where(np.isfinite(f), w, 0.0)
        total = w.sum(axis=0)
        if "model" in self.members:  # a weighted member is missing here: fall back on the model
            m0 = self.members.index("model")
            w[m0] = np.where(total > 0, w[m0], 1.0)
            total = w.sum(axis=0)
        point = np.nansum(np.where(w > 0, f, 0.0) * w, axis=0) / np.where(total > 0, total, np.nan)
        if not np.isfinite(point).all():
            raise ForecastError("no observed intensity in the days before the issue time")
        point = np.maximum(point, EPS)
        pooled = np.concatenate(residuals)
        if len(pooled) < MIN_RESIDUALS:
            raise ForecastError(
                f"only {len(pooled)} scored forecasts in the {self.window_days} days before the "
                "issue time to calibrate the quantiles; give it a longer history"
            )
        q = np.asarray(quantiles, dtype="float64")
        # per horizon: the residuals of its bucket whose target hour of day is within
        # hour_band_h of this one's (errors differ by hour: solar noon, evening peak), else the
        # bucket's, else all of them. Values are non-decreasing along q.
        target_hour = (table.start_hour + issue_pos + hz - 1) % 24
        cache: dict[tuple[int, int], np.ndarray] = {}
        log_q = np.empty((horizon_h, len(q)))
        for i, (b, hour) in enumerate(zip(buckets.tolist(), target_hour.tolist(), strict=True)):
            if (b, hour) not in cache:
                r = residuals[b]
                if self.hour_band_h is not None and len(r):
                    dist = np.abs(hours[b] - hour)
                    near = r[np.minimum(dist, 24 - dist) <= self.hour_band_h]
                    if len(near) >= MIN_RESIDUALS:
                        r = near
                if len(r) < MIN_RESIDUALS:
                    r = pooled
                qs = np.quantile(r, q)
                if self.recent_days:
                    rr = residuals[b][is_recent[b]]
                    if len(rr) >= MIN_RESIDUALS:
                        qr = np.quantile(rr, q)
                        # halfway towards the last week's band where that one is wider, by
                        # at most recent_cap of the band's half-width (a burst week of a calm
                        # zone, SG, would otherwise widen it several times: 87 % coverage)
                        wider = np.where(q < 0.5, qr < qs, qr > qs)
                        step = self.recent_weight * (qr - qs)
                        if self.recent_cap is not None:
                            mid = np.quantile(r, 0.5)
                            cap = self.recent_cap * np.abs(qs - mid)
                            step = np.clip(step, -cap, cap)
                        qs = np.where(wider, qs + step, qs)
                cache[b, hour] = qs
            log_q[i] = cache[b, hour]
        quant = point[:, None] * np.exp(log_q)
        return point, np.maximum.accumulate(np.maximum(quant, EPS), axis=1)

    # ---- predict ----------------------------------------------------------------------------

    def predict_table(
        self,
        frame: pd.DataFrame,
        issued_at: pd.DatetimeIndex,
        horizon_h: int,
        quantiles: Sequence[float] = QUANTILES,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Point (issue, H) and quantile (issue, H, Q) forecasts for several issue times.

        ``frame`` may extend past the issue times; only actuals before each issue time are read.
        """
        if not self._fitted:
            raise ForecastError("ensemble is not fitted; call fit() first")
        if not 1 <= horizon_h <= self.max_horizon_h:
            raise ForecastError(f"horizon_h must be 1..{self.max_horizon_h}, got {horizon_h}")
        if list(quantiles) != sorted(quantiles) or not all(0 < q < 1 for q in quantiles):
            raise ForecastError(f"quantiles must be increasing, in (0, 1): {list(quantiles)}")
        grid = self._grid(frame)
        issue_pos = np.array([grid.pos(t) for t in issued_at], dtype=np.int64)
        table = self._table(grid, self._window_positions(issue_pos, horizon_h), horizon_h)
        points = np.empty((len(issue_pos), horizon_h))
        quants = np.empty((len(issue_pos), horizon_h, len(quantiles)))
        for i, p in enumerate(issue_pos):
            points[i], quants[i] = self._combine(table, int(p), horizon_h, quantiles)
        self.last_members = table.members[:, np.searchsorted(table.pos, issue_pos), :]
        return points, quants

    def predict(self, history: pd.DataFrame, issued: pd.Timestamp, horizon_h: int) -> pd.Series:
        """The point forecast issued at ``issued`` (floored to the hour) for ``horizon_h`` h."""
        issued = pd.Timestamp(issued).floor("h")
        points, _ = self.predict_table(history, pd.DatetimeIndex([issued]), horizon_h, (0.5,))
        index = pd.date_range(issued, periods=horizon_h, freq="h")
        return pd.Series(points[0], index=index, name="g_per_kwh")

    def predict_quantiles(
        self,
        history: pd.DataFrame,
        issued: pd.Timestamp,
        horizon_h: int,
        quantiles: Sequence[float] = QUANTILES,
    ) -> pd.DataFrame:
        """Quantile forecasts: index = target hours, columns = the quantiles (floats), g/kWh.

        Values are positive and non-decreasing across the columns.
        """
        issued = pd.Timestamp(issued).floor("h")
        _, quants = self.predict_table(history, pd.DatetimeIndex([issued]), horizon_h, quantiles)
        index = pd.date_range(issued, periods=horizon_h, freq="h")
        return pd.DataFrame(quants[0], index=index, columns=list(quantiles))

    def last_weights_frame(self, horizon_h: int) -> pd.DataFrame:
        """:meth:`weights` of the last issue :meth:`predict_table` forecast, without scoring
        the window again: index = horizon bucket start, columns = members."""
        used = horizon_h + 1 > BUCKET_STARTS
        return pd.DataFrame(
            self.last_weights[used], index=BUCKET_STARTS[used], columns=list(self.members)
        )

    def weights(self, history: pd.DataFrame, issued: pd.Timestamp, horizon_h: int) -> pd.DataFrame:
        """Member weights used at ``issued``: index = horizon bucket start, columns = members."""
        issued = pd.Timestamp(issued).floor("h")
        grid = self._grid(history)
        p = grid.pos(issued)
        table = self._table(grid, self._window_positions(np.array([p]), horizon_h), horizon_h)
        w = self._weights_and_residuals(table, p, horizon_h)[0]
        used = horizon_h + 1 > BUCKET_STARTS
        return pd.DataFrame(w[used], index=BUCKET_STARTS[used], columns=list(self.members))
