"""The ASGI front: the OpenAI-compatible endpoints over a :class:`RouterService`.

``make_api()`` builds the FastAPI app; whoever runs it puts the service on
``app.state.service`` (the Ray ingress does, and so do the unit tests, with fakes). The two
completion endpoints are answered by :class:`FastRoutes`, a pure ASGI layer outside FastAPI's
middleware and routing (about 20 % of the ingress's CPU per request); they are declared to
FastAPI too, for ``/docs``. Auth is one dependency; every error, from any endpoint, becomes an
OpenAI-style error through one table (:mod:`router.http.errors`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers

from carbonrouter.errors import CarbonRouterError
from router.errors import BodyTooLarge, RequestError
from router.http.errors import JSONResponse, error_parts, error_response
from router.http.wire import (
    MAX_BODY_BYTES,
    SSE_DONE,
    EventStream,
    completion_body,
    parse_body,
    read_capped,
    sse_event,
)
from router.service.app import RouterService
from router.service.batches import MAX_FILE_BYTES
from router.service.completions import Settled, StreamFailed
from router.service.ports import Chunk, ParsedRequest, UsageQuery
from router.service.tenants import Caller

log = logging.getLogger(__name__)


def service_of(request: Request) -> RouterService:
    svc: RouterService = request.app.state.service
    return svc


async def authenticated(request: Request) -> Caller:
    return service_of(request).authenticate(request.headers.get("authorization"))


Auth = Annotated[Caller, Depends(authenticated)]


async def answer_completion(
    svc: RouterService, raw: bytes, headers: Mapping[str, str], *, chat: bool
) -> Response:
    """One completion request, from its body to its answer (202 when it is deferred)."""
    t0 = time.perf_counter()
    caller = svc.authenticate(headers.get("authorization"))
    parsed = parse_body(raw, chat=chat)
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
            location = {"Location": f"/v1/jobs/{job.id}"}
            return JSONResponse(job.public(), status_code=202, headers=location)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    started = await svc.completions.start(request_id, caller.tenant, parsed, cands, pref, hold=hold)
    st = router.states[started.index]
    out = {
        "X-Carbon-Region": st.region.name,
        "X-Carbon-Replica": st.replica.name,
        "X-Carbon-Policy": started.decision.policy,
        "X-Carbon-Binding": started.decision.binding,
    }
    if started.decision.note:
        out["X-Carbon-Note"] = started.decision.note
    created = int(time.time())
    if parsed.stream:
        svc.metrics.latency.observe(time.perf_counter() - t0)  # to the first chunk
        items = svc.completions.relay(started, request_id, caller.tenant, parsed)
        return EventStream(sse_events(items, request_id, parsed, created), out)
    done = await svc.completions.collect(started, request_id, caller.tenant, parsed)
    body = completion_body(request_id, parsed, done.text, done.finish_reason, done.usage, created)
    usage = done.usage
    out["X-Energy-kWh"] = f"{usage['energy_kwh']:.6e}"
    out["X-Carbon-g"] = f"{usage['carbon_g']:.6e}"
    svc.metrics.latency.observe(time.perf_counter() - t0)
    return JSONResponse(body, headers=out)


async def sse_events(
    items: AsyncIterator[Chunk | Settled | StreamFailed],
    request_id: str,
    parsed: ParsedRequest,
    created: int,
) -> AsyncIterator[bytes]:
    """A relayed stream as server-sent events. What arrived together leaves in one write, and
    a chunk the upstream ended the stream with leaves with the usage event and ``[DONE]``.
    Closing this closes the relay (which bills a cut stream and stops its replica)."""
    obj = "chat.completion.chunk" if parsed.chat else "text_completion"
    held = b""  # the last chunk, sent with the end (which follows it without waiting)
    try:
        async for item in items:
            if isinstance(item, StreamFailed):  # the replica failed after the first byte
                _, body, _ = error_parts(item.error)
                yield held + b"data: " + orjson.dumps(body) + b"\n\n"
                return
            if isinstance(item, Settled):
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
        await items.aclose()  # type: ignore[attr-defined]


class CompletionHandler(Protocol):
    async def __call__(
        self, svc: Any, raw: bytes, headers: Mapping[str, str], *, chat: bool
    ) -> Response: ...


class FastRoutes:
    """Pure ASGI in front of FastAPI: the two completion endpoints go straight to the service,
    skipping FastAPI's middleware, routing and dependency layers; everything else, ``/docs``
    included, goes through FastAPI. The body is read with its size capped, so an oversized one
    is refused (413) before it is all in memory."""

    PATHS = {"/v1/chat/completions": True, "/v1/completions": False}

    def __init__(self, app: Any, handler: CompletionHandler | None = None) -> None:
        self.app = app
        self.handler = handler or answer_completion

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        chat = self.PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        # the app Ray runs may be a copy of the module's app (the class travels pickled),
        # so the service is found on the app that is serving this request
        svc = getattr(scope["app"].state, "service", None) if chat is not None else None
        if svc is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            raw = await read_capped(receive, MAX_BODY_BYTES)
            response = await self.handler(svc, raw, Headers(scope=scope), chat=bool(chat))
        except Exception as e:  # a domain error by the table; anything else is a logged 500
            response = error_response(e)
        await response(scope, receive, send)


class _Api(FastAPI):
    def build_middleware_stack(self) -> Any:
        # FastRoutes outermost: the completions skip FastAPI's middleware too
        return FastRoutes(super().build_middleware_stack())


def make_api() -> FastAPI:
    api = _Api(title="carbon-router", description="OpenAI-compatible, carbon-aware LLM router")

    async def domain_error(request: Request, e: Exception) -> Response:
        return error_response(e)

    api.add_exception_handler(CarbonRouterError, domain_error)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        raw = await request.body()
        return await answer_completion(service_of(request), raw, request.headers, chat=True)

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        raw = await request.body()
        return await answer_completion(service_of(request), raw, request.headers, chat=False)

    @api.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "carbon-router"}
            for n in service_of(request).models()
        ]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/v1/usage")
    async def usage(
        request: Request,
        caller: Auth,
        tenant: str | None = None,
        start: str | None = None,
        end: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> JSONResponse:
        """A page of usage (``limit`` rows after ``after``, a request id) started in
        ``[start, end)`` (ISO 8601, UTC when no offset), with the period's totals."""
        query = UsageQuery(utc_param(start, "start"), utc_param(end, "end"), limit, after)
        return JSONResponse(await service_of(request).usage(caller, tenant, query))

    @api.get("/v1/jobs/{job_id}")
    async def get_job(request: Request, job_id: str, caller: Auth) -> JSONResponse:
        return JSONResponse(service_of(request).deferral.get(caller, job_id).public())

    @api.post("/v1/jobs/{job_id}/run")
    async def run_job_now(request: Request, job_id: str, caller: Auth) -> JSONResponse:
        """Admin: run a scheduled job now instead of at its planned time."""
        service_of(request).deferral.run_now(caller, job_id)
        return JSONResponse({"id": job_id, "status": "due"})

    @api.post("/v1/admin/reload")
    async def reload(request: Request, caller: Auth) -> JSONResponse:
        """Admin: re-read the config file and swap tenants, budgets, prices, carbon sources
        and policy without dropping requests (a changed set of replicas needs a redeploy)."""
        return JSONResponse(service_of(request).reload(caller))

    @api.get("/v1/admin/dead-letters")
    async def dead_letters(request: Request, caller: Auth) -> JSONResponse:
        """Admin: billed rows the ledger refused for good, set aside while the rest flowed."""
        return JSONResponse(service_of(request).dead_letters(caller))

    @api.post("/v1/files")
    async def upload_file(request: Request, caller: Auth) -> JSONResponse:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_FILE_BYTES + (64 << 10):
            raise BodyTooLarge(f"file over {MAX_FILE_BYTES} bytes", param="file")
        async with request.form() as form:  # closes the upload's temporary file
            upload, purpose = form.get("file"), str(form.get("purpose") or "")
            if upload is None or isinstance(upload, str):
                raise RequestError("multipart field 'file' is required", param="file")
            content = await upload.read(MAX_FILE_BYTES + 1)
            filename = upload.filename or "input.jsonl"
        f = service_of(request).batches.add_file(caller, purpose, filename, content)
        return JSONResponse(
            {
                "id": f.id,
                "object": "file",
                "bytes": len(f.content),
                "created_at": f.created_at,
                "filename": f.filename,
                "purpose": f.purpose,
            }
        )

    @api.delete("/v1/files/{file_id}")
    async def delete_file(request: Request, file_id: str, caller: Auth) -> JSONResponse:
        service_of(request).batches.delete_file(caller, file_id)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    @api.get("/v1/files/{file_id}/content")
    async def file_content(request: Request, file_id: str, caller: Auth) -> Response:
        f = service_of(request).batches.file(caller, file_id)
        return Response(f.content, media_type="application/jsonl")

    @api.post("/v1/batches")
    async def create_batch(request: Request, caller: Auth) -> JSONResponse:
        try:
            body = parse_json_object(await request.body())
        except ValueError as e:
            raise RequestError(f"body is not a JSON object: {e}") from e
        batch = await service_of(request).batches.create(
            caller,
            body.get("input_file_id"),
            body.get("endpoint"),
            body.get("completion_window", "24h"),
        )
        return JSONResponse(batch)

    @api.get("/v1/batches/{batch_id}")
    async def get_batch(request: Request, batch_id: str, caller: Auth) -> JSONResponse:
        return JSONResponse(service_of(request).batches.status(caller, batch_id))

    @api.post("/v1/batches/{batch_id}/run")
    async def run_batch_now(request: Request, batch_id: str, caller: Auth) -> JSONResponse:
        """Admin: run a batch's scheduled requests now instead of at their planned times."""
        service_of(request).batches.run_now(caller, batch_id)
        return JSONResponse({"id": batch_id, "status": "due"})

    @api.get("/healthz")
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @api.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        usable = service_of(request).ready()
        status = 200 if usable else 503
        return JSONResponse({"ready": bool(usable), "replicas": usable}, status_code=status)

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        exposition = service_of(request).metrics.exposition()
        return Response(exposition, media_type=CONTENT_TYPE_LATEST)

    return api


def utc_param(value: str | None, name: str) -> datetime | None:
    """A query parameter as a UTC time: ISO 8601, a date, or a time with no offset as UTC."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError as e:
        raise RequestError(f"'{name}' must be an ISO 8601 time, got {value!r}", param=name) from e
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    value = orjson.loads(raw or b"{}")
    if not isinstance(value, dict):
        raise ValueError(f"got {type(value).__name__}")
    return value
