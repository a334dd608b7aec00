"""Ray Serve adapters: the ingress (FastAPI, OpenAI-compatible), one deployment per region
replica, and the named metering actor that writes the ledger. The logic lives in
:mod:`router.gateway` and :mod:`router.metering`; this module only wires it to Ray.

``build_app({"config": PATH})`` is an application builder, so the same app runs with
``router serve`` and with ``serve run router.serve_app:build_app config=configs/local.yaml``.
"""

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import ray
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from ray import serve

from regions.backends import (
    Backend,
    BackendError,
    BackendUnavailable,
    CompletionRequest,
    LlamaCppBackend,
)
from regions.config import Replica, load_config
from regions.meters import open_meter
from regions.openai_backend import OpenAIBackend
from router.gateway import (
    MAX_BODY_BYTES,
    ApiError,
    Budgets,
    Router,
    Tenants,
    parse_body,
    period_start,
    usage_fields,
)
from router.jobs import Job, JobStore
from router.ledger import Ledger, LedgerRow
from router.metering.outbox import Outbox
from router.metering.remote import AwaitingBills, RemoteAttribution
from router.metering.replica import MeteredReplica

log = logging.getLogger(__name__)

METERING_ACTOR = "carbon-router-metering"
MAX_TEMPLATES = 100_000  # predicted bills a proxied replica keeps while it attributes
NAMESPACE = "carbon-router"


# ---- metering actor -------------------------------------------------------------------------


@ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)
class MeteringActor:
    """Writes billed rows to the ledger. ``record`` returns only once its rows are durable
    (group commit: rows arriving together share one transaction), and a retried call after a
    restart cannot bill twice: the ledger is idempotent by request id."""

    def __init__(self, ledger_path: str) -> None:
        self.ledger = Ledger(ledger_path)
        self._pending: list[tuple[list[LedgerRow], asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, rows: list[dict[str, Any]]) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(([LedgerRow(**r) for r in rows], fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0.002)  # let concurrent calls join the batch
        while self._pending:
            batch, self._pending = self._pending, []
            rows = [r for rs, _ in batch for r in rs]
            try:
                written = await asyncio.to_thread(self.ledger.write, rows)
            except Exception as e:  # every waiting caller gets the error; nothing is acked
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(written)

    async def usage(self, tenant: str | None) -> list[dict[str, Any]]:
        return [r.__dict__ for r in self.ledger.tenant_rows(tenant)]

    async def refit_rows(self, replica: str) -> list[tuple[int, int, float]]:
        return self.ledger.measured_rows(replica)


# ---- replicas ---------------------------------------------------------------------------------


def make_backend(rep: Replica) -> Backend:
    b = rep.backend
    if b.kind == "llama_cpp":
        return LlamaCppBackend(
            b.model, slots=rep.max_concurrency, n_threads=b.n_threads, n_ctx=b.n_ctx
        )
    return remote_backend(rep)


def remote_backend(rep: Replica) -> OpenAIBackend:
    b = rep.backend
    if b.kind == "llama_cpp":
        raise BackendError(f"replica {rep.name} runs in process, not behind a URL")
    return OpenAIBackend(b.url, b.model, api_key=b.api_key or None, timeout_s=b.timeout_s)


def timeline(
    request_id: str, start: float, end: float, prompt: int, completion: int, step_s: float = 0.05
) -> list[tuple[str, str, float, int]]:
    """The events of a request whose tokens were not seen one by one: start, its output tokens
    spread evenly over its duration (in ``step_s`` steps), end."""
    events: list[tuple[str, str, float, int]] = [("s", request_id, start, prompt)]
    steps = max(1, min(completion, math.ceil((end - start) / step_s)))
    if completion:
        base, extra = divmod(completion, steps)
        for k in range(steps):
            t = start + (end - start) * (k + 1) / steps
            events.append(("t", request_id, t, base + (1 if k < extra else 0)))
    events.append(("e", request_id, end, 0))
    return events


def spool_root() -> Path:
    """Where a process spools rows it has not yet handed to the metering actor (node-local)."""
    import tempfile

    return Path(tempfile.gettempdir()) / "carbon-router" / "spool"


@serve.deployment(max_ongoing_requests=256, health_check_period_s=5)
class RegionReplica:
    """One replica of a region. An in-process backend (llama.cpp) runs here, metered per request
    (``generate``/``complete``). A remote OpenAI-compatible server is called by the ingress
    directly; this deployment then owns only the meter on the region's node and attributes the
    request timelines the ingress sends (``meter_events``), billing each request's measured
    energy to the ledger through its own spooled :class:`Outbox`."""

    def __init__(self, replica_json: str, period_s: float = 0.1) -> None:
        rep = Replica.model_validate_json(replica_json)
        self.name = rep.name
        meter = open_meter(
            rep.meter, gpu_indices=rep.gpu_indices, watts_per_core=rep.cpu_watts_per_core
        )
        self.meter = meter
        self.proxied = rep.backend.kind != "llama_cpp"
        self.metered: MeteredReplica | None = None
        if not self.proxied:
            self.metered = MeteredReplica(
                rep.name, make_backend(rep), meter, prefill_weight=rep.prefill_weight
            )
        else:
            self.remote = RemoteAttribution(meter, prefill_weight=rep.prefill_weight)
            self._templates: dict[str, dict[str, Any]] = {}
            self._billed: list[str] = []
            self._tariffs: dict[str, Any] = {}
            self._period_s = period_s
            self._metering = ray.get_actor(METERING_ACTOR, namespace=NAMESPACE)
            self.outbox = Outbox(
                self._record,
                spool_dir=spool_root() / rep.name,
                interval_s=0.05,
                on_sent=lambda rows: self._billed.extend(r["request_id"] for r in rows),
            )
            loop = asyncio.get_event_loop()
            loop.call_soon(self.outbox.orphans)
            self._ticker = loop.create_task(self._tick())

    async def _record(self, rows: list[dict[str, Any]]) -> None:
        await self._metering.record.remote(rows)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                self.remote.sample()
                self._bill(self.remote.advance())
            except Exception:  # a failed read is retried next period; the ingress falls back
                log.exception("replica %s: metering tick failed", self.name)

    def _bill(self, done: list[Any]) -> None:
        from router.billing import rebill

        source = str(self.meter.energy_source)
        for att in done:
            template = self._templates.pop(att.request_id, None)
            if template is None:
                log.warning("replica %s: no bill for %s", self.name, att.request_id)
                continue
            billing = template.pop("billing")
            tariff = self._tariffs.get(billing)
            if tariff is None:
                from regions.config import Billing
                from router.billing import tariff_for

                tariff = self._tariffs[billing] = tariff_for(Billing.model_validate_json(billing))
            row = rebill(LedgerRow(**template), att.energy_j, source, tariff)
            self.outbox.add(row.__dict__)

    async def meter_events(
        self, events: list[tuple[str, str, float, int]], bills: dict[str, dict[str, Any]]
    ) -> list[str]:
        """Timelines from the ingress, and for each ended request its predicted bill (the
        template the measured bill is priced from, with ``billing``: the tariff's config).
        Returns the requests whose measured bill reached the ledger since the last call: the
        ingress stops waiting on them (one that never comes back is billed by its prediction)."""
        self._templates.update(bills)
        if len(self._templates) > MAX_TEMPLATES:  # bills whose timeline never came: the
            for rid in list(self._templates)[: len(self._templates) - MAX_TEMPLATES]:  # oldest
                del self._templates[rid]  # go; the ingress bills their prediction
        self.remote.events(events)
        billed, self._billed = self._billed, []
        return billed

    async def generate(
        self, request_id: str, request: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        if self.metered is None:
            raise BackendError(f"replica {self.name}: its server is called by the ingress")
        req = CompletionRequest(**request)
        prompt_tokens = await self.metered.backend.prompt_tokens(req)
        started = datetime.now(UTC)
        completion = 0
        async for chunk in self.metered.run(request_id, req):
            completion += chunk.n_tokens
            yield {"text": chunk.text, "finish_reason": chunk.finish_reason}
        ended = datetime.now(UTC)
        try:
            att = await self.metered.energy(request_id, timeout_s=5.0)
            energy_j, source = att.energy_j, str(self.meter.energy_source)
        except TimeoutError:
            energy_j, source = -1.0, "predicted"  # the ingress bills the prediction
        yield {
            "done": True,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "energy_j": energy_j,
            "energy_source": source,
            "started_at": started.isoformat(),
            "ended_at": ended.isoformat(),
        }

    async def complete(self, request_id: str, request: dict[str, Any]) -> dict[str, Any]:
        """The whole completion in one answer (one actor round trip instead of one per chunk)."""
        text: list[str] = []
        finish = None
        final: dict[str, Any] = {}
        async for item in self.generate(request_id, request):
            if item.get("done"):
                final = item
            else:
                text.append(item["text"])
                finish = item["finish_reason"] or finish
        return {"text": "".join(text), "finish_reason": finish, **final}

    def check_health(self) -> None:
        if self.proxied and self._ticker.done():
            raise RuntimeError(f"replica {self.name}: metering stopped")


# ---- ingress ----------------------------------------------------------------------------------


class JSONResponse(Response):
    """JSON by orjson: Starlette's ``json.dumps`` was ~4 % of the ingress's CPU per request."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class EventStream(Response):
    """A ``text/event-stream`` answer written straight to ASGI ``send``. Starlette's
    StreamingResponse runs each stream in an anyio task group with a second task listening for
    the disconnect (under ASGI spec < 2.4, which uvicorn declares): ~15 % of the ingress's CPU
    per stream. Ray Serve already watches for the client going away and cancels the request.
    The last event leaves with the end of the body, in one write."""

    def __init__(self, events: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        # not Response.__init__: it would add a Content-Length for the empty body
        self.status_code = 200
        self.background = None
        self.events = events
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        last = b""
        try:
            async for event in self.events:
                if last:
                    await send({"type": "http.response.body", "body": last, "more_body": True})
                last = event
            await send({"type": "http.response.body", "body": last, "more_body": False})
        finally:  # cancelled while sending (the client went away): the events' cleanup now
            aclose = getattr(self.events, "aclose", None)
            if aclose is not None:
                await aclose()


class _Api(FastAPI):
    def build_middleware_stack(self) -> Any:
        # FastRoutes outermost: the completions skip FastAPI's middleware too
        return FastRoutes(super().build_middleware_stack())


api = _Api(title="carbon-router", description="OpenAI-compatible, carbon-aware LLM router")


class FastRoutes:
    """Pure ASGI in front of FastAPI: the two completion endpoints go straight to the ingress,
    skipping FastAPI's middleware, routing and dependency layers (about 20 % of the ingress's
    CPU per request); everything else, ``/docs`` included, goes through FastAPI. The body is
    read with its size capped, so an oversized one is refused (413) before it is all in
    memory. A bug on this path is a 500 in the OpenAI error format, logged with its trace."""

    PATHS = {"/v1/chat/completions": True, "/v1/completions": False}

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        chat = self.PATHS.get(scope.get("path", "")) if scope["type"] == "http" else None
        # the app Ray runs may be a copy of the module's `api` (the class travels pickled),
        # so the ingress is found on the app that is serving this request
        ingress = getattr(scope["app"].state, "ingress", None) if chat is not None else None
        if ingress is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            raw = await read_capped(receive, MAX_BODY_BYTES)
            response = await ingress._route(raw, request, chat=bool(chat))
        except ApiError as e:
            response = _error(e)
        except Exception:
            log.exception("%s failed", scope["path"])
            response = _error(ApiError(500, "internal error", type_="server_error"))
        await response(scope, receive, send)


async def read_capped(receive: Any, limit: int) -> bytes:
    """An ASGI request body, refused with 413 as soon as it passes ``limit`` bytes."""
    parts, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "client disconnected while sending the body")
        body = message.get("body", b"")
        size += len(body)
        if size > limit:
            raise ApiError(413, f"request body over {limit} bytes", code="body_too_large")
        parts.append(body)
        more = message.get("more_body", False)
    return b"".join(parts)


def _sse_event(request_id: str, obj: str, created: int, model: str, **fields: Any) -> bytes:
    event = {"id": request_id, "object": obj, "created": created, "model": model, **fields}
    return b"data: " + orjson.dumps(event) + b"\n\n"


def _pieces(item: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(text, finish_reason) of a stream item: one chunk, or a proxied network read's batch."""
    batch = item.get("batch")
    return batch if batch is not None else [(item["text"], item["finish_reason"])]


def _prompt_estimate(parsed: Any) -> int:
    """Prompt tokens before a server has counted them: 4 characters a token."""
    req = parsed.completion
    return sum(len(m["content"]) for m in req.messages or []) // 4 or len(req.prompt or "") // 4


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


@serve.deployment(
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0},
    # a log line per request costs ~3 % of the ingress's CPU, and building the record Serve
    # then filters out another ~4 %: Serve's own logger here says warnings and errors only.
    # /metrics counts requests and the ledger records each one; our loggers are not affected
    logging_config={"enable_access_log": False, "log_level": "WARNING"},
)
@serve.ingress(api)
class Ingress:
    def __init__(self, config_path: str, replicas: dict[str, Any]) -> None:
        from forecasting.energy import EnergyPredictor
        from forecasting.sources import build_sources

        api.state.ingress = self  # for FastRoutes
        self.config_path = config_path
        cfg = load_config(config_path)
        base = Path(config_path).parent
        self.cfg = cfg
        self.tenants = Tenants(cfg.tenants)
        self.budgets = Budgets(cfg.tenants)
        gpu = any(r.gpu.type != "cpu" for region in cfg.regions for r in region.replicas)
        predictor = EnergyPredictor.from_mlenergy() if gpu else EnergyPredictor()
        self.router = Router.build(cfg, build_sources(cfg, base_dir=base), predictor, base_dir=base)
        self.handles = [replicas[s.replica.name] for s in self.router.states]
        # remote OpenAI-compatible servers are called from here, not through their replica
        # deployment (one actor hop less); the replica still meters them from our timelines
        self.direct = {
            i: remote_backend(s.replica)
            for i, s in enumerate(self.router.states)
            if s.replica.backend.kind != "llama_cpp"
        }
        self._events: dict[int, list[tuple[str, str, float, int]]] = {i: [] for i in self.direct}
        self._bills: dict[int, dict[str, dict[str, Any]]] = {i: {} for i in self.direct}
        self._tokens: dict[int, dict[str, tuple[float, int]]] = {i: {} for i in self.direct}
        self._awaiting = AwaitingBills(timeout_s=30.0)
        self._cut_bills: set[asyncio.Task[Any]] = set()  # streams whose client went away
        self._billing_json = cfg.billing.model_dump_json()
        ledger = str((base / cfg.ledger) if not Path(cfg.ledger).is_absolute() else cfg.ledger)
        self.metering = MeteringActor.options(  # type: ignore[attr-defined]
            name=METERING_ACTOR, get_if_exists=True, lifetime="detached", namespace=NAMESPACE
        ).remote(ledger)
        # billed rows reach the ledger off the response path, spooled so a crash loses none
        self.outbox = Outbox(self._record, spool_dir=Path(ledger).with_suffix(".spool"))
        self.jobs = JobStore(Path(ledger).with_suffix(".jobs.sqlite"))
        asyncio.get_event_loop().call_soon(self.outbox.orphans)
        self._runner = asyncio.get_event_loop().create_task(self._run_jobs())
        self._refitter = asyncio.get_event_loop().create_task(self._refit_loop())
        self._timelines = asyncio.get_event_loop().create_task(self._send_timelines())
        self.registry = CollectorRegistry()
        self.requests_total = Counter(
            "router_requests_total", "requests", ["region", "status"], registry=self.registry
        )
        self.energy_total = Counter(
            "router_energy_kwh_total", "billed kWh", ["region"], registry=self.registry
        )
        self.carbon_total = Counter(
            "router_carbon_g_total", "g CO2e", ["region"], registry=self.registry
        )
        self._region_series: dict[str, tuple[Any, Any, Any]] = {}
        self.latency = Histogram(
            "router_request_seconds",
            "answered requests: seconds to the whole answer, or to the first chunk of a stream",
            registry=self.registry,
        )

    async def _record(self, rows: list[dict[str, Any]]) -> None:
        await self.metering.record.remote(rows)

    def _series(self, region: str) -> tuple[Any, Any, Any]:
        """A region's Prometheus children, looked up once (``labels`` costs a lock and a hash)."""
        series = self._region_series.get(region)
        if series is None:
            series = self._region_series[region] = (
                self.requests_total.labels(region, "ok"),
                self.energy_total.labels(region),
                self.carbon_total.labels(region),
            )
        return series

    async def _send_timelines(self, period_s: float = 0.1) -> None:
        """Every ``period_s``: send each proxied replica the timelines and predicted bills
        gathered since the last call; bill by prediction what was not measured in time.
        The period is well inside the replica's attribution lag (1 s) and bounds what a killed
        ingress loses; each call through a Serve handle costs the ingress ~1 ms of CPU."""

        async def send(i: int) -> None:
            tokens, self._tokens[i] = self._tokens[i], {}
            self._events[i] += [("t", rid, t, n) for rid, (t, n) in tokens.items()]
            events, self._events[i] = self._events[i], []
            bills, self._bills[i] = self._bills[i], {}
            if not events and not bills:
                return
            try:
                self._awaiting.measured(await self.handles[i].meter_events.remote(events, bills))
            except Exception as e:  # its bills fall back to the prediction at the deadline
                log.warning("replica %s did not take its timelines: %s", i, e)

        while True:
            await asyncio.sleep(period_s)
            try:
                await asyncio.gather(*(send(i) for i in self.direct))
                for row in self._awaiting.expired():
                    log.warning(
                        "no measured bill for %s: billing its prediction", row["request_id"]
                    )
                    self.outbox.add(row)
            except Exception:
                log.exception("sending timelines failed")

    async def _settle(self, tenant: str | None, timeout_s: float = 5.0) -> None:
        """Wait (up to ``timeout_s``) until ``tenant``'s (None: everyone's) answered requests
        are in the ledger: measured bills still being attributed, and our outbox."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._awaiting.waiting(tenant):
            await asyncio.sleep(0.05)
        await self.outbox.flush(timeout_s)

    async def _proxy(
        self, i: int, request_id: str, req: CompletionRequest, stream: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """A remote server's completion, called from here, in the items ``generate`` yields;
        the replica's meter gets its timeline. A non-streaming request is one non-streamed
        call (the server counts the tokens; they are spread evenly over its duration)."""
        backend = self.direct[i]
        t0, wall0 = datetime.now(UTC), time.time()
        if not stream:
            ans = await backend.answer(req)
            wall1 = time.time()
            prompt = ans.prompt_tokens
            if prompt is None:
                prompt = await backend.prompt_tokens(req)
            completion = ans.completion_tokens
            if completion is None:
                completion = max(1, len(ans.text) // 4) if ans.text else 0
            self._events[i] += timeline(request_id, wall0, wall1, prompt, completion)
            yield {"text": ans.text, "finish_reason": ans.finish_reason}
        else:
            prompt = await backend.prompt_tokens(req)
            completion, started = 0, False
            try:
                async for batch, last in backend.stream_batches(req):
                    if not started:
                        self._events[i].append(("s", request_id, wall0, prompt))
                        started = True
                    if n_batch := sum(c.n_tokens for c in batch):  # merged until the next send
                        completion += n_batch
                        tokens = self._tokens[i]  # swapped out at each send
                        pending = tokens.get(request_id)
                        tokens[request_id] = (time.time(), n_batch + (pending[1] if pending else 0))
                    # what arrived together leaves together: one write for the whole batch
                    # (with the end of the stream too when the server ended it in that read)
                    yield {"batch": [(c.text, c.finish_reason) for c in batch], "last": last}
            finally:
                if started:
                    pending = self._tokens[i].pop(request_id, None)
                    if pending:
                        self._events[i].append(("t", request_id, pending[0], pending[1]))
                    self._events[i].append(("e", request_id, time.time(), 0))
        yield {
            "done": True,
            "proxied": True,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "energy_j": -1.0,
            "energy_source": "predicted",
            "started_at": t0.isoformat(),
            "ended_at": datetime.now(UTC).isoformat(),
        }

    # -- plumbing ------------------------------------------------------------------------------
    async def _route(self, raw: bytes, request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        try:
            caller = self.tenants.authenticate(request.headers.get("authorization"))
            parsed = parse_body(raw, chat=chat)
            pref = self.router.preference(request.headers.get("x-carbon-preference"))
            prompt_est = _prompt_estimate(parsed)
            expected = self.router.lengths.expected(
                caller.tenant, parsed.model, parsed.completion.max_tokens
            )
            cands = await self.router.candidates(prompt_est, expected)
            await self._check_budget(caller.tenant, cands)
            if pref.defer_s > 0 and not parsed.stream:
                job = await self._maybe_defer(raw, caller.tenant, parsed, pref, cands, expected)
                if job is not None:
                    return JSONResponse(
                        job.public(), status_code=202, headers={"Location": f"/v1/jobs/{job.id}"}
                    )
        except ApiError as e:
            return _error(e)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        try:
            i, decision, stream, first = await self._start(request_id, parsed, cands, pref)
        except ApiError as e:
            return _error(e)
        st = self.router.states[i]
        headers = {
            "X-Carbon-Region": st.region.name,
            "X-Carbon-Replica": st.replica.name,
            "X-Carbon-Policy": decision.policy,
            "X-Carbon-Binding": decision.binding,
        }
        if decision.note:
            headers["X-Carbon-Note"] = decision.note
        created = int(time.time())
        if parsed.stream:
            self.latency.observe(time.perf_counter() - t0)  # to the first chunk
            return EventStream(
                self._sse(stream, first, request_id, caller.tenant, i, parsed, created), headers
            )
        body = await self._collect(stream, first, request_id, caller.tenant, i, parsed, created)
        usage = body["usage"]
        headers.update(
            {"X-Energy-kWh": f"{usage['energy_kwh']:.6e}", "X-Carbon-g": f"{usage['carbon_g']:.6e}"}
        )
        self.latency.observe(time.perf_counter() - t0)
        return JSONResponse(body, headers=headers)

    async def _start(
        self, request_id: str, parsed: Any, cands: Any, pref: Any, only: int | None = None
    ) -> tuple[int, Any, Any, dict[str, Any] | None]:
        """Send the request to the best replica, failing over until one gives a first chunk.

        A remote server is called from here (``_proxy``). For an in-process one, a
        non-streaming request is sent whole (``complete``: one actor round trip) and returns
        ``stream=None`` with the full answer; a streaming one returns the chunk stream."""
        tried: set[int] = set()
        if only is not None:  # a planned job: its replica first, the others if it is down
            pref = pref.__class__(**{**pref.__dict__, "regions": ()})
        while True:
            decision = self.router.decide(cands, pref, tried)
            i = decision.index
            if (
                only is not None
                and only not in tried
                and self.router.states[only].usable(time.monotonic())
            ):
                i = only
            stream = None
            try:
                if i in self.direct:
                    stream = self._proxy(i, request_id, parsed.completion, parsed.stream)
                    first = await stream.__anext__()
                elif not parsed.stream:
                    first = await self.handles[i].complete.remote(
                        request_id, parsed.completion.__dict__
                    )
                    self.router.states[i].active += 1
                    return i, decision, None, first
                else:
                    stream = (
                        self.handles[i]
                        .options(stream=True)
                        .generate.remote(request_id, parsed.completion.__dict__)
                    )
                    first = await stream.__anext__()  # failover is possible until first byte
            except StopAsyncIteration:
                first = None
            except (BackendUnavailable, ray.exceptions.RayError, BackendError) as e:
                log.warning("replica %s failed before the first byte: %s", decision.replica, e)
                self.router.failed(i)
                tried.add(i)
                continue
            self.router.states[i].active += 1
            return i, decision, stream, first

    async def _collect(
        self,
        stream: Any,
        first: dict[str, Any] | None,
        request_id: str,
        tenant: str,
        i: int,
        parsed: Any,
        created: int,
    ) -> dict[str, Any]:
        text, finish, final = [], None, None
        item = first
        if stream is None and first is not None:  # a whole answer from RegionReplica.complete
            text, finish, final, item = [first["text"]], first["finish_reason"], first, None
        try:
            while item is not None:
                if item.get("done"):
                    final = item
                else:
                    for t, f in _pieces(item):
                        text.append(t)
                        finish = f or finish
                item = await stream.__anext__()
        except StopAsyncIteration:
            pass
        finally:
            self.router.states[i].active -= 1
        usage = await self._finish(request_id, tenant, i, final, parsed)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish or "stop", "logprobs": None}
        if parsed.chat:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
        else:
            choice["text"] = "".join(text)
        return {
            "id": request_id,
            "object": "chat.completion" if parsed.chat else "text_completion",
            "created": created,
            "model": parsed.model,
            "choices": [choice],
            "usage": usage,
        }

    async def _check_budget(self, tenant: str, cands: Any) -> None:
        if tenant not in self.budgets.limits:
            return
        now = datetime.now(UTC)
        if tenant not in self.budgets.spend:  # first request since start: sum the ledger
            since = period_start(now, self.budgets.limits[tenant].period)
            await self.outbox.flush()
            rows = [LedgerRow(**r) for r in await self.metering.usage.remote(tenant)]
            self.budgets.load(tenant, [r for r in rows if r.started_at >= since.isoformat()], now)
        i = int(np.argmin(cands.kwh))
        kwh = float(cands.kwh[i] * cands.pue[i])
        self.budgets.check(
            tenant,
            kwh,
            kwh * float(cands.intensity_g_per_kwh[i]),
            kwh * float(cands.price_usd_per_kwh[i]),
            now,
        )

    # -- deferred jobs -------------------------------------------------------------------------
    async def _maybe_defer(
        self,
        raw: bytes,
        tenant: str,
        parsed: Any,
        pref: Any,
        cands: Any,
        expected: float,
        *,
        force: bool = False,
    ) -> Job | None:
        """Plan a job when waiting pays; with ``force`` (batches) also when it does not, to run
        now. Returns the stored job, or ``None`` (run now, inline)."""
        plan = await self.router.plan_deferral(cands, pref, expected)
        now = datetime.now(UTC)
        if plan is None:
            if not force:
                return None  # waiting does not pay: run now
            index = self.router.decide(cands, pref).index
            start_at, best, now_score = now, 0.0, 0.0
        else:
            start_at, index, best, now_score = plan
        st = self.router.states[index]
        job = Job(
            id=f"job-{uuid.uuid4().hex}",
            tenant=tenant,
            status="scheduled",
            created_at=now.isoformat(),
            start_at=start_at.isoformat(),
            deadline=(now + timedelta(seconds=pref.defer_s)).isoformat(),
            replica=st.replica.name,
            region=st.region.name,
            chat=parsed.chat,
            body=json.loads(raw),
            forecast_score=best,
        )
        self.jobs.add(job)
        log.info(
            "planned %s at %s in %s (score %.3g vs %.3g now)",
            job.id,
            start_at,
            st.region.name,
            best,
            now_score,
        )
        return job

    async def _refit_loop(self, period_s: float = 600.0) -> None:
        """Refit each replica's energy model from its measured ledger rows on a schedule."""
        while True:
            await asyncio.sleep(period_s)
            for st in self.router.states:
                try:
                    rows = await self.metering.refit_rows.remote(st.replica.name)
                    self.router.predictor.refit(st.replica.name, rows)
                except Exception:  # a failed refit keeps the previous model; say so
                    log.exception("energy refit for %s failed", st.replica.name)

    async def _run_jobs(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for job in self.jobs.due(datetime.now(UTC)):
                asyncio.get_running_loop().create_task(self._run_job(job))

    async def _run_job(self, job: Job) -> None:
        try:
            parsed = parse_body(json.dumps(job.body).encode(), chat=job.chat)
            cands = await self.router.candidates(
                0,
                self.router.lengths.expected(
                    job.tenant, parsed.model, parsed.completion.max_tokens
                ),
            )
            index = next(
                k for k, s in enumerate(self.router.states) if s.replica.name == job.replica
            )
            pref = self.router.preference(None)
            i, _, stream, first = await self._start(job.id, parsed, cands, pref, only=index)
            body = await self._collect(
                stream, first, job.id, job.tenant, i, parsed, int(time.time())
            )
            self.jobs.finish(job.id, result=body, error=None)
        except Exception as e:  # the job records why; the loop goes on
            log.exception("job %s failed", job.id)
            self.jobs.finish(job.id, result=None, error=str(e))

    async def _sse(
        self,
        stream: Any,
        first: dict[str, Any] | None,
        request_id: str,
        tenant: str,
        i: int,
        parsed: Any,
        created: int,
    ) -> AsyncIterator[bytes]:
        obj = "chat.completion.chunk" if parsed.chat else "text_completion"
        final = None
        item = first
        st = self.router.states[i]
        held = b""  # the last batch, sent with the end (which follows it without waiting)
        started, produced = datetime.now(UTC), 0
        try:
            while item is not None:
                if item.get("done"):
                    final = item
                else:
                    out = [held]
                    for text, finish in _pieces(item):
                        produced += 1 if text else 0
                        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
                        if parsed.chat:
                            choice["delta"] = {"content": text}
                        else:
                            choice["text"] = text
                        out.append(
                            _sse_event(request_id, obj, created, parsed.model, choices=[choice])
                        )
                    held = b"".join(out)
                    if not item.get("last"):
                        yield held
                        held = b""
                try:
                    item = await stream.__anext__()
                except StopAsyncIteration:
                    item = None
        except (asyncio.CancelledError, GeneratorExit):
            # the client went away mid-stream (Serve cancels the request): what was generated
            # used energy, so it is billed, by prediction (no final figures came back)
            cut = {
                "prompt_tokens": _prompt_estimate(parsed),
                "completion_tokens": produced,
                "started_at": started.isoformat(),
                "ended_at": datetime.now(UTC).isoformat(),
            }
            task = asyncio.get_running_loop().create_task(
                self._finish(request_id, tenant, i, cut, parsed)
            )
            self._cut_bills.add(task)
            task.add_done_callback(self._cut_bills.discard)
            if hasattr(stream, "aclose"):  # stop the upstream: a proxied server's connection
                await stream.aclose()
            elif hasattr(stream, "cancel"):  # a replica's generator: it stops generating
                stream.cancel()
            raise
        finally:
            st.active -= 1
        usage = await self._finish(request_id, tenant, i, final, parsed)
        end = b"data: [DONE]\n\n"  # one write with the usage chunk
        if parsed.include_usage:
            end = _sse_event(request_id, obj, created, parsed.model, choices=[], usage=usage) + end
        yield held + end

    async def _finish(
        self, request_id: str, tenant: str, i: int, final: dict[str, Any] | None, parsed: Any
    ) -> dict[str, Any]:
        st = self.router.states[i]
        final = final or {}
        prompt = int(final.get("prompt_tokens", 0))
        completion = int(final.get("completion_tokens", 0))
        energy = float(final.get("energy_j", -1.0))
        source = str(final.get("energy_source", "predicted"))
        if energy < 0:  # not metered in time: bill the prediction, say so
            energy = self.router.predictor.predict_j(st.profile, prompt, completion)
            source = "estimated"
        started = datetime.fromisoformat(final.get("started_at", datetime.now(UTC).isoformat()))
        ended = datetime.fromisoformat(final.get("ended_at", datetime.now(UTC).isoformat()))
        row = await self.router.bill(
            request_id=request_id,
            tenant=tenant,
            index=i,
            started_at=started,
            ended_at=ended,
            prompt_tokens=prompt,
            completion_tokens=completion,
            energy_j=energy,
            energy_source=source,
        )
        extra = usage_fields(row)
        if final.get("proxied"):  # the replica bills the measurement; until then, ours
            extra["energy_source"] = "predicted"
            self._awaiting.add(row.__dict__)
            self._bills[i][request_id] = {
                **row.__dict__,
                "billing": self._billing_json,
            }
        else:
            self.outbox.add(row.__dict__)  # in the ledger within milliseconds; see Outbox
        self.budgets.add(row, datetime.now(UTC))
        self.router.lengths.observe(tenant, parsed.model, completion)
        requests, energy, carbon = self._series(row.region)
        requests.inc()
        energy.inc(row.kwh_billed)
        carbon.inc(row.carbon_g)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            **extra,
        }

    # -- endpoints -----------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._route(await request.body(), request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._route(await request.body(), request, chat=False)

    @api.get("/v1/models")
    async def models(self) -> JSONResponse:
        names = sorted({s.replica.backend.model for s in self.router.states})
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": n, "object": "model", "created": 0, "owned_by": "carbon-router"}
                    for n in names
                ],
            }
        )

    @api.get("/v1/usage")
    async def usage(self, request: Request) -> Response:
        try:
            caller = self.tenants.authenticate(request.headers.get("authorization"))
        except ApiError as e:
            return _error(e)
        tenant = request.query_params.get("tenant") if caller.admin else caller.tenant
        await self._settle(tenant)  # a caller sees the rows of the requests it was answered
        rows = await self.metering.usage.remote(tenant)
        return JSONResponse({"object": "list", "tenant": tenant, "data": rows})

    @api.get("/v1/jobs/{job_id}")
    async def get_job(self, job_id: str, request: Request) -> Response:
        try:
            caller = self.tenants.authenticate(request.headers.get("authorization"))
        except ApiError as e:
            return _error(e)
        job = self.jobs.get(job_id)
        if job is None or (job.tenant != caller.tenant and not caller.admin):
            return _error(ApiError(404, f"no job {job_id}", code="not_found"))
        return JSONResponse(job.public())

    @api.post("/v1/jobs/{job_id}/run")
    async def run_job_now(self, job_id: str, request: Request) -> Response:
        """Admin: run a scheduled job now instead of at its planned time."""
        try:
            caller = self.tenants.authenticate(request.headers.get("authorization"))
        except ApiError as e:
            return _error(e)
        if not caller.admin:
            return _error(ApiError(403, "admin key required", type_="permission_error"))
        self.jobs.run_now(job_id, datetime.now(UTC))
        return JSONResponse({"id": job_id, "status": "due"})

    @api.post("/v1/admin/reload")
    async def reload(self, request: Request) -> Response:
        """Admin: re-read the config file and swap tenants, budgets, prices, carbon sources
        and policy. Requests in flight keep what they started with; none is dropped. The set
        of replicas is fixed by the deployment: changing it needs a redeploy."""
        from forecasting.sources import build_sources
        from regions.config import ConfigError

        try:
            caller = self.tenants.authenticate(request.headers.get("authorization"))
            if not caller.admin:
                raise ApiError(403, "admin key required", type_="permission_error")
            try:
                cfg = load_config(self.config_path)
            except ConfigError as e:
                raise ApiError(400, str(e), code="invalid_config") from e
            old = [s.replica.name for s in self.router.states]
            new = [r.name for region in cfg.regions for r in region.replicas]
            if new != old:
                raise ApiError(
                    409,
                    f"replicas changed ({old} -> {new}); redeploy with router serve",
                    code="redeploy_needed",
                )
            base = Path(self.config_path).parent
            router = Router.build(
                cfg, build_sources(cfg, base_dir=base), self.router.predictor, base_dir=base
            )
        except ApiError as e:
            return _error(e)
        for st_new, st_old in zip(router.states, self.router.states, strict=True):
            st_new.active, st_new.cooldown_until = st_old.active, st_old.cooldown_until
        router.lengths = self.router.lengths
        self.cfg, self.router = cfg, router
        self._billing_json = cfg.billing.model_dump_json()
        self.tenants, self.budgets = Tenants(cfg.tenants), Budgets(cfg.tenants)
        return JSONResponse(
            {
                "reloaded": self.config_path,
                "tenants": len(cfg.tenants),
                "regions": [r.name for r in cfg.regions],
            }
        )

    # -- OpenAI Batch API ----------------------------------------------------------------------
    @api.post("/v1/files")
    async def upload_file(self, request: Request) -> Response:
        try:
            caller = self.tenants.authenticate(request.headers.get("authorization"))
            form = await request.form()
            upload, purpose = form.get("file"), str(form.get("purpose") or "")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "multipart field 'file' is required", param="file")
            if purpose != "batch":
                raise ApiError(400, "purpose must be 'batch'", param="purpose")
            content = await upload.read()
        except ApiError as e:
            return _error(e)
        file_id, created = f"file-{uuid.uuid4().hex}", int(time.time())
        name = upload.filename or "input.jsonl"
        self.jobs.add_file(file_id, caller.tenant, purpose, name, content, created)
        return JSONResponse(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(content),
                "created_at": created,
                "filename": name,
                "purpose": purpose,
            }
        )

    @api.get("/v1/files/{file_id}/content")
    async def file_content(self, file_id: str, request: Request) -> Response:
        try:
            caller = self.tenants.authenticate(request.headers.get("authorization"))
        except ApiError as e:
            return _error(e)
        f = self.jobs.file(file_id)
        if f is None or (f[0] != caller.tenant and not caller.admin):
            return _error(ApiError(404, f"no file {file_id}", code="not_found"))
        return Response(f[4], media_type="application/jsonl")

    @api.post("/v1/batches")
    async def create_batch(self, request: Request) -> Response:
        try:
            caller = self.tenants.authenticate(request.headers.get("authorization"))
            body = json.loads(await request.body() or b"{}")
            file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
            window = body.get("completion_window", "24h")
            if endpoint not in ("/v1/chat/completions", "/v1/completions"):
                raise ApiError(
                    400,
                    "endpoint must be /v1/chat/completions or /v1/completions",
                    param="endpoint",
                )
            if not (isinstance(window, str) and window.endswith("h") and window[:-1].isdigit()):
                raise ApiError(
                    400, "completion_window must look like '24h'", param="completion_window"
                )
            f = self.jobs.file(str(file_id))
            if f is None or f[0] != caller.tenant:
                raise ApiError(404, f"no file {file_id}", param="input_file_id")
            chat = endpoint == "/v1/chat/completions"
            pref = self.router.preference(f"defer={int(window[:-1]) * 3600}")
            jobs, custom_ids = [], []
            for n, line in enumerate(f[4].decode().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    raw = json.dumps(item["body"]).encode()
                    parsed = parse_body(raw, chat=chat)
                except (ValueError, KeyError, TypeError, ApiError) as e:
                    raise ApiError(400, f"{f[2]} line {n}: {e}", param="input_file_id") from e
                expected = self.router.lengths.expected(
                    caller.tenant, parsed.model, parsed.completion.max_tokens
                )
                cands = await self.router.candidates(0, expected)
                job = await self._maybe_defer(
                    raw, caller.tenant, parsed, pref, cands, expected, force=True
                )
                assert job is not None
                jobs.append(job.id)
                custom_ids.append(str(item.get("custom_id", f"line-{n}")))
        except ApiError as e:
            return _error(e)
        batch_id = f"batch_{uuid.uuid4().hex}"
        self.jobs.add_batch(
            batch_id,
            caller.tenant,
            str(file_id),
            endpoint,
            window,
            int(time.time()),
            jobs,
            custom_ids,
        )
        return JSONResponse(self._batch_object(batch_id))

    def _batch_object(self, batch_id: str) -> dict[str, Any]:
        b = self.jobs.batch(batch_id)
        assert b is not None
        jobs = [self.jobs.get(j) for j in b["jobs"]]
        done = [j for j in jobs if j is not None and j.status in ("completed", "failed")]
        failed = [j for j in done if j.status == "failed"]
        status = "completed" if len(done) == len(jobs) else "in_progress"
        if status == "completed" and not b["output_file_id"]:
            lines = []
            for cid, job in zip(b["custom_ids"], jobs, strict=True):
                assert job is not None
                ok = job.status == "completed"
                lines.append(
                    json.dumps(
                        {
                            "id": job.id,
                            "custom_id": cid,
                            "response": {
                                "status_code": 200,
                                "request_id": job.id,
                                "body": job.result,
                            }
                            if ok
                            else None,
                            "error": None if ok else {"message": job.error},
                        }
                    )
                )
            file_id = f"file-{uuid.uuid4().hex}"
            self.jobs.add_file(
                file_id,
                b["tenant"],
                "batch_output",
                f"{batch_id}_output.jsonl",
                ("\n".join(lines) + "\n").encode(),
                int(time.time()),
            )
            self.jobs.set_batch_output(batch_id, file_id)
            b["output_file_id"] = file_id
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": b["endpoint"],
            "errors": None,
            "input_file_id": b["input_file_id"],
            "completion_window": b["completion_window"],
            "status": status,
            "output_file_id": b["output_file_id"],
            "error_file_id": None,
            "created_at": b["created_at"],
            "request_counts": {
                "total": len(jobs),
                "completed": len(done) - len(failed),
                "failed": len(failed),
            },
        }

    @api.get("/v1/batches/{batch_id}")
    async def get_batch(self, batch_id: str, request: Request) -> Response:
        try:
            caller = self.tenants.authenticate(request.headers.get("authorization"))
        except ApiError as e:
            return _error(e)
        b = self.jobs.batch(batch_id)
        if b is None or (b["tenant"] != caller.tenant and not caller.admin):
            return _error(ApiError(404, f"no batch {batch_id}", code="not_found"))
        return JSONResponse(self._batch_object(batch_id))

    @api.post("/v1/batches/{batch_id}/run")
    async def run_batch_now(self, batch_id: str, request: Request) -> Response:
        """Admin: run a batch's scheduled requests now instead of at their planned times."""
        try:
            caller = self.tenants.authenticate(request.headers.get("authorization"))
        except ApiError as e:
            return _error(e)
        b = self.jobs.batch(batch_id)
        if not caller.admin or b is None:
            return _error(ApiError(403 if b else 404, "admin key and a known batch required"))
        now = datetime.now(UTC)
        for j in b["jobs"]:
            self.jobs.run_now(j, now)
        return JSONResponse({"id": batch_id, "status": "due"})

    @api.get("/healthz")
    async def healthz(self) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        usable = [s.replica.name for s in self.router.states if s.usable(time.monotonic())]
        return JSONResponse(
            {"ready": bool(usable), "replicas": usable}, status_code=200 if usable else 503
        )

    @api.get("/metrics")
    async def metrics(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def wait_ready(url: str, timeout_s: float = 300.0) -> bool:
    """Poll ``{url}/readyz`` until it answers 200 (True) or ``timeout_s`` passes (False)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def build_app(args: dict[str, str]) -> serve.Application:
    """Application builder: one RegionReplica per config replica, each carrying the Ray custom
    resource ``region:<name>`` (a sliver, so many fit), and the ingress bound to them."""
    config_path = str(Path(args.get("config", "configs/local.yaml")).resolve())
    cfg = load_config(config_path)
    replicas = {}
    for region in cfg.regions:
        for rep in region.replicas:
            cpus = rep.backend.n_threads if rep.backend.kind == "llama_cpp" else 0.1
            replicas[rep.name] = RegionReplica.options(  # type: ignore[attr-defined]
                name=f"replica-{rep.name}",
                ray_actor_options={
                    "num_cpus": min(cpus, 0.5),
                    "resources": {f"region:{region.name}": 0.01},
                },
            ).bind(rep.model_dump_json())
    return Ingress.bind(config_path, replicas)  # type: ignore[attr-defined,no-any-return]
