"""The per-request energy predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forecasting.energy import (
    EnergyModelError,
    EnergyPredictor,
    OutputLengths,
    ReplicaProfile,
    leave_one_model_out,
    load_mlenergy,
)
from router.cli import _local_error

A100_MISTRAL = ReplicaProfile(name="a", model="mistral-7b", gpu="A100-40GB", total_params_b=7.2)


@pytest.fixture(scope="module")
def predictor() -> EnergyPredictor:
    return EnergyPredictor.from_mlenergy()


def test_data_loads_both_leaderboards() -> None:
    d = load_mlenergy()
    assert set(d["source"]) == {"v2", "v3"}
    assert set(d["gpu"]) == {"A100-40GB", "H100", "B200"}
    assert (d["energy_per_request_j"] > 0).all()
    fp8 = d[d["model"] == "Qwen/Qwen3-235B-A22B-Instruct-2507-FP8"]["family"].iloc[0]
    assert fp8 == d[d["model"] == "Qwen/Qwen3-235B-A22B-Instruct-2507"]["family"].iloc[0]


def test_gpu_prior_matches_a_measured_configuration(predictor: EnergyPredictor) -> None:
    # Mistral-7B on A100-40GB, vLLM, batch ~32, ~424 output tokens: 98.7 J per request measured
    j = predictor.predict_j(A100_MISTRAL, prompt_tokens=0, output_tokens=424, batch=32)
    assert j == pytest.approx(98.7, rel=0.3)
    # bigger batches amortize: less energy per request
    assert predictor.predict_j(A100_MISTRAL, 0, 424, batch=256) < j
    # more output, more energy; prompt tokens cost something too
    assert predictor.predict_j(A100_MISTRAL, 0, 800, batch=32) > j
    assert predictor.predict_j(A100_MISTRAL, 2000, 424, batch=32) > j


def test_cpu_prior_is_power_times_time(predictor: EnergyPredictor) -> None:
    cpu = ReplicaProfile(name="c", model="smollm2", gpu="cpu", cpu_watts=30, tokens_per_s=100,
                         prefill_weight=0.5)  # fmt: skip
    assert predictor.predict_j(cpu, 100, 200) == pytest.approx(30 / 100 * (200 + 50))


def test_unknown_gpu_and_bad_tokens(predictor: EnergyPredictor) -> None:
    with pytest.raises(EnergyModelError, match="unknown GPU type 'TPU'"):
        predictor.predict_j(ReplicaProfile(name="t", model="m", gpu="TPU"), 1, 1)
    with pytest.raises(EnergyModelError, match=">= 0"):
        predictor.predict_j(A100_MISTRAL, -1, 1)


def test_refit_from_measured_rows_takes_over(predictor: EnergyPredictor) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(40):
        p, d = int(rng.integers(10, 1000)), int(rng.integers(5, 300))
        rows.append((p, d, 0.1 * p + 0.4 * d + 2.0 + rng.normal(0, 0.5)))
    fresh = EnergyPredictor(gpu_model=predictor.gpu_model)
    assert not fresh.refit("a", rows[:5])  # too few rows: keep the prior
    assert fresh.refit("a", rows)
    assert fresh.predict_j(A100_MISTRAL, 500, 100) == pytest.approx(
        0.1 * 500 + 0.4 * 100 + 2, rel=0.05
    )


def test_output_length_history() -> None:
    lengths = OutputLengths(prior_tokens=129)
    assert lengths.expected("t", "m", 50) == 50
    assert lengths.expected("t", "m", None) == 129
    for n in (100, 300, 500):
        lengths.observe("t", "m", n)
    assert lengths.expected("t", "m", None) == pytest.approx(300)
    assert lengths.expected("t", "m", 200) == pytest.approx((100 + 200 + 200) / 3)
    assert lengths.expected("other", "m", None) == 129


def test_leave_one_model_out_on_a_few_families() -> None:
    d = load_mlenergy()
    out = leave_one_model_out(d, source="v3", families=["llama-3.1-8b-instruct", "qwen3-14b"])
    assert out["models"] == 2 and out["configs"] > 20
    assert 0 < out["median_ape_pct"] < 60 and out["p90_ape_pct"] >= out["median_ape_pct"]


def test_local_error_fits_then_tests(tmp_path: Path) -> None:
    f = tmp_path / "m.jsonl"
    rows = [{"prompt_tokens": p, "completion_tokens": d, "energy_j": 0.12 * p + 0.35 * d + 1}
            for p, d in [(30 + 40 * i, 10 + 17 * (i % 7)) for i in range(24)]]  # fmt: skip
    f.write_text("\n".join(json.dumps(r) for r in rows))
    out = _local_error(str(f), EnergyPredictor())
    assert out["requests_fit"] == 12 and out["median_ape_pct"] < 1.0  # type: ignore[operator]
