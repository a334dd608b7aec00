"""The seams of the request path, and the typed values that cross them.

``ReplicaClient``: runs one completion on one replica. Two ways in:

- ``complete(request_id, request)``: the whole answer (:class:`Answer`) in one call;
- ``stream(request_id, request)``: an async iterator of :class:`Chunk` items (the pieces that
  arrived together, in order) ending with exactly one :class:`Final`. Closing the iterator
  early (``aclose``) stops the generation on the replica.

Both raise :class:`router.errors.ReplicaFailed` for the replica's own failures (the caller
cools it down and, before the first byte reached the client, fails over) and
:class:`router.errors.UpstreamRefused` when the replica's server refuses the request as
invalid (the client's 400; no cooldown, no failover). Nothing else is expected from them.

``bills_remotely``: the replica's measured bill reaches the ledger from the replica itself
(a proxied server metered on its node, :mod:`router.service.proxied`); the ingress then hands
the predicted bill to that replica instead of its own outbox.

``LoadSource``: a replica's load as it reports it (:class:`LoadReport`: its running batch and
its queue), read in the background by :class:`router.service.load.LoadPoller`, never on the
request path.

``BillSink``: where billed rows go (the spooled outbox to the metering actor).
``LedgerReader``: what the request path reads back from the ledger.
``Wire``: the request and answer format (OpenAI's, :mod:`router.http.wire`), for the work the
service stores and runs later (deferred jobs, batch lines).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from regions.backends import CompletionRequest
from router.ledger import Ledger, LedgerRow

Piece = tuple[str, str | None]  # (text, finish_reason)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Output that arrived together. ``last``: the upstream ended the stream in the same read
    (the :class:`Final` follows at once, so a proxy may send its end in the same write)."""

    pieces: tuple[Piece, ...]
    last: bool = False


@dataclass(frozen=True, slots=True)
class Final:
    """How a completion ended: token counts, times (UTC) and, when metered in time, its
    energy. ``energy_j`` is ``None`` when no measurement is available: the bill then uses
    the energy predictor's figure and says so (``estimated``)."""

    prompt_tokens: int
    completion_tokens: int
    started_at: datetime
    ended_at: datetime
    energy_j: float | None = None
    energy_source: str = "predicted"
    # from the meter's attribution with energy_j (router.metering.attribution.Attributed):
    # the prompt's share of it, and the replica seconds the request held
    prefill_j: float | None = None
    held_s: float | None = None
    first_token_at: datetime | None = None  # when the replica saw its first output token


StreamItem = Chunk | Final


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole (non-streamed) completion."""

    text: str
    finish_reason: str | None
    final: Final


class ReplicaClient(Protocol):
    name: str
    bills_remotely: bool

    async def complete(self, request_id: str, request: CompletionRequest) -> Answer: ...

    def stream(self, request_id: str, request: CompletionRequest) -> AsyncIterator[StreamItem]: ...


@dataclass(frozen=True, slots=True)
class LoadReport:
    """A replica's load as it reported it: ``running`` sequences in its batch, ``waiting``
    requests queued for a slot (whole requests, >= 0)."""

    running: int
    waiting: int


class LoadSource(Protocol):
    name: str  # the replica's

    async def read(self) -> LoadReport:
        """The replica's load now. Raises :class:`router.errors.LoadUnavailable` when it cannot
        say; it may also hang: its caller bounds the wait."""
        ...


class BillSink(Protocol):
    def add(self, row: dict[str, Any]) -> None:
        """Take one billed row (a :class:`router.ledger.LedgerRow` as a dict); durable soon."""

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Return once every row added before the call is in the ledger (or set aside)."""

    def dead_letters(self) -> list[dict[str, Any]]:
        """Rows the ledger refused for good, set aside so the rest keep flowing."""


@dataclass(frozen=True)
class UsageQuery:
    """Which usage rows: started in ``[start, end)``, ``limit`` of them after ``after``."""

    start: datetime | None = None
    end: datetime | None = None
    limit: int = 100
    after: str | None = None


def receipt_answer(ledger: Ledger, tenant: str | None, request_id: str) -> dict[str, Any] | None:
    """A :class:`router.ledger.Ledger`'s receipt as :meth:`LedgerReader.receipt` returns it."""
    from router.receipts import receipt_view

    found = ledger.receipt(request_id, tenant)
    return None if found is None else receipt_view(found)


def usage_answer(ledger: Ledger, tenant: str | None, query: UsageQuery) -> dict[str, Any]:
    """A :class:`router.ledger.Ledger`'s page as :meth:`LedgerReader.usage` returns it."""
    page = ledger.usage_page(
        tenant, start=query.start, end=query.end, limit=query.limit, after=query.after
    )
    data = [r.__dict__ for r in page.rows]
    return {"data": data, "totals": page.totals, "has_more": page.has_more}


class LedgerReader(Protocol):
    async def usage(self, tenant: str | None, query: UsageQuery) -> dict[str, Any]:
        """One page of ``tenant``'s ledger rows (None: everyone's): ``data`` (rows as dicts),
        ``totals`` over the period (requests, kwh, carbon_g, cost_usd) and ``has_more``."""

    async def spend(self, tenant: str, since: datetime) -> tuple[float, float, float]:
        """``tenant``'s billed (kWh, g CO2e, USD) since ``since``."""

    async def refit_rows(self, replica: str) -> list[tuple[int, int, float]]:
        """``(prompt tokens, completion tokens, measured J)`` of ``replica``'s metered rows."""

    async def receipt(self, tenant: str | None, request_id: str) -> dict[str, Any] | None:
        """The receipt of ``request_id`` (:func:`router.receipts.receipt_view`), ``tenant``'s
        only (None: anyone's), or None."""

    async def receipt_head(self, tenant: str) -> dict[str, Any]:
        """``tenant``'s chain head and its latest signed head
        (:func:`router.receipts.head_view`)."""

    async def hourly(
        self, start: datetime, end: datetime, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Sums per UTC hour, region and binding constraint of the rows started in the whole
        hours ``[start, end)`` (``tenant``'s, None: everyone's): :meth:`Ledger.hourly`."""

    async def top_tenants(self, start: datetime, end: datetime, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` tenants that used most kWh in those hours: :meth:`Ledger.top_tenants`."""

    async def bill(self, request_id: str) -> LedgerRow | None:
        """The ledger's row of ``request_id``, or None while it has none."""


@dataclass(frozen=True)
class ParsedRequest:
    """A completion request as the service sees it, whatever its wire format."""

    model: str
    stream: bool
    include_usage: bool
    completion: CompletionRequest
    chat: bool

    def prompt_estimate(self) -> int:
        """Prompt tokens before a server has counted them: 4 characters a token."""
        req = self.completion
        chars = sum(len(m["content"]) for m in req.messages or []) or len(req.prompt or "")
        return chars // 4


TraceContext = tuple[str, str | None]  # a span's W3C (traceparent, tracestate)


class Wire(Protocol):
    def parse(self, raw: bytes, *, chat: bool, trace: TraceContext | None = None) -> ParsedRequest:
        """A request body, validated; :class:`router.errors.RequestError` names the field.
        ``trace``: the context its replica is called with (regions.backends.CompletionRequest)."""

    def body(
        self, request_id: str, parsed: ParsedRequest, text: str, finish_reason: str,
        usage: dict[str, Any], created: int,
    ) -> dict[str, Any]:  # fmt: skip
        """The whole answer as the client gets it."""
