"""One completion, from admission to its bill: candidates and budget, the routing decision,
failover until a replica gives its first output, then the whole answer (``collect``) or the
stream (``relay``), and the settlement when it ends, including a stream cut by its client.

Failover happens only before the first byte reached the client: a :class:`ReplicaFailed` from
the replica cools it down and the next candidate is tried; anything the client already has
cannot be taken back, so a failure after that ends the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from router.accounting import Routed
from router.errors import ReplicaFailed
from router.ledger import LedgerRow
from router.policy import Candidates, Decision
from router.preference import Preference
from router.service.live import Live
from router.service.metrics import Metrics
from router.service.ports import (
    Answer,
    Chunk,
    Final,
    ParsedRequest,
    ReplicaClient,
    StreamItem,
)
from router.service.settlement import Settlement, usage_fields
from router.service.tenants import Caller, Hold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Admitted:
    """A request let in: where it could run, how long it is expected to be, and what it
    holds of its tenant's budget until it is billed."""

    cands: Candidates
    expected_tokens: float
    hold: Hold | None


@dataclass
class Started:
    """A request that a replica has begun: its whole ``answer`` (not streamed), or the
    ``first`` item of its ``stream``."""

    index: int
    decision: Decision
    hold: Hold | None = None
    answer: Answer | None = None
    first: StreamItem | None = None
    stream: AsyncIterator[StreamItem] | None = None
    routed: Routed | None = None  # for its receipt
    first_at: datetime | None = None  # when its first output reached the ingress


@dataclass(frozen=True)
class Collected:
    text: str
    finish_reason: str
    usage: dict[str, Any]


@dataclass(frozen=True)
class StreamFailed:
    """The last item of a stream whose replica failed after the first byte (it is billed for
    what was sent)."""

    error: ReplicaFailed


@dataclass(frozen=True)
class Settled:
    """The last item of a relayed stream: its bill."""

    usage: dict[str, Any]


class Completions:
    def __init__(
        self,
        live: Callable[[], Live],
        replicas: Sequence[ReplicaClient],
        settlement: Settlement,
        *,
        arrived: Callable[[str, tuple[str, ...]], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._live = live
        self.replicas = replicas
        self.settlement = settlement
        self._arrived = arrived  # told of each request started, for the fleet's load
        self._metrics = metrics  # counts the decisions
        self._settling: set[asyncio.Task[Any]] = set()  # bills no caller awaits any more

    async def admit(self, caller: Caller, parsed: ParsedRequest) -> Admitted:
        """The request's candidates and expected output tokens, its predicted spend held
        against its tenant's budget (or :class:`router.errors.BudgetExceeded`)."""
        router = self._live().router
        expected = router.lengths.expected(
            caller.tenant, parsed.model, parsed.completion.max_tokens
        )
        cands = await router.candidates(parsed.prompt_estimate(), expected)
        hold = await self.settlement.reserve(caller.tenant, cands)
        return Admitted(cands, expected, hold)

    async def start(
        self,
        request_id: str,
        tenant: str,
        parsed: ParsedRequest,
        cands: Candidates,
        pref: Preference,
        only: int | None = None,
        hold: Hold | None = None,
        bill_if_cut: bool = True,
    ) -> Started:
        """Send the request to the best replica, failing over until one answers (or gives
        its first stream item). ``only``: a planned job's replica, tried first. ``hold`` is
        released if no replica takes the request, else it travels with it to its bill.
        Cancelled while a replica works, it bills what ran (the client went away) unless
        ``bill_if_cut`` is off (a job stopped with its ingress: it runs again, billed then)."""
        if self._arrived is not None:
            self._arrived(parsed.model, pref.regions)
        try:
            return await self._start(
                request_id, tenant, parsed, cands, pref, only, hold, bill_if_cut
            )
        except BaseException:
            self.settlement.release(hold)
            raise

    async def _start(
        self,
        request_id: str,
        tenant: str,
        parsed: ParsedRequest,
        cands: Candidates,
        pref: Preference,
        only: int | None,
        hold: Hold | None,
        bill_if_cut: bool,
    ) -> Started:
        router = self._live().router
        tried: set[int] = set()
        # only: a planned job's replica first, then others its preference allows
        while True:
            decision = router.decide(cands, pref, tried)
            i, binding = decision.index, decision.binding
            if (
                only is not None
                and only not in tried
                and router.states[only].usable(time.monotonic())
            ):
                i, binding = only, "planned"
            replica, st = self.replicas[i], router.states[i]
            if self._metrics is not None:
                self._metrics.decided(st.region.name, decision.policy, binding)
            st.active += 1  # in flight from now: seen by capacity and queue estimates
            began = datetime.now(UTC)
            try:
                if not parsed.stream:
                    answer = await replica.complete(request_id, parsed.completion)
                    routed = Routed.of(decision, router.baseline(cands, pref, i), binding)
                    return Started(i, decision, hold, answer=answer, routed=routed)
                stream = replica.stream(request_id, parsed.completion)
                first: StreamItem | None = await anext(stream, None)
            except ReplicaFailed as e:
                st.active -= 1
                log.warning("replica %s failed before the first byte: %s", decision.replica, e)
                router.failed(i)
                tried.add(i)
                continue
            except asyncio.CancelledError:  # the client went away while the replica worked
                st.active -= 1
                if bill_if_cut:
                    routed = Routed.of(decision, router.baseline(cands, pref, i), binding)
                    self._bill_cut(request_id, tenant, i, parsed, began, None, hold, routed)
                raise
            except BaseException:
                st.active -= 1
                raise
            routed = Routed.of(decision, router.baseline(cands, pref, i), binding)
            first_at = datetime.now(UTC) if isinstance(first, Chunk) else None
            return Started(i, decision, hold, first=first, stream=stream, routed=routed,
                           first_at=first_at)  # fmt: skip

    def _bill_cut(
        self,
        request_id: str,
        tenant: str,
        index: int,
        parsed: ParsedRequest,
        began: datetime,
        produced: int | None,
        hold: Hold | None,
        routed: Routed | None = None,
        first_at: datetime | None = None,
    ) -> None:
        """Bill a request cut before its end, by prediction (``estimated``): its prompt, and
        the output it was sent (``produced``) or, not streamed, what its replica's rate makes
        of the time it ran (at most ``max_tokens``). The energy was spent either way."""
        now = datetime.now(UTC)
        if produced is None:
            per_s = self._live().router.states[index].replica.tokens_per_s
            elapsed_s = (now - began).total_seconds()
            produced = min(parsed.completion.max_tokens, int(elapsed_s * per_s))
        cut = Final(parsed.prompt_estimate(), produced, began, now, first_token_at=first_at)
        self._settle_soon(request_id, tenant, index, cut, parsed, hold, routed)

    async def _settle(
        self, request_id: str, tenant: str, index: int, final: Final | None,
        parsed: ParsedRequest, hold: Hold | None, routed: Routed | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Settle here; if the caller is cancelled meanwhile, again on a task of its own, so
        the bill is not lost. Settling has no effect before its one await (the carbon
        reading), and its hold is released once whoever gets there first: a second settle of
        the same request bills it once (the ledger is idempotent by request id)."""
        try:
            return await self.settlement.settle(
                request_id, tenant, index, final, parsed, hold, routed
            )
        except asyncio.CancelledError:
            self._settle_soon(request_id, tenant, index, final, parsed, hold, routed)
            raise

    def _settle_soon(
        self, request_id: str, tenant: str, index: int, final: Final | None,
        parsed: ParsedRequest, hold: Hold | None, routed: Routed | None = None,
    ) -> asyncio.Task[dict[str, Any]]:  # fmt: skip
        """Settle on a task of its own: a cancelled caller cannot lose the bill."""
        task = asyncio.get_running_loop().create_task(
            self.settlement.settle(request_id, tenant, index, final, parsed, hold, routed)
        )
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def collect(
        self,
        started: Started,
        request_id: str,
        tenant: str,
        parsed: ParsedRequest,
        *,
        billed: LedgerRow | None = None,
    ) -> Collected:
        """The whole answer and its bill. ``billed``: the request's bill is already in the
        ledger (a job run again after its answer was lost): the answer carries that bill and
        nothing is billed again."""
        router = self._live().router
        text: list[str] = []
        finish: str | None = None
        final: Final | None = None
        began = datetime.now(UTC)
        try:
            if started.answer is not None:
                text, finish = [started.answer.text], started.answer.finish_reason
                final = started.answer.final
            else:
                item, stream = started.first, started.stream
                while item is not None and stream is not None:
                    if isinstance(item, Final):
                        final = item
                    else:
                        for t, f in item.pieces:
                            text.append(t)
                            finish = f or finish
                    item = await anext(stream, None)
        finally:
            router.states[started.index].active -= 1
        if billed is not None:
            self.settlement.release(started.hold)
            return Collected("".join(text), finish or "stop", usage_of(billed))
        if final is None:  # the stream ended without its figures: bill what it produced
            final = unfinished(parsed, began, sum(1 for t in text if t))
        if final.first_token_at is None and started.first_at is not None:
            final = replace(final, first_token_at=started.first_at)
        usage = await self._settle(
            request_id, tenant, started.index, final, parsed, started.hold, started.routed
        )
        return Collected("".join(text), finish or "stop", usage)

    async def abandon(
        self, started: Started, request_id: str, tenant: str, parsed: ParsedRequest
    ) -> None:
        """A started stream that will never be relayed (its client was gone before the
        response began): stop its replica, free its slot, bill it as cut."""
        self._live().router.states[started.index].active -= 1
        began = datetime.now(UTC)
        produced = 1 if isinstance(started.first, Chunk) else 0  # its first output was made
        self._bill_cut(request_id, tenant, started.index, parsed, began, produced, started.hold,
                       started.routed, started.first_at)  # fmt: skip
        aclose = getattr(started.stream, "aclose", None)
        if aclose is not None:
            await aclose()

    async def relay(
        self, started: Started, request_id: str, tenant: str, parsed: ParsedRequest
    ) -> AsyncIterator[Chunk | Settled | StreamFailed]:
        """The stream's chunks as they come, then its bill (:class:`Settled`). Closed or
        cancelled early (the client went away), it stops the replica and bills what was
        generated until then, by prediction: that energy was spent. A replica that fails
        mid-stream is cooled down and the stream ends with :class:`StreamFailed`."""
        st = self._live().router.states[started.index]
        final: Final | None = None
        begun, produced = datetime.now(UTC), 0
        item, stream = started.first, started.stream
        try:
            while item is not None and stream is not None:
                if isinstance(item, Final):
                    final = item
                else:
                    produced += sum(1 for text, _ in item.pieces if text)
                    yield item
                item = await anext(stream, None)
        except ReplicaFailed as e:  # after the first byte: no failover; bill what was sent
            log.warning("replica %s failed mid-stream: %s", self.replicas[started.index].name, e)
            self._live().router.failed(started.index)
            self._bill_cut(request_id, tenant, started.index, parsed, begun, produced, started.hold,
                           started.routed, started.first_at)  # fmt: skip
            yield StreamFailed(e)
            return
        except (asyncio.CancelledError, GeneratorExit):
            self._bill_cut(request_id, tenant, started.index, parsed, begun, produced, started.hold,
                           started.routed, started.first_at)  # fmt: skip
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:  # stop the upstream: the replica stops generating
                await aclose()
            raise
        finally:
            st.active -= 1
        if final is None:  # the stream ended without its figures: bill what was sent
            final = unfinished(parsed, begun, produced)
        if final.first_token_at is None and started.first_at is not None:
            final = replace(final, first_token_at=started.first_at)
        yield Settled(
            await self._settle(
                request_id, tenant, started.index, final, parsed, started.hold, started.routed
            )
        )


def usage_of(row: LedgerRow) -> dict[str, Any]:
    """The ``usage`` of a bill already in the ledger, as :meth:`Settlement.settle` returns it."""
    prompt, completion = row.prompt_tokens, row.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        **usage_fields(row),
    }


def unfinished(parsed: ParsedRequest, began: datetime, produced: int) -> Final:
    """The figures of a stream that ended without its :class:`Final` (a replica that broke
    the contract of :class:`ReplicaClient`): its prompt estimated, one token a piece of output
    it produced, the energy predicted. Never 0 tokens for an answer the client got."""
    log.warning("a stream ended without its figures: billing %d pieces by estimate", produced)
    return Final(parsed.prompt_estimate(), produced, began, datetime.now(UTC))
