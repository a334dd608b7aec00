"""Replica load reports: one contract for every :class:`router.service.ports.LoadSource` (the
shipped fake, and a server's Prometheus ``/metrics`` on the fake OpenAI-compatible server; the
Ray replica's is held by ``tests/test_serve.py``), the metric names each engine exposes, where a
server's metrics are, and the counts an in-process replica reports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from regions.backends import Backend, CompletionRequest, TokenChunk
from regions.meters import FakeMeter
from router.errors import LoadUnavailable
from router.metering.replica import MeteredReplica
from router.service.fakes import FakeLoadSource
from router.service.load import (
    MAX_LOAD_COUNT,
    MAX_METRICS_BYTES,
    ServerMetricsLoad,
    checked,
    load_from_metrics,
    metrics_url,
)
from router.service.ports import LoadReport, LoadSource
from tests.fake_apis import fake_openai


@dataclass
class Rig:
    """A source and the knobs of what stands behind it."""

    source: LoadSource
    pin: Callable[[int, int], Awaitable[None]]  # make it report (running, waiting)
    fail: Callable[[str | None], Awaitable[None]]  # "down", "hang" or None


@asynccontextmanager
async def fake_rig() -> AsyncIterator[Rig]:
    fake = FakeLoadSource("r")

    async def pin(running: int, waiting: int) -> None:
        fake.running, fake.waiting = running, waiting

    async def fail(mode: str | None) -> None:
        fake.fail = mode  # type: ignore[assignment]

    yield Rig(fake, pin, fail)




async def control(base: str, body: dict[str, Any]) -> None:
    url = f"{base.removesuffix('/v1')}/_metrics"
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as r:
        assert r.status == 200, await r.text()


@asynccontextmanager
async def server_rig() -> AsyncIterator[Rig]:
    async with fake_openai() as base:
        source = ServerMetricsLoad("r", metrics_url(base), timeout_s=0.3)

        async def pin(running: int, waiting: int) -> None:
            await control(base, {"running": running, "waiting": waiting})

        async def fail(mode: str | None) -> None:
            await control(base, {"mode": {"down": "missing"}.get(mode or "", mode)})

        try:
            yield Rig(source, pin, fail)
        finally:
            await fail(None)  # a hanging answer ends: the server shuts down at once
            await source.aclose()


RIGS = {"fake": fake_rig, "server /metrics": server_rig}


@pytest.mark.parametrize("kind", RIGS)
async def test_an_idle_replica_reports_nothing_running(kind: str) -> None:
    async with RIGS[kind]() as rig:
        assert await rig.source.read() == LoadReport(0, 0)


@pytest.mark.parametrize("kind", RIGS)
async def test_a_report_says_the_running_batch_and_the_queue(kind: str) -> None:
    async with RIGS[kind]() as rig:
        await rig.pin(12, 3)
        assert await rig.source.read() == LoadReport(12, 3)


@pytest.mark.parametrize("kind", RIGS)
async def test_a_source_that_cannot_say_raises_load_unavailable(kind: str) -> None:
    async with RIGS[kind]() as rig:
        await rig.fail("down")
        with pytest.raises(LoadUnavailable, match="r"):
            await rig.source.read()
        await rig.fail(None)
        assert await rig.source.read() == LoadReport(0, 0)


@pytest.mark.parametrize("kind", RIGS)
async def test_a_hanging_source_is_ended_by_its_caller(kind: str) -> None:
    async with RIGS[kind]() as rig:
        await rig.fail("hang")
        t0 = time.monotonic()
        with pytest.raises((LoadUnavailable, TimeoutError)):
            async with asyncio.timeout(0.5):
                await rig.source.read()
        assert time.monotonic() - t0 < 1.0


async def test_the_fake_server_counts_the_requests_it_is_answering() -> None:
    async with fake_openai() as base:
        source = ServerMetricsLoad("r", metrics_url(base), timeout_s=1.0)
        await control(base, {"mode": None})
        async with aiohttp.ClientSession() as session:
            await session.post(f"{base.removesuffix('/v1')}/_fault", json={"mode": "slow"})
            body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]}
            async with session.post(f"{base}/chat/completions", json=body) as r:
                await r.content.readline()  # the first chunk is out; the rest come slowly
                assert await source.read() == LoadReport(1, 0)
        await source.aclose()


VLLM = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 37.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="meta-llama/Llama-3.1-8B-Instruct"} 4.0
vllm:num_requests_running_total_something 999
vllm:time_to_first_token_seconds_bucket{le="0.001"} 0.0
"""
LLAMA_CPP = """# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 1
"""
TGI = "tgi_batch_current_size 8\ntgi_queue_size 0\n"
SGLANG = 'sglang:num_running_reqs{model_name="m"} 5.0\nsglang:num_queue_reqs{model_name="m"} 2.0\n'


@pytest.mark.parametrize(
    ("text", "report"),
    [(VLLM, LoadReport(37, 4)), (LLAMA_CPP, LoadReport(2, 1)), (TGI, LoadReport(8, 0)),
     (SGLANG, LoadReport(5, 2))],
)  # fmt: skip
def test_each_engines_metric_names_are_read(text: str, report: LoadReport) -> None:
    assert load_from_metrics(text) == report


def test_two_engines_behind_one_server_add_up() -> None:
    text = VLLM + VLLM.replace('engine="0"', 'engine="1"')
    assert load_from_metrics(text) == LoadReport(74, 8)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no running-batch gauge"),
        ("vllm:num_requests_running 3\n", "no queue gauge"),
        ("vllm:num_requests_running NaN\nvllm:num_requests_waiting 0\n", "not a count"),
        ("vllm:num_requests_running -2\nvllm:num_requests_waiting 0\n", "not a count"),
        ("vllm:num_requests_running 0.4\nvllm:num_requests_waiting 0\n", "not a count"),
        ("vllm:num_requests_running 1e300\nvllm:num_requests_waiting 0\n", "not a count"),
        ("vllm:num_requests_running 1.5e308\nvllm:num_requests_waiting 1.5e308\n",
         "not a count"),
        ("vllm:num_requests_running 3\nvllm:num_requests_waiting 2e6\n", "not a count"),
        ('vllm:num_requests_running{e="0"} 9e5\nvllm:num_requests_running{e="1"} 9e5\n'
         "vllm:num_requests_waiting 0\n", "not a count"),
    ],
)
def test_metrics_without_a_load_say_what_is_missing(text: str, problem: str) -> None:
    with pytest.raises(LoadUnavailable, match=problem):
        load_from_metrics(text, replica="r", url="http://h/metrics")


def test_a_count_up_to_the_bound_is_read() -> None:
    text = f"vllm:num_requests_running {MAX_LOAD_COUNT:.1f}\nvllm:num_requests_waiting 0.0\n"
    assert load_from_metrics(text) == LoadReport(MAX_LOAD_COUNT, 0)


@pytest.mark.parametrize(
    "report", [LoadReport(10**400, 0), LoadReport(0, -1), LoadReport(MAX_LOAD_COUNT + 1, 0)]
)
def test_an_implausible_report_from_any_source_is_unavailable(report: LoadReport) -> None:
    with pytest.raises(LoadUnavailable, match="not a count"):
        checked(report, replica="r")
    assert checked(LoadReport(3, 1), replica="r") == LoadReport(3, 1)


@asynccontextmanager
async def metrics_server(body: bytes) -> AsyncIterator[str]:
    """A loopback server answering ``body`` at ``/metrics``; yields its URL."""
    from aiohttp import web

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    finally:
        await runner.cleanup()


async def test_a_metrics_body_past_a_real_servers_size_is_not_read() -> None:
    # a real vLLM /metrics is ~100 KB; a body past MAX_METRICS_BYTES (1 MiB) is refused
    assert MAX_METRICS_BYTES <= 1024 * 1024
    line = b'vllm:num_requests_running{e="0000000"} 0\n'
    body = line * (MAX_METRICS_BYTES // len(line) + 1) + b"vllm:num_requests_waiting 0\n"
    async with metrics_server(body) as url:
        source = ServerMetricsLoad("r", url, timeout_s=5.0)
        try:
            with pytest.raises(LoadUnavailable, match="over"):
                await source.read()
        finally:
            await source.aclose()


async def test_a_metrics_body_is_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # parsing a body of many matching gauge lines takes tens of ms: never on the ingress's loop
    import threading

    import router.service.load as load

    threads: list[int] = []
    parse = load.load_from_metrics

    def spy(text: str, **kw: Any) -> LoadReport:
        threads.append(threading.get_ident())
        return parse(text, **kw)

    monkeypatch.setattr(load, "load_from_metrics", spy)
    async with metrics_server(VLLM.encode()) as url:
        source = ServerMetricsLoad("r", url, timeout_s=5.0)
        try:
            assert await source.read() == LoadReport(37, 4)
        finally:
            await source.aclose()
    assert threads and threads[0] != threading.get_ident()


def test_a_servers_metrics_are_beside_its_api() -> None:
    assert metrics_url("http://gpu-1:8000/v1") == "http://gpu-1:8000/metrics"
    assert metrics_url("https://h/v1/") == "https://h/metrics"
    assert metrics_url("http://h:8080") == "http://h:8080/metrics"
    assert metrics_url("http://h/v1", "http://h:9090/m") == "http://h:9090/m"


class GatedBackend(Backend):
    """One slot; each completion waits for ``gate``, then yields one token."""

    model = "gated"
    slots = 1

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def prompt_tokens(self, request: CompletionRequest) -> int:
        return 4

    async def stream(self, request: CompletionRequest) -> AsyncIterator[TokenChunk]:
        await self.gate.wait()
        yield TokenChunk("ok", 1, "stop")


async def test_an_in_process_replica_counts_its_batch_and_its_queue() -> None:
    # what the Ray replica deployment reports (RegionReplica.load): requests holding one of
    # its slots, requests waiting for one; a request cancelled while it waits leaves the queue
    backend = GatedBackend()
    replica = MeteredReplica("local-0", backend, FakeMeter(10.0), period_s=0.01)

    async def run(rid: str) -> None:
        async for _ in replica.run(rid, CompletionRequest(prompt="x", max_tokens=1)):
            pass

    tasks = [asyncio.create_task(run(f"r{k}")) for k in range(3)]
    for _ in range(100):
        await asyncio.sleep(0.005)
        if (replica.active, replica.waiting) == (1, 2):
            break
    assert (replica.active, replica.waiting) == (1, 2)
    tasks[2].cancel()
    await asyncio.sleep(0.01)
    assert (replica.active, replica.waiting) == (1, 1)
    backend.gate.set()
    await asyncio.gather(*tasks[:2])
    assert (replica.active, replica.waiting) == (0, 0)
    await replica.aclose()
