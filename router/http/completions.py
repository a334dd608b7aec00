"""The completion endpoints: one request from its body to its answer, whole or as server-sent
events. :class:`router.http.app.FastRoutes` calls :func:`answer_completion`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
from starlette.responses import Response

from router.http.errors import JSONResponse, error_parts, error_status
from router.http.wire import SSE_DONE, EventStream, completion_body, parse_body, sse_event
from router.service.app import RouterService
from router.service.completions import Settled, StreamFailed
from router.service.ports import Chunk, ParsedRequest
from router.service.tracing import RequestSpan


async def answer_completion(
    svc: RouterService, raw: bytes, headers: Mapping[str, str], *, chat: bool
) -> Response:
    """One completion request, from its body to its answer (202 when it is deferred). Its span
    (when tracing is on) ends here, or with its stream; a refused request is counted by its
    status."""
    span = svc.tracing.request(headers, chat=chat)  # None: tracing is off
    try:
        response = await _answer(svc, raw, headers, chat, span)
    except Exception as e:
        status, code = error_status(e)
        svc.metrics.refused(status)
        if span is not None:
            span.failed(e, status, code)
            span.end()
        raise
    except BaseException:  # cancelled: the client went away (its bill is on its way)
        if span is not None:
            span.hung_up()
            span.end()
        raise
    if span is not None and not isinstance(response, EventStream):
        span.end()  # a stream's span ends with the stream
    return response


async def _answer(
    svc: RouterService,
    raw: bytes,
    headers: Mapping[str, str],
    chat: bool,
    span: RequestSpan | None,
) -> Response:
    t0 = time.perf_counter()
    caller = svc.authenticate(headers.get("authorization"))
    # with the span's context, which goes upstream with the request
    parsed = parse_body(raw, chat=chat, trace=span.context() if span is not None else None)
    if span is not None:
        span.parsed(parsed)
    svc.check_model(parsed.model)
    router = svc.live.router
    pref = router.preference(headers.get("x-carbon-preference"))
    admitted = await svc.completions.admit(caller, parsed)
    cands, hold = admitted.cands, admitted.hold
    if pref.defer_s > 0 and not parsed.stream:
        try:
            job = await svc.deferral.maybe_defer(
                raw,
                caller.tenant,
                parsed,
                pref,
                cands,
                admitted.expected_tokens,
                header=headers.get("x-carbon-preference"),
            )
        except BaseException:
            svc.settlement.release(hold)
            raise
        if job is not None:  # it holds its budget when it runs
            svc.settlement.release(hold)
            if span is not None:
                span.deferred(job.id, job.region, job.replica, job.start_at)
            location = {"Location": f"/v1/jobs/{job.id}"}
            return JSONResponse(job.public(), status_code=202, headers=location)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    started = await svc.completions.start(request_id, caller.tenant, parsed, cands, pref, hold=hold)
    st = router.states[started.index]
    if span is not None:
        span.routed(request_id, started.index, started.decision, st, cands)
    out = {
        "X-Carbon-Region": st.region.name,
        "X-Carbon-Replica": st.replica.name,
        "X-Carbon-Policy": started.decision.policy,
        "X-Carbon-Binding": started.decision.binding,
    }
    if started.decision.note:
        out["X-Carbon-Note"] = started.decision.note
    if started.decision.estimated:  # figures the decision had only estimates of
        out["X-Carbon-Estimated"] = ", ".join(started.decision.estimated)
    created = int(time.time())
    if parsed.stream:
        svc.metrics.latency.observe(time.perf_counter() - t0)  # to the first chunk
        items = svc.completions.relay(started, request_id, caller.tenant, parsed)

        async def abandoned() -> None:  # the client was gone before the response began
            try:
                await svc.completions.abandon(started, request_id, caller.tenant, parsed)
            finally:
                if span is not None:
                    span.hung_up()
                    span.end()

        events = sse_events(items, request_id, parsed, created, span=span)
        return EventStream(events, out, abandoned)
    done = await svc.completions.collect(started, request_id, caller.tenant, parsed)
    body = completion_body(request_id, parsed, done.text, done.finish_reason, done.usage, created)
    usage = done.usage
    out["X-Energy-kWh"] = f"{usage['energy_kwh']:.6e}"
    out["X-Carbon-g"] = f"{usage['carbon_g']:.6e}"
    svc.metrics.latency.observe(time.perf_counter() - t0)
    if span is not None:
        span.answered(usage, done.finish_reason)
    return JSONResponse(body, headers=out)


async def sse_events(
    items: AsyncIterator[Chunk | Settled | StreamFailed],
    request_id: str,
    parsed: ParsedRequest,
    created: int,
    *,
    span: RequestSpan | None = None,
) -> AsyncIterator[bytes]:
    """A relayed stream as server-sent events. What arrived together leaves in one write, and
    a chunk the upstream ended the stream with leaves with the usage event and ``[DONE]``.
    Closing this closes the relay (which bills a cut stream and stops its replica), and ends
    the request's ``span``: a stream closed before its end was cut by its client."""
    obj = "chat.completion.chunk" if parsed.chat else "text_completion"
    held = b""  # the last chunk, sent with the end (which follows it without waiting)
    ended = False
    try:
        async for item in items:
            if isinstance(item, StreamFailed):  # the replica failed after the first byte
                _, body, _ = error_parts(item.error)
                ended = True
                if span is not None:  # answered 200 already: the code, not a status
                    span.failed(item.error, code=error_status(item.error)[1])
                yield held + b"data: " + orjson.dumps(body) + b"\n\n"
                return
            if isinstance(item, Settled):
                ended = True
                if span is not None:
                    span.answered(item.usage, span.finish)
                end = SSE_DONE
                if parsed.include_usage:
                    usage = sse_event(
                        request_id, obj, created, parsed.model, choices=[], usage=item.usage
                    )
                    end = usage + end
                yield held + end
                return
            out = [held]
            for text, finish in item.pieces:
                if finish is not None and span is not None:
                    span.finish = finish
                choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
                if parsed.chat:
                    choice["delta"] = {"content": text}
                else:
                    choice["text"] = text
                out.append(sse_event(request_id, obj, created, parsed.model, choices=[choice]))
            held = b"".join(out)
            if not item.last:
                yield held
                held = b""
    finally:
        try:
            await items.aclose()  # type: ignore[attr-defined]
        finally:
            if span is not None:
                if not ended:
                    span.hung_up()
                span.end()
