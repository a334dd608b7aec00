"""X-Carbon-Preference parsing and the routing policies."""

from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.errors import RouterError
from router.policy import (
    Candidates,
    NoCandidateError,
    make_policy,
    score,
)
from router.preference import Preference, PreferenceError, parse_preference


def test_the_readme_example() -> None:
    p = parse_preference('mode=carbon, max-latency-ms=800, regions=("eu-*")')
    assert p == Preference(weight=1.0, max_latency_ms=800.0, regions=("eu-*",), mode="carbon")


def test_all_keys() -> None:
    p = parse_preference("weight=0.25, defer=3600, max-carbon-g=0.5, regions=(eu us-east)")
    assert (p.weight, p.defer_s, p.max_carbon_g, p.regions) == (0.25, 3600, 0.5, ("eu", "us-east"))
    assert parse_preference(None).weight == 0.5
    assert parse_preference("", default_weight=0.7).weight == 0.7
    assert parse_preference("mode=cost").weight == 0.0


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("weight=1.7", "weight must be >= 0 and <= 1, got 1.7"),
        ("defer=-5", "defer must be >= 0"),
        ("colour=green", "unknown key 'colour'"),
        ("mode=green", "mode must be one of balanced, carbon, cost"),
        ("mode=carbon, weight=0.2", "give mode or weight, not both"),
        ("max-latency-ms=0", "max-latency-ms must be > 0"),
        ("max-tpot-ms=0", "max-tpot-ms must be > 0"),
        ("max-tpot-ms=fast", "max-tpot-ms must be a number"),
        ("regions=()", "regions must not be empty"),
        ("regions=(1 2)", "regions must hold strings or tokens"),
        ('regions=("")', "regions must hold strings or tokens, got ''"),
        ("mode=((", "not a structured-field dictionary (malformed)"),
        ("weight=é", "must be ASCII (RFC 8941)"),
        ("weight=-0.1", "weight must be >= 0 and <= 1, got -0.1"),
        ("defer=604801", "defer must be >= 0 and <= 604800, got 604801"),
        ("max-carbon-g=0", "max-carbon-g must be > 0, got 0"),
        ("max-latency-ms=-1", "max-latency-ms must be > 0, got -1"),
    ],
)
def test_bad_values_say_what_is_allowed(header: str, problem: str) -> None:
    with pytest.raises(PreferenceError) as info:
        parse_preference(header)
    assert info.value.problem.startswith(problem)
    assert str(info.value).startswith(f"invalid X-Carbon-Preference: {problem}")
    assert "allowed keys: mode (balanced|carbon|cost), weight (0.0-1.0)" in str(info.value)
    assert info.value.param == "X-Carbon-Preference"  # the 400's param names the header


@pytest.mark.parametrize(
    ("header", "field", "value"),
    [
        ("weight=0", "weight", 0.0),
        ("weight=1", "weight", 1.0),
        ("defer=0", "defer_s", 0.0),
        ("defer=604800", "defer_s", 604800.0),  # seven days, the longest wait
        ("max-carbon-g=0.001", "max_carbon_g", 0.001),
    ],
)
def test_inclusive_bounds(header: str, field: str, value: float) -> None:
    assert getattr(parse_preference(header), field) == value


@pytest.mark.parametrize("header", [None, "", "   "])
def test_no_header_gives_the_operator_defaults_and_no_mode(header: str | None) -> None:
    p = parse_preference(header, default_weight=0.7, default_max_latency_ms=800.0)
    assert p == Preference(weight=0.7, mode=None, max_latency_ms=800.0)


def test_the_operator_latency_budget_holds_unless_the_header_gives_one() -> None:
    assert parse_preference("weight=0.2", default_max_latency_ms=800.0).max_latency_ms == 800.0
    p = parse_preference("max-latency-ms=300", default_max_latency_ms=800.0)
    assert p.max_latency_ms == 300.0


@settings(max_examples=2000, deadline=None)
@given(st.text())
def test_fuzz_only_preference_errors(header: str) -> None:
    try:
        p = parse_preference(header)
    except PreferenceError:
        return
    assert 0.0 <= p.weight <= 1.0 and p.defer_s >= 0


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.sampled_from(["mode", "weight", "defer", "regions", "max-latency-ms",
                                        "max-carbon-g", "x"]),  # fmt: skip
                       st.one_of(st.integers(-5, 5), st.floats(-2, 2, allow_nan=False),
                                 st.sampled_from(["carbon", "eu-*", "?1", "()", '("a")'])),
                       min_size=1))  # fmt: skip
def test_fuzz_structured_members(members: dict[str, object]) -> None:
    header = ", ".join(f"{k}={v}" for k, v in members.items())
    try:
        p = parse_preference(header)
    except PreferenceError as e:
        assert e.problem  # noqa: PT017 - the message is the outcome under test
        return
    assert set(members) <= {"mode", "weight", "defer", "regions", "max-latency-ms", "max-carbon-g"}
    assert 0.0 <= p.weight <= 1.0 and p.defer_s >= 0


def cands(**over: object) -> Candidates:
    n = 3
    base: dict[str, object] = dict(
        names=["eu-north-0", "eu-central-0", "us-south-0"],
        regions=["eu-north", "eu-central", "us-south"],
        residency=[("eu",), ("eu",), ("us",)],
        healthy=np.ones(n, bool), has_capacity=np.ones(n, bool),
        kwh=np.full(n, 1e-4), pue=np.array([1.1, 1.25, 1.3]),
        price_usd_per_kwh=np.array([0.07, 0.22, 0.06]),
        intensity_g_per_kwh=np.array([40.0, 350.0, 400.0]),
        rtt_ms=np.array([30.0, 15.0, 110.0]), queue_wait_ms=np.zeros(n),
        service_ms=np.full(n, 200.0), load=np.zeros(n),
    )  # fmt: skip
    base.update(over)
    return Candidates(**base)  # type: ignore[arg-type]


def test_score_is_the_weighted_geometric_mean() -> None:
    kwh, pue, price, ci = 2e-4, 1.2, 0.1, 300.0
    cost, carbon = kwh * price, kwh * pue * ci
    for w in (0.0, 0.5, 1.0, 0.3):
        assert score(kwh, pue, price, ci, w) == pytest.approx(cost ** (1 - w) * carbon**w)


def test_modes_choose_as_expected() -> None:
    c = cands()
    assert make_policy("price_carbon").rank(c, parse_preference(None)).replica == "eu-north-0"
    cheap = cands(price_usd_per_kwh=np.array([0.12, 0.22, 0.06]))
    assert (
        make_policy("price_carbon").rank(cheap, parse_preference("mode=cost")).replica
        == "us-south-0"
    )
    assert make_policy("cheapest").rank(cheap, Preference()).replica == "us-south-0"
    assert make_policy("greenest").rank(cheap, Preference()).replica == "eu-north-0"
    assert make_policy("nearest").rank(c, Preference()).replica == "eu-central-0"


def test_constraints_come_first_and_are_explained() -> None:
    c = cands(healthy=np.array([False, True, True]))
    d = make_policy("greenest").rank(c, parse_preference('regions=("eu-*")'))
    assert d.replica == "eu-central-0"
    explained = d.explain(c)
    assert explained["candidates"]["eu-north-0"]["feasible"] is False
    assert explained["candidates"]["us-south-0"]["feasible"] is False
    with pytest.raises(
        NoCandidateError, match=r"no healthy replica in the allowed regions \['us-w'\]"
    ):
        make_policy("greenest").rank(c, parse_preference('regions=("us-w")'))
    full = cands(has_capacity=np.zeros(3, bool))
    with pytest.raises(NoCandidateError, match="at capacity"):
        make_policy("greenest").rank(full, Preference())


def test_max_tpot_ms_parses() -> None:
    p = parse_preference("max-tpot-ms=40, max-latency-ms=800")
    assert p.max_tpot_ms == 40.0 and p.max_latency_ms == 800.0


def test_time_per_output_token_bound_binds_and_falls_back_to_the_quickest() -> None:
    # the greenest replica (eu-north) decodes in a full batch: 80 ms a token
    c = cands(tpot_of=lambda: np.array([80.0, 30.0, 20.0]))
    d = make_policy("greenest").rank(c, parse_preference("max-tpot-ms=50"))
    assert d.replica == "eu-central-0" and d.binding == "tpot" and d.latency_budget_met
    d = make_policy("greenest").rank(c, parse_preference("max-tpot-ms=10"))
    assert d.replica == "us-south-0" and not d.latency_budget_met
    assert "max-tpot-ms 10" in d.note and "us-south-0" in d.note
    d = make_policy("greenest").rank(c, parse_preference("max-tpot-ms=90"))
    assert d.replica == "eu-north-0" and d.binding == "score"


def test_a_replica_whose_time_per_token_is_unknown_does_not_meet_a_tpot_bound() -> None:
    c = cands(tpot_of=lambda: np.array([np.nan, 30.0, 20.0]))
    d = make_policy("greenest").rank(c, parse_preference("max-tpot-ms=50"))
    assert d.replica == "eu-central-0"


def test_latency_budget_binds_and_falls_back_to_the_fastest() -> None:
    # max-latency-ms bounds the first token: RTT + queue wait + prefill (not the whole answer)
    c = cands(queue_wait_ms=np.array([900.0, 0.0, 0.0]))
    d = make_policy("greenest").rank(c, parse_preference("max-latency-ms=500"))
    assert d.replica == "eu-central-0" and d.binding == "latency"
    d = make_policy("greenest").rank(c, parse_preference("max-latency-ms=10"))
    assert d.replica == "eu-central-0" and not d.latency_budget_met
    assert "unmet by every candidate; chose the fastest (eu-central-0, 15 ms" in d.note


def test_the_latency_budget_counts_prefill_not_the_whole_answer() -> None:
    # eu-north answers in 200 ms of decode but needs 900 ms of prefill for this prompt first
    c = cands(prefill_of=lambda: np.array([900.0, 50.0, 50.0]), service_ms=np.full(3, 5000.0))
    d = make_policy("greenest").rank(c, parse_preference("max-latency-ms=500"))
    assert d.replica == "eu-central-0" and d.binding == "latency"
    assert list(c.ttft_ms) == [930.0, 65.0, 160.0]


def test_max_carbon_cap() -> None:
    c = cands()
    d = make_policy("cheapest").rank(c, parse_preference("max-carbon-g=0.01"))
    assert d.replica == "eu-north-0"  # the cheap one emits too much
    with pytest.raises(NoCandidateError, match="max-carbon-g 0.001 cannot be met now"):
        make_policy("cheapest").rank(c, parse_preference("max-carbon-g=0.001"))


def test_near_ties_are_spread_by_load() -> None:
    c = cands(intensity_g_per_kwh=np.array([40.0, 40.5, 400.0]), pue=np.ones(3),
              price_usd_per_kwh=np.full(3, 0.1), load=np.array([0.9, 0.1, 0.0]))  # fmt: skip
    policy = make_policy("greenest", rng=random.Random(1))
    picks = {policy.rank(c, Preference()).replica for _ in range(20)}
    assert picks == {"eu-central-0"}  # the loaded near-tie loses every two-choice draw
    c.load = np.array([0.1, 0.9, 0.0])
    assert {policy.rank(c, Preference()).replica for _ in range(20)} == {"eu-north-0"}


def same_region(**over: object) -> Candidates:
    """Three replicas at one price and intensity: only energy and load tell them apart."""
    return cands(pue=np.ones(3), price_usd_per_kwh=np.full(3, 0.1),
                 intensity_g_per_kwh=np.full(3, 40.0), **over)  # fmt: skip


def test_a_near_tie_does_not_wake_an_idle_replica_where_joining_costs_no_latency() -> None:
    # eu-north-0 is busy: this request's marginal energy there is 3 % lower (a near-tie at the
    # default 5 %), and joining its batch slows no one (slowdown 1.0 there as on the idle ones)
    c = same_region(kwh=np.array([0.97e-4, 1e-4, 1e-4]), load=np.array([0.05, 0.0, 0.0]),
                    slowdown=np.ones(3))  # fmt: skip
    policy = make_policy("greenest", rng=random.Random(1))
    assert {policy.rank(c, Preference()).replica for _ in range(50)} == {"eu-north-0"}


def test_a_near_tie_spreads_where_joining_would_slow_the_request() -> None:
    # the same near-tie, but eu-north-0's batch makes a token 60 % slower than alone
    c = same_region(kwh=np.array([0.97e-4, 1e-4, 1e-4]), load=np.array([0.5, 0.0, 0.0]),
                    slowdown=np.array([1.6, 1.0, 1.0]))  # fmt: skip
    policy = make_policy("greenest", rng=random.Random(1))
    picks = {policy.rank(c, Preference()).replica for _ in range(50)}
    assert picks == {"eu-central-0", "us-south-0"}  # the rival drawn at random wins


def test_a_clear_energy_difference_is_no_tie() -> None:
    # joining the busy replica costs a fifth of waking an idle one: it wins whatever the load
    c = same_region(kwh=np.array([0.2e-4, 1e-4, 1e-4]), load=np.array([0.5, 0.0, 0.0]),
                    slowdown=np.array([1.6, 1.0, 1.0]))  # fmt: skip
    policy = make_policy("greenest", rng=random.Random(1))
    assert {policy.rank(c, Preference()).replica for _ in range(50)} == {"eu-north-0"}


def test_the_decision_says_which_figures_were_estimated() -> None:
    c = cands(estimated=[("load", "prefill"), (), ("load",)])
    d = make_policy("greenest").rank(c, Preference())
    assert d.replica == "eu-north-0" and d.estimated == ("load", "prefill")
    explained = d.explain(c)
    assert explained["estimated"] == ["load", "prefill"]
    assert explained["candidates"]["us-south-0"]["estimated"] == ["load"]
    assert explained["candidates"]["eu-north-0"]["kwh"] == pytest.approx(1e-4)
    assert make_policy("greenest").rank(cands(), Preference()).estimated == ()


def test_round_robin_cycles_over_feasible() -> None:
    rr = make_policy("round_robin")
    c = cands(healthy=np.array([True, False, True]))
    assert [rr.rank(c, Preference()).replica for _ in range(4)] == [
        "eu-north-0", "us-south-0", "eu-north-0", "us-south-0"]  # fmt: skip


def test_unknown_policy() -> None:
    with pytest.raises(RouterError, match="unknown policy 'fastest'; choose from cheapest"):
        make_policy("fastest")


def test_a_replica_with_room_in_its_batch_is_preferred_to_a_queue() -> None:
    # a full batch's queue is cheap at the margin (the saturated figure), far cheaper than
    # waking an idle replica; the wait is not: while some replica has room, none queues
    c = cands(kwh=np.array([2.5e-5, 8.2e-4, 8.2e-4]), load=np.array([1.4, 0.0, 0.0]))
    d = make_policy("price_carbon").rank(c, Preference())
    assert d.replica != "eu-north-0" and d.binding == "batch"
    # below the batch limit, packing stands
    c = cands(kwh=np.array([2.5e-5, 8.2e-4, 8.2e-4]), load=np.array([0.6, 0.0, 0.0]))
    assert make_policy("price_carbon").rank(c, Preference()).replica == "eu-north-0"
    # every replica full: the best queue
    c = cands(kwh=np.array([2.5e-5, 8.2e-4, 8.2e-4]), load=np.array([1.4, 1.0, 2.0]))
    assert make_policy("price_carbon").rank(c, Preference()).replica == "eu-north-0"


def test_when_every_score_is_zero_carbon_and_price_still_decide() -> None:
    # a request with no prompt, joining batches where the model's power is flat: zero
    # marginal energy everywhere; the cleanest (per kWh) must win, not the first listed
    c = cands(
        kwh=np.zeros(3),
        names=["us-south-0", "eu-central-0", "eu-north-0"],
        regions=["us-south", "eu-central", "eu-north"],
        intensity_g_per_kwh=np.array([450.0, 350.0, 30.0]),
        price_usd_per_kwh=np.array([0.06, 0.22, 0.07]),
        pue=np.array([1.3, 1.25, 1.1]),
    )
    for _ in range(20):
        assert make_policy("greenest").rank(c, Preference()).replica == "eu-north-0"
        assert make_policy("price_carbon").rank(c, Preference()).replica == "eu-north-0"


def test_the_carbon_agnostic_baseline_is_power_of_two_expected_over_its_draws() -> None:
    """Power of two choices draws two allowed replicas and takes the less loaded: the replica
    of load rank r (0 the least) among n is taken in n - 1 - r of the n(n-1)/2 pairs."""
    from router.policy import carbon_agnostic_baseline

    c = cands(load=np.array([0.5, 0.1, 0.9]), billed_kwh_of=lambda: np.array([1e-4, 2e-4, 1e-4]))
    allowed = np.ones(3, bool)
    name, g = carbon_agnostic_baseline(c, allowed, chosen=0)
    assert name == "eu-central-0"  # the least loaded: its likeliest pick
    # per kWh of IT energy on the chosen replica: eu-central uses twice the energy there
    want = 2 / 3 * 2.0 * 1.25 * 350.0 + 1 / 3 * 1.0 * 1.1 * 40.0 + 0.0
    assert g == pytest.approx(want)
    # ties share the pairs they win
    tied = cands(load=np.array([0.2, 0.2, 0.9]))
    _, g = carbon_agnostic_baseline(tied, allowed, chosen=0)
    assert g == pytest.approx(0.5 * 1.1 * 40.0 + 0.5 * 1.25 * 350.0)
    # only the replicas the request allows; one alone is the baseline
    name, g = carbon_agnostic_baseline(tied, np.array([False, False, True]), chosen=2)
    assert (name, g) == ("us-south-0", pytest.approx(1.3 * 400.0))
    # none allowed (cannot happen after a decision): the chosen one, nothing avoided
    name, g = carbon_agnostic_baseline(tied, np.zeros(3, bool), chosen=1)
    assert (name, g) == ("eu-central-0", pytest.approx(1.25 * 350.0))


ALLOWED_TEXT = (
    "allowed keys: mode (balanced|carbon|cost), weight (0.0-1.0), max-latency-ms (> 0), "
    'max-tpot-ms (> 0), regions (inner list of names or globs, e.g. ("eu-*")), '
    "defer (seconds >= 0), max-carbon-g (> 0)"
)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ("colour=green", "unknown key 'colour'"),
        ("mode=green", "mode must be one of balanced, carbon, cost, got 'green'"),
        ("mode=carbon, weight=0.2", "give mode or weight, not both"),
        ("weight=1.5", "weight must be >= 0 and <= 1, got 1.5"),
        ("max-latency-ms=0", "max-latency-ms must be > 0, got 0"),
        ("max-tpot-ms=fast", "max-tpot-ms must be a number, got 'fast'"),
        ("defer=-1", "defer must be >= 0 and <= 604800, got -1"),
        ("defer=700000", "defer must be >= 0 and <= 604800, got 700000"),
        ("max-carbon-g=0", "max-carbon-g must be > 0, got 0"),
        ("regions=()", "regions must not be empty"),
        ("regions=(1 2)", "regions must hold strings or tokens, got 1"),
        ("weight=é", "must be ASCII (RFC 8941)"),
    ],
)
def test_the_message_a_client_reads_is_exact(header: str, problem: str) -> None:
    """The 400's message is a contract: clients and their logs read it word for word."""
    with pytest.raises(PreferenceError) as info:
        parse_preference(header)
    assert str(info.value) == f"invalid X-Carbon-Preference: {problem}; {ALLOWED_TEXT}"
    assert info.value.problem == problem
