"""The fleet scaling policy (router/scaling.py): cleanest first, per-region minimum, capacity
cap, overload, residency groups, start-up delay and its energy, monotone in load."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.scaling import (
    RegionFleet,
    desired_on,
    issued_before,
    lead_intervals,
    schedule_energy,
    with_startup,
)


def fleet(name: str, replicas: int = 4, min_on: int = 1, capacity_rps: float = 10.0,
          startup_s: float = 0.0, standby_w: float = 0.0) -> RegionFleet:  # fmt: skip
    return RegionFleet(name, replicas, min_on, capacity_rps, startup_s, standby_w)


CLEAN, MID, DIRTY = fleet("clean"), fleet("mid"), fleet("dirty")
SCORE = np.array([[10.0, 200.0, 500.0]])  # clean, mid, dirty


def on(load: float | list[float], score: np.ndarray = SCORE, fleets=(CLEAN, MID, DIRTY),
       util: float = 1.0, **kw) -> np.ndarray:  # type: ignore[no-untyped-def]  # fmt: skip
    loads = np.atleast_1d(np.asarray(load, dtype=float))
    return desired_on(loads, np.repeat(score, len(loads), axis=0), list(fleets),
                      target_utilization=util, **kw)  # fmt: skip


def test_cleanest_region_is_filled_first() -> None:
    assert on(25.0).tolist() == [[3, 1, 1]]  # 25 rps: 3 x 10 in the clean region
    assert on(45.0).tolist() == [[4, 1, 1]]  # the clean region carries up to 40
    assert on(45.1).tolist() == [[4, 1, 1]]  # the minimum of the mid region takes the rest
    assert on(55.0).tolist() == [[4, 2, 1]]


def test_the_order_follows_the_score_per_interval() -> None:
    score = np.array([[10.0, 200.0, 500.0], [500.0, 200.0, 10.0]])
    got = desired_on(np.array([30.0, 30.0]), score, [CLEAN, MID, DIRTY], target_utilization=1)
    assert got.tolist() == [[3, 1, 1], [1, 1, 3]]


def test_never_below_the_minimum() -> None:
    fleets = (fleet("clean", min_on=0), fleet("mid", min_on=2), fleet("dirty", min_on=0))
    assert on(0.0, fleets=fleets).tolist() == [[0, 2, 0]]
    assert on(5.0, fleets=fleets).tolist() == [[1, 2, 0]]


def test_target_utilization_caps_what_a_replica_carries() -> None:
    # at 50 % a replica carries 5 rps: 25 rps need 5 replicas, the clean region owns 4
    assert on(25.0, util=0.5).tolist() == [[4, 1, 1]]
    assert on(15.0, util=0.5).tolist() == [[3, 1, 1]]


def test_a_region_never_gets_more_than_it_owns() -> None:
    got = on(90.0, fleets=(fleet("clean", replicas=2), MID, DIRTY))
    assert got.tolist() == [[2, 4, 3]]  # 20 + 40 + 30


def test_overload_turns_everything_on() -> None:
    assert on(1e6).tolist() == [[4, 4, 4]]
    assert on(120.0).tolist() == [[4, 4, 4]]  # exactly the whole fleet


def test_a_count_on_an_integer_is_not_rounded_up() -> None:
    # 0.3 rps x 10 replicas at 0.1 rps: a float a hair above 3.0 is still 3 replicas
    tiny = fleet("tiny", replicas=10, min_on=0, capacity_rps=0.1)
    got = desired_on(np.array([0.1 + 0.2]), np.array([[1.0]]), [tiny], target_utilization=1)
    assert got.tolist() == [[3]]


def test_residency_groups_are_served_by_their_own_regions() -> None:
    # eu = clean + dirty, us = mid; the us load cannot use the clean region
    loads = np.array([[25.0, 15.0]])  # [eu, us]
    got = desired_on(loads, SCORE, [CLEAN, MID, DIRTY], target_utilization=1, groups=[0, 1, 0])
    assert got.tolist() == [[3, 2, 1]]
    loads = np.array([[55.0, 0.0]])  # eu over the clean region's 40: the dirty eu one takes it
    got = desired_on(loads, SCORE, [CLEAN, MID, DIRTY], target_utilization=1, groups=[0, 1, 0])
    assert got.tolist() == [[4, 1, 2]]


def test_overload_of_one_group_turns_only_its_regions_on() -> None:
    loads = np.array([[1e6, 0.0]])
    got = desired_on(loads, SCORE, [CLEAN, MID, DIRTY], target_utilization=1, groups=[0, 1, 0])
    assert got.tolist() == [[4, 1, 4]]


def test_restricted_load_is_placed_before_load_that_may_go_anywhere() -> None:
    # 40 rps may go anywhere, 30 only to the clean region: the clean region keeps the
    # restricted load and the free load moves to the next cleanest
    allowed = np.array([[True, True, True], [True, False, False]])
    got = desired_on(np.array([[40.0, 30.0]]), SCORE, [CLEAN, MID, DIRTY],
                     target_utilization=1, allowed=allowed)  # fmt: skip
    assert got.tolist() == [[4, 3, 1]]  # clean: 30 + 10, mid: the other 30


def test_bad_inputs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="min_on"):
        fleet("x", replicas=1, min_on=2)
    with pytest.raises(ValueError, match="NaN"):
        on(1.0, score=np.array([[np.nan, 1.0, 1.0]]))
    with pytest.raises(ValueError, match="target_utilization"):
        on(1.0, util=0.0)
    with pytest.raises(ValueError, match="groups"):
        desired_on(np.array([[1.0, 1.0]]), SCORE, [CLEAN, MID, DIRTY], target_utilization=1)


@settings(max_examples=200, deadline=None)
@given(
    loads=st.lists(st.floats(0, 200), min_size=2, max_size=2),
    share=st.floats(0, 1),
    scores=st.lists(st.floats(0, 1000), min_size=3, max_size=3),
    util=st.floats(0.1, 1.0),
)
def test_more_load_never_turns_a_replica_off(
    loads: list[float], share: float, scores: list[float], util: float
) -> None:
    lo, hi = sorted(loads)
    score = np.array([scores])
    fleets = [CLEAN, fleet("mid", replicas=3, min_on=0), fleet("dirty", replicas=2)]
    a, b = on([lo, hi], score=score, fleets=fleets, util=util)
    assert (a <= b).all()
    owned = np.array([4, 3, 2])
    assert ((b >= [1, 0, 1]) & (b <= owned)).all()
    carried = (b * np.array([10.0, 10.0, 10.0]) * util).sum()
    assert carried >= min(hi, (owned * 10.0 * util).sum()) - 1e-6  # the load fits, or all on
    # the same with the load split between a restricted and a free column
    allowed = np.array([[True, True, True], [True, False, True]])
    cols = np.array([[lo * share, lo * (1 - share)], [hi * share, hi * (1 - share)]])
    a, b = desired_on(cols, np.repeat(score, 2, axis=0), fleets, target_utilization=util,
                      allowed=allowed)  # fmt: skip
    assert (a <= b).all()


# ---- start-up ---------------------------------------------------------------------------------


def test_the_decision_is_taken_a_start_up_ahead() -> None:
    fleets = [fleet("a", startup_s=300.0), fleet("b", startup_s=5400.0)]
    assert lead_intervals(fleets, step_s=3600.0) == 2
    assert lead_intervals([fleet("a")], step_s=3600.0) == 0
    load = np.array([5.0, 5.0, 30.0, 30.0, 5.0])
    # a persistence forecast issued one interval ahead sees the step one interval late
    assert issued_before(load, 1).tolist() == [5.0, 5.0, 5.0, 30.0, 30.0]


def test_a_late_forecast_makes_the_fleet_late_a_timely_one_starts_replicas_ahead() -> None:
    region = fleet("a", replicas=4, min_on=1, startup_s=600.0)
    load = np.array([5.0, 5.0, 30.0, 30.0, 5.0, 5.0])
    lead = lead_intervals([region], step_s=900.0)  # 600 s start-up: decided one interval ahead
    score = np.ones((len(load), 1))
    late = with_startup(
        desired_on(issued_before(load, lead), score, [region], target_utilization=1),
        [region], step_s=900.0,
    )  # fmt: skip
    assert late.on[:, 0].tolist() == [1, 1, 1, 3, 3, 1]  # interval 2 is served short
    perfect = with_startup(
        desired_on(load, score, [region], target_utilization=1), [region], step_s=900.0
    )
    assert perfect.on[:, 0].tolist() == [1, 1, 3, 3, 1, 1]
    assert perfect.started[:, 0].tolist() == [0, 0, 2, 0, 0, 0]  # 2 switched on 600 s before


def test_a_dip_shorter_than_a_start_up_is_not_switched_off() -> None:
    region = fleet("a", replicas=4, min_on=0, startup_s=1800.0)
    desired = np.array([[3], [1], [3], [1], [1], [1], [3], [0]])
    s = with_startup(desired, [region], step_s=900.0)
    # the one-interval dip (900 s < 1800 s) is idled through; the three-interval one is not;
    # the dip at the end is switched off
    assert s.on[:, 0].tolist() == [3, 3, 3, 1, 1, 1, 3, 0]
    assert s.started[:, 0].tolist() == [0, 0, 0, 0, 0, 0, 2, 0]


def test_a_dip_is_idled_through_when_that_is_cheaper_than_a_restart() -> None:
    region = fleet("a", replicas=2, min_on=0, startup_s=600.0, standby_w=50.0)
    desired = np.array([[2], [0], [0], [2]])  # a 2-interval dip of 1,800 s
    # restart: 600 s x 400 W = 240 kJ; idling: 1,800 s x (400 - 50) W = 630 kJ: switch off
    assert with_startup(desired, [region], step_s=900.0, static_w=[400.0]).on[:, 0].tolist() == [
        2, 0, 0, 2,
    ]  # fmt: skip
    # a slow start-up (3,000 s x 400 W = 1.2 MJ) makes idling cheaper
    slow = fleet("a", replicas=2, min_on=0, startup_s=3000.0, standby_w=50.0)
    assert with_startup(desired, [slow], step_s=900.0, static_w=[400.0]).on[:, 0].tolist() == [
        2, 2, 2, 2,
    ]  # fmt: skip


def test_the_energy_of_a_schedule() -> None:
    region = fleet("a", replicas=4, min_on=1, startup_s=600.0, standby_w=30.0)
    desired = np.array([[1], [3], [3], [1]])
    s = with_startup(desired, [region], step_s=3600.0)
    e = schedule_energy(s, [region], static_w=[440.0])
    assert e.up_j[:, 0].tolist() == [1 * 440 * 3600, 3 * 440 * 3600, 3 * 440 * 3600, 440 * 3600]
    assert e.startup_j[:, 0].tolist() == [0, 2 * (440 - 30) * 600, 0, 0]
    assert e.standby_j[:, 0].tolist() == [3 * 30 * 3600, 30 * 3600, 30 * 3600, 3 * 30 * 3600]
    assert np.allclose(e.total_j, e.up_j + e.startup_j + e.standby_j)
    # scaling saves energy against an always-on fleet of the same replicas
    always = schedule_energy(
        with_startup(np.full((4, 1), 4), [region], step_s=3600.0), [region], static_w=[440.0]
    )
    assert e.total_j.sum() < always.total_j.sum()
