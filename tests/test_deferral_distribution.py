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
