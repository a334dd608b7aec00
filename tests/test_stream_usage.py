"""Proxied streams are billed with the token counts their server reports (issue 11.13): the
router asks for OpenAI's ``stream_options.include_usage`` and reads the usage event the server
ends the stream with; without one (a server that does not send it, nonsense, a stream cut
mid-way) the tokens are estimated as before. Against loopback servers that stream as scripted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from regions.backends import BackendRefused, CompletionRequest
from regions.config import OpenAIBackendConfig
from regions.openai_backend import OpenAIBackend
from router.service.fakes import FakeReplicaClient, LedgerSink
from router.service.proxied import ProxiedMetering, ProxiedReplica
from tests.fake_apis import fake_openai
from tests.service_kit import DEMO, chat, service_kit
from tests.test_http1 import Handler, Seen, read_request, server, sse

Event = dict[str, Any] | str  # a JSON event, or a data line as it is ("[DONE]")


def delta(text: str, finish: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}, "finish_reason": finish}
    return {"object": "chat.completion.chunk", "choices": [choice]}


def usage(prompt: Any = 8, completion: Any = 4) -> dict[str, Any]:
    """The event OpenAI (and vLLM, llama.cpp server) end a stream with under include_usage."""
    return {"object": "chat.completion.chunk", "choices": [],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}  # fmt: skip


WORDS = [delta("Paris"), delta(" is"), delta(" lovely", "stop")]  # 3 chunks; usage() says 4


def streaming(events: list[Event], bodies: list[dict[str, Any]], *, cut: bool = False,
              pause_s: float = 0.0) -> Handler:  # fmt: skip
    """A server that streams ``events`` to every request (each in an HTTP chunk of its own,
    ``pause_s`` apart, so that they come in separate reads) and records the request bodies.
    ``cut``: it dies after them, the body unfinished."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        seen = Seen()
        while (request := await read_request(reader, seen)) is not None:
            bodies.append(json.loads(request.partition(b"\r\n\r\n")[2]))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
            for event in events:
                data = event if isinstance(event, str) else json.dumps(event)
                writer.write(sse(b"data: %s\n\n" % data.encode()))
                if pause_s:
                    await writer.drain()
                    await asyncio.sleep(pause_s)
            if cut:
                await writer.drain()
                writer.transport.abort()
                return
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    return handler


REQUEST = CompletionRequest(messages=[{"role": "user", "content": "Name one fruit."}])
ESTIMATED_PROMPT = len("Name one fruit.") // 4  # 3; the server's figure below is 8


# ---- the backend: asks for usage on streams, reports it on the last batch ----------------------


@pytest.mark.parametrize("pause_s", [0.0, 0.02])  # the events in one read, or each in its own
async def test_a_stream_asks_for_usage_and_reports_the_servers_counts(pause_s: float) -> None:
    bodies: list[dict[str, Any]] = []
    async with server(streaming([*WORDS, usage(), "[DONE]"], bodies, pause_s=pause_s)) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        batches = [b async for b in backend.stream_batches(REQUEST)]
        chunks = [c async for c in backend.stream(REQUEST)]
        await backend.aclose()
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"] == {"include_usage": True}
    last = batches[-1]
    assert last.last and (last.prompt_tokens, last.completion_tokens) == (8, 4)
    assert all(b.prompt_tokens is None and not b.last for b in batches[:-1])
    # the usage event is no chunk of output: stream() yields the text alone
    assert [c.text for c in chunks] == ["Paris", " is", " lovely"]
    assert [c.text for b in batches for c in b.chunks] == ["Paris", " is", " lovely"]


async def test_usage_on_a_stream_that_ends_without_done_is_on_its_last_batch() -> None:
    bodies: list[dict[str, Any]] = []
    async with server(streaming([*WORDS, usage()], bodies, pause_s=0.02)) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        batches = [b async for b in backend.stream_batches(REQUEST)]
        await backend.aclose()
    assert batches[-1].last and (batches[-1].prompt_tokens, batches[-1].completion_tokens) == (8, 4)


async def test_usage_sent_with_the_last_choice_counts_and_its_text_is_kept() -> None:
    # TGI and older llama.cpp servers put usage on the chunk that carries finish_reason
    last = {**delta(" lovely", "stop"), "usage": {"prompt_tokens": 8, "completion_tokens": 4}}
    bodies: list[dict[str, Any]] = []
    async with server(streaming([*WORDS[:2], last, "[DONE]"], bodies)) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        batches = [b async for b in backend.stream_batches(REQUEST)]
        await backend.aclose()
    assert [c.text for b in batches for c in b.chunks] == ["Paris", " is", " lovely"]
    assert (batches[-1].prompt_tokens, batches[-1].completion_tokens) == (8, 4)


@pytest.mark.parametrize(
    "event",
    ["3", '"text"', "[1, 2]", '{"choices": [3]}', '{"choices": {"a": 1}}',
     '{"choices": [{"delta": "x"}]}', '{"choices": [{"delta": {"content": 5}}]}'],
)  # fmt: skip
async def test_an_event_of_the_wrong_shape_is_the_servers_failure_not_a_crash(event: str) -> None:
    # valid JSON that is no chunk object raised AttributeError (or billed a number as text):
    # it is the server's nonsense, a BackendError (the replica fails, is cooled down)
    from regions.backends import BackendError

    bodies: list[dict[str, Any]] = []
    async with server(streaming([WORDS[0], event, "[DONE]"], bodies)) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        with pytest.raises(BackendError, match="stream event"):
            async for _ in backend.stream_batches(REQUEST):
                pass
        await backend.aclose()


async def test_without_stream_usage_no_stream_options_are_sent() -> None:
    # a server that refuses stream_options is configured with stream_usage: false
    bodies: list[dict[str, Any]] = []
    async with server(streaming([*WORDS, "[DONE]"], bodies)) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m", stream_usage=False)
        batches = [b async for b in backend.stream_batches(REQUEST)]
        await backend.aclose()
    assert "stream_options" not in bodies[0]
    assert batches[-1].last and batches[-1].prompt_tokens is None


async def test_a_non_streamed_call_never_sends_stream_options() -> None:
    # OpenAI refuses stream_options on a request that does not stream
    answer = {"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}],
              "usage": {"prompt_tokens": 8, "completion_tokens": 1}}  # fmt: skip
    body = json.dumps(answer).encode()
    bodies: list[dict[str, Any]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while (request := await read_request(reader, Seen())) is not None:
            bodies.append(json.loads(request.partition(b"\r\n\r\n")[2]))
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async with server(handler) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        ans = await backend.answer(REQUEST)
        await backend.aclose()
    assert "stream_options" not in bodies[0] and ans.prompt_tokens == 8


def test_stream_usage_is_on_by_default_and_can_be_turned_off() -> None:
    base = {"kind": "openai", "url": "http://h:8000/v1", "model": "m"}
    assert OpenAIBackendConfig.model_validate(base).stream_usage is True
    assert OpenAIBackendConfig.model_validate({**base, "stream_usage": False}).stream_usage is False


# ---- the bill: the server's counts when they came, the estimate otherwise ----------------------


Streamed = tuple[list[dict[str, Any]], Any, dict[str, Any]]  # sent, row, the upstream's body


async def proxied_stream(
    tmp_path: Path, events: list[Event], *, cut: bool = False, **backend: Any
) -> Streamed:
    """One streamed chat request routed to a ProxiedReplica whose server streams ``events``
    (its OpenAIBackend made with the keywords ``backend``): the client's SSE events, the
    ledger row and the body the server got."""
    bodies: list[dict[str, Any]] = []
    async with server(streaming(events, bodies, cut=cut)) as seen:
        upstream = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "smollm2-135m", **backend)
        metering = ProxiedMetering([0], LedgerSink(tmp_path / "unused.sqlite"))
        proxied = ProxiedReplica(0, "eu-north-0", upstream, metering)
        others = [FakeReplicaClient("eu-central-0"), FakeReplicaClient("us-south-0")]
        async with service_kit(tmp_path, replicas=[proxied, *others]) as kit:  # type: ignore[list-item]
            r = await kit.client.post(
                "/v1/chat/completions",
                json=chat(stream=True, stream_options={"include_usage": True}), headers=DEMO,
            )  # fmt: skip
            assert r.status_code == 200, r.text
            assert r.headers["x-carbon-replica"] == "eu-north-0"
            sent = [json.loads(line[6:]) for line in r.text.split("\n")
                    if line.startswith("data: {")]  # fmt: skip
            for _ in range(100):  # a cut stream's bill is settled on a task of its own
                if kit.rows():
                    break
                await asyncio.sleep(0.01)
            (row,) = kit.rows()
        await upstream.aclose()
    return sent, row, bodies[0]


def text_of(sent: list[dict[str, Any]]) -> str:
    return "".join(c["delta"]["content"] for e in sent for c in e.get("choices") or [])


async def test_a_proxied_stream_is_billed_with_the_servers_token_counts(tmp_path: Path) -> None:
    sent, row, body = await proxied_stream(tmp_path, [*WORDS, usage(8, 4), "[DONE]"])
    assert (row.prompt_tokens, row.completion_tokens) == (8, 4)  # not (3, 3): 4 chars, 3 chunks
    assert text_of(sent) == "Paris is lovely"
    # the server's usage event did not reach the client: the one usage event is the router's
    ends = [e for e in sent if not e.get("choices")]
    assert len(ends) == 1 and "energy_kwh" in ends[0]["usage"]
    assert ends[0]["usage"]["prompt_tokens"] == 8 and ends[0]["usage"]["completion_tokens"] == 4
    assert body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "reported",
    [usage(1e30, -3), usage(8.5, "4"), usage(None, None), {"choices": [], "usage": "lots"},
     {"choices": [], "usage": None}],
)  # fmt: skip
async def test_nonsense_usage_in_a_stream_is_ignored_and_estimated(
    tmp_path: Path, reported: dict[str, Any]
) -> None:
    sent, row, _ = await proxied_stream(tmp_path, [*WORDS, reported, "[DONE]"])
    assert text_of(sent) == "Paris is lovely"
    # estimated from the text, as the same answer whole would be: 15 characters, 3 tokens
    assert (row.prompt_tokens, row.completion_tokens) == (ESTIMATED_PROMPT, 3)


async def test_half_the_usage_counts_and_the_other_half_is_estimated(tmp_path: Path) -> None:
    _, row, _ = await proxied_stream(tmp_path, [*WORDS, usage(8, -1), "[DONE]"])
    assert (row.prompt_tokens, row.completion_tokens) == (8, 3)


async def test_a_server_that_sends_no_usage_is_billed_the_estimate(tmp_path: Path) -> None:
    _, row, body = await proxied_stream(tmp_path, [*WORDS, "[DONE]"], stream_usage=False)
    assert "stream_options" not in body
    assert (row.prompt_tokens, row.completion_tokens) == (ESTIMATED_PROMPT, 3)


async def test_a_stream_cut_mid_way_is_billed_the_estimate(tmp_path: Path) -> None:
    sent, row, _ = await proxied_stream(tmp_path, WORDS[:2], cut=True)
    assert text_of(sent) == "Paris is" and sent[-1]["error"]["code"] == "replica_failed"
    assert (row.prompt_tokens, row.completion_tokens) == (ESTIMATED_PROMPT, 2)
    assert row.energy_source == "predicted"


async def test_a_usage_that_is_no_object_is_ignored_in_a_whole_answer_too() -> None:
    answer = {"choices": [{"index": 0, "message": {"content": "ok"}, "finish_reason": "stop"}],
              "usage": "lots"}  # fmt: skip
    body = json.dumps(answer).encode()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, _: int) -> None:
        while await read_request(reader, Seen()) is not None:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async with server(handler) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "m")
        ans = await backend.answer(REQUEST)
        await backend.aclose()
    assert ans.text == "ok" and (ans.prompt_tokens, ans.completion_tokens) == (None, None)


# ---- the fake OpenAI-compatible server of the live tests does what real ones do ----------------


async def fault(url: str, mode: str | None) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        base = url.removesuffix("/v1")
        async with session.post(f"{base}/_fault", json={"mode": mode}) as resp:
            assert resp.status == 200, await resp.text()


async def test_the_fake_server_ends_a_stream_with_usage_when_asked() -> None:
    async with fake_openai() as url:
        backend = OpenAIBackend(url, "fake")
        batches = [b async for b in backend.stream_batches(REQUEST)]
        plain = OpenAIBackend(url, "fake", stream_usage=False)
        unasked = [b async for b in plain.stream_batches(REQUEST)]
        await fault(url, "absurd_usage")
        absurd = [b async for b in backend.stream_batches(REQUEST)]
        await backend.aclose()
        await plain.aclose()
    for got in (batches, unasked, absurd):
        assert "".join(c.text for b in got for c in b.chunks) == "t0 t1 t2 t3 t4 t5 t6 t7 "
    assert (batches[-1].prompt_tokens, batches[-1].completion_tokens) == (8, 8)
    assert unasked[-1].last and unasked[-1].prompt_tokens is None
    assert (absurd[-1].prompt_tokens, absurd[-1].completion_tokens) == (None, None)


async def test_the_fake_server_can_refuse_stream_options() -> None:
    async with fake_openai() as url:
        await fault(url, "refuse_stream_options")
        backend = OpenAIBackend(url, "fake")
        with pytest.raises(BackendRefused, match="stream_options"):
            async for _ in backend.stream(REQUEST):
                pass
        plain = OpenAIBackend(url, "fake", stream_usage=False)  # what such a server needs
        assert len([c async for c in plain.stream(REQUEST)]) == 8
        assert (await backend.answer(REQUEST)).prompt_tokens == 8  # whole answers unaffected
        await backend.aclose()
        await plain.aclose()
