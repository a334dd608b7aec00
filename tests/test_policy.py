"""Routing policies (router/policy.py): exact figures, boundaries at equality and the messages a
client reads. Tiny explicit candidate tables; scores chosen to be exact in binary floating point.

Preference parsing and the policies' broad behaviour are in tests/test_preference_policy.py.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from router.errors import RouterError
from router.policy import (
    AtCapacity,
    Candidates,
    Decision,
    NoCandidateError,
    carbon_agnostic_baseline,
    make_policy,
    score,
)
from router.preference import Preference

NAMES = ["eu-north-0", "eu-central-0", "us-south-0"]
REGIONS = ["eu-north", "eu-central", "us-south"]


def cands(**over: object) -> Candidates:
    n = len(over.get("names", NAMES))  # type: ignore[arg-type]
    base: dict[str, object] = dict(
        names=NAMES, regions=REGIONS, residency=[("eu",), ("eu",), ("us",)],
        healthy=np.ones(n, bool), has_capacity=np.ones(n, bool),
        kwh=np.full(n, 1.0), pue=np.ones(n), price_usd_per_kwh=np.ones(n),
        intensity_g_per_kwh=np.array([1.0, 2.0, 4.0])[:n],
        rtt_ms=np.array([30.0, 15.0, 110.0])[:n], queue_wait_ms=np.zeros(n),
        service_ms=np.full(n, 200.0), load=np.zeros(n),
    )  # fmt: skip
    base.update(over)
    return Candidates(**base)  # type: ignore[arg-type]


def test_scores_are_computed_in_double_precision_whatever_the_inputs_dtype() -> None:
    # the simulator may hand in float32 tables: the score must not round to float32
    f32 = [np.array([v], np.float32) for v in (2.0, 1.0, 4.0, 3.0, 0.5)]
    got = score(*f32)
    assert got.dtype == np.float64
    assert got[0] == pytest.approx(2.0 * math.sqrt(4.0) * math.sqrt(3.0), rel=1e-15)


# ---- candidates ------------------------------------------------------------------------------


def test_the_allowed_mask_is_computed_once_per_pattern() -> None:
    c = cands()
    first = c.allowed(("eu-*",))
    assert first.tolist() == [True, True, False]
    assert c.allowed(("eu-*",)) is first
    assert c.allowed(("us",)).tolist() == [False, False, True]  # a residency tag
    assert c.allowed(()).tolist() == [True, True, True]


def test_regions_and_residency_must_line_up() -> None:
    c = cands(residency=[("eu",), ("eu",)])  # one short
    with pytest.raises(ValueError, match="zip"):
        c.allowed(("eu",))


def test_the_explanation_lists_every_candidate() -> None:
    c = cands(healthy=np.array([True, True, False]), estimated=[("load",), (), ()])
    d = make_policy("greenest").rank(c, Preference())
    assert d.explain(c) == {
        "policy": "greenest",
        "replica": "eu-north-0",
        "region": "eu-north",
        "binding": "score",
        "latency_budget_met": True,
        "note": "",
        "estimated": ["load"],
        "candidates": {
            "eu-north-0": {"score": 1.0, "feasible": True, "kwh": 1.0, "estimated": ["load"]},
            "eu-central-0": {"score": 2.0, "feasible": True, "kwh": 1.0, "estimated": []},
            "us-south-0": {"score": 4.0, "feasible": False, "kwh": 1.0, "estimated": []},
        },
    }
    short = Decision(0, "eu-north-0", "eu-north", "greenest", np.ones(2), np.ones(3, bool), "")
    with pytest.raises(ValueError, match="zip"):
        short.explain(c)


# ---- the carbon-agnostic baseline ------------------------------------------------------------


def four(load: list[float], billed: list[float]) -> Candidates:
    return cands(names=["a", "b", "c", "d"], regions=["ra", "rb", "rc", "rd"],
                 residency=[(), (), (), ()], pue=np.ones(4), load=np.array(load),
                 intensity_g_per_kwh=np.array([1.0, 2.0, 4.0, 8.0]), rtt_ms=np.zeros(4),
                 billed_kwh_of=lambda: np.array(billed))  # fmt: skip


def test_the_baseline_shares_a_tie_among_the_most_loaded() -> None:
    # load ranks: a 0, b 1, then c and d tied at ranks 2 and 3: of the 6 pairs a wins 3, b 2,
    # c and d share 1 (each 0.5)
    c = four([0.1, 0.5, 0.7, 0.7], [1.0, 1.0, 1.0, 1.0])
    name, g = carbon_agnostic_baseline(c, np.ones(4, bool), chosen=0)
    assert name == "a"
    assert g == pytest.approx((3 * 1.0 + 2 * 2.0 + 0.5 * 4.0 + 0.5 * 8.0) / 6)


def test_the_baseline_of_two_takes_the_less_loaded() -> None:
    c = four([0.9, 0.1, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    name, g = carbon_agnostic_baseline(c, [True, True, False, False], chosen=0)  # a plain list
    assert (name, g) == ("b", 2.0)  # the one pair: b, less loaded, at 2 g/kWh


def test_the_baseline_where_the_chosen_replica_used_no_energy() -> None:
    # per kWh of the allowed replicas' mean predicted energy, (1 + 3) / 2 = 2 kWh
    c = four([0.1, 0.5, 0.0, 0.0], [1.0, 3.0, 0.0, 5.0])
    name, g = carbon_agnostic_baseline(c, [True, True, False, False], chosen=2)
    assert name == "a"
    assert g == pytest.approx(1.0 * 1.0 * 1.0 / 2.0)  # a wins the one pair: 1 kWh x 1 g/kWh


# ---- constraints and their messages ----------------------------------------------------------


def test_a_policy_keeps_the_random_source_it_is_given() -> None:
    rng = random.Random(7)
    assert make_policy("greenest", rng=rng).rng is rng
    assert isinstance(make_policy("greenest").rng, random.Random)


def test_no_healthy_replica_says_which_regions_lack_data() -> None:
    c = cands(healthy=np.zeros(3, bool),
              unavailable={"eu-central": "no carbon intensity for eu-central",
                           "us-south": "no price for us-south"})  # fmt: skip
    with pytest.raises(NoCandidateError) as e:
        make_policy("greenest").rank(c, Preference(regions=("eu-*",)))
    assert str(e.value) == (
        "no healthy replica in the allowed regions ['eu-*']; no carbon intensity for eu-central"
    )
    with pytest.raises(NoCandidateError) as e:
        make_policy("greenest").rank(c, Preference())
    assert str(e.value) == (
        "no healthy replica; no carbon intensity for eu-central; no price for us-south"
    )
    with pytest.raises(NoCandidateError) as e:
        make_policy("greenest").rank(cands(healthy=np.zeros(3, bool)), Preference())
    assert str(e.value) == "no healthy replica"


@pytest.mark.parametrize(
    ("service_ms", "retry_after_s"),
    [
        ([2500.0, 3000.0, 500.0], 2.5),  # the quickest allowed (healthy) replica's service time
        ([1500.0, 3000.0, 500.0], 1.5),
        ([200.0, 3000.0, 500.0], 1.0),  # never under a second
    ],
)
def test_at_capacity_says_when_to_retry(service_ms: list[float], retry_after_s: float) -> None:
    c = cands(has_capacity=np.zeros(3, bool), healthy=np.array([True, True, False]),
              service_ms=np.array(service_ms))  # fmt: skip
    with pytest.raises(AtCapacity) as e:
        make_policy("greenest").rank(c, Preference())
    assert str(e.value) == "every allowed replica is at capacity; retry later"
    assert e.value.retry_after_s == retry_after_s


def test_the_carbon_cap_is_inclusive_and_its_message_exact() -> None:
    c = cands(kwh=np.array([0.5, 0.25, 0.25]))  # 0.5, 0.5 and 1 g expected
    ok, why = make_policy("cheapest").feasible(c, Preference(max_carbon_g=0.5))
    assert ok.tolist() == [True, True, False] and why == "capacity"
    with pytest.raises(NoCandidateError) as e:
        make_policy("cheapest").rank(c, Preference(max_carbon_g=0.25))
    assert str(e.value) == (
        "max-carbon-g 0.25 cannot be met now: the lowest expected is 0.5 g; allow more carbon "
        "or set defer to wait for a cleaner grid"
    )


# ---- ranking ---------------------------------------------------------------------------------


def test_a_decision_bound_by_nothing_has_no_note() -> None:
    d = make_policy("greenest").rank(cands(), Preference(max_latency_ms=1000.0))
    assert (d.index, d.replica, d.region, d.policy) == (0, "eu-north-0", "eu-north", "greenest")
    assert (d.binding, d.latency_budget_met, d.note) == ("score", True, "")


def test_a_latency_budget_met_exactly_is_met() -> None:
    c = cands(rtt_ms=np.array([30.0, 15.0, 110.0]))
    d = make_policy("greenest").rank(c, Preference(max_latency_ms=30.0))
    # eu-north at exactly 30 ms is within; us-south (110 ms) is left out, so the budget bound
    assert (d.replica, d.binding, d.latency_budget_met) == ("eu-north-0", "latency", True)


def test_an_unmet_budget_falls_back_to_the_fastest_feasible_replica() -> None:
    # us-south is the fastest but unhealthy: the fallback keeps to the feasible ones
    c = cands(healthy=np.array([True, True, False]), rtt_ms=np.array([30.0, 15.0, 5.0]))
    d = make_policy("greenest").rank(c, Preference(max_latency_ms=10.0))
    assert (d.index, d.replica, d.region, d.policy) == (1, "eu-central-0", "eu-central", "greenest")
    assert d.scores.tolist() == [1.0, 2.0, 4.0] and d.feasible.tolist() == [True, True, False]
    assert (d.binding, d.latency_budget_met) == ("latency", False)
    assert d.note == (
        "latency budget 10 ms unmet by every candidate; chose the fastest (eu-central-0, 15 ms "
        "expected)"
    )


def test_an_unknown_first_token_time_falls_back_to_the_best_score() -> None:
    c = cands(prefill_of=lambda: np.full(3, np.nan), intensity_g_per_kwh=np.array([4.0, 1.0, 2.0]))
    d = make_policy("greenest").rank(c, Preference(max_latency_ms=500.0))
    assert (d.index, d.replica, d.region, d.policy) == (1, "eu-central-0", "eu-central", "greenest")
    assert d.scores.tolist() == [4.0, 1.0, 2.0] and d.feasible.tolist() == [True, True, True]
    assert (d.binding, d.latency_budget_met) == ("latency", False)
    assert d.note == (
        "latency budget 500 ms unmet by every candidate; chose the fastest (eu-central-0, none "
        "is known)"
    )


def test_an_unknown_first_token_time_falls_back_to_the_best_score_near_ties_included() -> None:
    # eu-north and eu-central tie on score; eu-north's batch would slow the request
    c = cands(prefill_of=lambda: np.full(3, np.nan), intensity_g_per_kwh=np.array([1.0, 1.0, 4.0]),
              load=np.array([0.6, 0.0, 0.0]))  # fmt: skip
    d = make_policy("greenest", rng=random.Random(0)).rank(c, Preference(max_latency_ms=500.0))
    assert (d.replica, d.binding, d.latency_budget_met) == ("eu-central-0", "latency", False)


def test_an_unknown_time_per_token_falls_back_to_the_best_score() -> None:
    c = cands(tpot_of=lambda: np.full(3, np.nan), intensity_g_per_kwh=np.array([4.0, 1.0, 2.0]))
    d = make_policy("greenest").rank(c, Preference(max_tpot_ms=50.0))
    assert (d.index, d.binding, d.latency_budget_met) == (1, "tpot", False)
    assert d.scores.tolist() == [4.0, 1.0, 2.0]
    assert d.note == (
        "max-tpot-ms 50 ms unmet by every candidate; chose the quickest (eu-central-0, none is "
        "known)"
    )


def zero_energy(**over: object) -> Candidates:
    base: dict[str, object] = dict(kwh=np.zeros(3), pue=np.ones(3))
    base.update(over)
    return cands(**base)


def test_zero_energy_ties_are_broken_on_the_replicas_that_used_none() -> None:
    # eu-north and eu-central use no energy and tie per kWh; us-south's energy is not zero
    c = zero_energy(kwh=np.array([0.0, 0.0, 1.0]), intensity_g_per_kwh=np.array([2.0, 2.0, 1.0]),
                    slowdown=np.array([2.0, 1.0, 1.0]))  # fmt: skip
    d = make_policy("greenest", rng=random.Random(0)).rank(c, Preference())
    assert d.replica == "eu-central-0"  # the rival decodes twice as fast


def test_a_fixed_weight_breaks_zero_energy_ties_too() -> None:
    # eu-north is cleaner, us-south cheaper: greenest takes the cleaner whatever the request says
    c = zero_energy(intensity_g_per_kwh=np.array([1.0, 8.0, 4.0]),
                    price_usd_per_kwh=np.array([4.0, 8.0, 1.0]))  # fmt: skip
    assert make_policy("greenest").rank(c, Preference(weight=0.0)).replica == "eu-north-0"
    assert make_policy("cheapest").rank(c, Preference(weight=1.0)).replica == "us-south-0"


# ---- near-ties: nearest scores are the RTTs, exact; tolerance 0.5 --------------------------


def nearest(rtt: list[float], **over: object) -> Decision:
    c = cands(rtt_ms=np.array(rtt), **over)
    return make_policy("nearest", tie_tolerance=0.5, rng=random.Random(0)).rank(c, Preference())


def test_a_near_tie_is_within_the_tolerance_inclusive() -> None:
    load = np.array([0.6, 0.0, 0.0])  # 1 + load: the rival is 1.6 / 1.0 faster
    assert nearest([2.0, 3.0, 10.0], load=load).index == 1  # 3 = 2 x 1.5: a near-tie
    assert nearest([2.0, 4.0, 10.0], load=load).index == 0  # 4 > 3: none


def test_a_rival_must_be_faster_by_more_than_the_tolerance() -> None:
    # slowdown given: it decides, not the load
    assert nearest([2.0, 3.0, 10.0], slowdown=np.array([1.5, 1.0, 1.0]), load=np.array(
        [0.0, 0.9, 0.0])).index == 0  # 1.0 x 1.5 == 1.5: not faster by more  # fmt: skip
    assert nearest([2.0, 3.0, 10.0], slowdown=np.array([1.6, 1.0, 1.0]), load=np.array(
        [0.0, 0.9, 0.0])).index == 1  # fmt: skip


def test_nearest_scores_are_float_rtts() -> None:
    c = cands(rtt_ms=np.array([30, 15, 110]))
    s = make_policy("nearest").scores(c, Preference())
    assert s.dtype == np.float64 and s.tolist() == [30.0, 15.0, 110.0]


def test_round_robin_cycles_over_every_replica_in_order() -> None:
    rr = make_policy("round_robin")
    assert [rr.rank(cands(), Preference()).index for _ in range(4)] == [0, 1, 2, 0]
    assert make_policy("round_robin").scores(cands(), Preference()).tolist() == [0.0, 1.0, 2.0]


def test_an_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(RouterError) as e:
        make_policy("fastest")
    assert str(e.value) == (
        "unknown policy 'fastest'; choose from cheapest, greenest, nearest, oracle, "
        "price_carbon, round_robin"
    )
