"""The record of issued provider forecasts, and the ensemble that weighs the provider by it.

The provider here is :class:`tests.fake_provider.FakeProvider` (the ``CarbonSource`` interface
over a known truth) and, for the wire, the loopback Electricity Maps API of
:mod:`tests.fake_apis` behind the real :class:`ElectricityMapsSource`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forecasting.ensemble import CarbonEnsemble
from forecasting.errors import CarbonSourceError
from forecasting.forecaster import CarbonForecaster
from forecasting.sources import (
    ElectricityMapsSource,
    ForecastRecord,
    RecordedSource,
    build_sources,
    record_path,
)
from forecasting.sources.http import HttpClient
from regions.config import ConfigError, parse_config
from tests.conftest import FakeClock
from tests.fake_apis import FakeAPI, electricitymaps_app
from tests.fake_provider import FakeProvider

ROOT = Path(__file__).resolve().parents[1]
START = pd.Timestamp("2024-01-01", tz="UTC")
NOW = START + pd.Timedelta(days=70, hours=13)
ZONE = "Z"
# a short window keeps each fit near a second; the production default is 28 days
WINDOW_D = 10
HISTORY_D = WINDOW_D + 17


def CLOCK() -> datetime:  # noqa: N802 - a clock, called like the others
    """The records' clock in the tests of the record: the day the hours below are in."""
    out: datetime = START.to_pydatetime()
    return out


def at(hour: int) -> datetime:
    out: datetime = (START + pd.Timedelta(hours=hour)).to_pydatetime()
    return out


def hours(*values: float, first: int) -> pd.Series:
    idx = pd.date_range(START + pd.Timedelta(hours=first), periods=len(values), freq="h")
    return pd.Series(values, index=idx, dtype="float64")


def mape(forecast: pd.Series, actual: pd.Series) -> float:
    y = actual.reindex(forecast.index).to_numpy()
    return float(np.mean(np.abs(forecast.to_numpy() - y) / y))


# ---- the record ---------------------------------------------------------------------------------


def test_an_issue_is_read_back_by_target_hour(tmp_path: Path) -> None:
    rec = ForecastRecord(tmp_path / "r.sqlite", "em", clock=CLOCK)
    assert rec.add_issue(ZONE, at(0), hours(100, 110, 120, first=1)) == 3
    got = rec.published(ZONE, at(0), at(10))
    assert list(got.index) == [pd.Timestamp(at(h)) for h in (1, 2, 3)]
    assert list(got) == [100, 110, 120]
    assert str(got.index.tz) == "UTC"
    assert rec.published("other-zone", at(0), at(10)).empty
    assert (
        ForecastRecord(tmp_path / "r.sqlite", "wt", clock=CLOCK)
        .published(ZONE, at(0), at(10))
        .empty
    )


def test_published_is_the_latest_issue_made_before_each_target_hour(tmp_path: Path) -> None:
    """The convention: for target hour T, the value of the latest issue whose hour is < T.
    An issue made in the target hour itself (fetched at 03:10 for 03:00) is not a forecast
    of it."""
    rec = ForecastRecord(tmp_path / "r.sqlite", "em", clock=CLOCK)
    rec.add_issue(ZONE, at(0), hours(100, 100, 100, 100, 100, first=1))  # targets 1..5
    rec.add_issue(ZONE, at(2), hours(200, 200, 200, 200, first=2))  # targets 2..5
    rec.add_issue(ZONE, at(3), hours(300, 300, 300, first=3))  # targets 3..5
    got = rec.published(ZONE, at(0), at(6))
    # T=1: issue 0; T=2: issue 0 (issue 2 is not before 2); T=3: issue 2; T=4, 5: issue 3
    assert got.to_dict() == {
        pd.Timestamp(at(1)): 100,
        pd.Timestamp(at(2)): 100,
        pd.Timestamp(at(3)): 200,
        pd.Timestamp(at(4)): 300,
        pd.Timestamp(at(5)): 300,
    }


def test_issue_hour_is_the_fetch_hour_and_a_refetch_replaces(tmp_path: Path) -> None:
    rec = ForecastRecord(tmp_path / "r.sqlite", "em", clock=CLOCK)
    fetched = START + pd.Timedelta(hours=4, minutes=50)
    rec.add_issue(ZONE, fetched.to_pydatetime(), hours(1, first=6))
    rec.add_issue(ZONE, (fetched + pd.Timedelta(minutes=5)).to_pydatetime(), hours(2, first=6))
    assert rec.issues(ZONE) == 1
    assert rec.published(ZONE, at(0), at(10)).to_dict() == {pd.Timestamp(at(6)): 2}


def test_half_hours_are_averaged_and_garbage_is_never_stored(tmp_path: Path) -> None:
    rec = ForecastRecord(tmp_path / "r.sqlite", "uk", clock=CLOCK)
    idx = pd.date_range(at(1), periods=6, freq="30min")
    values = pd.Series([100, 200, float("nan"), float("inf"), -5.0, 50.0], index=idx)
    rec.add_issue(ZONE, at(0), values)
    got = rec.published(ZONE, at(0), at(10))
    # hour 1: mean(100, 200); hour 2: nothing usable (a gap, not 0); hour 3: 50 (-5 dropped)
    assert got.to_dict() == {pd.Timestamp(at(1)): 150.0, pd.Timestamp(at(3)): 50.0}
    assert rec.add_issue(ZONE, at(0), pd.Series([float("nan")], index=[at(9)])) == 0


def test_retention_drops_old_issues_and_actuals(tmp_path: Path) -> None:
    clock = FakeClock(at(0))
    rec = ForecastRecord(tmp_path / "r.sqlite", "em", retention_days=7, clock=clock)
    rec.add_issue(ZONE, at(0), hours(1, 2, first=1))
    rec.add_actuals(ZONE, hours(5, first=0))
    clock.advance(8 * 86400)
    rec.add_issue(ZONE, clock(), hours(3, first=8 * 24 + 1))
    assert rec.issues(ZONE) == 1
    assert rec.published(ZONE, at(0), at(24 * 9)).index[0] == pd.Timestamp(at(8 * 24 + 1))
    assert rec.actuals(ZONE, at(0), at(24 * 9)).empty


def test_a_restart_keeps_the_record(tmp_path: Path) -> None:
    path = tmp_path / "state" / "r.sqlite"
    rec = ForecastRecord(path, "em", clock=CLOCK)
    rec.add_issue(ZONE, at(0), hours(100, 110, first=1))
    rec.add_actuals(ZONE, hours(90, 95, first=0))
    rec.close()
    again = ForecastRecord(path, "em", clock=CLOCK)
    assert list(again.published(ZONE, at(0), at(5))) == [100, 110]
    assert list(again.actuals(ZONE, at(0), at(5))) == [90, 95]


def test_concurrent_writers_of_one_process_lose_nothing(tmp_path: Path) -> None:
    """Two sources' records on one file, each written from several threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    records = [ForecastRecord(tmp_path / "r.sqlite", s, clock=CLOCK) for s in ("em", "wt")]

    def write(i: int) -> int:
        rec = records[i % 2]
        return rec.add_issue(ZONE, at(i), pd.Series(float(i + 1), index=[at(i + 1), at(i + 2)]))

    with ThreadPoolExecutor(8) as pool:
        assert sum(pool.map(write, range(200))) == 400
    for k, rec in enumerate(records):  # "em" issued at even hours, "wt" at odd ones
        assert rec.issues(ZONE) == 100
        got = rec.published(ZONE, at(0), at(300))
        targets = [int((t - START) / pd.Timedelta(hours=1)) for t in got.index]
        assert targets == list(range(1 + k, 201 + k))
        # target T: the latest issue before it, made at T - 1 or T - 2, valued its hour + 1
        assert list(got) == [float(t if (t - k) % 2 == 1 else t - 1) for t in targets]


def test_a_foreign_file_is_refused_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE rows (x)")
    from forecasting.sources.record import ForecastRecordError

    with pytest.raises(ForecastRecordError, match="not a carbon-router forecast record"):
        ForecastRecord(path, "em").add_issue(ZONE, at(0), hours(1, first=1))


def test_a_writer_killed_mid_write_leaves_whole_issues(tmp_path: Path) -> None:
    """A process killed while writing leaves each issue whole or absent, and a file the next
    process reads and writes."""
    path = tmp_path / "r.sqlite"
    script = textwrap.dedent(f"""
        import sys, pandas as pd
        sys.path.insert(0, {str(ROOT)!r})
        from forecasting.sources.record import ForecastRecord
        rec = ForecastRecord({str(path)!r}, "em", retention_days=10000)
        start = pd.Timestamp("2024-01-01", tz="UTC")
        i = 0
        while True:
            t = start + pd.Timedelta(hours=i)
            idx = pd.date_range(t, periods=2000, freq="h")
            rec.add_issue("Z", t.to_pydatetime(), pd.Series(float(i + 1), index=idx))
            if i == 3:
                print("writing", flush=True)
            i += 1
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = db.execute("SELECT issued_h, COUNT(*) FROM issued GROUP BY issued_h").fetchall()
    assert len(counts) >= 4
    assert {n for _, n in counts} == {2000}
    rec = ForecastRecord(path, "em", retention_days=10000)
    assert rec.add_issue(ZONE, at(0), hours(1, first=1)) == 1


# ---- the recording wrapper over the wire --------------------------------------------------------


@pytest.fixture
async def em_api(clock: FakeClock) -> AsyncIterator[FakeAPI]:
    api = electricitymaps_app(FakeAPI(clock))
    await api.start()
    yield api
    await api.stop()


async def _no_sleep(_: float) -> None:
    return None


def _em(api: FakeAPI, clock: FakeClock) -> ElectricityMapsSource:
    http = HttpClient(source="em", clock=clock, sleep=_no_sleep, timeout_s=2.0, cache_ttl_s=300)
    return ElectricityMapsSource("em-key", base_url=f"{api.url}/v3", http=http, clock=clock)


async def test_each_fetched_forecast_is_recorded_as_it_came(
    em_api: FakeAPI, clock: FakeClock, tmp_path: Path
) -> None:
    rec = ForecastRecord(tmp_path / "r.sqlite", "electricitymaps", clock=clock)
    src = RecordedSource(_em(em_api, clock), rec, clock=clock)
    try:
        fc = await src.forecast("NL", 24)
        assert fc.note == "" and fc.weights is None  # the provider's forecast as is
        stored = rec.published(
            "NL", fc.g_per_kwh.index[0], fc.g_per_kwh.index[-1] + timedelta(hours=1)
        )
        # the current hour's value was issued in that hour: not a forecast of it
        assert stored.index[0] == fc.g_per_kwh.index[1]
        assert stored.to_dict() == fc.g_per_kwh.iloc[1:].to_dict()
        assert rec.issues("NL") == 1
    finally:
        await src.aclose()


async def test_a_garbage_answer_records_nothing(
    em_api: FakeAPI, clock: FakeClock, tmp_path: Path
) -> None:
    now = pd.Timestamp(clock()).floor("h")
    em_api.override["/v3/carbon-intensity/forecast"] = {
        "zone": "NL",
        "forecast": [
            {"datetime": (now + pd.Timedelta(hours=2)).isoformat(), "carbonIntensity": "n/a"}
        ],
    }
    rec = ForecastRecord(tmp_path / "r.sqlite", "electricitymaps", clock=clock)
    src = RecordedSource(_em(em_api, clock), rec, clock=clock)
    try:
        with pytest.raises(CarbonSourceError, match="not a number"):
            await src.forecast("NL", 24)
        assert rec.issues("NL") == 0
    finally:
        await src.aclose()


async def test_an_unwritable_record_leaves_the_forecast_standing(
    em_api: FakeAPI, clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rec = ForecastRecord(blocker / "r.sqlite", "electricitymaps", clock=clock)
    src = RecordedSource(_em(em_api, clock), rec, clock=clock)
    try:
        with caplog.at_level(logging.WARNING):
            fc = await src.forecast("NL", 24)
        assert len(fc.g_per_kwh) >= 20
        assert "forecast not recorded" in caplog.text
    finally:
        await src.aclose()


# ---- the ensemble -------------------------------------------------------------------------------


async def _recorded(provider: FakeProvider, rec: ForecastRecord, days: int) -> None:
    """The provider's issues of the last ``days``, recorded as the router would have: through
    a recording wrapper, one fetch an hour."""
    clock = provider.clock
    assert isinstance(clock, FakeClock)
    end = clock.now
    clock.now = end - timedelta(days=days)
    recorder = RecordedSource(provider, rec, clock=clock)
    while clock.now < end:
        await recorder.forecast(ZONE, 48)
        clock.advance(3600)
    clock.now = end


def _setup(
    tmp_path: Path, quality: str, *, record_days: int = WINDOW_D + 3, **kw: object
) -> tuple[FakeProvider, ForecastRecord, RecordedSource]:
    clock = FakeClock(NOW.to_pydatetime())
    provider = FakeProvider(clock, start=START, hours=24 * 90, quality=quality, **kw)  # type: ignore[arg-type]
    rec = ForecastRecord(tmp_path / "r.sqlite", "fake", clock=clock)
    src = RecordedSource(
        provider, rec, ensemble=True, history_days=HISTORY_D, window_days=WINDOW_D, clock=clock
    )
    return provider, rec, src


@pytest.mark.parametrize("quality", ["good", "bad"])
async def test_the_weight_follows_the_providers_recent_error(tmp_path: Path, quality: str) -> None:
    provider, rec, src = _setup(tmp_path, quality)
    await _recorded(provider, rec, WINDOW_D + 3)
    errors: dict[str, list[float]] = {"ensemble": [], "published": [], "naive_24": []}
    for _ in range(2):
        fc = await src.forecast(ZONE, 48)
        assert fc.note == ""
        assert fc.weights is not None and fc.quantiles is not None
        assert list(fc.weights.columns) == ["model", "naive_24", "naive_168", "published"]
        assert np.allclose(fc.weights.sum(axis=1), 1.0)
        assert len(fc.g_per_kwh) == 48 and (fc.g_per_kwh > 0).all()
        assert (fc.quantiles[0.1] <= fc.quantiles[0.9]).all()
        issued = pd.Timestamp(fc.issued_at)
        naive = provider.truth.reindex(fc.g_per_kwh.index - pd.Timedelta(hours=24))
        naive.index = fc.g_per_kwh.index
        errors["ensemble"].append(mape(fc.g_per_kwh, provider.truth))
        errors["published"].append(mape(provider.issued(issued, 48), provider.truth))
        errors["naive_24"].append(mape(naive, provider.truth))
        published_weight = fc.weights["published"]
        if quality == "good":
            assert (published_weight > 0.5).all(), fc.weights
        else:
            assert (published_weight < 0.1).all(), fc.weights
        provider.clock.advance(86400)  # type: ignore[attr-defined]
        await _recorded(provider, rec, 1)
    ens, pub, naive24 = (float(np.mean(v)) for v in errors.values())
    if quality == "good":  # the provider carries it: well under the naive forecast's error
        assert ens < 0.5 * naive24 and ens <= pub * 1.1, errors
    else:  # the weight is off the provider: the learned model's error, of the naive's order
        assert ens < 0.5 * pub and ens < 1.5 * naive24, errors
    assert src.fits == 2


async def test_the_provider_is_weighed_at_each_horizon_on_what_it_issued_that_far_ahead(
    tmp_path: Path,
) -> None:
    """A provider good for 12 hours and bad after: scored on the forecasts it issued (not, for
    each past hour, on its latest before it, which were all 1-2 h ahead and all good), the
    weight stays on it for the first hours and leaves it for the day ahead."""
    provider, rec, src = _setup(tmp_path, "fading")
    await _recorded(provider, rec, WINDOW_D + 3)
    fc = await src.forecast(ZONE, 48)
    assert fc.weights is not None and fc.note == ""
    published = fc.weights["published"]
    assert (published.loc[[1, 2, 4]] > 0.5).all(), fc.weights
    assert (published.loc[[13, 25]] < 0.1).all(), fc.weights
    issued = provider.issued(pd.Timestamp(fc.issued_at), 48)
    assert mape(fc.g_per_kwh, provider.truth) < 0.5 * mape(issued, provider.truth)


def test_latest_issued_reads_each_issue_time_from_the_latest_issue_made_by_then() -> None:
    from forecasting.sources.record import to_hour
    from forecasting.sources.recorded import LatestIssued

    h0 = to_hour(START)  # hours since the epoch
    # issue 0: targets 0..3 = 10..13; issue 2: targets 2..5 = 20..23
    table = LatestIssued(
        h0 + np.array([0, 0, 0, 0, 2, 2, 2, 2]),
        h0 + np.array([0, 1, 2, 3, 2, 3, 4, 5]),
        np.array([10, 11, 12, 13, 20, 21, 22, 23.0]),
        first_h=h0,
        now_h=h0 + 3,
        horizon_h=3,
    )
    got = table(pd.DatetimeIndex([at(h) for h in (-1, 0, 1, 2, 3)]), 3)
    assert np.isnan(got[0]).all()  # before the first issue
    assert got[1:].tolist() == [[10, 11, 12], [11, 12, 13], [20, 21, 22], [21, 22, 23]]


async def test_one_fit_per_zone_and_hour(tmp_path: Path) -> None:
    provider, rec, src = _setup(tmp_path, "good")
    await _recorded(provider, rec, WINDOW_D + 3)
    first = await src.forecast(ZONE, 48)
    again = await src.forecast(ZONE, 24)
    assert src.fits == 1
    assert len(again.g_per_kwh) == 24
    assert again.g_per_kwh.equals(first.g_per_kwh.iloc[:24])
    assert again.weights is not None and again.weights.index.max() <= 24


async def test_too_few_recorded_issues_serve_the_provider_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    provider, rec, src = _setup(tmp_path, "good")
    await _recorded(provider, rec, 3)
    with caplog.at_level(logging.WARNING):
        fc = await src.forecast(ZONE, 48)
    assert fc.note.startswith("provider forecast alone: recorded provider forecasts cover")
    assert fc.note in caplog.text
    assert fc.weights is None and fc.quantiles is None
    expected = provider.issued(pd.Timestamp(fc.issued_at), 48)
    assert fc.g_per_kwh.to_dict() == expected.to_dict()
    assert src.fits == 0


async def test_too_short_a_history_serves_the_provider_alone(tmp_path: Path) -> None:
    history_from = NOW - pd.Timedelta(days=12)  # the account serves 12 days of history
    provider, rec, src = _setup(tmp_path, "good", history_from=history_from)
    await _recorded(provider, rec, WINDOW_D + 3)
    fc = await src.forecast(ZONE, 48)
    assert fc.note.startswith("provider forecast alone:")
    assert "hours of actuals since" in fc.note and f"needs {HISTORY_D} days" in fc.note
    assert math.isclose(fc.g_per_kwh.iloc[5], provider.issued(pd.Timestamp(fc.issued_at)).iloc[5])


async def test_the_actuals_are_fetched_once_then_topped_up(tmp_path: Path) -> None:
    provider, rec, src = _setup(tmp_path, "good")
    await _recorded(provider, rec, WINDOW_D + 3)
    await src.forecast(ZONE, 48)
    stored = rec.actuals(ZONE, (NOW - pd.Timedelta(days=100)).to_pydatetime(), NOW.to_pydatetime())
    assert len(stored) == HISTORY_D * 24
    provider.clock.advance(3600)  # type: ignore[attr-defined]
    provider.fail_history = True  # the next hour: the API is down, the stored actuals serve
    fc = await src.forecast(ZONE, 48)
    assert fc.weights is not None and fc.note == ""
    assert provider.history_calls == 2 and src.fits == 2


async def test_a_failing_provider_leaves_the_ensemble_of_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    provider, rec, src = _setup(tmp_path, "good")
    await _recorded(provider, rec, WINDOW_D + 3)
    provider.fail_forecast = True
    with caplog.at_level(logging.WARNING):
        fc = await src.forecast(ZONE, 48)
    assert fc.note.startswith("provider forecast unavailable (fakeprov zone Z: HTTP 503")
    assert fc.note in caplog.text
    assert fc.weights is not None and list(fc.weights.columns) == [
        "model",
        "naive_24",
        "naive_168",
    ]
    assert len(fc.g_per_kwh) == 48 and (fc.g_per_kwh > 0).all() and fc.quantiles is not None
    assert mape(fc.g_per_kwh, provider.truth) < 0.25


async def test_a_failing_provider_without_history_fails_loudly(tmp_path: Path) -> None:
    provider, rec, src = _setup(tmp_path, "good")
    provider.fail_forecast = True
    provider.fail_history = True
    with pytest.raises(CarbonSourceError, match="HTTP 503 from /forecast.*no ensemble without"):
        await src.forecast(ZONE, 48)


async def test_a_restart_keeps_weighing_the_provider(tmp_path: Path) -> None:
    """A new process (a new record object and source on the same file) finds the issues and
    actuals the last one recorded: the provider is weighed at once, the history not fetched."""
    provider, rec, src = _setup(tmp_path, "good")
    await _recorded(provider, rec, WINDOW_D + 3)
    await src.forecast(ZONE, 48)
    await src.aclose()
    provider.clock.advance(3600)  # type: ignore[attr-defined]
    calls = provider.history_calls
    again = RecordedSource(
        provider,
        ForecastRecord(tmp_path / "r.sqlite", "fake", clock=provider.clock),
        ensemble=True,
        history_days=HISTORY_D,
        window_days=WINDOW_D,
        clock=provider.clock,
    )
    fc = await again.forecast(ZONE, 48)
    assert fc.note == "" and fc.weights is not None
    assert (fc.weights["published"] > 0.5).all()
    assert provider.history_calls == calls + 1  # only the last hours, topped up


async def test_the_live_forecast_view_plans_on_the_ensemble(tmp_path: Path) -> None:
    """The router's forecast view (what deferral plans with) gets the ensemble, band and
    weights included, and its background refresh in the same hour fits nothing again."""
    from router.service.forecasts import HORIZON_H, ForecastView, forecast_rows

    provider, rec, src = _setup(tmp_path, "good")
    await _recorded(provider, rec, WINDOW_D + 3)
    cfg = parse_config(CONFIG.format(extra=""))
    region = cfg.regions[0].model_copy(update={"zone": ZONE})
    view = ForecastView([region], {"em": src})
    fc = await view.get(region)
    assert fc.weights is not None and fc.quantiles is not None
    assert len(fc.g_per_kwh) == HORIZON_H
    point, bound = forecast_rows(fc, list(fc.g_per_kwh.index[:6]), 0.9)
    assert np.isfinite(point).all() and (bound >= point).all()
    await view.refresh_all()
    assert src.fits == 1 and view.failures == 0


def test_a_model_without_exogenous_features_leaves_the_published_column_to_its_member() -> None:
    """The learned member of the live ensemble reads no exogenous column (the record is
    younger than the history); the published member still reads the column."""
    from forecasting.ensemble import PUBLISHED_COLUMN
    from tests.fake_provider import truth

    y = truth(START, 24 * 40)
    now = START + pd.Timedelta(days=38)
    frame = pd.DataFrame({"g_per_kwh": y, PUBLISHED_COLUMN: y * 1.01})
    frame.loc[frame.index < START + pd.Timedelta(days=30), PUBLISHED_COLUMN] = np.nan
    model = CarbonEnsemble(
        max_horizon_h=24,
        window_days=7,
        forecaster=CarbonForecaster(max_horizon_h=24, use_exogenous=False, max_iter=30),
    )
    model.fit(frame[frame.index < now])
    model.predict_table(frame, pd.DatetimeIndex([now]), 24)
    published = model.last_members[list(model.members).index("published")]
    assert np.allclose(published[0], (y * 1.01).reindex(pd.date_range(now, periods=24, freq="h")))
    assert model.last_weights_frame(24)["published"].iloc[0] == 1.0


# ---- config -------------------------------------------------------------------------------------

CONFIG = """\
carbon_sources:
  em:
    kind: electricitymaps
    api_key: k
    forecast:
      ensemble: true
      {extra}
regions:
  - name: r
    zone: NL
    carbon_source: em
    price: {{flat_usd_per_kwh: 0.1}}
    replicas:
      - name: r-0
        backend: {{kind: openai, url: "http://127.0.0.1:9/v1", model: m}}
"""


def test_a_source_opts_in_and_is_wrapped(tmp_path: Path) -> None:
    cfg = parse_config(CONFIG.format(extra="window_days: 14"), path="c.yaml")
    sources = build_sources(cfg, base_dir=tmp_path)
    src = sources["em"]
    assert isinstance(src, RecordedSource) and src.ensemble and src.window_days == 14
    assert src.record is not None and src.record.path == tmp_path / "carbon-router.forecasts.sqlite"
    assert src.record.path == record_path(cfg, tmp_path)
    assert isinstance(src.inner, ElectricityMapsSource)


def test_by_default_forecasts_are_recorded_not_ensembled() -> None:
    text = CONFIG.replace("    forecast:\n      ensemble: true\n      {extra}\n", "")
    cfg = parse_config(text.format())
    spec = cfg.carbon_sources["em"]
    assert spec.forecast.record and not spec.forecast.ensemble  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "line", "field", "message"),
    [
        ("record: false", 5, "forecast", "set record: true"),
        ("window_days: 3", 7, "forecast.window_days", "must be >= 7, got 3"),
        ("history_days: 30", 5, "forecast", "give at least window_days + 17 = 45"),
        ("retention_days: 50", 5, "forecast", "retention_days 50 < history_days 60"),
        ("horizon: 3", 7, "forecast.horizon", "unknown key"),
    ],
)
def test_bad_forecast_settings_name_file_line_and_field(
    extra: str, line: int, field: str, message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(CONFIG.format(extra=extra), path="c.yaml")
    problem = e.value.problems[0]
    assert problem.startswith(f"c.yaml:{line} carbon_sources.em.{field}: "), problem
    assert message in problem


# ---- router forecast show -----------------------------------------------------------------------


@pytest.fixture
def em_in_a_thread() -> Iterator[FakeAPI]:
    """The loopback Electricity Maps API on its own loop and thread, at the wall clock: the
    CLI runs its own loop."""
    api = electricitymaps_app(FakeAPI(lambda: datetime.now(UTC)))
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(api.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10)
    yield api
    asyncio.run_coroutine_threadsafe(api.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


def test_forecast_show_says_which_members_weigh_what(
    em_in_a_thread: FakeAPI, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from router.cli import main
    from tests.fake_apis import _value

    text = CONFIG.format(extra="window_days: 7\n      history_days: 24").replace(
        "api_key: k", f"api_key: em-key\n    base_url: {em_in_a_thread.url}/v3"
    )
    path = tmp_path / "c.yaml"
    path.write_text(text + "ledger: state/ledger.sqlite\n")
    now = pd.Timestamp.now(tz="UTC").floor("h")
    rec = ForecastRecord(tmp_path / "state" / "ledger.forecasts.sqlite", "em")
    for h in range(10 * 24, 0, -1):  # the last 10 days' issues, as a router would have kept
        issued = now - pd.Timedelta(hours=h)
        idx = pd.date_range(issued, periods=48, freq="h")
        values = [_value(t.to_pydatetime()) for t in idx]
        rec.add_issue("NL", issued.to_pydatetime(), pd.Series(values, index=idx))
    rec.close()
    assert main(["forecast", "show", "--config", str(path), "--zone", "NL", "--hours", "6"]) == 0
    out = capsys.readouterr().out
    assert "ensemble weights by hours ahead:" in out and "published" in out
    assert "note:" not in out
    args = ["forecast", "show", "--config", str(path), "--zone", "NL", "--hours", "6", "--json"]
    assert main(args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert list(shown["weights"]) == ["1 h", "2-3 h", "4+ h"]
    for row in shown["weights"].values():
        assert set(row) == {"model", "naive_24", "naive_168", "published"}
        assert sum(row.values()) == pytest.approx(1.0)
    assert "note" not in shown and len(shown["quantiles"]) == 6
