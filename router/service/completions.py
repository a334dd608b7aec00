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

from router.errors import ReplicaFailed
from router.policy import Candidates, Decision
from router.preference import Preference
from router.service.live import Live
from router.service.ports import (
    Answer,
    Chunk,
    Final,
    ParsedRequest,
    ReplicaClient,
    StreamItem,
)
from router.service.settlement import Settlement
from router.service.tenants import Caller

log = logging.getLogger(__name__)


@dataclass
class Started:
    """A request that a replica has begun: its whole ``answer`` (not streamed), or the
    ``first`` item of its ``stream``."""

    index: int
    decision: Decision
    answer: Answer | None = None
    first: StreamItem | None = None
    stream: AsyncIterator[StreamItem] | None = None


@dataclass(frozen=True)
class Collected:
    text: str
    finish_reason: str
    usage: dict[str, Any]


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
    ) -> None:
        self._live = live
        self.replicas = replicas
        self.settlement = settlement
        self._cut_bills: set[asyncio.Task[Any]] = set()  # streams whose client went away

    async def admit(
        self, caller: Caller, parsed: ParsedRequest, pref: Preference
    ) -> tuple[Candidates, float]:
        """The request's candidates and expected output tokens, once its budget allows it."""
        router = self._live().router
        expected = router.lengths.expected(
            caller.tenant, parsed.model, parsed.completion.max_tokens
        )
        cands = await router.candidates(parsed.prompt_estimate(), expected)
        await self.settlement.check_budget(caller.tenant, cands)
        return cands, expected

    async def start(
        self,
        request_id: str,
        parsed: ParsedRequest,
        cands: Candidates,
        pref: Preference,
        only: int | None = None,
    ) -> Started:
        """Send the request to the best replica, failing over until one answers (or gives
        its first stream item). ``only``: a planned job's replica, tried first."""
        router = self._live().router
        tried: set[int] = set()
        if only is not None:  # a planned job: its replica first, the others if it is down
            pref = replace(pref, regions=())
        while True:
            decision = router.decide(cands, pref, tried)
            i = decision.index
            if (
                only is not None
                and only not in tried
                and router.states[only].usable(time.monotonic())
            ):
                i = only
            replica = self.replicas[i]
            try:
                if not parsed.stream:
                    answer = await replica.complete(request_id, parsed.completion)
                    router.states[i].active += 1
                    return Started(i, decision, answer=answer)
                stream = replica.stream(request_id, parsed.completion)
                try:
                    first: StreamItem | None = await stream.__anext__()
                except StopAsyncIteration:
                    first = None
            except ReplicaFailed as e:
                log.warning("replica %s failed before the first byte: %s", decision.replica, e)
                router.failed(i)
                tried.add(i)
                continue
            router.states[i].active += 1
            return Started(i, decision, first=first, stream=stream)

    async def collect(
        self, started: Started, request_id: str, tenant: str, parsed: ParsedRequest
    ) -> Collected:
        """The whole answer and its bill."""
        router = self._live().router
        text: list[str] = []
        finish: str | None = None
        final: Final | None = None
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
        usage = await self.settlement.settle(request_id, tenant, started.index, final, parsed)
        return Collected("".join(text), finish or "stop", usage)

    async def relay(
        self, started: Started, request_id: str, tenant: str, parsed: ParsedRequest
    ) -> AsyncIterator[Chunk | Settled]:
        """The stream's chunks as they come, then its bill (:class:`Settled`). Closed or
        cancelled early (the client went away), it stops the replica and bills what was
        generated until then, by prediction: that energy was spent."""
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
        except (asyncio.CancelledError, GeneratorExit):
            cut = Final(parsed.prompt_estimate(), produced, begun, datetime.now(UTC))
            task = asyncio.get_running_loop().create_task(
                self.settlement.settle(request_id, tenant, started.index, cut, parsed)
            )
            self._cut_bills.add(task)
            task.add_done_callback(self._cut_bills.discard)
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:  # stop the upstream: the replica stops generating
                await aclose()
            raise
        finally:
            st.active -= 1
        yield Settled(
            await self.settlement.settle(request_id, tenant, started.index, final, parsed)
        )
