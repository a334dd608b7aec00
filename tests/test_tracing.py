"""Request spans: one a request, named and described after the GenAI conventions, with the
router's figures; errors, hang-ups and deferred jobs; the W3C trace context from the client
and on to a loopback OpenAI-compatible server; nothing when tracing is off; a collector that
does not answer holds up no request. Spans go to the SDK's in-memory exporter through a tracer
provider passed in, never a global one."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from regions.config import Telemetry
from regions.openai_backend import OpenAIBackend
from router.http.app import make_api
from router.service import telemetry
from router.service.fakes import FakeReplicaClient, LedgerSink
from router.service.proxied import ProxiedMetering, ProxiedReplica
from router.service.tracing import Tracing
from tests.fake_apis import fake_openai
from tests.service_kit import ADMIN, CONFIG, DEMO, Kit, chat, service_kit

NAMES = ("eu-north-0", "eu-central-0", "us-south-0")
CLIENT_TRACE = 0x0AF7651916CD43DD8448EB211C80319C
CLIENT_SPAN = 0xB7AD6B7169203331
TRACEPARENT = f"00-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01"
PROMPT = "Name one fruit."  # what tests.service_kit.chat asks


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def text(span: ReadableSpan) -> str:
    """Everything a span carries that could leak: name, attributes, status, events."""
    events = [(e.name, dict(e.attributes or {})) for e in span.events]
    return f"{span.name} {dict(span.attributes or {})} {span.status.description} {events}"


def assert_clean(span: ReadableSpan) -> None:
    carried = text(span)
    for secret in (PROMPT, "sk-local-demo", "sk-local-admin", "Hello from a fake replica",
                   "'demo'"):  # fmt: skip
        assert secret not in carried


async def post(kit: Kit, path: str, body: dict[str, Any], headers: dict[str, str]) -> Any:
    return await kit.client.post(path, json=body, headers=headers)


# ---- one request, one span ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "stream", "operation"),
    [
        ("/v1/chat/completions", False, "chat"),
        ("/v1/chat/completions", True, "chat"),
        ("/v1/completions", False, "text_completion"),
        ("/v1/completions", True, "text_completion"),
    ],
)
async def test_a_request_is_one_span_with_the_genai_attributes_and_its_bill(
    tmp_path: Path,
    traced: tuple[TracerProvider, InMemorySpanExporter],
    path: str,
    stream: bool,
    operation: str,
) -> None:
    provider, exported = traced
    body: dict[str, Any] = chat(temperature=0.2, seed=7, stream=stream)
    if operation == "text_completion":
        body = {k: v for k, v in body.items() if k != "messages"} | {"prompt": PROMPT}
    async with service_kit(tmp_path, tracer_provider=provider) as kit:
        r = await post(kit, path, body, DEMO)
        assert r.status_code == 200, r.text
        (row,) = kit.rows()
    (span,) = exported.get_finished_spans()
    assert span.name == f"{operation} smollm2-135m" and span.kind == SpanKind.CLIENT
    assert span.parent is None and span.status.status_code == StatusCode.UNSET
    a = dict(span.attributes or {})
    assert a["gen_ai.operation.name"] == operation
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == "smollm2-135m"
    assert a["gen_ai.request.max_tokens"] == 16 and a["gen_ai.request.temperature"] == 0.2
    assert a["gen_ai.request.seed"] == 7 and a["carbon_router.stream"] is stream
    assert a["gen_ai.response.id"] == row.request_id
    assert a["gen_ai.response.finish_reasons"] == ("stop",)
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (12, 5)
    assert a["gen_ai.provider.name"] == "llama_cpp" and "server.address" not in a  # in process
    assert a["carbon_router.region"] == r.headers["x-carbon-region"] == row.region
    assert a["carbon_router.replica"] == r.headers["x-carbon-replica"] == row.replica
    assert a["carbon_router.policy"] == "price_carbon"
    assert a["carbon_router.binding"] == r.headers["x-carbon-binding"]
    assert a["carbon_router.intensity_g_per_kwh"] == row.intensity_g_per_kwh
    assert a["carbon_router.energy_kwh"] == row.kwh_billed > 0
    assert a["carbon_router.carbon_g"] == row.carbon_g > 0
    assert a["carbon_router.cost_usd"] == row.cost_usd
    assert a["carbon_router.energy_source"] == "measured"
    assert a.get("carbon_router.carbon_avoided_g") == getattr(row, "avoided_g", None)
    assert a["carbon_router.deferred"] is False and "error.type" not in a
    assert_clean(span)


def test_a_bills_carbon_avoided_goes_on_its_span(
    traced: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exported = traced
    span = Tracing(provider).request({}, chat=True)
    assert span is not None
    # a row as the receipts will bill it; before them a row has no avoided_g and the span none
    row = SimpleNamespace(prompt_tokens=3, completion_tokens=4, kwh_billed=1e-6, carbon_g=4e-4,
                          cost_usd=1e-7, intensity_g_per_kwh=400.0, carbon_stale=False,
                          avoided_g=-2.5e-4)  # fmt: skip
    span.billed(row)  # type: ignore[arg-type]
    span.end()
    (done,) = exported.get_finished_spans()
    assert dict(done.attributes or {})["carbon_router.carbon_avoided_g"] == -2.5e-4


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "body", "down", "status", "error", "code"),
    [
        ({"Authorization": "Bearer sk-not-a-key"}, chat(), False, 401, "router.errors.AuthError",
         "invalid_api_key"),
        (DEMO, chat(model="gpt-9"), False, 404, "router.errors.ModelNotFound", "model_not_found"),
        (DEMO, chat(max_tokens=-1), False, 400, "router.errors.RequestError",
         "invalid_request_error"),
        (DEMO, chat(), True, 503, "router.policy.NoCandidateError", "no_replica"),
    ],
)  # fmt: skip
async def test_a_failed_request_is_an_error_span_with_its_class_and_code_not_its_message(
    tmp_path: Path,
    traced: tuple[TracerProvider, InMemorySpanExporter],
    headers: dict[str, str],
    body: dict[str, Any],
    down: bool,
    status: int,
    error: str,
    code: str,
) -> None:
    provider, exported = traced
    fakes = [FakeReplicaClient(n, fail="down" if down else None) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes, tracer_provider=provider) as kit:
        r = await post(kit, "/v1/chat/completions", body, headers)
        assert r.status_code == status, r.text
        metrics = (await kit.client.get("/metrics")).text
    (span,) = exported.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR and span.status.description == code
    a = dict(span.attributes or {})
    assert a["error.type"] == error and a["http.response.status_code"] == status
    assert span.events == ()  # no exception event: its message may quote the request
    assert "sk-not-a-key" not in text(span) and "gpt-9" not in str(span.status.description)
    assert_clean(span)
    assert f'router_requests_total{{region="none",status="{status}"}} 1.0' in metrics


async def test_a_replica_failing_mid_stream_ends_the_span_in_error(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exported = traced
    fakes = [FakeReplicaClient(n, fail="die_mid_stream") for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes, tracer_provider=provider) as kit:
        r = await post(kit, "/v1/chat/completions", chat(stream=True), DEMO)
        assert r.status_code == 200 and "replica_failed" in r.text  # after the first byte
    (span,) = exported.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.status.description == "replica_failed"
    a = dict(span.attributes or {})
    assert a["error.type"] == "router.errors.ReplicaFailed"
    assert "http.response.status_code" not in a  # the client had its 200


# ---- a client that hangs up -------------------------------------------------------------------


def scope_of(kit: Kit, body: dict[str, Any]) -> tuple[dict[str, Any], Any, bytes]:
    api = make_api()
    api.state.service = kit.service
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1), "server": ("r", 80),
        "headers": [(b"authorization", DEMO["Authorization"].encode()),
                    (b"content-type", b"application/json")],
    }  # fmt: skip
    return scope, api, json.dumps(body).encode()


async def receive_once(raw: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()  # a client that says nothing more
        raise AssertionError("unreachable")

    return receive


async def until_billed(kit: Kit) -> Any:
    for _ in range(200):  # a cut request's bill is settled on a task of its own
        if kit.rows():
            return kit.rows()[0]
        await asyncio.sleep(0.01)
    raise AssertionError("never billed")


async def test_a_stream_cut_by_its_client_still_ends_its_span(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exported = traced
    fakes = [FakeReplicaClient(n, delay_s=0.05) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes, tracer_provider=provider) as kit:
        scope, api, raw = scope_of(kit, chat(stream=True))
        first = asyncio.Event()

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                first.set()

        task = asyncio.create_task(api(scope, await receive_once(raw), send))
        await first.wait()
        task.cancel()  # Ray Serve cancels a request whose client went away
        with pytest.raises(asyncio.CancelledError):
            await task
        row = await until_billed(kit)
    (span,) = exported.get_finished_spans()
    a = dict(span.attributes or {})
    assert a["carbon_router.client_hung_up"] is True
    assert span.status.status_code == StatusCode.UNSET  # the client's doing, not an error
    assert a["gen_ai.response.id"] == row.request_id  # billed all the same, by prediction
    assert "carbon_router.energy_kwh" not in a  # billed after the span ended: see the ledger


async def test_a_whole_answer_whose_client_hangs_up_ends_its_span(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exported = traced
    gate = asyncio.Event()  # never opened: the replicas work until the client gives up
    fakes = [FakeReplicaClient(n, gate=gate) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes, tracer_provider=provider) as kit:
        scope, api, raw = scope_of(kit, chat())

        async def send(message: dict[str, Any]) -> None:
            raise AssertionError("no answer was expected")

        task = asyncio.create_task(api(scope, await receive_once(raw), send))
        while not any(f.calls for f in fakes):
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until_billed(kit)
    (span,) = exported.get_finished_spans()
    assert dict(span.attributes or {})["carbon_router.client_hung_up"] is True
    assert span.status.status_code == StatusCode.UNSET


async def test_a_stream_whose_client_is_gone_before_it_starts_ends_its_span(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exported = traced
    async with service_kit(tmp_path, tracer_provider=provider) as kit:
        scope, api, raw = scope_of(kit, chat(stream=True))

        async def send(message: dict[str, Any]) -> None:
            raise OSError("the client is gone")  # before the response could start

        with pytest.raises(OSError):
            await api(scope, await receive_once(raw), send)
        await until_billed(kit)
    (span,) = exported.get_finished_spans()
    assert dict(span.attributes or {})["carbon_router.client_hung_up"] is True


# ---- deferred jobs ---------------------------------------------------------------------------


async def test_a_deferred_request_and_its_jobs_run_are_spans_found_by_the_job_id(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exported = traced
    # the grid is five times cleaner from the next hour on: waiting pays
    async with service_kit(tmp_path, profile=(1.0, 0.2), tracer_provider=provider) as kit:
        r = await post(kit, "/v1/chat/completions", chat(),
                       {**DEMO, "X-Carbon-Preference": "defer=7200"})  # fmt: skip
        assert r.status_code == 202, r.text
        job = r.json()
        assert (await kit.client.post(f"/v1/jobs/{job['id']}/run", headers=ADMIN)).status_code
        kit.service.deferral.run_due()
        await asyncio.gather(*kit.service.deferral._running)
        (row,) = kit.rows()
    asked, ran = exported.get_finished_spans()
    a, b = dict(asked.attributes or {}), dict(ran.attributes or {})
    assert a["carbon_router.deferred"] is True and a["carbon_router.job_id"] == job["id"]
    assert a["carbon_router.region"] == job["region"] and "carbon_router.energy_kwh" not in a
    assert b["carbon_router.deferred"] is True and b["carbon_router.job_id"] == job["id"]
    assert ran.name == "chat smollm2-135m" and ran.parent is None
    assert b["carbon_router.binding"] == "planned" and b["carbon_router.region"] == job["region"]
    assert b["gen_ai.response.id"] == row.request_id and b["carbon_router.carbon_g"] == row.carbon_g
    assert_clean(asked)
    assert_clean(ran)


# ---- the trace context: from the client, and on to the upstream --------------------------------


@asynccontextmanager
async def proxied_kit(
    tmp_path: Path, provider: TracerProvider | None
) -> AsyncIterator[tuple[Kit, str]]:
    """The kit with eu-north-0 a ProxiedReplica of the fake OpenAI server on loopback (the
    greenest region, where requests go), and the server's base URL."""
    async with fake_openai() as url:
        config = CONFIG.replace(
            "{name: eu-north-0, backend: {kind: llama_cpp, model: smollm2-135m}, meter: cpu}",
            f"{{name: eu-north-0, backend: {{kind: openai, url: '{url}', model: smollm2-135m}}}}",
        )
        upstream = OpenAIBackend(url, "smollm2-135m")
        metering = ProxiedMetering([0], LedgerSink(tmp_path / "unused.sqlite"))
        proxied = ProxiedReplica(0, "eu-north-0", upstream, metering)
        others = [FakeReplicaClient(n) for n in NAMES[1:]]
        async with service_kit(
            tmp_path, replicas=[proxied, *others], config=config, tracer_provider=provider  # type: ignore[list-item]
        ) as kit:
            yield kit, url
        await upstream.aclose()


def usage_of(body: str, stream: bool) -> dict[str, Any]:
    """The ``usage`` a client got, whole or in a stream's usage event."""
    if not stream:
        usage: dict[str, Any] = json.loads(body)["usage"]
        return usage
    events = [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: {")]
    return next(e["usage"] for e in events if e.get("usage"))


async def seen_upstream(url: str) -> dict[str, Any]:
    """What the fake server says of the last completion it was asked for."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(url.removesuffix("/v1") + "/_fault") as resp,
    ):
        seen: dict[str, Any] = await resp.json()
        return seen


@pytest.mark.parametrize("stream", [False, True])
async def test_the_clients_traceparent_is_the_parent_and_the_span_goes_upstream(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter], stream: bool
) -> None:
    provider, exported = traced
    async with proxied_kit(tmp_path, provider) as (kit, url):
        headers = {**DEMO, "traceparent": TRACEPARENT, "tracestate": "congo=t61rcWkgMzE"}
        r = await post(kit, "/v1/chat/completions", chat(stream=stream), headers)
        assert r.status_code == 200 and r.headers["x-carbon-replica"] == "eu-north-0", r.text
        seen = await seen_upstream(url)
    (span,) = exported.get_finished_spans()
    assert span.context.trace_id == CLIENT_TRACE
    assert span.parent is not None and span.parent.span_id == CLIENT_SPAN and span.parent.is_remote
    assert seen["traceparent"] == f"00-{CLIENT_TRACE:032x}-{span.context.span_id:016x}-01"
    assert seen["tracestate"] == "congo=t61rcWkgMzE"
    a = dict(span.attributes or {})
    port = int(url.split(":")[-1].split("/")[0])
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", port)
    assert a["gen_ai.provider.name"] == "openai"
    assert a["carbon_router.energy_source"] == usage_of(r.text, stream)["energy_source"]


async def test_a_long_tracestate_goes_upstream_in_whole_entries_up_to_512_characters(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, _ = traced
    entries = [f"k{i}={'v' * 100}" for i in range(32)]  # 32 entries of 103 characters
    async with proxied_kit(tmp_path, provider) as (kit, url):
        headers = {**DEMO, "traceparent": TRACEPARENT, "tracestate": ",".join(entries)}
        r = await post(kit, "/v1/chat/completions", chat(), headers)
        assert r.status_code == 200, r.text
        seen = await seen_upstream(url)
    assert seen["tracestate"] == ",".join(entries[:4])  # 4 x 103 + 3 commas <= 512 < 5 x 104


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        f"00-{0:032x}-{CLIENT_SPAN:016x}-01",  # an all-zero trace id
        f"00-{CLIENT_TRACE:032x}-{0:016x}-01",  # an all-zero parent id
        f"ff-{CLIENT_TRACE:032x}-{CLIENT_SPAN:016x}-01",  # the forbidden version
        f"00-{CLIENT_TRACE:032X}-{CLIENT_SPAN:016x}-01",  # upper case
        TRACEPARENT + "-and-more",
        "00-" + "a" * 10_000,
    ],
)
async def test_a_malformed_traceparent_is_ignored_and_the_request_answered(
    tmp_path: Path, traced: tuple[TracerProvider, InMemorySpanExporter], traceparent: str
) -> None:
    provider, exported = traced
    async with service_kit(tmp_path, tracer_provider=provider) as kit:
        headers = {**DEMO, "traceparent": traceparent, "tracestate": "=,\t,"}
        r = await post(kit, "/v1/chat/completions", chat(), headers)
        assert r.status_code == 200, r.text
    (span,) = exported.get_finished_spans()
    assert span.parent is None and span.context.trace_id != CLIENT_TRACE  # a trace of its own
    assert span.status.status_code == StatusCode.UNSET


async def test_the_clients_sampled_flag_does_not_force_a_span_out(tmp_path: Path) -> None:
    exported = InMemorySpanExporter()
    cfg = Telemetry(otlp_endpoint="http://127.0.0.1:9", sample_ratio=0.0)
    provider, processor = telemetry.tracer_provider(cfg, exporter=exported)
    try:
        async with proxied_kit(tmp_path, provider) as (kit, url):
            r = await post(kit, "/v1/chat/completions", chat(),
                           {**DEMO, "traceparent": TRACEPARENT})  # fmt: skip
            assert r.status_code == 200
            seen = await seen_upstream(url)
        processor.force_flush()
        assert exported.get_finished_spans() == ()
        # not recorded, still propagated: the upstream joins the client's trace, unsampled
        assert seen["traceparent"].startswith(f"00-{CLIENT_TRACE:032x}-")
        assert seen["traceparent"].endswith("-00")
    finally:
        provider.shutdown()


async def test_with_tracing_off_nothing_is_traced_or_sent_upstream(tmp_path: Path) -> None:
    async with proxied_kit(tmp_path, None) as (kit, url):
        assert not kit.service.tracing.enabled
        assert kit.service.tracing.request({"traceparent": TRACEPARENT}, chat=True) is None
        for stream in (False, True):
            r = await post(kit, "/v1/chat/completions", chat(stream=stream),
                           {**DEMO, "traceparent": TRACEPARENT})  # fmt: skip
            assert r.status_code == 200
            seen = await seen_upstream(url)
            assert seen["calls"] and seen["traceparent"] is None


# ---- a collector that is down ----------------------------------------------------------------


@pytest.mark.slow  # waits out an export's 5 s timeout, twice
async def test_a_collector_that_never_answers_holds_up_no_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a socket that accepts connections (the kernel does) and never answers: each export
    # waits out its timeout on the export thread, the first from 2 s to 3 s
    with socket.socket() as sink:
        sink.bind(("127.0.0.1", 0))
        sink.listen(64)
        port = sink.getsockname()[1]
        config = CONFIG + (
            f"telemetry: {{otlp_endpoint: 'http://127.0.0.1:{port}', export_timeout_s: 5}}\n"
        )
        async with service_kit(tmp_path, config=config) as kit:
            assert kit.service.tracing.enabled
            slowest, until = 0.0, time.monotonic() + 3.2  # past the first export
            while time.monotonic() < until:
                t0 = time.monotonic()
                r = await post(kit, "/v1/chat/completions", chat(), DEMO)
                slowest = max(slowest, time.monotonic() - t0)
                assert r.status_code == 200
            provider = kit.service.tracing.provider
            assert isinstance(provider, TracerProvider)
            provider.shutdown()
    # an export waits 5 s for an answer that never comes: a request held by it would take
    # seconds; the bound leaves room for a loaded machine
    assert slowest < 2.5
    assert any("Failed to export" in r.getMessage() for r in caplog.records)  # it was tried


class Stuck(SpanExporter):
    """An exporter that does not return until told to."""

    def __init__(self) -> None:
        import threading

        self.release = threading.Event()
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait(10)
        self.exported += len(spans)
        return SpanExportResult.SUCCESS


def test_spans_past_the_queue_are_dropped_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = Stuck()
    processor = telemetry.SheddingProcessor(stuck, max_queue=3, batch=2, delay_ms=1)
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("test")
    with caplog.at_level(logging.WARNING, logger="router.service.telemetry"):
        for _ in range(10):
            tracer.start_span("s").end()
    assert processor.dropped == 7 and processor.pending == 3
    assert len([r for r in caplog.records if "spans dropped" in r.getMessage()]) == 1
    stuck.release.set()
    provider.shutdown()
    assert stuck.exported == 3 and processor.pending == 0


def test_an_sdk_disabled_by_its_environment_sends_no_invalid_context_upstream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")  # the SDK then hands out no-op tracers
    span = Tracing(TracerProvider(shutdown_on_exit=False)).request({}, chat=True)
    assert span is not None and span.context() is None  # not "00-000...-000...-00"
    span.end()
