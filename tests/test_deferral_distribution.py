"""Deferral on the forecast's distribution (issue 14): wait only when the gain holds at a
stated quantile, and count the requests that waited into a dirtier hour (regret)."""

from __future__ import annotations

import numpy as np
import pytest

from router.scheduler import deferral_regret, worth_waiting


def test_a_later_slot_counts_only_where_its_gain_holds_at_the_stated_quantile() -> None:
    # two replicas; now the best scores 100. Hour 1's median says 70 on both (a 30 % gain), but
    # its 90 % bound says 120 on replica 0 (a coin flip) and 90 on replica 1 (a sure gain)
    median = np.array([[100.0, 130.0], [70.0, 70.0], [99.0, 60.0]])
    upper = np.array([[100.0, 130.0], [120.0, 90.0], [99.0, 94.0]])
    s = worth_waiting(median, min_gain=0.05, gate=upper)
    # now: only the best replica; later: the median's score where the bound beats 95
    assert s.tolist() == [[100.0, np.inf], [np.inf, 70.0], [np.inf, 60.0]]
    # without a gate, the point forecast decides (as before)
    assert worth_waiting(median, min_gain=0.05).tolist() == [
        [100.0, np.inf], [70.0, 70.0], [np.inf, 60.0]
    ]  # fmt: skip


def test_the_gate_is_strict_at_the_bar() -> None:
    median = np.array([[100.0], [50.0]])
    assert worth_waiting(median, 0.05, gate=np.array([[100.0], [95.0]]))[1, 0] == np.inf
    assert worth_waiting(median, 0.05, gate=np.array([[100.0], [94.999]]))[1, 0] == 50.0


def test_the_gate_must_have_the_scores_shape() -> None:
    with pytest.raises(ValueError, match=r"gate has shape \(2, 1\), the scores \(3, 1\)"):
        worth_waiting(np.ones((3, 1)), 0.05, gate=np.ones((2, 1)))


def test_regret_counts_requests_that_ran_dirtier_than_at_arrival() -> None:
    # carbon per request of each (hour, replica): arrival at hour 0, best now is replica 1 (5 g)
    carbon = np.array([[9.0, 5.0], [4.0, 6.0], [5.0, 5.5]])
    # 10 requests: 4 ran at hour 1 on replica 0 (4 g, cleaner), 3 at hour 1 on replica 1
    # (6 g: +1 g each), 2 at hour 2 on replica 1 (5.5 g: +0.5 g each), 1 at hour 2 on replica 0
    # (5 g: no worse, not a regret)
    booked = np.array([[0.0, 0.0], [4.0, 3.0], [1.0, 2.0]])
    r = deferral_regret(carbon, booked, now_g=5.0)
    assert r.deferred == 10.0
    assert r.regretted == 5.0
    assert r.excess_g == pytest.approx(3 * 1.0 + 2 * 0.5, abs=1e-12)
    assert r.saved_g == pytest.approx(4 * 1.0, abs=1e-12)
    # requests that ran at arrival (hour 0) are not deferred
    assert deferral_regret(carbon, np.array([[5.0, 5.0], [0, 0], [0, 0]]), now_g=5.0).deferred == 0


def _replan_world(forecast_gate: np.ndarray | None = None) -> tuple[object, np.ndarray]:
    """One replica; arrival at hour 0 (100 g/kWh). Issued at hour 0, the forecast says hour 1
    is the cleanest (40) and hour 2 next (60); in fact hour 1 comes at 150 and hour 2 at 50,
    and the forecast issued at hour 1 says so."""
    from types import SimpleNamespace

    h_n, w = 4, 3
    intensity = np.array([[100.0], [150.0], [50.0], [100.0]])
    forecast = np.full((h_n, w, 1), 100.0)
    forecast[0, :, 0] = [100.0, 40.0, 60.0]  # issued at hour 0 for hours 0, 1, 2
    forecast[1, :, 0] = [150.0, 50.0, 100.0]  # issued at hour 1 for hours 1, 2, 3
    world = SimpleNamespace(replica_region=np.array([0]), forecast=forecast, intensity=intensity,
                            price=np.ones((h_n, 1)), j_per_request=np.array([3600.0]),
                            pue=np.ones(1), forecast_gate=forecast_gate)  # fmt: skip
    return world, np.array([10.0, 0.0, 0.0, 0.0])


def test_requests_whose_hour_comes_dirtier_than_their_arrival_are_planned_again() -> None:
    from router.simulate import _plan_deferred

    world, demand = _replan_world()
    h_n = len(demand)
    room, up = np.full((h_n, 1), 100.0), np.ones((h_n, 1), dtype=bool)
    args = (world, demand, np.zeros((h_n, 1)), room, up, 1.0)
    # planned once, at arrival: they run in hour 1 (150 g/kWh), dirtier than at arrival
    out, delay, regret = _plan_deferred(*args, oracle=False, spatial=True, min_gain=0.05,  # type: ignore[arg-type]
                                        replan=False)  # fmt: skip
    assert out[1, 0] == pytest.approx(10.0) and delay == pytest.approx(10.0)
    assert regret.deferred == pytest.approx(10.0) and regret.regretted == pytest.approx(10.0)
    # planned again when hour 1 comes dirtier: on the forecast issued then, hour 2 (50)
    out, delay, regret = _plan_deferred(*args, oracle=False, spatial=True, min_gain=0.05)  # type: ignore[arg-type]
    assert out[:, 0] == pytest.approx([0.0, 0.0, 10.0, 0.0])
    assert delay == pytest.approx(20.0)  # 10 requests waited 2 hours
    assert regret.deferred == pytest.approx(10.0) and regret.regretted == 0.0
    assert regret.saved_g == pytest.approx(10 * (100.0 - 50.0) / 1000.0)  # 1 Wh each: 50 g/kWh less


def test_the_last_hour_of_a_window_runs_its_requests_whatever_its_grid() -> None:
    from router.simulate import _plan_deferred

    world, demand = _replan_world()
    world.intensity[2, 0] = 300.0  # type: ignore[attr-defined]  # hour 2 dirtier still
    world.forecast[1, :, 0] = [150.0, 50.0, 100.0]  # type: ignore[attr-defined]
    h_n = len(demand)
    room, up = np.full((h_n, 1), 100.0), np.ones((h_n, 1), dtype=bool)
    out, _, regret = _plan_deferred(world, demand, np.zeros((h_n, 1)), room, up, 1.0,  # type: ignore[arg-type]
                                    oracle=False, spatial=True, min_gain=0.05)  # fmt: skip
    # planned again at hour 1 for hour 2 (the window's last, 0..2): it runs there, dirtier
    assert out[:, 0] == pytest.approx([0.0, 0.0, 10.0, 0.0])
    assert regret.regretted == pytest.approx(10.0)
    assert sum(out[:, 0]) == pytest.approx(10.0)  # none lost, none doubled
