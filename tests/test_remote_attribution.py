"""Attribution for proxied replicas: timelines that arrive late, in batches, give the same
bills as the in-process attributor fed live; energy is conserved; late and unknown events are
counted, never crash the replica."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from regions.meters import FakeMeter, MeterReading
from router.metering.attribution import ReplicaAttributor
from router.metering.remote import AwaitingBills, RemoteAttribution, timeline

OFFSET = 1_700_000_000.0  # wall clock = monotonic + OFFSET


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def scenario(seed: int) -> list[tuple[float, tuple[str, str, float, int]]]:
    """Random overlapping requests, off the 0.1 s meter grid (a tie between an event and a
    reading could fall either way once shifted onto the wall clock): (monotonic time, event)."""
    rng = random.Random(seed)
    out = []
    for k in range(rng.randint(1, 6)):
        start = 100.0 + rng.randint(0, 20) / 10 + 0.0123
        end = start + rng.randint(1, 15) / 10 + 0.0311
        rid = f"r{k}"
        out.append((start, ("start", rid, start, rng.randint(0, 200))))
        t = start
        while (t := t + rng.randint(1, 4) / 20) < end:
            out.append((t, ("tokens", rid, t, rng.randint(1, 3))))
        out.append((end, ("end", rid, end, 0)))
    return sorted(out, key=lambda x: x[0])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), power=st.floats(10, 700))
def test_late_batched_timelines_bill_what_live_ones_do(seed: int, power: float) -> None:
    events = scenario(seed)
    clock = Clock()
    live_meter, remote_meter = FakeMeter(power, clock=clock), FakeMeter(power, clock=clock)
    live = ReplicaAttributor()
    remote = RemoteAttribution(remote_meter, lag_s=1.0, wall=lambda: clock() + OFFSET)
    live.reading(live_meter.read())
    live_done, remote_done = [], []
    batch: list[tuple[str, str, float, int]] = []
    i = 0
    for tick in range(1, 60):  # 100 ms meter period; timelines sent every 300 ms
        clock.t = 100.0 + tick / 10
        while i < len(events) and events[i][0] <= clock.t:
            kind, rid, t, n = events[i][1]
            getattr(live, {"start": "start", "tokens": "token", "end": "end"}[kind])(
                rid, t, *([n] if kind != "end" else [])
            )
            batch.append((kind, rid, t + OFFSET, n))
            i += 1
        live_done += live.reading(live_meter.read())
        remote.sample()
        if tick % 3 == 0:
            remote.events(batch)
            batch = []
        remote_done += remote.advance()
    clock.t += 5
    remote.events(batch)
    remote_done += remote.advance()
    live_e = {a.request_id: a.energy_j for a in live_done}
    remote_e = {a.request_id: a.energy_j for a in remote_done}
    assert live_e.keys() == remote_e.keys() == {e[1][1] for e in events}
    for rid, j in live_e.items():
        assert remote_e[rid] == pytest.approx(j, rel=1e-5, abs=1e-9)  # wall clock: 0.24 us steps
    a = remote.attributor
    assert a.attributed_j + a.idle_j == pytest.approx(a.measured_j, rel=1e-9)
    assert remote.late == 0 and remote.unknown == 0


def test_late_and_unknown_events_are_counted() -> None:
    clock = Clock()
    remote = RemoteAttribution(FakeMeter(100.0, clock=clock), lag_s=0.5, wall=lambda: clock())
    for _ in range(20):
        clock.t += 0.1
        remote.sample()
    remote.advance()  # the watermark is now at 101.5
    remote.events([("start", "old", 100.2, 10), ("end", "old", 100.4, 0)])  # too late
    remote.events([("tokens", "ghost", 101.9, 1), ("end", "ghost", 101.9, 0)])  # never started here
    for _ in range(10):
        clock.t += 0.1
        remote.sample()
    done = remote.advance()
    assert remote.late == 2 and remote.unknown == 2
    assert [d.request_id for d in done] == ["old"] and done[0].energy_j >= 0


def test_duplicate_events_do_not_bill_twice() -> None:
    clock = Clock()
    remote = RemoteAttribution(FakeMeter(50.0, clock=clock), lag_s=0.2, wall=lambda: clock())
    evs = [("start", "a", 100.05, 5), ("tokens", "a", 100.1, 2), ("end", "a", 100.15, 0)]
    remote.events(evs)
    remote.events(evs)  # a retried send
    done = []
    for _ in range(10):
        clock.t += 0.1
        remote.sample()
        done += remote.advance()
    assert [d.request_id for d in done] == ["a"] and remote.unknown >= 1


def test_timeline_spreads_tokens_over_the_duration() -> None:
    ev = timeline("r", 10.0, 10.5, 40, 23)
    assert ev[0] == ("start", "r", 10.0, 40) and ev[-1] == ("end", "r", 10.5, 0)
    toks = [e for e in ev if e[0] == "tokens"]
    assert sum(e[3] for e in toks) == 23 and len(toks) == 10
    assert all(10.0 < e[2] <= 10.5 for e in toks)
    assert [e[2] for e in toks] == sorted(e[2] for e in toks)
    assert timeline("q", 1.0, 1.01, 5, 0) == [("start", "q", 1.0, 5), ("end", "q", 1.01, 0)]
    assert [e[3] for e in timeline("q", 1.0, 1.01, 5, 7) if e[0] == "tokens"] == [7]


def test_meter_readings_move_onto_the_wall_clock() -> None:
    clock = Clock()
    meter = FakeMeter(10.0, clock=clock)
    remote = RemoteAttribution(meter, lag_s=0.0, wall=lambda: clock() + OFFSET)
    clock.t += 1.0
    remote.sample()
    remote.advance()
    assert remote.attributor._last == MeterReading(101.0 + OFFSET, pytest.approx(10.0))


def test_an_unmeasured_bill_falls_back_to_the_prediction_after_the_timeout() -> None:
    clock = Clock()
    bills = AwaitingBills(timeout_s=30.0, clock=clock)
    bills.add({"request_id": "a", "tenant": "demo", "energy_j": 5.0})
    bills.add({"request_id": "b", "tenant": "other", "energy_j": 7.0})
    assert bills.waiting("demo") and bills.waiting() and not bills.waiting("nobody")
    bills.measured(["a", "never-seen"])  # a's measured bill is in the ledger
    assert not bills.waiting("demo") and len(bills) == 1
    clock.t += 29.0
    assert bills.expired() == []
    clock.t += 2.0
    assert bills.expired() == [{"request_id": "b", "tenant": "other", "energy_j": 7.0}]
    assert len(bills) == 0 and bills.expired() == []


def test_a_request_whose_end_never_arrives_expires_and_the_rest_keep_being_billed() -> None:
    clock = Clock()
    remote = RemoteAttribution(
        FakeMeter(100.0, clock=clock), lag_s=0.2, wall=lambda: clock(), max_silence_s=5.0
    )
    remote.events([("start", "lost", 100.05, 10)])  # its end was in a batch that was lost
    done = []
    for k in range(100):  # 10 s of traffic after it
        clock.t += 0.1
        remote.sample()
        rid = f"r{k}"
        remote.events([("start", rid, clock.t - 0.09, 5), ("end", rid, clock.t - 0.01, 0)])
        done += remote.advance()
    assert "lost" not in remote.open_requests and remote.expired == 1
    billed = {d.request_id for d in done}
    assert {f"r{k}" for k in range(90)} <= billed  # all but the newest, still in the lag
    assert len(remote.open_requests) < 5  # nothing piles up
