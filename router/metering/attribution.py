"""Split a replica's measured energy among the requests that used it.

Each interval between two meter readings is split among the requests active in it in
proportion to the work each did in it: decode tokens, plus prefill tokens x ``prefill_weight``
(default :data:`regions.calibration.PREFILL_WEIGHT`, measured)
spread uniformly over the request's prefill (from its start to its first token). Energy of the
part of an interval when no request was active is idle energy, booked to the replica.

Invariant: for every replica and window, attributed + idle == measured (to float rounding).

The live replica calls :meth:`ReplicaAttributor.start`, ``token``, ``end`` and ``reading`` as
things happen (readings at every start and end and periodically); an interval is settled once
every request active in it knows where its prefill ended, so a request's energy is final shortly
after its end. :func:`attribute` runs the same code over recorded timelines.

Equal times. A bill depends on the timestamps, not on the order in which things stamped with one
time arrive (one exception, below), so the live path and the replay agree
(``tests/test_attribution_live_replay.py`` checks 1,000 random timelines):

- Readings with one timestamp are one reading: the energy read between them belongs to the
  interval that starts at that time: it is charged to the requests running after it, never to
  one already final (the live path cannot reopen an interval it has split); read at the latest
  time, it is measured with the next reading.
- An interval (a, b] holds the lifetime of a request by its measure (overlap in seconds), so a
  start or an end exactly at a reading time puts nothing in the interval it only touches.
- A token belongs to the interval that ends at its time (it is the product of work done before
  it), unless it is stamped with its request's start: then it belongs to the interval that
  starts there, and so does a prompt prefilled at an instant (first token at the start, or a
  request of zero length). What a request does as it starts cannot have used energy read
  before it started.
- A request with work but no length in an interval (zero length, inside it) is the interval's
  busy time if no other request covers it: the whole interval was that work.
- The live path takes events and readings in time order. At one instant anything may come in
  any order but one: a token of a request that started earlier, stamped with a reading's time,
  is fed before that reading (a replica reads the meter after the token it just stamped; fed
  after it, it is booked as if stamped just after the reading). An event stamped before the last
  reading is refused (:class:`AttributionError`); the proxied path reorders late events first
  (:class:`router.metering.remote.RemoteAttribution`).
- A request is final at the first reading fed after its end and stamped at or after it, or,
  with work at its own start on that reading's time (a zero-length request on a reading), at
  the first reading stamped after it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from regions.calibration import PREFILL_WEIGHT
from regions.meters import MeterReading
from router.errors import RouterError

log = logging.getLogger(__name__)


class AttributionError(RouterError, ValueError):
    """Events out of order, unknown request ids, or a meter that went backwards."""


@dataclass
class _Request:
    id: str
    start_s: float
    prefill_tokens: int
    first_token_s: float | None = None
    end_s: float | None = None
    pending_tokens: int = 0  # decode tokens since the last reading
    energy_j: float = 0.0
    prefill_j: float = 0.0  # of energy_j, the share that paid for its prompt
    held_s: float = 0.0  # the replica's busy time, in the share its energy had
    open_intervals: int = 0  # intervals it is active in that are not yet settled


@dataclass
class _Interval:
    a_s: float
    b_s: float
    energy_j: float
    decode: dict[str, int]
    active: list[_Request]


@dataclass(frozen=True, slots=True)
class Attributed:
    """A finished request's share of measured energy."""

    request_id: str
    energy_j: float
    start_s: float
    end_s: float
    prefill_tokens: int
    decode_tokens: int
    prefill_j: float = 0.0  # of energy_j, its prompt's share: prefill work over its work
    held_s: float = 0.0  # seconds of the replica's busy time it held, in its energy's share
    first_token_s: float | None = None


@dataclass
class ReplicaAttributor:
    prefill_weight: float = PREFILL_WEIGHT
    idle_j: float = 0.0
    measured_j: float = 0.0
    attributed_j: float = 0.0
    _requests: dict[str, _Request] = field(default_factory=dict)
    _decoded: dict[str, int] = field(default_factory=dict)
    _last: MeterReading | None = None
    _pending: deque[_Interval] = field(default_factory=deque)
    _done: list[Attributed] = field(default_factory=list)

    # ---- events -------------------------------------------------------------------------------

    def start(self, request_id: str, t_s: float, prefill_tokens: int) -> None:
        if request_id in self._requests:
            raise AttributionError(f"request {request_id} started twice")
        if prefill_tokens < 0:
            raise AttributionError(f"request {request_id}: negative prefill tokens")
        self._in_order(request_id, "starts", t_s)
        self._requests[request_id] = _Request(request_id, t_s, prefill_tokens)
        self._decoded[request_id] = 0

    def token(self, request_id: str, t_s: float, n: int = 1) -> None:
        r = self._get(request_id)
        if r.end_s is not None:
            raise AttributionError(f"request {request_id}: token after its end")
        self._in_order(request_id, "has a token", t_s)
        if r.first_token_s is None:
            r.first_token_s = max(t_s, r.start_s)
        r.pending_tokens += n
        self._decoded[request_id] += n

    def end(self, request_id: str, t_s: float) -> None:
        r = self._get(request_id)
        if r.end_s is not None:
            raise AttributionError(f"request {request_id} ended twice")
        if t_s < r.start_s:
            raise AttributionError(f"request {request_id} ends before it starts")
        self._in_order(request_id, "ends", t_s)
        r.end_s = t_s
        if r.first_token_s is None:  # no output: its whole life was prefill
            r.first_token_s = t_s

    def _in_order(self, request_id: str, what: str, t_s: float) -> None:
        if self._last is not None and t_s < self._last.t_s:
            raise AttributionError(
                f"request {request_id} {what} at {t_s}, before the last reading "
                f"({self._last.t_s}); feed events and readings in time order"
            )

    def reading(self, reading: MeterReading) -> list[Attributed]:
        """Close the interval since the previous reading; return requests whose energy is final.

        A reading with the previous one's time closes nothing: its energy joins the next
        interval (the module docstring's rule for equal times)."""
        last = self._last
        self._last = reading
        if last is None:
            return self._drain()
        if reading.t_s < last.t_s:
            raise AttributionError(f"meter time went back from {last.t_s} to {reading.t_s}")
        energy = reading.energy_j - last.energy_j
        if energy < 0:
            raise AttributionError(
                f"meter energy went back from {last.energy_j} J to {reading.energy_j} J; "
                "meters must be monotonic (counter resets are absorbed by the meter)"
            )
        if reading.t_s == last.t_s:
            self._last = last  # the interval from `last` carries this energy
            self._settle()  # ends fed since `last` may have told a pending interval its prefills
            return self._drain()
        self.measured_j += energy
        a, b = last.t_s, reading.t_s
        # a request that starts at b does its work at b in the next interval (its tokens at b
        # stay pending); one with work at an instant in [a, b) is active though it has no length
        active = [
            r
            for r in self._requests.values()
            if r.start_s < b
            and (r.end_s is None or r.end_s >= a)
            and (
                r.pending_tokens
                or _overlap(r.start_s, r.end_s, a, b) > 0
                or (r.prefill_tokens and r.first_token_s == r.start_s and r.start_s >= a)
            )
        ]
        decode = {r.id: r.pending_tokens for r in active if r.pending_tokens}
        for r in active:
            r.pending_tokens = 0
            r.open_intervals += 1
        self._pending.append(_Interval(a, b, energy, decode, active))
        self._settle()
        return self._drain()

    # ---- settling -----------------------------------------------------------------------------

    def _settle(self) -> None:
        while self._pending and all(r.first_token_s is not None for r in self._pending[0].active):
            self._split(self._pending.popleft())

    def _split(self, iv: _Interval) -> None:
        work: dict[str, float] = {}
        prefill: dict[str, float] = {}  # of each one's work, the prompt's
        for r in iv.active:
            prompt = r.prefill_tokens * _prefill_share(r, iv.a_s, iv.b_s) if r.prefill_tokens else 0
            work[r.id] = float(request_work(iv.decode.get(r.id, 0), prompt, self.prefill_weight))
            prefill[r.id] = float(self.prefill_weight * prompt)
        total_work = sum(work.values())
        covered = _covered_fraction([(r.start_s, r.end_s) for r in iv.active], iv.a_s, iv.b_s)
        if total_work > 0 and covered == 0.0:
            covered = 1.0  # work done at an instant: the whole interval was that work
        if not iv.active or covered == 0.0:
            self.idle_j += iv.energy_j
        else:
            busy, idle = split_busy_idle(iv.energy_j, covered)
            self.idle_j += idle
            if total_work > 0:
                shares = {k: v / total_work for k, v in work.items()}
            else:  # active but no measured work (e.g. waiting on a lock): by time present
                t = {r.id: _overlap(r.start_s, r.end_s, iv.a_s, iv.b_s) for r in iv.active}
                tt = sum(t.values()) or 1.0
                shares = {k: (v / tt if sum(t.values()) else 1.0 / len(t)) for k, v in t.items()}
            busy_s = (iv.b_s - iv.a_s) * covered
            for r in iv.active:
                share = busy * shares[r.id]
                r.energy_j += share
                r.held_s += busy_s * shares[r.id]
                if work[r.id] > 0:
                    r.prefill_j += share * prefill[r.id] / work[r.id]
                self.attributed_j += share
        for r in iv.active:
            r.open_intervals -= 1

    def _drain(self) -> list[Attributed]:
        for r in list(self._requests.values()):
            if (
                r.end_s is not None
                and r.open_intervals == 0
                and self._last is not None
                and self._last.t_s >= r.end_s
                and not (self._last.t_s == r.start_s and _works_at_start(r))
            ):
                self._done.append(
                    Attributed(
                        request_id=r.id,
                        energy_j=r.energy_j,
                        start_s=r.start_s,
                        end_s=r.end_s,
                        prefill_tokens=r.prefill_tokens,
                        decode_tokens=self._decoded.pop(r.id),
                        prefill_j=min(r.prefill_j, r.energy_j),
                        held_s=r.held_s,
                        first_token_s=r.first_token_s,
                    )
                )
                del self._requests[r.id]
        done, self._done = self._done, []
        return done

    def _get(self, request_id: str) -> _Request:
        try:
            return self._requests[request_id]
        except KeyError:
            raise AttributionError(f"unknown request {request_id}") from None

    @property
    def open_requests(self) -> list[str]:
        return sorted(self._requests)


def request_work(decode_tokens: Any, prefill_tokens: Any, prefill_weight: Any) -> Any:
    """A request's work in an interval: its decode tokens + ``prefill_weight`` x the prompt
    tokens it prefilled then (scalars or NumPy arrays alike; the simulator calls it too)."""
    return decode_tokens + prefill_weight * prefill_tokens


def split_busy_idle(energy_j: Any, covered: Any) -> tuple[Any, Any]:
    """An interval's energy as (attributed to the requests present, idle): the share of the
    interval some request was present is attributed (scalars or NumPy arrays alike)."""
    busy = energy_j * covered
    return busy, energy_j - busy


def _overlap(s: float, e: float | None, a: float, b: float) -> float:
    return max(0.0, min(b, e if e is not None else b) - max(a, s))


def _prefill_share(r: _Request, a: float, b: float) -> float:
    assert r.first_token_s is not None
    span = r.first_token_s - r.start_s
    if span <= 0:  # prefilled at its start: in the interval that starts there or holds it
        return 1.0 if a <= r.start_s < b else 0.0
    return _overlap(r.start_s, r.first_token_s, a, b) / span


def _works_at_start(r: _Request) -> bool:
    """Work stamped with the request's start time not booked yet: tokens, or a whole prompt."""
    return bool(r.pending_tokens or (r.prefill_tokens and r.first_token_s == r.start_s))


def _covered_fraction(lifetimes: Sequence[tuple[float, float | None]], a: float, b: float) -> float:
    """Fraction of (a, b] covered by the union of request lifetimes (a < b)."""
    spans = sorted((max(a, s), min(b, e if e is not None else b)) for s, e in lifetimes)
    covered, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if e <= s:
            continue
        if cur_e is None or s > cur_e:
            if cur_e is not None and cur_s is not None:
                covered += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None and cur_s is not None:
        covered += cur_e - cur_s
    return covered / (b - a)


# ---- batch ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timeline:
    """One request as a replica saw it: monotonic seconds."""

    request_id: str
    start_s: float
    prefill_tokens: int
    token_times_s: tuple[float, ...]
    end_s: float


@dataclass(frozen=True)
class Attribution:
    energy_j: dict[str, float]
    idle_j: float
    measured_j: float
    attributed: dict[str, Attributed] = field(default_factory=dict)  # the receipts' split too


def attribute(
    readings: Iterable[MeterReading],
    timelines: Iterable[Timeline],
    *,
    prefill_weight: float = PREFILL_WEIGHT,
) -> Attribution:
    """Attribute recorded readings to recorded request timelines (the live code path, replayed).

    Readings must cover every request (one at or before each start, one at or after each end,
    and one after a request's start when it has work at that instant).
    """
    # At equal times a reading closes the interval that ends then: tokens and ends at that time
    # belong to it (order 0, 1), starts to the next one (3); a request's own events keep their
    # order (a token at its start time, or an end at its start time, come after the start).
    events: list[tuple[float, int, MeterReading | tuple[str, Timeline]]] = []
    for tl in timelines:
        if tl.end_s < tl.start_s or any(t < tl.start_s or t > tl.end_s for t in tl.token_times_s):
            raise AttributionError(f"request {tl.request_id}: times outside [start, end]")
        events.append((tl.start_s, 3, ("start", tl)))
        events.extend((t, 0 if t > tl.start_s else 4, ("token", tl)) for t in tl.token_times_s)
        events.append((tl.end_s, 1 if tl.end_s > tl.start_s else 5, ("end", tl)))
    events.extend((r.t_s, 2, r) for r in readings)
    events.sort(key=lambda e: (e[0], e[1]))
    att = ReplicaAttributor(prefill_weight=prefill_weight)
    out: dict[str, Attributed] = {}
    for t, _, ev in events:
        if isinstance(ev, MeterReading):
            out.update((done.request_id, done) for done in att.reading(ev))
            continue
        kind, tl = ev
        if kind == "start":
            att.start(tl.request_id, t, tl.prefill_tokens)
        elif kind == "token":
            att.token(tl.request_id, t)
        else:
            att.end(tl.request_id, t)
    if att.open_requests:
        raise AttributionError(
            f"no reading after the end of {', '.join(att.open_requests)}; "
            "take a reading at or after every request's end (after it, for work at its start)"
        )
    return Attribution(
        energy_j={k: a.energy_j for k, a in out.items()},
        idle_j=att.idle_j,
        measured_j=att.measured_j,
        attributed=out,
    )
