"""router simulate: outcomes on a short period, the queue model, and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from regions.config import Config, parse_config
from router.cli import main
from router.simreport import write_outputs
from router.simulate import SimulationError, _lindley, _water_fill, simulate
from tests.conftest import ROOT

SMALL = """
carbon_sources:
  em: {kind: file, dataset: electricitymaps_hourly}
regions:
  - name: clean
    zone: SE
    carbon_source: em
    pue: 1.1
    price: {flat_usd_per_kwh: 0.10}
    rtt_ms: 40
    replicas:
      - {name: clean-0, backend: {kind: openai, url: "http://x/v1", model: m}, gpu: {type: H100},
         max_concurrency: 2, tokens_per_s: 70, model_params_b: 8, prefill_weight: 0.05}
  - name: dirty
    zone: PL
    carbon_source: em
    pue: 1.3
    price: {flat_usd_per_kwh: 0.05}
    rtt_ms: 10
    replicas:
      - {name: dirty-0, backend: {kind: openai, url: "http://x/v1", model: m}, gpu: {type: H100},
         max_concurrency: 2, tokens_per_s: 70, model_params_b: 8, prefill_weight: 0.05}
simulation:
  trace: azure_conv
  start: "2024-03-01"
  end: "2024-03-15"
  requests_per_hour: 200
  deferrable_share: 0.3
  defer_window_h: 12
  slo_ms: 5000
  target_utilization: 0.6
  policies: [round_robin, cheapest, greenest, price_carbon, greenest+defer, oracle]
"""


def small(**sim: object) -> Config:
    cfg = parse_config(SMALL, env={})
    return cfg.model_copy(update={"simulation": cfg.simulation.model_copy(update=sim)})


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> object:
    return simulate(small(), base_dir=ROOT, cache_dir=tmp_path_factory.mktemp("fc"))


def test_outcomes_make_sense(result: object) -> None:
    s = result.summary.set_index("policy")  # type: ignore[attr-defined]
    n = s["requests"].iloc[0]
    assert (s["requests"] == n).all() and 200 * 24 * 14 * 0.8 < n < 200 * 24 * 14 * 1.2
    # SE is far cleaner than PL: greenest emits much less than round-robin, cheapest more
    assert s.loc["greenest", "t_co2e"] < 0.5 * s.loc["round_robin", "t_co2e"]
    assert s.loc["cheapest", "t_co2e"] > s.loc["greenest", "t_co2e"]
    assert s.loc["cheapest", "energy_tariff_usd"] < s.loc["greenest", "energy_tariff_usd"]
    # the oracle is the bound; deferral moves about 30 % of the requests
    assert s.loc["oracle", "t_co2e"] <= s.loc["greenest+defer", "t_co2e"] * 1.001
    assert s.loc["greenest+defer", "share_deferred"] == pytest.approx(0.3, abs=0.03)
    assert s.loc["greenest", "share_deferred"] == 0
    assert s.loc["greenest+defer", "mean_delay_s"] > 0
    # capacity binds: flooding the clean region costs latency that round-robin does not pay
    assert (
        s.loc["greenest", "mean_added_latency_ms"] > s.loc["round_robin", "mean_added_latency_ms"]
    )
    assert s.loc["round_robin", "co2_saved_vs_round_robin"] == 0
    assert s.loc["oracle", "share_of_oracle_saving"] == pytest.approx(1.0)
    token = s["token_tariff_usd"]
    assert (token == token.iloc[0]).all()  # same requests, same token bill


def test_energy_and_carbon_add_up(result: object) -> None:
    o = result.outcomes["greenest"]  # type: ignore[attr-defined]
    w = result.world  # type: ignore[attr-defined]
    g = w.replica_region[o.replica]
    h = np.minimum((o.start_s // 3600).astype(int), len(w.hours) - 1)
    assert np.allclose(o.kwh, o.energy_j / 3.6e6 * w.pue[g])
    assert np.allclose(o.carbon_g, o.kwh * w.intensity[h, g])
    assert (o.wait_s >= -1e-6).all()


def test_report_folder(result: object, tmp_path: Path) -> None:
    files = write_outputs(result, tmp_path, sample=500)  # type: ignore[arg-type]
    names = {p.name for p in files}
    assert {"report.md", "hourly.csv", "summary.csv", "by_region.csv",
            "intensity_and_traffic.png", "carbon_and_cost.png"} <= names  # fmt: skip
    per_req = pd.read_parquet(tmp_path / "requests_greenest_defer.parquet")
    assert len(per_req) == 500 and per_req["deferred"].any()
    assert "| greenest |" in (tmp_path / "report.md").read_text()


def test_lindley_matches_a_plain_queue() -> None:
    rng = np.random.default_rng(1)
    start = np.sort(rng.uniform(0, 100, 300))
    service = rng.exponential(0.5, 300)
    group = rng.integers(0, 3, 300)
    finish = _lindley(start, service, group)
    for g in range(3):
        free = 0.0
        for i in np.flatnonzero(group == g):
            free = max(free, start[i]) + service[i]
            assert finish[i] == pytest.approx(free)


def test_water_fill_respects_capacity_and_ties() -> None:
    scores = np.array([[1.0, 2.0, 3.0], [1.0, 1.01, 3.0]])
    share = _water_fill(scores, np.array([15.0, 15.0]), np.array([10.0, 10.0, 10.0]), 0.05)
    assert share[0] == pytest.approx([10 / 15, 5 / 15, 0])
    assert share[1] == pytest.approx([0.5, 0.5, 0])  # near-tie: split by capacity


@pytest.mark.needs_data
def test_jsonl_trace_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "t.jsonl"
    good.write_text("\n".join(json.dumps({"time": f"2024-03-0{1 + i % 3}T10:00:00Z",
                                          "prompt_tokens": 100, "output_tokens": 50})
                              for i in range(30)))  # fmt: skip
    r = simulate(small(trace=str(good), start="2024-03-01", end="2024-03-04"), base_dir=ROOT,
                 policies=["greenest"], cache_dir=tmp_path)  # fmt: skip
    assert r.summary["requests"].iloc[0] == 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"time": "2024-03-01T10:00:00Z", "prompt_tokens": 1}))
    with pytest.raises(SimulationError, match=r"missing columns \['output_tokens'\]"):
        simulate(small(trace=str(bad)), base_dir=ROOT, policies=["greenest"], cache_dir=tmp_path)


@pytest.mark.needs_data
def test_bad_inputs_are_clear(tmp_path: Path) -> None:
    with pytest.raises(SimulationError, match="unknown policy 'fastest'"):
        simulate(small(), base_dir=ROOT, policies=["fastest"])
    with pytest.raises(SimulationError, match="zone SE.*missing 100% of the period"):
        simulate(small(start="2030-01-01", end="2030-01-08"), base_dir=ROOT, policies=["greenest"])
    with pytest.raises(SimulationError, match="unknown trace 'trace.csv'"):
        simulate(small(trace="trace.csv"), base_dir=ROOT, policies=["greenest"], cache_dir=tmp_path)


@pytest.mark.needs_data
def test_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "sim.yaml"
    cfg.write_text(SMALL.replace('end: "2024-03-15"', 'end: "2024-03-05"'))
    code = main(["simulate", "--config", str(cfg), "--out", str(tmp_path / "out"),
                 "--policies", "round_robin,greenest", "--json"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in out["summary"]] == ["round_robin", "greenest"]
    assert (tmp_path / "out" / "report.md").is_file()
