"""A backend with a power meter and an attributor: every request it runs is metered.

:class:`MeteredReplica` reads the meter at each request's start and end and every
``period_s`` while any request is active or its energy is not final yet, feeds the request's
timeline (start, prompt tokens, each output token, end) to a :class:`ReplicaAttributor`, and
resolves each request's :class:`Attributed` energy once its intervals are settled. It keeps
every reading, so a bill can be recomputed from raw readings. Plain asyncio: the Ray replica
deployment wraps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from regions.backends import Backend, CompletionRequest, TokenChunk
from regions.calibration import PREFILL_WEIGHT
from regions.meters import MeterReading, PowerMeter
from router.metering.attribution import Attributed, ReplicaAttributor

log = logging.getLogger(__name__)

MAX_UNCOLLECTED = 10_000


@dataclass
class RequestRecord:
    request_id: str
    prompt_tokens: int
    completion_tokens: int = 0
    start_s: float = 0.0
    first_token_s: float | None = None
    end_s: float | None = None
    finish_reason: str | None = None
    text: list[str] = field(default_factory=list)


class MeteredReplica:
    def __init__(
        self,
        name: str,
        backend: Backend,
        meter: PowerMeter,
        *,
        prefill_weight: float = PREFILL_WEIGHT,
        period_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        keep_readings: int = 100_000,
        on_attributed: Callable[[Attributed], None] | None = None,
    ) -> None:
        self.on_attributed = on_attributed
        # in-process backends run `slots` requests at once; remote servers batch themselves
        self._slots = asyncio.Semaphore(getattr(backend, "slots", None) or 1_000_000)
        self.name = name
        self.backend = backend
        self.meter = meter
        self.attributor = ReplicaAttributor(prefill_weight=prefill_weight)
        self.period_s = period_s
        self._clock = clock
        self._futures: dict[str, asyncio.Future[Attributed]] = {}
        self._active = 0
        self._waiting = 0  # requests waiting for a slot
        self._ticker: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.readings: list[MeterReading] = []
        self._keep = keep_readings
        self._read()

    @property
    def active(self) -> int:
        """Requests holding a slot: the running batch."""
        return self._active

    @property
    def waiting(self) -> int:
        """Requests waiting for a slot: the queue."""
        return self._waiting

    def _read(self) -> None:
        reading = self.meter.read()
        self.readings.append(reading)
        if len(self.readings) > self._keep:
            del self.readings[: len(self.readings) - self._keep]
        for done in self.attributor.reading(reading):
            fut = self._futures.get(done.request_id)
            if fut is not None and not fut.done():
                fut.set_result(done)
            if self.on_attributed is not None:
                self.on_attributed(done)
        if len(self._futures) > MAX_UNCOLLECTED:  # results nobody asked for: drop the oldest
            for rid in [k for k, f in self._futures.items() if f.done()][: MAX_UNCOLLECTED // 10]:
                del self._futures[rid]

    async def _tick(self) -> None:
        # reads while requests run, and after, until every request's energy is final (work
        # stamped with a reading's time at a request's start waits for a later reading: on a
        # coarse clock, one whole request can fall within one tick)
        while True:
            if self._active == 0 and not self.attributor.open_requests:
                self._wake.clear()
                await self._wake.wait()
            await asyncio.sleep(self.period_s)
            if self._active or self.attributor.open_requests:
                self._read()

    def _ensure_ticker(self) -> None:
        if self._ticker is None or self._ticker.done():
            self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def run(self, request_id: str, request: CompletionRequest) -> AsyncIterator[TokenChunk]:
        """Stream the completion; its energy is available from :meth:`energy` afterwards."""
        prompt_tokens = await self.backend.prompt_tokens(request)
        self._ensure_ticker()
        loop = asyncio.get_running_loop()
        self._futures[request_id] = loop.create_future()
        # a request starts using the hardware when it gets a slot, not when it arrives: time
        # spent queued must not carry its prefill work
        self._waiting += 1  # in the queue until it has a slot (or is cancelled waiting)
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        try:
            self._read()
            self.attributor.start(request_id, self._clock(), prompt_tokens)
            self._active += 1
            self._wake.set()
            try:
                async for chunk in self.backend.stream(request):
                    if chunk.n_tokens:
                        self.attributor.token(request_id, self._clock(), chunk.n_tokens)
                    yield chunk
            finally:
                self._active -= 1
                self.attributor.end(request_id, self._clock())
                self._read()
        finally:
            self._slots.release()

    async def energy(self, request_id: str, timeout_s: float = 30.0) -> Attributed:
        """The request's attributed energy (waits for other requests' prefills to settle)."""
        fut = self._futures.get(request_id)
        if fut is None:
            raise KeyError(f"request {request_id} unknown or already collected")
        result = await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        self._futures.pop(request_id, None)
        return result

    async def complete(self, request_id: str, request: CompletionRequest) -> RequestRecord:
        """Run a request to its end and collect its text and token timeline."""
        rec = RequestRecord(request_id, await self.backend.prompt_tokens(request))
        rec.start_s = self._clock()
        async for chunk in self.run(request_id, request):
            if chunk.n_tokens and rec.first_token_s is None:
                rec.first_token_s = self._clock()
            rec.completion_tokens += chunk.n_tokens
            rec.text.append(chunk.text)
            if chunk.finish_reason:
                rec.finish_reason = chunk.finish_reason
        rec.end_s = self._clock()
        return rec

    async def aclose(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self.meter.close()
