"""Deferral planning (router/scheduler.py): slot scores, the "waiting must pay" rule, booking.

Tiny explicit tables, values worked out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from router.errors import RouterError
from router.scheduler import PlanError, SlotBook, plan, slot_scores, worth_waiting

INF = np.inf


def test_a_slot_book_counts_what_is_booked_against_each_replica_hour() -> None:
    book = SlotBook(np.array([100.0, 50.0]))
    assert book.free(3, 0) == 100.0 and book.free(3, 1) == 50.0  # nothing booked yet
    book.book(3, 1, 20.0)
    book.book(3, 1, 5.0)
    assert book.booked == {(3, 1): 25.0}
    assert book.free(3, 1) == 25.0
    assert book.free(4, 1) == 50.0 and book.free(3, 0) == 100.0  # other hours and replicas


def test_slot_scores_are_the_policy_score_per_hour_and_replica() -> None:
    kwh = np.array([2.0, 1.0])  # per replica
    pue = np.array([1.0, 4.0])
    price = np.array([[1.0, 4.0], [9.0, 1.0], [4.0, 9.0]])  # 3 hours x 2 replicas
    intensity = np.array([[4.0, 1.0], [1.0, 16.0], [9.0, 4.0]])
    # kWh x PUE^0.5 x price^0.5 x intensity^0.5
    expected = [[2 * 1 * 1 * 2, 1 * 2 * 2 * 1], [2 * 1 * 3 * 1, 1 * 2 * 1 * 4],
                [2 * 1 * 2 * 3, 1 * 2 * 3 * 2]]  # fmt: skip
    assert slot_scores(kwh, pue, price, intensity, 0.5).tolist() == expected
    # w = 0: price only; w = 1: PUE x intensity only
    assert slot_scores(kwh, pue, price, intensity, 0.0).tolist() == [[2, 4], [18, 1], [8, 9]]
    assert slot_scores(kwh, pue, price, intensity, 1.0).tolist() == [[8, 4], [2, 64], [18, 16]]


def test_waiting_pays_only_by_more_than_the_minimum_gain() -> None:
    # now the best replica is 1 (score 10); 5 % gain: a later slot must score under 9.5
    scores = np.array([[12, 10, 11], [9.5, 9.4, 20], [1, 10, 9.49]])  # 3 hours x 3 replicas
    s = worth_waiting(scores, min_gain=0.05)
    assert s.tolist() == [[INF, 10, INF], [INF, 9.4, INF], [1, INF, 9.49]]
    assert scores.tolist()[0] == [12, 10, 11]  # the input is left as it was
    # no gain required: anything strictly better than now's best
    assert worth_waiting(scores, 0.0).tolist() == [[INF, 10, INF], [9.5, 9.4, INF],
                                                    [1, INF, 9.49]]  # fmt: skip


def test_waiting_must_pay_on_integer_scores_too() -> None:
    s = worth_waiting(np.array([[4, 2], [1, 3]]), min_gain=0.5)  # now's best 2: later must be < 1
    assert s.dtype == np.float64
    assert s.tolist() == [[INF, 2.0], [INF, INF]]


def test_plan_books_the_best_slot_with_room_in_absolute_hours() -> None:
    scores = np.array([[3.0, 2.0], [1.0, 4.0], [5.0, 0.5]])
    book = SlotBook(np.array([60.0, 100.0]))
    assert plan(scores, first_hour=10, work_s=60.0, book=book) == (12, 1, 0.5)
    assert book.booked == {(12, 1): 60.0}
    # exactly the room left is enough
    assert plan(scores, first_hour=10, work_s=60.0, book=book) == (11, 0, 1.0)
    assert book.booked == {(12, 1): 60.0, (11, 0): 60.0}
    # (12, 1) has 40 s left: not enough for 60; the next best is (10, 1)
    assert plan(scores, first_hour=10, work_s=60.0, book=book) == (10, 1, 2.0)
    assert isinstance(plan(scores, first_hour=10, work_s=1.0, book=book)[2], float)


def test_plan_keeps_to_the_allowed_replicas() -> None:
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 4.0, 0.1]])
    book = SlotBook(np.array([10.0, 10.0, 10.0]))
    allowed = np.array([False, True, False])
    assert plan(scores, first_hour=0, work_s=1.0, book=book, allowed=allowed) == (0, 1, 2.0)
    assert plan(scores, first_hour=0, work_s=1.0, book=book) == (1, 2, 0.1)
    ints = np.array([[3, 2, 1], [1, 4, 1]])  # integer scores are ruled out as well
    assert plan(ints, first_hour=0, work_s=1.0, book=book, allowed=allowed) == (0, 1, 2.0)


def test_plan_takes_the_earlier_slot_of_equal_scores() -> None:
    scores = np.full((6, 4), 7.0)  # 24 equal slots: the first hour, the first replica
    book = SlotBook(np.full(4, 10.0))
    got = [plan(scores, first_hour=0, work_s=10.0, book=book)[:2] for _ in range(6)]
    assert got == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]


def test_plan_orders_slots_by_score_then_hour_then_replica() -> None:
    # 18 slots in three levels: among equal scores the earlier hour wins, then the lower
    # replica (a stable order; numpy's default quicksort reorders ties in arrays this long)
    scores = np.array([[1, 1, 2], [2, 0, 0], [2, 2, 0], [0, 2, 1], [0, 2, 0], [1, 1, 1]])
    book = SlotBook(np.full(3, 10.0))
    got = [plan(scores, first_hour=0, work_s=10.0, book=book)[:2] for _ in range(18)]
    assert got == [(1, 1), (1, 2), (2, 2), (3, 0), (4, 0), (4, 2),
                   (0, 0), (0, 1), (3, 2), (5, 0), (5, 1), (5, 2),
                   (0, 2), (1, 0), (2, 0), (2, 1), (3, 1), (4, 1)]  # fmt: skip


def test_plan_never_books_a_slot_that_the_rule_ruled_out() -> None:
    scores = np.array([[INF, 5.0], [INF, INF]])
    book = SlotBook(np.array([100.0, 10.0]))  # replica 1 is too small for 20 s
    with pytest.raises(PlanError) as e:
        plan(scores, first_hour=0, work_s=20.0, book=book)
    assert str(e.value) == "no replica has 20.0 s of room in the next 2 h; run it now"
    assert isinstance(e.value, RouterError)
    assert book.booked == {}
