"""The receipt's figures beyond the price (router.accounting), each against a value worked out by
hand: the embodied carbon rate and its basis, the prompt's share of a predicted energy, and what
the routing decision hands the receipt."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from regions.calibration import PREFILL_WEIGHT
from regions.config import Embodied, Replica
from router.accounting import SECONDS_PER_YEAR, Routed, embodied_rate, prefill_share_j
from router.policy import Decision

# 2 years at 50 % busy: one year of busy seconds, 31,557,600 s (365.25 days)
E = Embodied(gpu_kg=150.0, server_kg=2500.0, gpus_per_server=8, lifetime_years=2.0,
             utilization=0.5)  # fmt: skip
BUSY_S = 31_557_600.0


def replica(**kw: Any) -> Replica:
    return Replica.model_validate({"name": "r-0", "backend": {"kind": "llama_cpp"}, **kw})


def test_a_year_is_365_and_a_quarter_days() -> None:
    assert SECONDS_PER_YEAR == BUSY_S


def test_a_gpu_replica_pays_for_its_gpus_and_their_share_of_a_server() -> None:
    rate, basis = embodied_rate(replica(gpu={"type": "H100", "count": 2}), E)
    # 2 x 150 kg + 2/8 x 2500 kg = 925 kg, over 31,557,600 busy seconds
    assert rate == pytest.approx(925_000.0 / BUSY_S, rel=1e-12)
    assert basis == "2 x 150 kg GPU + 2/8 of a 2500 kg server over 2 years at 50% busy"


def test_a_cpu_replica_pays_one_accelerator_slots_share_of_a_server() -> None:
    rate, basis = embodied_rate(replica(), E)
    # 2500 kg / 8 = 312.5 kg
    assert rate == pytest.approx(312_500.0 / BUSY_S, rel=1e-12)
    assert basis == "1/8 of a 2500 kg server (CPU replica) over 2 years at 50% busy"


def test_a_replicas_own_figure_wins_even_when_it_is_zero() -> None:
    rate, basis = embodied_rate(replica(gpu={"type": "H100", "count": 4}, embodied_kg=63.1), E)
    assert rate == pytest.approx(63_100.0 / BUSY_S, rel=1e-12)
    assert basis == "63.1 kg (replica config) over 2 years at 50% busy"
    rate, basis = embodied_rate(replica(embodied_kg=0.0), E)
    assert rate == 0.0
    assert basis == "0 kg (replica config) over 2 years at 50% busy"


def test_the_rate_is_over_the_busy_seconds_of_the_life() -> None:
    """Twice the life or twice as busy: half the rate per second held; the basis says which."""
    long = Embodied(gpu_kg=150.0, server_kg=2500.0, gpus_per_server=8, lifetime_years=4.0,
                    utilization=0.25)  # fmt: skip
    rate, basis = embodied_rate(replica(gpu={"type": "A100", "count": 1}), long)
    # 150 + 2500/8 = 462.5 kg over 4 x 0.25 = one year of busy seconds
    assert rate == pytest.approx(462_500.0 / BUSY_S, rel=1e-12)
    assert basis == "1 x 150 kg GPU + 1/8 of a 2500 kg server over 4 years at 25% busy"


def test_the_prompts_share_of_a_predicted_energy_is_its_share_of_the_work() -> None:
    assert PREFILL_WEIGHT == 0.42
    # 100 prompt tokens weigh 42 output tokens: 42 of 100 units of work, of 200 J
    assert prefill_share_j(200.0, 100, 58) == pytest.approx(84.0, rel=1e-12)
    assert prefill_share_j(200.0, 100, 0) == pytest.approx(200.0, rel=1e-12)  # all prompt
    assert prefill_share_j(200.0, 0, 10) == 0.0  # all decode
    # less than one unit of work is still work: one prompt token is 0.42 of a unit
    assert prefill_share_j(10.0, 1, 0) == pytest.approx(10.0, rel=1e-12)
    assert prefill_share_j(200.0, 0, 0) == 0.0  # no work: nothing to split, not a division


def test_the_receipt_takes_the_policy_binding_and_baseline_of_the_decision() -> None:
    d = Decision(index=0, replica="a", region="eu", policy="price_carbon",
                 scores=np.zeros(1), feasible=np.ones(1, dtype=bool), binding="score")  # fmt: skip
    assert Routed.of(d, ("us-east-0", 420.0)) == Routed("price_carbon", "score", "us-east-0", 420.0)
    planned = Routed.of(d, ("us-east-0", 420.0), "planned")
    assert planned == Routed("price_carbon", "planned", "us-east-0", 420.0)
