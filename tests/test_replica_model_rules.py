"""The replica model (forecasting/replica_model.py): the curve's rules on tiny explicit tables,
the specs' validation messages, and a configured replica's spec. Figures worked out by hand;
no data folder (the shipped tables), nothing slow.

Measured runs, the evaluation and the marginal energy are in tests/test_replica_model.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from forecasting.energy import GPUS
from forecasting.replica_calibration import ReplicaCalibration
from forecasting.replica_model import (
    PREFILL_MFU,
    BatchCurve,
    CpuReplicaModel,
    CpuReplicaSpec,
    GpuReplicaModel,
    ReplicaModelError,
    ReplicaSpec,
    _non_decreasing,
    replica_model,
)
from regions.config import Replica, parse_config
from tests.conftest import ROOT

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
ENV = {"ELECTRICITYMAPS_API_KEY": "em", "WATTTIME_USERNAME": "u", "WATTTIME_PASSWORD": "p"}


@pytest.fixture(scope="module")
def calibration() -> ReplicaCalibration:
    return ReplicaCalibration.from_mlenergy()


# ---- the curve -------------------------------------------------------------------------------


def test_two_runs_whose_power_falls_are_pooled() -> None:
    # least squares on the logs with power not falling: both at the geometric mean; the rate
    # rises faster than power already and is kept
    c = BatchCurve.from_points(np.array([16.0, 8.0]), np.array([400.0, 500.0]),
                               np.array([2000.0, 1000.0]), np.array([2.0, 1.0]))  # fmt: skip
    assert np.exp(c.log_batch).tolist() == pytest.approx([8.0, 16.0], rel=1e-15)
    assert np.exp(c.log_power_w) == pytest.approx([math.sqrt(500 * 400)] * 2, rel=1e-12)
    assert np.exp(c.log_tokens_per_s) == pytest.approx([1000.0, 2000.0], rel=1e-12)
    assert np.exp(c.log_itl_s) == pytest.approx([1.0, 2.0], rel=1e-15)


def test_one_run_is_its_own_curve() -> None:
    c = BatchCurve.from_points(np.array([8.0]), np.array([500.0]), np.array([1000.0]),
                               np.array([0.01]))  # fmt: skip
    assert np.exp([c.log_power_w[0], c.log_tokens_per_s[0]]) == pytest.approx([500, 1000])


def test_a_float32_table_gives_the_curve_of_its_values() -> None:
    # computed in float64 either way: a float32 table is not rounded to float32 logs
    points = ([8.0, 16.0, 32.0], [400.0, 450.0, 430.0], [1000.0, 1900.0, 3500.0], [8.0, 9.0, 8.5])
    f64 = BatchCurve.from_points(*(np.array(p) for p in points))
    f32 = BatchCurve.from_points(*(np.array(p, np.float32) for p in points))
    for name in ("log_batch", "log_power_w", "log_tokens_per_s", "log_itl_s"):
        assert getattr(f32, name).dtype == np.float64, name
        assert getattr(f32, name).tolist() == getattr(f64, name).tolist(), name


@pytest.mark.parametrize(
    ("y", "pooled"),
    [
        ([3.0, 2.0, 1.0], [2.0, 2.0, 2.0]),
        ([4.0, 5.0, 3.0, 0.0], [3.0, 3.0, 3.0, 3.0]),  # a pooled block pooled again
        ([1.0, 3.0, 2.0, 5.0], [1.0, 2.5, 2.5, 5.0]),
    ],
)
def test_isotonic_regression_pools_adjacent_violators(y: list[float], pooled: list[float]) -> None:
    assert _non_decreasing(np.array(y)).tolist() == pytest.approx(pooled, rel=1e-15)


def test_isotonic_regression_keeps_equal_neighbours_exactly() -> None:
    # equal values are no violation: not pooled, so not rounded ((0.2 + 0.1) / 3 != 0.1)
    assert _non_decreasing(np.array([0.1, 0.1, 0.1])).tolist() == [0.1, 0.1, 0.1]


def test_beyond_and_between_the_measured_batches() -> None:
    c = BatchCurve.from_points(np.array([8.0, 16.0, 32.0]), np.array([400.0, 400.0, 400.0]),
                               np.array([1000.0, 2000.0, 4000.0]),
                               np.array([0.01, 0.01, 0.02]))  # fmt: skip
    power, rate, itl = c.at(np.array([4.0, 8.0, 12.0, 24.0, 32.0, 64.0]))
    assert power == pytest.approx([400.0] * 6, rel=1e-12)  # held beyond the table
    # below the smallest batch the rate is proportional to the batch; above, held
    assert rate == pytest.approx([500.0, 1000.0, 1500.0, 3000.0, 4000.0, 4000.0], rel=1e-12)
    # log-log between 16 and 32 (ITL 0.01 -> 0.02: 24 is 0.01 x 1.5); above, proportional
    assert itl == pytest.approx([0.01, 0.01, 0.01, 0.015, 0.02, 0.04], rel=1e-12)


# ---- specs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("gpu_count", 0), ("max_num_seqs", -1), ("active_params_b", 0.0),
     ("total_params_b", math.inf), ("static_power_w_per_gpu", math.nan)],
)  # fmt: skip
def test_a_gpu_spec_names_the_field_that_is_not_positive(field: str, value: float) -> None:
    with pytest.raises(ReplicaModelError) as e:
        ReplicaSpec(LLAMA_8B, "H100", **{field: value})  # type: ignore[arg-type]
    assert str(e.value) == f"replica {LLAMA_8B}: {field} must be > 0, got {value}"
    with pytest.raises(ReplicaModelError) as e:
        ReplicaSpec(LLAMA_8B, "H100", name="r1", **{field: value})  # type: ignore[arg-type]
    assert str(e.value) == f"replica r1: {field} must be > 0, got {value}"


def test_a_gpu_spec_names_the_precisions_it_knows() -> None:
    with pytest.raises(ReplicaModelError) as e:
        ReplicaSpec(LLAMA_8B, "H100", precision="fp3", name="r1")
    assert str(e.value) == (
        "replica r1: precision 'fp3' is not one of bfloat16, float16, fp8, mxfp4, int4"
    )
    with pytest.raises(ReplicaModelError) as e:
        ReplicaSpec(LLAMA_8B, "H100", precision="fp3")
    assert str(e.value).startswith(f"replica {LLAMA_8B}: precision 'fp3'")


@pytest.mark.parametrize(
    ("field", "value"),
    [("tokens_per_s", math.inf), ("watts_per_core", 0.0), ("cores", -1), ("max_batch", 0)],
)
def test_a_cpu_spec_names_the_field_that_is_not_positive(field: str, value: float) -> None:
    base: dict[str, float] = {"tokens_per_s": 100.0, "watts_per_core": 10.0}
    base[field] = value
    with pytest.raises(ReplicaModelError) as e:
        CpuReplicaSpec("m", **base)  # type: ignore[arg-type]
    assert str(e.value) == f"replica m: {field} must be > 0, got {value}"
    with pytest.raises(ReplicaModelError) as e:
        CpuReplicaSpec("m", name="c1", **base)  # type: ignore[arg-type]
    assert str(e.value) == f"replica c1: {field} must be > 0, got {value}"


def test_a_cpu_spec_takes_figures_under_one() -> None:
    assert CpuReplicaSpec("m", tokens_per_s=0.5, watts_per_core=0.25).watts_per_core == 0.25


# ---- a CPU replica, exact --------------------------------------------------------------------


def cpu() -> CpuReplicaModel:
    # busy: 2 cores x 10 W + static 1 W = 21 W, 100 tokens/s shared by the sequences
    return CpuReplicaModel(CpuReplicaSpec("m", tokens_per_s=100.0, watts_per_core=10.0))


def test_below_one_sequence_a_cpu_replica_is_a_time_share_of_one() -> None:
    m = cpu()
    assert (m.power_w(0.5), m.decode_tokens_per_s(0.5), m.itl_s(0.5)) == (11.0, 50.0, 0.01)
    assert (m.power_w(1), m.decode_tokens_per_s(1), m.itl_s(1)) == (21.0, 100.0, 0.01)
    assert m.j_per_token(0.5) == 11.0 / 50.0


def test_an_idle_replica_has_no_j_per_token() -> None:
    with pytest.raises(ReplicaModelError) as e:
        cpu().j_per_token(0)
    assert str(e.value) == "J per token needs a batch > 0: an idle replica makes none"


def test_a_cpu_prefill_is_its_share_of_decode_time() -> None:
    m = cpu()
    assert m.prefill_s(0) == 0.0 and m.prefill_s(0.5) == 0.5 * 0.42 / 100.0
    with pytest.raises(ReplicaModelError) as e:
        m.prefill_s(-1)
    assert str(e.value) == "prompt_tokens must be >= 0, got -1"


# ---- a GPU replica's prefill -----------------------------------------------------------------


def test_a_gpu_prefill_is_compute_bound_with_a_weight_read_floor(
    calibration: ReplicaCalibration,
) -> None:
    one = calibration.model(ReplicaSpec(LLAMA_8B, "H100", 1))
    two = calibration.model(ReplicaSpec(LLAMA_8B, "H100", 2))
    h100 = GPUS["H100"]
    assert one.prefill_s(8000) == pytest.approx(
        2 * 8e9 * 8000 / (h100.dense_flops * PREFILL_MFU), rel=1e-13
    )
    # one token: the weights (8B x 2 bytes) read once, over one GPU's bandwidth or two
    assert one.prefill_s(1) == pytest.approx(8e9 * 2 / h100.memory_bw_bytes_s, rel=1e-13)
    assert two.prefill_s(1) == pytest.approx(8e9 * 2 / (2 * h100.memory_bw_bytes_s), rel=1e-13)
    with pytest.raises(ReplicaModelError) as e:
        one.prefill_s(-1)
    assert str(e.value) == "prompt_tokens must be >= 0, got -1"


def test_a_prefill_needs_a_resolved_spec(calibration: ReplicaCalibration) -> None:
    resolved = calibration.model(ReplicaSpec(LLAMA_8B, "H100", 1))
    for unresolved in (
        ReplicaSpec(LLAMA_8B, "H100", 1, active_params_b=8.0, total_params_b=8.0),
        ReplicaSpec(LLAMA_8B, "H100", 1, total_params_b=8.0, precision="bfloat16"),
    ):
        m = GpuReplicaModel(unresolved, resolved.curve, "test")
        with pytest.raises(AssertionError):
            m.prefill_s(10)


# ---- a configured replica --------------------------------------------------------------------


def test_a_configured_cpu_replica_keeps_its_fields() -> None:
    text = (ROOT / "configs/local.yaml").read_text()
    text = text.replace("        tokens_per_s: 130\n", "        tokens_per_s: 130\n"
                        "        prefill_weight: 0.25\n", 1)  # fmt: skip
    replica = parse_config(text, path="local.yaml", env={}).regions[0].replicas[0]
    m = replica_model(replica, None)
    assert isinstance(m, CpuReplicaModel)
    assert m.spec == CpuReplicaSpec(
        model="smollm2-135m", tokens_per_s=130.0, watts_per_core=replica.cpu_watts_per_core,
        max_batch=4, prefill_weight=0.25, name="eu-north-0",
    )  # fmt: skip


def test_a_gpu_replica_without_a_calibration_says_how_to_build_one() -> None:
    text = (ROOT / "configs/multiregion.yaml").read_text()
    replica = parse_config(text, path="m.yaml", env=ENV).regions[0].replicas[0]
    with pytest.raises(ReplicaModelError) as e:
        replica_model(replica, None)
    assert str(e.value) == (
        "replica eu-north-1-a runs on H100: build the GPU calibration "
        "(ReplicaCalibration.from_mlenergy())"
    )


def gpu_replica(text: str, params_b: float | None = None, model: str = LLAMA_8B) -> Replica:
    text = text.replace("        max_concurrency: 256\n", "        max_concurrency: 64\n", 1)
    text = text.replace(f"model: {LLAMA_8B},", f"model: {model},", 1)
    if params_b is not None:
        text = text.replace("        max_concurrency: 64\n",
                            f"        max_concurrency: 64\n        model_params_b: {params_b}\n",
                            1)  # fmt: skip
    return parse_config(text, path="m.yaml", env=ENV).regions[0].replicas[0]


def test_a_configured_gpu_replica_keeps_its_fields(calibration: ReplicaCalibration) -> None:
    text = (ROOT / "configs/multiregion.yaml").read_text()
    m = replica_model(gpu_replica(text), calibration)
    assert isinstance(m, GpuReplicaModel) and m.basis.startswith("measured:")
    assert (m.spec.model, m.spec.gpu, m.spec.gpu_count) == (LLAMA_8B, "H100", 1)
    assert (m.spec.max_num_seqs, m.spec.name) == (64, "eu-north-1-a")
    # measured: its parameters come from the data, whatever the config says
    m = replica_model(gpu_replica(text, params_b=70.0), calibration)
    assert isinstance(m, GpuReplicaModel) and m.spec.total_params_b == 8.0
    # not measured: the config's parameters
    acme = gpu_replica(text, params_b=20.0, model="acme/model-20b")
    m = replica_model(acme, calibration)
    assert m.basis.startswith("fitted: 20B active / 20B dense bfloat16 on 1 x H100")
