"""OpenTelemetry spans of the completion requests, and the W3C trace context sent upstream.

One span a request, from its first byte to its last (a stream's end, a client's hang-up or an
error), named and described after the GenAI semantic conventions (``{operation} {model}``,
``gen_ai.*``, ``server.*``, ``error.type``), with the router's own figures under
``carbon_router.*``: where it ran and why (region, replica, policy, the decision's binding
constraint), the grid's intensity, and its bill (kWh, g CO2e, USD, carbon avoided). Its kind is
CLIENT, as the conventions have it for a call to a model: the router calls one on the client's
behalf, failing over within the span. A client's ``traceparent`` is its parent; the span's own
context goes upstream with the request (:attr:`regions.backends.CompletionRequest.traceparent`),
so a remote server's spans are its children. A deferred job's run is a span of its own
(:meth:`Tracing.job`), found by ``carbon_router.job_id``.

What a span never carries: prompt or answer text, API keys, the tenant, and error messages
(which may quote the request); an error is its class (``error.type``) and the OpenAI error code.

Off (no tracer provider: the config has no ``telemetry`` block), :meth:`Tracing.request` is
``None`` and the request path does nothing else. The sampling decision is the provider's
(``sample_ratio``): a client's sampled flag never forces a span to be recorded, and an
unsampled request still sends its context upstream. Ending a span hands it to the provider's
processor; export happens on the processor's own thread (:mod:`router.service.telemetry`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry.trace import (
    NoOpTracerProvider,
    SpanKind,
    Status,
    StatusCode,
    TracerProvider,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from router.ledger import LedgerRow
    from router.policy import Candidates, Decision
    from router.service.ports import ParsedRequest, TraceContext
    from router.service.routing import ReplicaState

OPERATION = {True: "chat", False: "text_completion"}  # the GenAI operation of each endpoint
MAX_TRACESTATE = 512  # characters of a client's tracestate passed upstream
MAX_OPEN = 65536  # spans a bill may still find by request id; past it the oldest are forgotten
_W3C = TraceContextTextMapPropagator()  # traceparent and tracestate, never baggage


class Tracing:
    """Spans of requests from ``provider`` (``None``, or OpenTelemetry's no-op provider: off)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self.enabled = provider is not None and not isinstance(provider, NoOpTracerProvider)
        self.provider = provider
        self._tracer = (provider or NoOpTracerProvider()).get_tracer("carbon-router")
        self._open: dict[str, RequestSpan] = {}  # by request id, for the bill
        self._servers: dict[str, tuple[str, int] | None] = {}  # a replica's (host, port)

    def request(self, headers: Mapping[str, str], *, chat: bool) -> RequestSpan | None:
        """The span of a request that came with ``headers``: the child of the client's
        ``traceparent`` when it has a valid one, else the root of a trace. ``None``: off."""
        if not self.enabled:
            return None
        parent = _W3C.extract(headers)  # malformed: nothing extracted, a new trace
        return self._start(chat, parent, deferred=False)

    def job(self, job_id: str, *, chat: bool) -> RequestSpan | None:
        """The span of a deferred job's (or batch line's) run, the root of a trace."""
        if not self.enabled:
            return None
        span = self._start(chat, None, deferred=True)
        if span.recording:
            span.span.set_attribute("carbon_router.job_id", job_id)
        return span

    def _start(self, chat: bool, parent: Any, *, deferred: bool) -> RequestSpan:
        operation = OPERATION[chat]
        span = self._tracer.start_span(
            operation, context=parent, kind=SpanKind.CLIENT,
            attributes={"gen_ai.operation.name": operation, "carbon_router.deferred": deferred},
        )  # fmt: skip
        return RequestSpan(self, span, operation)

    def billed(self, row: LedgerRow) -> None:
        """A bill: its figures go on its request's span if that is still open (a stream cut
        by its client is billed after its span ended, and is found in the ledger)."""
        span = self._open.get(row.request_id)
        if span is not None:
            span.billed(row)

    def _track(self, request_id: str, span: RequestSpan) -> None:
        if len(self._open) >= MAX_OPEN:  # a span never ended: forget it, not the process
            del self._open[next(iter(self._open))]
        self._open[request_id] = span

    def server(self, st: ReplicaState) -> tuple[str, int] | None:
        """The (host, port) of a replica's remote server; ``None`` in process."""
        name = st.replica.name
        if name not in self._servers:
            url = getattr(st.replica.backend, "url", None)
            parts = urlsplit(url) if url else None
            self._servers[name] = (
                (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
                if parts is not None and parts.hostname
                else None
            )
        return self._servers[name]


class RequestSpan:
    """One request's span, told what happens to the request as it happens. Attributes are
    built only when the span is recorded (sampled)."""

    __slots__ = ("_tracing", "span", "recording", "operation", "request_id", "finish", "_ended")

    def __init__(self, tracing: Tracing, span: Span, operation: str) -> None:
        self._tracing = tracing
        self.span = span
        self.recording = span.is_recording()
        self.operation = operation
        self.request_id: str | None = None
        self.finish: str | None = None  # the last finish reason a stream gave
        self._ended = False

    def context(self) -> TraceContext | None:
        """This span's W3C ``(traceparent, tracestate)``, for the request to carry upstream
        (written as the W3C propagator writes them, at a third of its cost); ``None`` when the
        span has no valid context (the SDK disabled by ``OTEL_SDK_DISABLED``). A client's
        ``tracestate`` goes on in whole entries up to 512 characters, as W3C allows: 32 long
        entries would make a head some servers refuse."""
        ctx = self.span.get_span_context()
        if not ctx.is_valid:
            return None
        traceparent = f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"
        state = ctx.trace_state.to_header()
        if len(state) > MAX_TRACESTATE:
            state = state[: max(state.rfind(",", 0, MAX_TRACESTATE + 1), 0)]
        return traceparent, state or None

    def parsed(self, parsed: ParsedRequest) -> None:
        """The request as parsed (with :meth:`context`): the span is named after its model."""
        if self.recording:
            c = parsed.completion
            self.span.update_name(f"{self.operation} {parsed.model}")
            attrs: dict[str, Any] = {
                "gen_ai.request.model": parsed.model,
                "gen_ai.request.max_tokens": c.max_tokens,
                "gen_ai.request.temperature": c.temperature,
                "gen_ai.request.top_p": c.top_p,
                "carbon_router.stream": parsed.stream,
            }
            if c.seed is not None:
                attrs["gen_ai.request.seed"] = c.seed
            self.span.set_attributes(attrs)

    def routed(
        self,
        request_id: str,
        index: int,
        decision: Decision,
        st: ReplicaState,
        cands: Candidates,
        *,
        planned: bool = False,
    ) -> None:
        """Replica ``index`` (``st``) took the request: ``decision`` chose it or, ``planned``,
        a deferred job's plan did. Its bill, when it comes, lands here."""
        self.request_id = request_id
        self._tracing._track(request_id, self)
        if not self.recording:
            return
        backend = st.replica.backend
        attrs: dict[str, Any] = {
            "gen_ai.response.id": request_id,
            "gen_ai.response.model": backend.model,
            "gen_ai.provider.name": backend.kind,
            "carbon_router.region": st.region.name,
            "carbon_router.replica": st.replica.name,
            "carbon_router.policy": decision.policy,
            "carbon_router.binding": "planned" if planned else decision.binding,
            "carbon_router.intensity_g_per_kwh": float(cands.intensity_g_per_kwh[index]),
            "carbon_router.price_usd_per_kwh": float(cands.price_usd_per_kwh[index]),
        }
        if decision.estimated:
            attrs["carbon_router.estimated"] = list(decision.estimated)
        server = self._tracing.server(st)
        if server is not None:
            attrs["server.address"], attrs["server.port"] = server
        self.span.set_attributes(attrs)

    def deferred(self, job_id: str, region: str, replica: str, start_at: str) -> None:
        """The request became a job, to run at ``start_at`` (answered 202)."""
        if self.recording:
            self.span.set_attributes({
                "carbon_router.deferred": True, "carbon_router.job_id": job_id,
                "carbon_router.region": region, "carbon_router.replica": replica,
                "carbon_router.job_start_at": start_at,
            })  # fmt: skip

    def billed(self, row: LedgerRow) -> None:
        if not self.recording:
            return
        attrs: dict[str, Any] = {
            "gen_ai.usage.input_tokens": row.prompt_tokens,
            "gen_ai.usage.output_tokens": row.completion_tokens,
            "carbon_router.energy_kwh": row.kwh_billed,
            "carbon_router.carbon_g": row.carbon_g,
            "carbon_router.cost_usd": row.cost_usd,
            "carbon_router.intensity_g_per_kwh": row.intensity_g_per_kwh,
            "carbon_router.carbon_stale": row.carbon_stale,
        }
        avoided = getattr(row, "avoided_g", None)  # the receipts' counterfactual, when billed
        if avoided is not None:
            attrs["carbon_router.carbon_avoided_g"] = float(avoided)
        self.span.set_attributes(attrs)

    def answered(self, usage: Mapping[str, Any], finish_reason: str | None) -> None:
        """The request's answer ended: the ``usage`` its client got (``energy_source`` as the
        client was told it: ``predicted`` when the replica bills the measurement later)."""
        if self.recording:
            attrs: dict[str, Any] = {"carbon_router.energy_source": usage["energy_source"]}
            if finish_reason is not None:
                attrs["gen_ai.response.finish_reasons"] = [finish_reason]
            self.span.set_attributes(attrs)

    def failed(self, e: BaseException, status: int | None = None, code: str | None = None) -> None:
        """The request ended with ``e``, answered (if it was a client's) as HTTP ``status``
        with OpenAI's error ``code``. A cancellation is the client going away, not an error
        (:meth:`hung_up`)."""
        if isinstance(e, asyncio.CancelledError):
            self.hung_up()
            return
        kind = type(e)
        if self.recording:
            attrs: dict[str, Any] = {"error.type": f"{kind.__module__}.{kind.__qualname__}"}
            if status is not None:
                attrs["http.response.status_code"] = status
            self.span.set_attributes(attrs)
        # the code or the class, never the message: messages may quote the request
        self.span.set_status(Status(StatusCode.ERROR, code or kind.__name__))

    def hung_up(self) -> None:
        """The client went away before the answer ended: billed for what was made (the bill
        follows on its own task, after the span)."""
        if self.recording:
            self.span.set_attribute("carbon_router.client_hung_up", True)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        if self.request_id is not None:
            self._tracing._open.pop(self.request_id, None)
        self.span.end()
