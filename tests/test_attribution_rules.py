"""Energy attribution (router/metering/attribution.py): each rule of the module docstring on a
tiny explicit timeline, figures worked out by hand, and the messages a caller reads.

The conservation property and the live/replay agreement are in tests/test_attribution.py and
tests/test_attribution_live_replay.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from regions.meters import MeterReading
from router.metering.attribution import (
    Attributed,
    AttributionError,
    ReplicaAttributor,
    Timeline,
    _covered_fraction,
    attribute,
)


def R(t: float, e: float) -> MeterReading:  # noqa: N802
    return MeterReading(t, e)


def started(*readings: MeterReading, prefill_weight: float = 1.0) -> ReplicaAttributor:
    att = ReplicaAttributor(prefill_weight=prefill_weight)
    for r in readings:
        att.reading(r)
    return att


# ---- what a caller is told -------------------------------------------------------------------


def test_events_out_of_order_are_refused_with_the_time_of_the_last_reading() -> None:
    att = started(R(0.0, 0.0))
    att.start("a", 0.25, 0)
    att.reading(R(1.0, 10.0))
    cases: list[tuple[Callable[[], None], str]] = [
        (lambda: att.start("b", 0.5, 1), "b starts"),
        (lambda: att.token("a", 0.5), "a has a token"),
        (lambda: att.end("a", 0.5), "a ends"),
    ]
    for call, what in cases:
        with pytest.raises(AttributionError) as e:
            call()
        assert str(e.value) == (
            f"request {what} at 0.5, before the last reading (1.0); feed events and readings "
            "in time order"
        )


def test_bad_events_say_what_is_wrong() -> None:
    att = ReplicaAttributor()
    att.start("a", 0.0, 3)  # before any reading: nothing to be out of order with
    with pytest.raises(AttributionError) as e:
        att.start("n", 0.0, -1)
    assert str(e.value) == "request n: negative prefill tokens"
    with pytest.raises(AttributionError) as e:
        att.end("a", -1.0)
    assert str(e.value) == "request a ends before it starts"
    att.end("a", 1.0)
    with pytest.raises(AttributionError) as e:
        att.token("a", 1.0)
    assert str(e.value) == "request a: token after its end"
    with pytest.raises(AttributionError) as e:
        att.end("a", 1.0)
    assert str(e.value) == "request a ended twice"
    att.reading(R(1.0, 10.0))
    with pytest.raises(AttributionError) as e:
        att.reading(R(2.0, 5.0))
    assert str(e.value) == (
        "meter energy went back from 10.0 J to 5.0 J; meters must be monotonic (counter resets "
        "are absorbed by the meter)"
    )


def test_timelines_outside_their_own_lifetime_are_refused() -> None:
    for tl in (
        Timeline("x", 2.0, 0, (), 1.0),  # ends before it starts
        Timeline("x", 1.0, 0, (0.5,), 2.0),  # a token before its start
        Timeline("x", 1.0, 0, (2.5,), 2.0),  # a token after its end
    ):
        with pytest.raises(AttributionError) as e:
            attribute([R(0.0, 0.0), R(3.0, 1.0)], [tl])
        assert str(e.value) == "request x: times outside [start, end]"


def test_a_missing_final_reading_names_every_open_request() -> None:
    with pytest.raises(AttributionError) as e:
        attribute(
            [R(0.0, 0.0), R(1.0, 1.0)],
            [Timeline("b", 0.5, 0, (), 2.0), Timeline("a", 0.5, 0, (), 3.0)],
        )
    assert str(e.value) == (
        "no reading after the end of a, b; take a reading at or after every request's end "
        "(after it, for work at its start)"
    )


# ---- counting and the finished record --------------------------------------------------------


def test_a_finished_request_carries_its_times_and_counts() -> None:
    att = started(R(0.0, 0.0))
    att.start("a", 0.25, 4)
    att.token("a", 0.5, n=2)
    att.token("a", 0.75, n=3)
    att.end("a", 0.875)
    (done,) = att.reading(R(1.0, 16.0))
    # alone: all of the energy while it ran, 0.25 .. 0.875 of (0, 1]: 10 J; 6 J idle
    assert done == Attributed(
        request_id="a", energy_j=10.0, start_s=0.25, end_s=0.875, prefill_tokens=4,
        decode_tokens=5, prefill_j=10.0 * 4 / 9, held_s=0.625, first_token_s=0.5,
    )  # fmt: skip
    assert (att.idle_j, att.measured_j, att.attributed_j) == (6.0, 16.0, 10.0)


def test_attribute_returns_each_request_as_the_receipts_read_it() -> None:
    out = attribute([R(0.0, 0.0), R(1.0, 8.0)], [Timeline("a", 0.0, 0, (0.5,), 1.0)])
    assert out.attributed == {
        "a": Attributed("a", 8.0, 0.0, 1.0, 0, 1, prefill_j=0.0, held_s=1.0, first_token_s=0.5)
    }


def test_attributed_energy_adds_up_over_intervals_and_requests() -> None:
    att = started(R(0.0, 0.0))
    att.start("a", 0.0, 0)
    att.start("b", 0.0, 0)
    att.token("a", 0.5)
    att.token("b", 0.5, n=3)
    att.reading(R(1.0, 8.0))  # 2 J to a, 6 J to b
    att.token("a", 1.5)
    att.end("a", 2.0)
    att.end("b", 2.0)
    done = {d.request_id: d.energy_j for d in att.reading(R(2.0, 12.0))}  # 4 J to a
    assert done == {"a": 6.0, "b": 6.0}
    assert (att.attributed_j, att.idle_j) == (12.0, 0.0)


# ---- equal times -----------------------------------------------------------------------------


def test_readings_with_one_time_are_one_reading() -> None:
    att = started(R(0.0, 0.0))
    att.start("a", 0.0, 0)
    assert att.reading(R(1.0, 10.0)) == []
    assert att.reading(R(1.0, 15.0)) == []  # read again at 1: its 5 J join (1, 2]
    att.token("a", 1.5)
    att.end("a", 2.0)
    (done,) = att.reading(R(2.0, 25.0))
    assert done.energy_j == 25.0 and att.measured_j == 25.0 and att.idle_j == 0.0


def test_a_request_starting_at_a_reading_has_none_of_the_energy_before_it() -> None:
    att = started(R(0.0, 0.0))
    att.start("x", 0.0, 0)
    att.token("x", 0.5)
    att.start("b", 1.0, 10)  # starts at 1 with its prompt prefilled and a token at once
    att.token("b", 1.0)
    att.reading(R(1.0, 10.0))  # (0, 1]: x's alone
    att.end("x", 2.0)
    att.end("b", 2.0)
    done = {d.request_id: d.energy_j for d in att.reading(R(2.0, 30.0))}
    # (1, 2]: b's prompt (10) and first token (1) against x's nothing: all 20 J to b
    assert done == {"x": 10.0, "b": 20.0}


def test_a_zero_length_request_with_a_prompt_on_a_reading_is_billed_the_next_interval() -> None:
    att = started(R(0.0, 0.0), prefill_weight=0.1)
    att.start("z", 1.0, 5)  # work 0.5: its prompt at an instant
    att.end("z", 1.0)
    assert att.reading(R(1.0, 5.0)) == []  # not final: its work is booked after this reading
    (done,) = att.reading(R(2.0, 25.0))
    assert (done.request_id, done.energy_j, done.prefill_j) == ("z", 20.0, 20.0)
    assert done.held_s == 1.0  # the whole interval was that work
    assert att.idle_j == 5.0


def test_a_zero_length_request_without_work_is_final_at_its_reading() -> None:
    att = started(R(0.0, 0.0))
    att.start("z", 1.0, 0)
    att.end("z", 1.0)
    (done,) = att.reading(R(1.0, 5.0))
    assert (done.request_id, done.energy_j) == ("z", 0.0)


def test_a_request_without_work_or_length_is_final_though_an_interval_waits() -> None:
    # (0, 1] waits for p's first token; z, of no length and no work, is not in it: final at 1
    att = started(R(0.0, 0.0))
    att.start("p", 0.0, 5)
    att.start("z", 0.5, 0)
    att.end("z", 0.5)
    (done,) = att.reading(R(1.0, 10.0))
    assert (done.request_id, done.energy_j, done.held_s) == ("z", 0.0, 0.0)
    assert att.open_requests == ["p"]


def test_work_at_an_instant_without_weight_is_idle() -> None:
    att = started(R(0.0, 0.0), prefill_weight=0.0)
    att.start("z", 0.5, 5)  # a prompt prefilled at an instant, weighing nothing
    att.end("z", 0.5)
    (done,) = att.reading(R(1.0, 10.0))
    assert done.energy_j == 0.0 and att.idle_j == 10.0


# ---- splitting an interval -------------------------------------------------------------------


def test_a_prompt_prefilled_at_its_start_counts_in_that_interval_only() -> None:
    att = started(R(0.0, 0.0))
    att.start("a", 0.0, 3)
    att.token("a", 0.0)  # prompt prefilled at once: 3 + 1 work in (0, 1]
    att.start("b", 0.0, 0)
    att.token("b", 0.5)  # 1
    att.reading(R(1.0, 10.0))
    att.token("a", 1.5)
    att.token("b", 1.5)
    att.end("a", 2.0)
    att.end("b", 2.0)
    done = {d.request_id: d for d in att.reading(R(2.0, 20.0))}
    assert done["a"].energy_j == 8.0 + 5.0 and done["b"].energy_j == 2.0 + 5.0
    assert done["a"].prefill_j == 8.0 * 3 / 4


def test_a_prompt_is_spread_over_its_prefill_however_short() -> None:
    att = started(R(1.0, 0.0))
    att.start("a", 1.0, 4)
    att.reading(R(1.25, 10.0))  # half of its prefill (1 .. 1.5) in (1, 1.25]
    att.token("a", 1.5)
    att.end("a", 1.5)
    (done,) = att.reading(R(2.0, 20.0))
    # alone: all of (1, 1.25]; a third of (1.25, 2], where its work is 2 prompt + 1 token
    assert done.energy_j == pytest.approx(10.0 + 10.0 / 3)
    assert done.prefill_j == pytest.approx(10.0 + 10.0 / 3 * 2 / 3)


def test_a_small_amount_of_work_still_splits_by_work() -> None:
    att = started(R(0.0, 0.0), prefill_weight=0.125)
    att.start("a", 0.0, 4)  # prompt work 0.5, its first token at its end
    att.start("b", 0.0, 0)  # present, no work
    att.end("a", 1.0)
    att.end("b", 1.0)
    done = {d.request_id: d for d in att.reading(R(1.0, 8.0))}
    # a's work 0.5, b's none: all 8 J to a (not split by time), all of it for the prompt
    assert (done["a"].energy_j, done["b"].energy_j) == (8.0, 0.0)
    assert done["a"].prefill_j == 8.0


def test_a_request_is_final_at_a_reading_with_the_last_ones_time_fed_after_its_end() -> None:
    # the live path: a replica reads the meter at 1, then its requests end, stamped 1; (0, 1]
    # waited for b's first token (its end), so a reading again at 1 makes both final
    att = started(R(0.0, 0.0))
    att.start("a", 0.0, 0)
    att.start("b", 0.0, 0)
    att.token("a", 0.5)
    assert att.reading(R(1.0, 10.0)) == []
    att.end("a", 1.0)
    att.end("b", 1.0)
    done = {d.request_id: d.energy_j for d in att.reading(R(1.0, 10.0))}
    assert done == {"a": 10.0, "b": 0.0}


def test_a_single_token_is_work_enough_to_split_by() -> None:
    out = attribute(
        [R(0.0, 0.0), R(1.0, 10.0)],
        [Timeline("a", 0.0, 0, (0.5,), 1.0), Timeline("b", 0.0, 0, (), 1.0)],
    )
    assert out.energy_j == {"a": 10.0, "b": 0.0}


def test_a_prompt_weighing_under_one_token_is_its_whole_prefill_share() -> None:
    out = attribute([R(0.0, 0.0), R(1.0, 6.0)], [Timeline("a", 0.0, 4, (), 1.0)],
                    prefill_weight=0.125)  # fmt: skip
    assert out.attributed["a"].prefill_j == 6.0


def test_without_work_requests_share_by_the_time_they_were_present() -> None:
    out = attribute(
        [R(0.0, 0.0), R(1.0, 12.0)],
        [Timeline("a", 0.0, 0, (), 0.5), Timeline("b", 0.0, 0, (), 1.0)],
        prefill_weight=0.0,
    )
    assert out.energy_j == {"a": 4.0, "b": 8.0}
    assert out.attributed["a"].held_s == pytest.approx(1 / 3)


def test_work_in_part_of_an_interval_leaves_the_rest_idle() -> None:
    out = attribute([R(1.0, 0.0), R(2.0, 10.0)], [Timeline("a", 1.0, 0, (1.25,), 1.5)])
    assert out.energy_j == {"a": 5.0} and out.idle_j == 5.0


# ---- the covered share of an interval --------------------------------------------------------


@pytest.mark.parametrize(
    ("lifetimes", "covered"),
    [
        ([], 0.0),
        ([(0.0, 0.5), (0.5, 4.0)], 0.75),  # the first ends before the interval (1, 5]
        ([(1.5, 2.0), (2.5, 3.0), (3.5, 4.0)], 0.375),  # three apart
        ([(1.0, 3.0), (2.0, 2.5), (2.25, 4.0)], 0.75),  # overlapping and nested
        ([(1.0, 2.0), (3.0, None)], 0.75),  # one still running
    ],
)
def test_the_covered_share_is_the_union_of_lifetimes(
    lifetimes: list[tuple[float, float | None]], covered: float
) -> None:
    assert _covered_fraction(lifetimes, 1.0, 5.0) == covered
