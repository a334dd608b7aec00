"""router simulate: the iteration-level engine on cases worked by hand, the fast model against
it, the policies' outcomes on a short period, the outputs, and bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from regions.config import Config, ConfigError, parse_config
from router.cli import main
from router.replica_sim import Engine, Histograms, ServingTable, Traffic, run_engine
from router.simreport import write_outputs
from router.simulate import (
    SimulationError,
    _water_fill,
    build_world,
    compare_day,
    run_policy,
    simulate,
)
from tests.conftest import ROOT

SMALL = """
carbon_sources:
  em: {kind: file, dataset: electricitymaps_hourly}
x-replica: &rep
  backend: {kind: openai, url: "http://x/v1", model: m}
  gpu: {type: H100}
  max_concurrency: 64
  model_params_b: 8
  count: 2
regions:
  - name: clean
    zone: SE
    carbon_source: em
    pue: 1.1
    price: {flat_usd_per_kwh: 0.10}
    rtt_ms: 40
    scaling: {min_replicas: 1}
    replicas:
      - {<<: *rep, name: clean}
  - name: dirty
    zone: PL
    carbon_source: em
    pue: 1.3
    price: {flat_usd_per_kwh: 0.05}
    rtt_ms: 10
    scaling: {min_replicas: 1}
    replicas:
      - {<<: *rep, name: dirty}
simulation:
  trace: azure_conv
  start: "2024-03-01"
  end: "2024-03-08"
  mean_utilization: 0.5
  diurnal_amplitude: 0.5
  deferrable_share: 0.3
  defer_window_h: 12
  slo_ttft_ms: 3000
  slo_tpot_ms: 150
  target_utilization: 0.9
  policies: [power_of_two, round_robin, cheapest, greenest, price_carbon, greenest+defer,
             price_carbon+scale, power_of_two+scale, cleanest_hour, oracle]
"""


def small(**sim: object) -> Config:
    cfg = parse_config(SMALL, env={})
    return cfg.model_copy(update={"simulation": cfg.simulation.model_copy(update=sim)})


# ---- the engine, by hand ------------------------------------------------------------------------

# one decode step: 10 ms alone, 12 ms with two, 15 ms with three; 1 ms per prompt token
ENGINE = Engine(
    itl_s=(0.0, 0.010, 0.012, 0.015),
    power_w=(100.0, 300.0, 320.0, 340.0),
    prefill_s_per_token=0.001,
    prefill_min_s=0.005,
    prefill_w=500.0,
    static_w=100.0,
    max_batch=3,
    chunk_tokens=100,
)


def run(arrival: list[float], prompt: list[int], output: list[int], **kw: object) -> object:
    return run_engine(ENGINE, np.array(arrival), np.array(prompt), np.array(output), **kw)  # type: ignore[arg-type]


def test_a_lone_request_prefills_then_decodes_one_token_a_step() -> None:
    r = run([1.0], [50], [5], until_s=2.0)
    # idle to 1 s; one step of 50 prompt tokens (its first token); 4 decode steps alone
    assert r.first_token_s[0] == pytest.approx(1.05)  # type: ignore[attr-defined]
    assert r.finish_s[0] == pytest.approx(1.05 + 4 * 0.010)  # type: ignore[attr-defined]
    energy = 100 * 1.0 + 500 * 0.05 + 300 * 0.04 + 100 * (2.0 - 1.09)
    assert r.energy_j == pytest.approx(energy)  # type: ignore[attr-defined]
    assert r.busy_s == pytest.approx(0.09)  # type: ignore[attr-defined]


def test_requests_arriving_together_prefill_in_one_step_and_share_decode_steps() -> None:
    r = run([0.0, 0.0], [30, 20], [3, 2])
    assert list(r.first_token_s) == pytest.approx([0.05, 0.05])  # type: ignore[attr-defined]
    # two decoding: 12 ms steps; the shorter answer leaves after one, the other goes on alone
    assert list(r.finish_s) == pytest.approx([0.05 + 0.012 + 0.010, 0.05 + 0.012])  # type: ignore[attr-defined]
    assert list(r.tpot_s(np.array([3, 2]))) == pytest.approx([0.011, 0.012])  # type: ignore[attr-defined]


def test_a_long_prompt_is_prefilled_in_chunks_and_stalls_the_batch() -> None:
    # request 0 decodes; request 1's 250-token prompt takes 3 steps (budget 100 less 1 decode)
    r = run([0.0, 0.0501], [10, 250], [20, 2])
    first0 = 0.01
    assert r.first_token_s[0] == pytest.approx(first0)  # type: ignore[attr-defined]
    # request 1 joins at the step boundary after it arrives (5 decode steps in: 0.06 s)
    steps = [0.010 + 0.099, 0.010 + 0.099, 0.010 + 0.052]
    assert r.first_token_s[1] == pytest.approx(0.06 + sum(steps))  # type: ignore[attr-defined]


def test_at_the_batch_limit_a_request_waits_for_a_sequence_to_finish() -> None:
    r = run([0.0, 0.0, 0.0, 0.0], [10, 10, 10, 10], [3, 3, 3, 2])
    first = r.first_token_s  # type: ignore[attr-defined]
    assert first[:3] == pytest.approx([0.03] * 3)
    assert first[3] > r.finish_s[:3].min()  # type: ignore[attr-defined]
    assert first[3] == pytest.approx(0.03 + 2 * 0.015 + 0.010)  # after two full-batch steps


def test_arrivals_must_be_sorted() -> None:
    with pytest.raises(ValueError, match="sorted"):
        run([1.0, 0.5], [1, 1], [1, 1])


# ---- the fast model -----------------------------------------------------------------------------


def toy_traffic(n: int) -> Traffic:
    """``n`` requests spread over the hour: prompts of 10-200 tokens, answers of 1-30."""
    rng = np.random.default_rng(0)
    return Traffic(rng.uniform(0, 3600, n), rng.integers(10, 200, n), rng.integers(1, 30, n))


def test_a_serving_table_reads_energy_and_distributions_by_rate() -> None:
    traffic = toy_traffic(2000)
    table = ServingTable.build(ENGINE, traffic, slo_ttft_s=0.5, slo_tpot_s=0.05,
                               grid_requests=20_000)  # fmt: skip
    assert table.capacity_rps > 0
    assert table.energy_j_per_h[0] == pytest.approx(100 * 3600)  # idle: static power
    assert (np.diff(table.energy_j_per_h) > 0).all()  # more requests, more energy
    # past the last rate, each request costs what it costs there
    top = table.rates_rps[-1]
    e2 = table.energy_at(np.array([2 * top]))[0]
    assert e2 == pytest.approx(2 * table.energy_j_per_h[-1])
    # at capacity, the attainment it was defined by (the bisection stops within 2 %)
    gw = table.grid_weights(np.array([table.capacity_rps]), np.array([1000.0]))
    assert gw.sum() == pytest.approx(1000.0)
    hist = Histograms.of(table, gw, 0.0)
    assert hist.attainment(0.5) == pytest.approx(0.99, abs=0.01)
    assert table.capacity_at(0.5) == pytest.approx(table.capacity_rps)
    assert table.capacity_at(0.2) < table.capacity_rps  # a tighter SLO: less capacity
    # far past capacity the tail is past the histograms: infinite, not the last bin's edge
    gw = table.grid_weights(np.array([10 * top]), np.array([1000.0]))
    assert Histograms.of(table, gw, 0.0).ttft_q(0.99) == math.inf


def test_water_fill_respects_capacity_ties_and_replicas_that_are_off() -> None:
    scores = np.array([[1.0, 2.0, 3.0], [1.0, 1.01, 3.0]])
    share = _water_fill(scores, np.array([15.0, 15.0]), np.array([10.0, 10.0, 10.0]), 0.05)
    assert share[0] == pytest.approx([10 / 15, 5 / 15, 0])
    assert share[1] == pytest.approx([0.5, 0.5, 0])  # near-tie: split by capacity
    # equal scores below the best share too (the live router spreads them by load)
    share = _water_fill(np.array([[1.0, 2.0, 2.0]]), np.array([20.0]), np.array([10.0] * 3), 0.05)
    assert share[0] == pytest.approx([0.5, 0.25, 0.25])
    off = np.array([[0.0, 10.0, 10.0], [10.0, 10.0, 10.0]])
    share = _water_fill(scores, np.array([15.0, 40.0]), off, 0.05)
    assert share[0] == pytest.approx([0, 10 / 15, 5 / 15])  # the best is off
    assert share[1] == pytest.approx([1 / 3, 1 / 3, 1 / 3])  # over capacity: by capacity


# ---- a short period, all policies ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def result(cache: Path, data_dir: Path) -> object:
    return simulate(small(), base_dir=ROOT, cache_dir=cache)


def test_deferral_regret_is_reported_and_the_gate_is_the_forecasts_upper_quantile(
    result: object,
) -> None:
    from dataclasses import replace

    s = result.summary.set_index("policy")  # type: ignore[attr-defined]
    w = result.world  # type: ignore[attr-defined]
    cfg = small()
    # the gate is the forecast's 90 % quantile: above the point forecast, and above most
    # actuals (calibrated on the weeks before the period, so not exactly 90 % on one week)
    assert w.gate_quantile == 0.9 and w.forecast_gate is not None
    assert (w.forecast_gate >= w.forecast - 1e-9).all()
    assert min(w.gate_coverage.values()) >= 0.75 and max(w.gate_coverage.values()) <= 1.0
    # the oracle knows the actuals and weights carbon only: it never waits into a dirtier hour
    assert s.loc["oracle", "deferral_regret"] == 0 and s.loc["oracle", "regret_t_co2e"] == 0
    assert 0 <= s.loc["greenest+defer", "deferral_regret"] < 1
    # trusting the point forecast instead waits into dirtier hours at least as often
    point = run_policy("greenest+defer", replace(w, forecast_gate=None, gate_quantile=0.5), cfg)
    gated = result.outcomes["greenest+defer"]  # type: ignore[attr-defined]
    assert point.regret is not None and gated.regret is not None
    assert point.regret.deferred >= gated.regret.deferred
    assert point.regret.excess_g >= gated.regret.excess_g


def test_outcomes_make_sense(result: object) -> None:
    s = result.summary.set_index("policy")  # type: ignore[attr-defined]
    w = result.world  # type: ignore[attr-defined]
    n = s["requests"].iloc[0]
    # the rate is half the fleet's capacity at the SLOs, over 7 days
    assert n == pytest.approx(0.5 * w.fleet_capacity_rps * 3600 * 24 * 7, rel=0.01)
    assert np.allclose(s["requests"], n)
    # SE is far cleaner than PL
    assert s.loc["greenest", "t_co2e"] < 0.7 * s.loc["power_of_two", "t_co2e"]
    assert s.loc["cheapest", "t_co2e"] > s.loc["greenest", "t_co2e"]
    assert s.loc["cheapest", "energy_tariff_usd"] < s.loc["greenest", "energy_tariff_usd"]
    # packing the clean region to 90 % of capacity costs tail latency, within the SLO
    assert s.loc["greenest", "ttft_p99_ms"] > s.loc["power_of_two", "ttft_p99_ms"]
    assert s.loc["greenest", "slo_attainment"] >= 0.99
    # the oracle plans with actual intensity (greedily, hour by hour, as the others: not a
    # global optimum, so a forecast can land within a percent of it either side); deferral
    # moves 30 % of the requests and saves carbon
    assert s.loc["oracle", "t_co2e"] <= s.loc["greenest+defer", "t_co2e"] * 1.01
    assert s.loc["greenest+defer", "t_co2e"] < s.loc["greenest", "t_co2e"]
    assert s.loc["greenest+defer", "share_deferred"] == pytest.approx(0.3, abs=0.01)
    assert s.loc["greenest+defer", "mean_delay_h"] > 0
    assert s.loc["power_of_two", "co2_saved_vs_power_of_two"] == 0
    assert s.loc["oracle", "share_of_oracle_saving"] == pytest.approx(1.0)
    # fleet scaling: fewer replicas up at night, less static energy, less energy per token
    for base in ("power_of_two", "price_carbon"):
        scaled = s.loc[f"{base}+scale"]
        assert scaled["replicas_on_mean"] < s.loc[base, "replicas_on_mean"] == 4
        assert scaled["it_kwh_static"] < s.loc[base, "it_kwh_static"]
        assert scaled["j_per_token"] < s.loc[base, "j_per_token"]
    token = s["token_tariff_usd"]
    assert np.allclose(token, token.iloc[0])  # same requests, same token bill


def test_energy_carbon_and_attribution_add_up(result: object) -> None:
    w = result.world  # type: ignore[attr-defined]
    for o in result.outcomes.values():  # type: ignore[attr-defined]
        g = w.replica_region
        assert np.allclose(o.kwh, o.energy_j / 3.6e6 * w.pue[g][None, :])
        assert np.allclose(o.carbon_g, o.kwh * w.intensity[:, g])
        # what the attributor gives the requests never exceeds what was drawn
        assert (o.attributed_j <= o.energy_j + 1e-6).all() and (o.attributed_j >= 0).all()
        assert (o.static_j <= o.energy_j + 1e-6).all()
        assert o.requests.sum() == pytest.approx(w.demand.per_hour.sum())


def test_scaling_the_fleet_scales_the_number_of_replicas_not_their_physics(
    result: object, cache: Path
) -> None:
    cfg = small()
    doubled = parse_config(SMALL.replace("count: 2", "count: 4"), env={})
    w1 = result.world  # type: ignore[attr-defined]
    w2 = build_world(doubled, base_dir=ROOT, cache_dir=cache)
    assert w2.fleet_capacity_rps == pytest.approx(2 * w1.fleet_capacity_rps)
    o1 = run_policy("greenest", w1, cfg)
    o2 = run_policy("greenest", w2, doubled)
    assert o2.energy_j.sum() == pytest.approx(2 * o1.energy_j.sum(), rel=1e-6)
    assert o2.fleet_hist.attainment(3.0) == pytest.approx(o1.fleet_hist.attainment(3.0))


@pytest.mark.needs_data
def test_the_fast_model_agrees_with_the_reference_on_a_day(result: object) -> None:
    w = result.world  # type: ignore[attr-defined]
    df = compare_day(w, small(), "greenest", 2).set_index("figure")
    err = df["error"].abs()
    assert err["energy kWh"] < 0.05
    assert err["TTFT p50 ms"] < 0.10 and err["TTFT p99 ms"] < 0.10
    assert err["TPOT p50 ms"] < 0.10 and err["TPOT p99 ms"] < 0.10
    assert err["requests"] < 0.01


def test_report_folder(result: object, tmp_path: Path) -> None:
    files = write_outputs(result, tmp_path)  # type: ignore[arg-type]
    names = {p.name for p in files}
    assert {"report.md", "hourly.csv", "summary.csv", "by_region.csv", "fleet.csv",
            "intensity_and_traffic.png", "carbon_and_cost.png",
            "carbon_vs_p99_ttft.png"} <= names  # fmt: skip
    hourly = pd.read_csv(tmp_path / "hourly.csv")
    one = hourly[hourly["policy"] == "price_carbon+scale"]
    assert len(one) == 7 * 24 * 2 and one["replicas_on"].max() <= 2
    assert one["requests"].sum() == pytest.approx(result.requests, rel=1e-6)  # type: ignore[attr-defined]
    assert "| greenest |" in (tmp_path / "report.md").read_text()


# ---- inputs -------------------------------------------------------------------------------------


@pytest.mark.needs_data
def test_jsonl_trace_and_its_errors(tmp_path: Path, cache: Path) -> None:
    good = tmp_path / "t.jsonl"
    good.write_text("\n".join(json.dumps({"time": f"2024-03-0{1 + i % 3}T10:00:00Z",
                                          "prompt_tokens": 100, "output_tokens": 50})
                              for i in range(30)))  # fmt: skip
    r = simulate(small(trace=str(good), start="2024-03-01", end="2024-03-04"), base_dir=ROOT,
                 policies=["greenest"], cache_dir=cache)  # fmt: skip
    assert r.summary["requests"].iloc[0] == 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"time": "2024-03-01T10:00:00Z", "prompt_tokens": 1}))
    with pytest.raises(SimulationError, match=r"missing columns \['output_tokens'\]"):
        simulate(small(trace=str(bad)), base_dir=ROOT, policies=["greenest"], cache_dir=cache)
    zero = tmp_path / "zero.jsonl"
    zero.write_text(json.dumps({"time": "2024-03-01T10:00:00Z", "prompt_tokens": 1,
                                "output_tokens": 0}))  # fmt: skip
    with pytest.raises(SimulationError, match=r"zero.jsonl:1: output_tokens must be .*got 0$"):
        simulate(small(trace=str(zero)), base_dir=ROOT, policies=["greenest"], cache_dir=cache)


@pytest.mark.needs_data
def test_bad_inputs_are_clear(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(SimulationError, match="unknown policy 'fastest'"):
        simulate(small(), base_dir=ROOT, policies=["fastest"])
    with pytest.raises(SimulationError, match="unknown policy 'greenest\\+later'"):
        simulate(small(), base_dir=ROOT, policies=["greenest+later"])
    with pytest.raises(SimulationError, match="zone SE.*missing 100% of the period"):
        simulate(small(start="2030-01-01", end="2030-01-08"), base_dir=ROOT, policies=["greenest"])
    with pytest.raises(SimulationError, match="unknown trace 'trace.csv'"):
        simulate(small(trace="trace.csv"), base_dir=ROOT, policies=["greenest"], cache_dir=cache)
    with pytest.raises(SimulationError, match="region clean: its RTT \\(40.0 ms\\) leaves nothing"):
        simulate(small(slo_ttft_ms=30), base_dir=ROOT, policies=["greenest"], cache_dir=cache)
    with pytest.raises(SimulationError, match="cannot meet the SLOs"):
        simulate(small(slo_tpot_ms=1), base_dir=ROOT, policies=["greenest"], cache_dir=cache)


def test_config_fields_of_the_simulator() -> None:
    old = parse_config(SMALL.replace("slo_ttft_ms: 3000", "slo_ms: 2500"), env={})
    assert old.simulation.slo_ttft_ms == 2500  # the old name still reads
    with pytest.raises(ConfigError, match=r"<string>:\d+ simulation: .*not both"):
        parse_config(SMALL.replace("mean_utilization: 0.5", "mean_utilization: 0.5\n"
                                   "  requests_per_hour: 100"), env={})  # fmt: skip
    with pytest.raises(ConfigError, match=r"replicas\[0\].count: must be >= 1, got 0"):
        parse_config(SMALL.replace("count: 2", "count: 0"), env={})
    cfg = parse_config(SMALL, env={})
    assert [r.replicas[0].count for r in cfg.regions] == [2, 2]  # the anchor was merged


@pytest.mark.needs_data
def test_cli_json_and_reference_day(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, cache: Path
) -> None:
    import forecasting.datasets

    monkeypatch.setattr(forecasting.datasets, "cache_dir", lambda: cache / "data")
    cfg = tmp_path / "sim.yaml"
    cfg.write_text(SMALL)
    code = main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "out"),
                 "--policies", "power_of_two,greenest", "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["summary"]] == ["power_of_two", "greenest"]
    assert out["fleet_capacity_rps"] > 0
    assert (tmp_path / "out" / "report.md").is_file()
    code = main(["simulate", "--config", str(cfg), "--policies", "greenest",
                 "--reference-day", "1", "--json"])  # fmt: skip
    assert code == 0
    rows = {r["figure"]: r for r in json.loads(capsys.readouterr().out)}
    assert abs(rows["energy kWh"]["error"]) < 0.05
    assert not math.isnan(rows["TTFT p99 ms"]["reference"])


# ---- found by a hostile review ------------------------------------------------------------------


@pytest.mark.needs_data
def test_scaling_to_zero_never_loses_the_requests_of_a_quiet_day_after(
    tmp_path: Path, cache: Path
) -> None:
    # no load on day 1, load on day 2, min_replicas 0: yesterday's load says "all off"
    trace = tmp_path / "gap.jsonl"
    rng = np.random.default_rng(0)
    times = pd.Timestamp("2024-03-02", tz="UTC") + pd.to_timedelta(rng.uniform(0, 86400, 3000), "s")
    trace.write_text("\n".join(json.dumps({"time": t.isoformat(), "prompt_tokens": 500,
                                           "output_tokens": 100}) for t in times))  # fmt: skip
    cfg = parse_config(SMALL.replace("min_replicas: 1", "min_replicas: 0"), env={})
    cfg = cfg.model_copy(update={"simulation": cfg.simulation.model_copy(
        update={"trace": str(trace), "start": "2024-03-01", "end": "2024-03-03"})})  # fmt: skip
    scaled = ["power_of_two+scale", "price_carbon+scale", "greenest+defer+scale"]
    r = simulate(cfg, base_dir=ROOT, cache_dir=cache, policies=scaled)
    for o in r.outcomes.values():
        assert o.requests.sum() == pytest.approx(3000)
        assert (o.requests[~o.on] == 0).all()  # an off replica serves nothing
    assert r.summary["slo_attainment"].notna().all()


def test_a_replica_that_meets_any_slo_has_its_throughput_as_capacity() -> None:
    # SLOs no replica can miss: the capacity search stops at what the replica can process
    traffic = toy_traffic(500)
    table = ServingTable.build(ENGINE, traffic, slo_ttft_s=1e9, slo_tpot_s=1e9,
                               grid_requests=5_000)  # fmt: skip
    prefill_bound = 1 / (ENGINE.prefill_s_per_token * traffic.mean_prompt)
    assert 0 < table.capacity_rps <= 1.5 * prefill_bound


@pytest.mark.needs_data
def test_a_corrupt_cache_is_rebuilt_and_an_unwritable_one_is_skipped(
    tmp_path: Path, cache: Path
) -> None:
    import shutil

    own = tmp_path / "c"
    shutil.copytree(cache, own)
    for f in own.glob("*.np[yz]"):
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated
    w = build_world(small(), base_dir=ROOT, cache_dir=own)
    assert w.fleet_capacity_rps > 0
    ro = tmp_path / "ro"
    ro.write_text("a file where the cache folder should be")
    w2 = build_world(small(), base_dir=ROOT, cache_dir=ro / "sub")
    assert w2.fleet_capacity_rps == pytest.approx(w.fleet_capacity_rps)


@pytest.mark.needs_data
def test_forecasts_cached_for_one_emission_factor_are_not_used_for_another(
    tmp_path: Path, cache: Path
) -> None:
    life = build_world(small(), base_dir=ROOT, cache_dir=cache)
    direct = SMALL.replace(
        "{kind: file, dataset: electricitymaps_hourly}",
        "{kind: file, dataset: electricitymaps_hourly, emission_factor: direct}",
    )
    w = build_world(parse_config(direct, env={}), base_dir=ROOT, cache_dir=cache)
    assert not np.allclose(w.forecast, life.forecast)
    assert np.mean(np.abs(w.forecast[:, 0] - w.intensity)) < np.mean(
        np.abs(life.forecast[:, 0] - w.intensity)
    )


@pytest.mark.needs_data
def test_compare_day_books_a_scaled_fleets_standby_as_the_fast_model_does(result: object) -> None:
    w = result.world  # type: ignore[attr-defined]
    df = compare_day(w, small(), "price_carbon+scale", 2).set_index("figure")
    assert abs(df.loc["energy kWh", "error"]) < 0.05


@pytest.mark.needs_data
def test_more_bad_inputs_are_clear(tmp_path: Path, cache: Path) -> None:
    for bad, match in (
        ("policies: [", r"policies: .*at least 1"),
        ('start: "2024-03-01"', r"start: not a date"),
        ("slo_ttft_ms: 3000", r"slo_ttft_ms: .*finite"),
    ):
        text = {
            "policies: [": SMALL.replace(SMALL[SMALL.index("  policies: [") :], "  policies: []\n"),
            'start: "2024-03-01"': SMALL.replace('start: "2024-03-01"', "start: soon"),
            "slo_ttft_ms: 3000": SMALL.replace("slo_ttft_ms: 3000", "slo_ttft_ms: .inf"),
        }[bad]
        with pytest.raises(ConfigError, match=match):
            parse_config(text, env={})
    with pytest.raises(ConfigError, match=r"max_concurrency: must be <= 65536"):
        parse_config(SMALL.replace("max_concurrency: 64", "max_concurrency: 10000000"), env={})
    for line, match in (
        ({"time": "yesterday", "prompt_tokens": 1, "output_tokens": 1}, r"t.jsonl:1: .*time"),
        ({"time": "2024-03-01T10:00:00Z", "prompt_tokens": "abc", "output_tokens": 1},
         r"t.jsonl:1: .*prompt_tokens"),
    ):  # fmt: skip
        (tmp_path / "t.jsonl").write_text(json.dumps(line))
        with pytest.raises(SimulationError, match=match):
            simulate(small(trace=str(tmp_path / "t.jsonl")), base_dir=ROOT,
                     policies=["greenest"], cache_dir=cache)  # fmt: skip
    # seconds since the epoch, as documented
    t = pd.Timestamp("2024-03-01T10:00:00Z").timestamp()
    (tmp_path / "t.jsonl").write_text(json.dumps({"time": t, "prompt_tokens": 5,
                                                  "output_tokens": 5}))  # fmt: skip
    r = simulate(small(trace=str(tmp_path / "t.jsonl")), base_dir=ROOT, policies=["greenest"],
                 cache_dir=cache)  # fmt: skip
    assert r.requests == 1
    with pytest.raises(SimulationError, match="synthetic cannot be pooled"):
        simulate(small(trace=["synthetic", "azure_conv"]), base_dir=ROOT, policies=["greenest"],
                 cache_dir=cache)  # fmt: skip


def test_period_option_must_be_start_dot_dot_end(capsys: pytest.CaptureFixture[str]) -> None:
    for period in ("2024-03-01", "2024-03-01..soon"):
        code = main(["simulate", "--config", str(ROOT / "configs/simulate.yaml"),
                     "--period", period, "--out", ""])  # fmt: skip
        assert code == 1 and "give START..END" in capsys.readouterr().err
