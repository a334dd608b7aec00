"""Energy attribution: the conservation invariant (hypothesis), and exact small cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regions.meters import MeterReading
from router.metering.attribution import (
    AttributionError,
    ReplicaAttributor,
    Timeline,
    attribute,
)


def R(t: float, e: float) -> MeterReading:  # noqa: N802
    return MeterReading(t, e)


def test_a_request_alone_gets_all_energy_of_its_intervals() -> None:
    tl = Timeline("a", 1.0, 10, (1.5, 2.0, 2.5), 3.0)
    out = attribute([R(0, 0), R(1, 5), R(2, 25), R(3, 45), R(4, 50)], [tl])
    assert out.energy_j == {"a": pytest.approx(40.0)}
    assert out.idle_j == pytest.approx(10.0)
    assert out.measured_j == pytest.approx(50.0)


def test_split_by_decode_tokens_and_weighted_prefill() -> None:
    # two requests share one interval (0, 1]: a decodes 3 tokens, b prefills 20 tokens (weight
    # 0.1 -> 2 work units) and its first token at t=1 counts as one decode token
    a = Timeline("a", 0.0, 0, (0.2, 0.5, 0.8), 1.0)
    b = Timeline("b", 0.0, 20, (1.0,), 1.0)
    out = attribute([R(0, 0), R(1, 60)], [a, b], prefill_weight=0.1)
    assert out.energy_j["a"] == pytest.approx(60 * 3 / 6)
    assert out.energy_j["b"] == pytest.approx(60 * 3 / 6)
    assert out.idle_j == 0


def test_prefill_is_spread_over_its_duration() -> None:
    # b prefills from 0 to 2 (first token at 2): half of its prefill work falls in each second
    a = Timeline("a", 0.0, 0, (0.5, 1.5), 2.0)
    b = Timeline("b", 0.0, 10, (2.0,), 2.0)
    out = attribute([R(0, 0), R(1, 10), R(2, 20)], [a, b], prefill_weight=0.2)
    # interval 1: a=1 token, b=1 (0.2*10*0.5); interval 2: a=1, b=1 + first token 1
    assert out.energy_j["a"] == pytest.approx(5 + 10 / 3)
    assert out.energy_j["b"] == pytest.approx(5 + 20 / 3)


def test_energy_of_a_waiting_request_is_split_by_time() -> None:
    out = attribute([R(0, 0), R(2, 8)], [Timeline("a", 0.0, 0, (), 2.0)], prefill_weight=0.0)
    assert out.energy_j == {"a": pytest.approx(8.0)}


def test_bad_inputs() -> None:
    att = ReplicaAttributor()
    att.reading(R(0, 10))
    with pytest.raises(AttributionError, match="energy went back"):
        att.reading(R(1, 5))
    with pytest.raises(AttributionError, match="time went back"):
        att.reading(R(0.5, 20))
    with pytest.raises(AttributionError, match="unknown request x"):
        att.token("x", 1.0)
    att.start("a", 1.0, 5)
    with pytest.raises(AttributionError, match="started twice"):
        att.start("a", 1.0, 5)
    with pytest.raises(AttributionError, match="no reading after the end of a"):
        attribute([R(0, 0), R(1, 1)], [Timeline("a", 0.5, 1, (), 2.0)])


def test_a_request_with_no_end_stays_open_and_is_not_billed() -> None:
    att = ReplicaAttributor()
    att.reading(R(0, 0))
    att.start("a", 0.0, 4)
    att.token("a", 0.5)
    assert att.reading(R(1, 10)) == []
    assert att.open_requests == ["a"]
    att.end("a", 1.5)
    (done,) = att.reading(R(2, 20))
    # all of (0, 1], half of (1, 2]: it ended at 1.5 and the rest of that second was idle
    assert done.request_id == "a" and done.energy_j == pytest.approx(15.0)
    assert att.idle_j == pytest.approx(5.0)
    assert done.decode_tokens == 1 and done.prefill_tokens == 4


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[MeterReading], list[Timeline], float]:
    n = draw(st.integers(1, 8))
    timelines = []
    for i in range(n):
        start = draw(st.floats(0, 10, allow_nan=False))
        dur = draw(st.floats(0, 5, allow_nan=False))
        k = draw(st.integers(0, 6))
        toks = sorted(draw(st.lists(st.floats(start, start + dur), min_size=k, max_size=k)))
        timelines.append(
            Timeline(f"r{i}", start, draw(st.integers(0, 500)), tuple(toks), start + dur)
        )
    end = max(t.end_s for t in timelines)
    times = sorted({0.0, end + 0.5, *draw(st.lists(st.floats(0, end + 0.5), max_size=20))})
    energy, readings = 0.0, []
    for t in times:
        energy += draw(st.floats(0, 1e4, allow_nan=False))
        readings.append(MeterReading(t, energy))
    return readings, timelines, draw(st.floats(0, 2))


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_attributed_plus_idle_equals_measured(
    case: tuple[list[MeterReading], list[Timeline], float],
) -> None:
    readings, timelines, weight = case
    out = attribute(readings, timelines, prefill_weight=weight)
    measured = readings[-1].energy_j - readings[0].energy_j
    assert out.measured_j == pytest.approx(measured, rel=1e-9, abs=1e-9)
    total = sum(out.energy_j.values()) + out.idle_j
    assert total == pytest.approx(measured, rel=1e-9, abs=1e-9)
    assert set(out.energy_j) == {t.request_id for t in timelines}
    assert all(e >= 0 for e in out.energy_j.values()) and out.idle_j >= -1e-9


@settings(max_examples=100, deadline=None)
@given(st.floats(0, 5), st.floats(0.1, 5), st.lists(st.floats(0, 1e3), min_size=1, max_size=10))
def test_alone_means_everything_between_its_readings(
    start: float, dur: float, steps: list[float]
) -> None:
    end = start + dur
    ts = [start + dur * i / len(steps) for i in range(len(steps))] + [end]  # exact end
    energy = [0.0]
    for s in steps:
        energy.append(energy[-1] + s)
    readings = [MeterReading(0.0 if start > 0 else -1.0, 0.0)] + [
        MeterReading(t, e + 1.0) for t, e in zip(ts, energy, strict=True)
    ]
    out = attribute(readings, [Timeline("a", start, 7, (end,), end)])
    assert out.energy_j["a"] == pytest.approx(energy[-1], rel=1e-9, abs=1e-9)


def test_one_prefill_weight_default_everywhere() -> None:
    # attribution, the energy predictor and the YAML replica once had 0.1, 0.02 and 0.35
    import dataclasses
    import inspect

    from forecasting.energy import ReplicaProfile
    from regions.calibration import PREFILL_WEIGHT
    from regions.config import Replica
    from router.metering.remote import RemoteAttribution
    from router.metering.replica import MeteredReplica

    defaults = {
        "attributor": ReplicaAttributor().prefill_weight,
        "attribute()": inspect.signature(attribute).parameters["prefill_weight"].default,
        "metered replica": inspect.signature(MeteredReplica).parameters["prefill_weight"].default,
        "remote": {f.name: f.default for f in dataclasses.fields(RemoteAttribution)}[
            "prefill_weight"
        ],
        "predictor": {f.name: f.default for f in dataclasses.fields(ReplicaProfile)}[
            "prefill_weight"
        ],
        "config": Replica.model_fields["prefill_weight"].default,
    }
    assert defaults == dict.fromkeys(defaults, PREFILL_WEIGHT)


def test_a_receipt_splits_energy_into_prefill_and_decode_and_counts_time_held() -> None:
    """The receipt's split: each interval's share of a request's energy that paid for its
    prompt is its prefill work over its work; the time it held is the interval's busy time in
    the same share."""
    att = ReplicaAttributor(prefill_weight=1.0)
    att.reading(R(0.0, 0.0))
    att.start("a", 0.0, 10)
    att.token("a", 1.0)  # its first token at 1 s: prefill over [0, 1]
    assert att.reading(R(1.0, 100.0)) == []  # work in [0, 1]: 10 prefill + 1 decode
    att.start("b", 1.0, 0)
    att.token("a", 1.5)
    att.token("b", 1.5)
    att.token("a", 2.0)
    att.token("b", 2.0)
    att.end("a", 2.0)
    att.end("b", 3.0)
    done = {x.request_id: x for x in att.reading(R(2.0, 200.0))}
    a = done["a"]
    assert a.energy_j == pytest.approx(150.0)  # 100 + half of [1, 2]
    assert a.prefill_j == pytest.approx(100.0 * 10 / 11)
    assert a.held_s == pytest.approx(1.0 + 0.5)
    assert a.first_token_s == 1.0
    # b: half of [1, 2], and [2, 3] half covered (it ended at 3 but the interval runs to 4)
    b = {x.request_id: x for x in att.reading(R(4.0, 300.0))}["b"]
    assert b.energy_j == pytest.approx(50.0 + 50.0)
    assert b.prefill_j == 0.0
    assert b.held_s == pytest.approx(0.5 + 1.0)
