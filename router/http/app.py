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
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers

from carbonrouter.errors import CarbonRouterError
from router.errors import BodyTooLarge, RequestError
from router.http.auth import Auth, service_of
from router.http.completions import answer_completion
from router.http.dashboard import router as dashboard_routes
from router.http.errors import JSONResponse, error_response
from router.http.wire import (
    MAX_BODY_BYTES,
    read_capped,
)
from router.service.batches import MAX_FILE_BYTES
from router.service.ports import UsageQuery

log = logging.getLogger(__name__)



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

    @api.get("/v1/receipts/head")
    async def receipt_head(
        request: Request, caller: Auth, tenant: str | None = None
    ) -> JSONResponse:
        """The caller's receipt chain head now and the latest signed one (keep these: they
        show later that no receipt before them changed)."""
        return JSONResponse(await service_of(request).receipt_head(caller, tenant))

    @api.get("/v1/receipts/{request_id}")
    async def receipt(request: Request, request_id: str, caller: Auth) -> JSONResponse:
        """A billed request's receipt: every figure and where it came from, and its place in
        the tenant's hash chain."""
        return JSONResponse(await service_of(request).receipt(caller, request_id))

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

    @api.get("/v1/fleet")
    async def fleet(request: Request) -> JSONResponse:
        """Per region: the replicas the fleet scaler wants on, those on and serving, those
        owned, and the inputs of its last decision with their age (README 'Fleet scaling').
        Unauthenticated, like /metrics, for an external autoscaler."""
        return JSONResponse(service_of(request).fleet.view())

    @api.get("/metrics")
    async def metrics(request: Request) -> Response:
        exposition = service_of(request).metrics.exposition()
        return Response(exposition, media_type=CONTENT_TYPE_LATEST)

    api.include_router(dashboard_routes)  # GET /dashboard and /v1/dashboard/*
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
