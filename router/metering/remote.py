"""Attribution for a replica whose requests are proxied by the ingress.

For a remote OpenAI-compatible server (vLLM, TGI, llama.cpp server) the ingress talks to the
server directly, so the replica deployment no longer sees the requests go by. It still owns the
meter (it runs on the region's node and reads that node's GPUs), and the ingress sends it each
request's timeline: start, output tokens as they stream, end. Those events arrive in batches, a
few tens of milliseconds late, so attribution runs ``lag_s`` behind the clock: readings and events
up to the watermark ``now - lag_s`` are merged in time order and fed to the same
:class:`ReplicaAttributor` the in-process path uses. Times are wall-clock seconds
(``time.time()``) on both sides; the meter's monotonic readings are shifted onto that clock once.

An event that arrives after the watermark has passed its time is fed anyway (the request loses
the part of its energy that fell before the watermark) and counted in ``late``; one for a request
this replica never saw start (it restarted) is dropped and counted in ``unknown``: the ingress
bills such a request by its prediction when no measured bill comes back in time.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from regions.calibration import PREFILL_WEIGHT
from regions.meters import MeterReading, PowerMeter
from router.metering.attribution import (
    Attributed,
    AttributionError,
    ReplicaAttributor,
)

EventKind = Literal["start", "tokens", "end"]


class MeterEvent(NamedTuple):
    """One point of a request's timeline, as the ingress sends it to the metering replica."""

    kind: EventKind  # start: n = prompt tokens; tokens: n output tokens; end: n unused (0)
    request_id: str
    t_s: float  # wall clock, time.time()
    n: int


def timeline(
    request_id: str, start_s: float, end_s: float, prompt: int, completion: int,
    step_s: float = 0.05,
) -> list[MeterEvent]:  # fmt: skip
    """The events of a request whose tokens were not seen one by one (a non-streamed answer):
    start, its output tokens spread evenly over its duration (in ``step_s`` steps), end."""
    events = [MeterEvent("start", request_id, start_s, prompt)]
    steps = max(1, min(completion, math.ceil((end_s - start_s) / step_s)))
    if completion:
        base, extra = divmod(completion, steps)
        for k in range(steps):
            t = start_s + (end_s - start_s) * (k + 1) / steps
            events.append(MeterEvent("tokens", request_id, t, base + (1 if k < extra else 0)))
    events.append(MeterEvent("end", request_id, end_s, 0))
    return events


@dataclass
class RemoteAttribution:
    meter: PowerMeter
    prefill_weight: float = PREFILL_WEIGHT
    lag_s: float = 1.0
    wall: Callable[[], float] = time.time
    max_silence_s: float = 120.0  # an open request with no event for this long is given up
    late: int = 0
    unknown: int = 0
    expired: int = 0

    def __post_init__(self) -> None:
        self.attributor = ReplicaAttributor(prefill_weight=self.prefill_weight)
        first = self.meter.read()
        self._offset = self.wall() - first.t_s  # monotonic -> wall clock, fixed once
        self._queue: list[tuple[float, int, int, str, str, int, float]] = []
        self._seq = itertools.count()
        self._known: set[str] = set()
        self._last_seen: dict[str, float] = {}  # open request -> time of its latest event
        self._given_up: set[str] = set()
        self._fed_until = -float("inf")
        self._last_reading = MeterReading(first.t_s + self._offset, first.energy_j)
        self.attributor.reading(self._last_reading)

    def sample(self) -> None:
        """Read the meter now (call it every meter period)."""
        r = self.meter.read()
        self._push(r.t_s + self._offset, "r", "", 0, energy=r.energy_j)

    def events(self, events: Iterable[MeterEvent]) -> None:
        for kind, rid, t, n in events:
            if t < self._fed_until:
                self.late += 1
                t = self._fed_until  # keep time order for the attributor
            self._push(t, kind, rid, n)

    def _push(self, t: float, kind: str, rid: str, n: int, energy: float = 0.0) -> None:
        # readings sort after events at the same instant, so a request ending at t is in it
        order = 1 if kind == "r" else 0
        heapq.heappush(self._queue, (t, order, next(self._seq), kind, rid, n, energy))

    def advance(self, now: float | None = None) -> list[Attributed]:
        """Feed everything up to ``now - lag_s``; return requests whose energy is now final."""
        watermark = (self.wall() if now is None else now) - self.lag_s
        done: list[Attributed] = []
        q = self._queue
        while q and q[0][0] <= watermark:
            t, _, _, kind, rid, n, energy = heapq.heappop(q)
            self._fed_until = t
            if kind == "r":
                self._last_reading = MeterReading(t, energy)
                done += self.attributor.reading(self._last_reading)
                continue
            try:
                if kind == "start":
                    if rid not in self._known:  # a start sent twice counts once
                        self.attributor.start(rid, t, n)
                        self._known.add(rid)
                        self._last_seen[rid] = t
                elif rid not in self._known:
                    self.unknown += 1
                elif kind == "tokens":
                    self.attributor.token(rid, t, n)
                    self._last_seen[rid] = t
                else:
                    self.attributor.end(rid, t)
                    self._last_seen.pop(rid, None)
            except AttributionError:  # e.g. an end sent twice: the first one stands
                self.unknown += 1
        self._expire(watermark)
        out = []
        for a in done:
            self._known.discard(a.request_id)
            if a.request_id in self._given_up:  # not a measurement: the ingress predicts it
                self._given_up.discard(a.request_id)
            else:
                out.append(a)
        return out

    def _expire(self, watermark: float) -> None:
        """End the open requests silent for ``max_silence_s`` (their end was lost with a
        timeline batch, or their ingress died): left open, they would hold every later
        interval open with them. Their energy is not reported as measured: the ingress bills
        their prediction."""
        cutoff = watermark - self.max_silence_s
        for rid in [r for r, t in self._last_seen.items() if t < cutoff]:
            del self._last_seen[rid]
            self._fed_until = max(self._fed_until, cutoff)  # later events keep time order
            with contextlib.suppress(AttributionError):
                self.attributor.end(rid, self._fed_until)
                self._given_up.add(rid)
                self.expired += 1

    @property
    def open_requests(self) -> list[str]:
        return self.attributor.open_requests


class AwaitingBills:
    """The ingress's side of a proxied request's bill: its predicted row, kept until the replica
    reports the measured bill in the ledger, or billed as it is (``estimated``) once
    ``timeout_s`` passes without one (the replica or its meter is down)."""

    def __init__(self, timeout_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.timeout_s = timeout_s
        self._clock = clock
        self._rows: dict[str, tuple[float, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, row: dict[str, Any]) -> None:
        self._rows[row["request_id"]] = (self._clock() + self.timeout_s, row)

    def measured(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._rows.pop(rid, None)

    def expired(self) -> list[dict[str, Any]]:
        """Rows whose measurement did not come in time: the caller bills them as they are."""
        now = self._clock()
        late = [rid for rid, (deadline, _) in self._rows.items() if deadline < now]
        return [self._rows.pop(rid)[1] for rid in late]

    def waiting(self, tenant: str | None = None) -> set[str]:
        """The ids of the answered requests (``tenant``'s, or everyone's) whose measured bill
        has not come yet."""
        return {rid for rid, (_, row) in self._rows.items() if tenant in (None, row["tenant"])}

    def any_of(self, request_ids: set[str]) -> bool:
        """Whether any of ``request_ids`` still waits for its measured bill."""
        return any(rid in self._rows for rid in request_ids)
