"""Fakes of the request path's seams, shipped so that failover, cut streams, deferral and
batches are tested in milliseconds without Ray. Each implements the real interface.

- :class:`FakeReplicaClient`: a scripted replica (its answer, its energy, and how it fails);
- :class:`FakeLoadSource`: a replica's scripted load reports (and how its endpoint fails);
- :class:`StaticCarbonSource`: fixed intensities per zone, with an hourly forecast profile;
- :class:`LedgerSink`: a real SQLite :class:`router.ledger.Ledger` as both the bill sink and
  the ledger reader, written synchronously (no metering actor).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from forecasting.errors import CarbonSourceError
from forecasting.sources.base import CarbonSource, Forecast, Intensity
from regions.backends import CompletionRequest
from router.errors import LoadUnavailable, ReplicaFailed, UpstreamRefused
from router.ledger import Ledger, LedgerRow
from router.receipts import head_view
from router.service.ports import (
    Answer,
    Chunk,
    Final,
    LoadReport,
    StreamItem,
    UsageQuery,
    receipt_answer,
    usage_answer,
)

Failure = Literal["down", "refuse", "die_mid_stream"]


class FakeReplicaClient:
    """Answers ``words`` (one chunk per word, streamed), counting ``prompt_tokens`` and one
    token per word, with ``energy_j`` metered (``None``: not metered). ``fail``: ``down``
    raises :class:`ReplicaFailed` before any output, ``refuse`` raises
    :class:`UpstreamRefused` (the server's 4xx), ``die_mid_stream`` fails after the first
    chunk. ``delay_s`` is waited before each chunk, and ``gate`` (when given) must be set before
    any output. It records what it was asked
    (``calls``) and which streams were closed before their end (``closed``)."""

    def __init__(
        self,
        name: str,
        *,
        words: Sequence[str] = ("Hello", " from", " a", " fake", " replica."),
        prompt_tokens: int = 12,
        energy_j: float | None = 40.0,
        fail: Failure | None = None,
        delay_s: float = 0.0,
        gate: asyncio.Event | None = None,
        bills_remotely: bool = False,
    ) -> None:
        self.name = name
        self.words = list(words)
        self.prompt_tokens = prompt_tokens
        self.energy_j = energy_j
        self.fail = fail
        self.delay_s = delay_s
        self.gate = gate
        self.bills_remotely = bills_remotely
        self.calls: list[str] = []
        self.closed: list[str] = []

    async def _begin(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail == "down":
            raise ReplicaFailed("connection refused", replica=self.name)
        if self.fail == "refuse":
            raise UpstreamRefused(f"replica {self.name}: HTTP 400: prompt too long")

    def _final(self, started: datetime, n: int) -> Final:
        source = "measured" if self.energy_j is not None else "predicted"
        return Final(self.prompt_tokens, n, started, datetime.now(UTC), self.energy_j, source)

    async def complete(self, request_id: str, request: CompletionRequest) -> Answer:
        self.calls.append(request_id)
        started = datetime.now(UTC)
        await self._begin()
        words = self.words[: request.max_tokens]
        await asyncio.sleep(self.delay_s * len(words))
        return Answer("".join(words), "stop", self._final(started, len(words)))

    async def stream(
        self, request_id: str, request: CompletionRequest
    ) -> AsyncIterator[StreamItem]:
        self.calls.append(request_id)
        started = datetime.now(UTC)
        await self._begin()
        words = self.words[: request.max_tokens]
        ended = False
        try:
            for k, word in enumerate(words):
                await asyncio.sleep(self.delay_s)
                if k == 1 and self.fail == "die_mid_stream":
                    raise ReplicaFailed("connection dropped mid-stream", replica=self.name)
                yield Chunk(((word, "stop" if k == len(words) - 1 else None),))
            ended = True
        finally:
            if not ended:
                self.closed.append(request_id)
        yield self._final(started, len(words))


class FakeLoadSource:
    """Reports ``running`` and ``waiting`` as they are set. ``fail``: ``down`` raises
    :class:`LoadUnavailable` (an endpoint that answers no load), ``hang`` never answers (its
    caller's timeout ends the read). ``reads`` counts the reads asked for."""

    def __init__(
        self,
        name: str,
        *,
        running: int = 0,
        waiting: int = 0,
        fail: Literal["down", "hang"] | None = None,
    ) -> None:
        self.name = name
        self.running = running
        self.waiting = waiting
        self.fail = fail
        self.reads = 0

    async def read(self) -> LoadReport:
        self.reads += 1
        if self.fail == "hang":
            await asyncio.Event().wait()
        if self.fail == "down":
            raise LoadUnavailable("its load endpoint answers no load", replica=self.name)
        return LoadReport(self.running, self.waiting)


class StaticCarbonSource(CarbonSource):
    """Fixed intensities per zone (g/kWh). ``profile`` multiplies the value by hour from now in
    forecasts (e.g. ``[1.0, 0.5]``: half as dirty from the next hour on). ``upper``, when given,
    does the same for the forecast's 90 % quantile (its q10 is 0.9 x the median), so the
    forecast has a band; without it the forecast is a point, as an API's. A zone it does not
    know fails like a real source: :class:`CarbonSourceError`, never 0 g/kWh."""

    signal = "average"

    def __init__(
        self,
        g_per_kwh: dict[str, float],
        *,
        profile: Sequence[float] = (1.0,),
        upper: Sequence[float] | None = None,
        name: str = "static",
    ) -> None:
        self.name = name
        self.values = dict(g_per_kwh)
        self.profile = list(profile)
        self.upper = None if upper is None else list(upper)

    def _value(self, zone: str) -> float:
        if zone not in self.values:
            raise CarbonSourceError("no such zone in this static source", source=self.name,
                                    zone=zone)  # fmt: skip
        return self.values[zone]

    async def latest(self, zone: str) -> Intensity:
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        return Intensity(zone, now, self._value(zone), "average", self.name)

    async def history(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        index = pd.date_range(start, end, freq="h", inclusive="left", tz=UTC)
        return pd.Series(self._value(zone), index=index, dtype=float)

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        hour0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        value = self._value(zone)
        times = [hour0 + timedelta(hours=k) for k in range(horizon_h)]
        factors = [self.profile[min(k, len(self.profile) - 1)] for k in range(horizon_h)]
        series = pd.Series([value * f for f in factors], index=pd.DatetimeIndex(times))
        band = None
        if self.upper is not None:
            up = [value * self.upper[min(k, len(self.upper) - 1)] for k in range(horizon_h)]
            band = pd.DataFrame(
                {0.1: series.to_numpy() * 0.9, 0.5: series.to_numpy(), 0.9: up},
                index=series.index,
            )
        return Forecast(zone, hour0, series, "average", self.name, quantiles=band)


class LedgerSink:
    """A real ledger as the bill sink and the ledger reader, written at once."""

    def __init__(self, path: str | Path) -> None:
        self.ledger = Ledger(path)

    def add(self, row: dict[str, Any]) -> None:
        self.ledger.write([LedgerRow(**row)])

    async def flush(self, timeout_s: float = 30.0) -> None:
        return None

    def dead_letters(self) -> list[dict[str, Any]]:
        return []  # a row the ledger refuses raises at add(): the test sees it

    async def usage(self, tenant: str | None, query: UsageQuery) -> dict[str, Any]:
        return usage_answer(self.ledger, tenant, query)

    async def spend(self, tenant: str, since: datetime) -> tuple[float, float, float]:
        return self.ledger.spend(tenant, since)

    async def refit_rows(self, replica: str) -> list[tuple[int, int, float]]:
        return self.ledger.measured_rows(replica)

    async def receipt(self, tenant: str | None, request_id: str) -> dict[str, Any] | None:
        return receipt_answer(self.ledger, tenant, request_id)

    async def receipt_head(self, tenant: str) -> dict[str, Any]:
        return head_view(self.ledger, tenant)

    async def hourly(
        self, start: datetime, end: datetime, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        return self.ledger.hourly(start, end, tenant)

    async def top_tenants(self, start: datetime, end: datetime, limit: int) -> list[dict[str, Any]]:
        return self.ledger.top_tenants(start, end, limit)

    async def bill(self, request_id: str) -> LedgerRow | None:
        return self.ledger.get(request_id)
