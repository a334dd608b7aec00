"""Replicas behind an OpenAI-compatible URL (vLLM, TGI, llama.cpp server), called by the
ingress itself, and their metering.

The ingress talks to the server directly (one actor hop less than going through the replica's
deployment). The replica's deployment, on the region's node, still owns the meter: it gets each
request's timeline (:class:`router.metering.remote.MeterEvent`: start, output tokens as they
stream, end) and, when the request ends, its predicted bill as a template. It attributes its
meter's readings to the timelines (:class:`router.metering.remote.RemoteAttribution`), prices
the measurement from the template and writes the bill to the ledger itself.

:class:`ProxiedMetering` gathers timelines and bills per replica and hands them over on every
``send`` (the Ray adapter calls it every 100 ms). A bill whose measurement does not come back
within ``AwaitingBills.timeout_s`` is billed as predicted (``estimated``) through the sink, so
a request is billed once whether its replica is up or not.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from regions.backends import BackendError, BackendRefused, CompletionRequest
from regions.openai_backend import OpenAIBackend, estimate_tokens
from router.errors import ReplicaFailed, UpstreamRefused
from router.metering.remote import AwaitingBills, MeterEvent, timeline
from router.service.ports import Answer, BillSink, Chunk, Final, StreamItem

log = logging.getLogger(__name__)

# send(replica index, Batch) -> request ids whose measured bill reached the ledger since the
# last call
SendTimelines = Callable[[int, "TimelineBatch"], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class TimelineBatch:
    """What one ingress sends one metering replica every period. ``seq`` counts up by one per
    batch from ``sender``: a gap tells the replica a batch was lost (its requests' ends with
    it; they expire there, and are billed by prediction here)."""

    sender: str
    seq: int
    events: list[MeterEvent]
    bills: dict[str, dict[str, Any]]


class ProxiedMetering:
    """Timelines and predicted bills of proxied requests, per replica index, until sent."""

    def __init__(
        self, replicas: Iterable[int], sink: BillSink, awaiting: AwaitingBills | None = None
    ) -> None:
        self.replicas = list(replicas)
        self.sink = sink
        self.awaiting = awaiting if awaiting is not None else AwaitingBills(timeout_s=30.0)
        self._events: dict[int, list[MeterEvent]] = {i: [] for i in self.replicas}
        self._bills: dict[int, dict[str, dict[str, Any]]] = {i: {} for i in self.replicas}
        # output tokens seen since the last send, merged per request: (last time, count)
        self._tokens: dict[int, dict[str, tuple[float, int]]] = {i: {} for i in self.replicas}
        self.sender = uuid.uuid4().hex[:12]
        self._seq = dict.fromkeys(self.replicas, 0)

    def started(self, i: int, request_id: str, t_s: float, prompt_tokens: int) -> None:
        self._events[i].append(MeterEvent("start", request_id, t_s, prompt_tokens))

    def tokens(self, i: int, request_id: str, n: int) -> None:
        tokens = self._tokens[i]  # swapped out at each send
        pending = tokens.get(request_id)
        tokens[request_id] = (time.time(), n + (pending[1] if pending else 0))

    def ended(self, i: int, request_id: str) -> None:
        pending = self._tokens[i].pop(request_id, None)
        if pending:
            self._events[i].append(MeterEvent("tokens", request_id, pending[0], pending[1]))
        self._events[i].append(MeterEvent("end", request_id, time.time(), 0))

    def whole(self, i: int, request_id: str, start_s: float, end_s: float, prompt: int,
              completion: int) -> None:  # fmt: skip
        """A request whose tokens were not seen one by one (a non-streamed answer)."""
        self._events[i] += timeline(request_id, start_s, end_s, prompt, completion)

    def expect(
        self, i: int, row: dict[str, Any], billing_json: str, rates: dict[str, float] | None = None
    ) -> None:
        """Hand ``row`` (the predicted bill) to replica ``i`` to be priced from its measurement;
        it is billed as it is if no measurement comes back in time. ``rates``: the receipt's
        per-unit figures (:meth:`router.service.routing.Router.receipt_rates`) the measured
        receipt is computed with."""
        self.awaiting.add(row)
        self._bills[i][row["request_id"]] = {**row, "billing": billing_json, "rates": rates}

    def waiting(self, tenant: str | None) -> set[str]:
        """The answered requests (``tenant``'s) whose measured bill has not come yet."""
        return self.awaiting.waiting(tenant)

    def still_waiting(self, request_ids: set[str]) -> bool:
        return self.awaiting.any_of(request_ids)

    async def send(self, send_one: SendTimelines) -> None:
        """Send every replica what gathered since the last call; bill by prediction what was
        not measured in time."""

        async def one(i: int) -> None:
            tokens, self._tokens[i] = self._tokens[i], {}
            self._events[i] += [MeterEvent("tokens", rid, t, n) for rid, (t, n) in tokens.items()]
            events, self._events[i] = self._events[i], []
            bills, self._bills[i] = self._bills[i], {}
            if not events and not bills:
                return
            self._seq[i] += 1
            batch = TimelineBatch(self.sender, self._seq[i], events, bills)
            try:
                self.awaiting.measured(await send_one(i, batch))
            except Exception as e:  # its bills fall back to the prediction at the deadline
                log.warning("replica %s did not take its timelines: %s", i, e)

        await asyncio.gather(*(one(i) for i in self.replicas))
        for row in self.awaiting.expired():
            log.warning("no measured bill for %s: billing its prediction", row["request_id"])
            self.sink.add(row)


class ProxiedReplica:
    """A :class:`router.service.ports.ReplicaClient` for a remote OpenAI-compatible server,
    called from the ingress; the replica's deployment meters it from the timelines."""

    bills_remotely = True

    def __init__(
        self, index: int, name: str, backend: OpenAIBackend, metering: ProxiedMetering
    ) -> None:
        self.index = index
        self.name = name
        self.backend = backend
        self.metering = metering

    def _failed(self, e: BackendError) -> ReplicaFailed | UpstreamRefused:
        """The replica's failure, or the client's (its server refused the request)."""
        if isinstance(e, BackendRefused):
            return UpstreamRefused(f"replica {self.name} refused the request: {e}")
        return ReplicaFailed(str(e), replica=self.name)

    async def complete(self, request_id: str, request: CompletionRequest) -> Answer:
        """One non-streamed call: the server counts the tokens (where it reports none, they
        are estimated from the text, as for a stream); they are spread evenly over its
        duration on the timeline."""
        started, wall0 = datetime.now(UTC), time.time()
        try:
            ans = await self.backend.answer(request)
        except BackendError as e:
            raise self._failed(e) from e
        wall1 = time.time()
        prompt = ans.prompt_tokens
        if prompt is None:
            prompt = await self.backend.prompt_tokens(request)
        completion = ans.completion_tokens
        if completion is None:
            completion = estimate_tokens(ans.text)
        self.metering.whole(self.index, request_id, wall0, wall1, prompt, completion)
        final = Final(prompt, completion, started, datetime.now(UTC))
        return Answer(ans.text, ans.finish_reason, final)

    async def stream(
        self, request_id: str, request: CompletionRequest
    ) -> AsyncIterator[StreamItem]:
        """The server's stream. Its :class:`Final` has the token counts the server reported at
        the end (its usage event, asked for unless the backend's ``stream_usage`` is off);
        where it reported none, or nonsense, they are estimated from the text, the prompt's
        and the answer's, exactly as for the same answer whole
        (:func:`regions.openai_backend.estimate_tokens`): the same request bills the same
        tokens streamed or not. The timeline counts one token a chunk (its start is sent
        before the server has counted anything): it only splits the meter's readings between
        requests. A stream cut before its end has no Final; the caller bills it by estimate."""
        i, metering = self.index, self.metering
        started, wall0 = datetime.now(UTC), time.time()
        prompt = await self.backend.prompt_tokens(request)  # an estimate
        begun, text = False, list[str]()  # the answer's text, for its estimate
        reported: tuple[int | None, int | None] = (None, None)  # the server's (prompt, completion)
        try:
            async for batch in self.backend.stream_batches(request):
                if not begun:
                    metering.started(i, request_id, wall0, prompt)
                    begun = True
                if n_batch := sum(c.n_tokens for c in batch.chunks):  # merged until the next send
                    metering.tokens(i, request_id, n_batch)
                text += (c.text for c in batch.chunks)
                if batch.last:
                    reported = batch.prompt_tokens, batch.completion_tokens
                # what arrived together leaves together: one write for the whole batch (with
                # the end of the stream too when the server ended it in that read)
                yield Chunk(tuple((c.text, c.finish_reason) for c in batch.chunks), batch.last)
        except BackendError as e:
            raise self._failed(e) from e
        finally:
            if begun:
                metering.ended(i, request_id)
        server_prompt, server_completion = reported
        yield Final(
            prompt if server_prompt is None else server_prompt,
            estimate_tokens("".join(text)) if server_completion is None else server_completion,
            started,
            datetime.now(UTC),
        )
