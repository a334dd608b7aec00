"""Parity of bills, streamed or not (issue 13 §1). The same request bills the same tokens by
the same method whether it streams or not: the same prompt and completion tokens in its ledger
row and in the ``usage`` the client gets (a stream's final usage event), the same energy
source, tariff and kWh, for chat and text completions, in process (scripted replicas) and
proxied (a loopback OpenAI-compatible server that reports its usage at the end, with its last
choice, as running totals on every chunk, or not at all). A stream cut by its client is billed
once, for what it was sent; one whose replica ends it without its figures is billed for what
it was sent, never at 0 tokens.

Billed once is read where it counts: one ledger row, and the tenant's budget and the
``/metrics`` energy total grown by that row's kWh, not twice (the ledger alone would hide a
second bill: it keeps the first row of a request id)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regions.backends import CompletionRequest
from regions.openai_backend import OpenAIBackend
from router.http.completions import sse_events
from router.http.wire import parse_body
from router.ledger import LedgerRow
from router.metering.remote import AwaitingBills
from router.service.fakes import FakeReplicaClient, LedgerSink
from router.service.ports import Chunk, Final, StreamItem
from router.service.proxied import ProxiedMetering, ProxiedReplica, TimelineBatch
from tests.fake_apis import USAGE_MODES, Scripted, scripted_openai
from tests.service_kit import BUDGETED, DEMO, Kit, service_kit

NAMES = ("eu-north-0", "eu-central-0", "us-south-0")
QUESTION = "Name two red fruits, please."
# six chunks, 42 characters: one token a chunk and 4 characters a token disagree
PIECES = ["Strawberries", " and", " raspberries", " are", " both", " red."]


def body_of(*, chat: bool, stream: bool, include_usage: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "smollm2-135m", "max_tokens": 16, "stream": stream}
    if chat:
        out["messages"] = [{"role": "user", "content": QUESTION}]
    else:
        out["prompt"] = QUESTION
    if stream:
        out["stream_options"] = {"include_usage": include_usage}
    return out


@dataclass(frozen=True)
class Asked:
    """One request as its client saw it: its id, the text, and its ``usage`` (None: a stream
    that did not ask for it)."""

    request_id: str
    text: str
    usage: dict[str, Any] | None


async def ask(kit: Kit, *, chat: bool, stream: bool, include_usage: bool = True) -> Asked:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = body_of(chat=chat, stream=stream, include_usage=include_usage)
    r = await kit.client.post(path, json=body, headers=DEMO)
    assert r.status_code == 200, r.text
    if not stream:
        got = r.json()
        choice = got["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return Asked(got["id"], text, got["usage"])
    lines = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    events = [json.loads(line) for line in lines[:-1]]
    usages = [e["usage"] for e in events if e.get("usage") is not None]
    assert len(usages) <= 1, usages  # one usage event, the router's
    if include_usage:
        assert len(usages) == 1 and events[-1]["choices"] == []  # it ends the stream
    parts = [c["delta"]["content"] if chat else c["text"] for e in events for c in e["choices"]]
    return Asked(events[0]["id"], "".join(parts), usages[0] if usages else None)


def assert_same_bill(a: LedgerRow, b: LedgerRow) -> None:
    assert (a.prompt_tokens, a.completion_tokens) == (b.prompt_tokens, b.completion_tokens)
    assert (a.replica, a.energy_source, a.tariff) == (b.replica, b.energy_source, b.tariff)
    assert a.kwh_billed == pytest.approx(b.kwh_billed, rel=1e-12)
    assert a.cost_usd == pytest.approx(b.cost_usd, rel=1e-12)


def assert_usage_is_the_row(usage: dict[str, Any] | None, row: LedgerRow) -> None:
    assert usage is not None
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        row.prompt_tokens, row.completion_tokens,
    )  # fmt: skip
    assert usage["total_tokens"] == row.prompt_tokens + row.completion_tokens
    assert usage["energy_kwh"] == pytest.approx(row.kwh_billed, rel=1e-12)
    assert usage["cost_usd"] == pytest.approx(row.cost_usd, rel=1e-12)


async def until_rows(kit: Kit, n: int, timeout_s: float = 2.0) -> list[LedgerRow]:
    """The ledger's rows once there are ``n`` (a cut stream's bill settles on a task)."""
    for _ in range(int(timeout_s / 0.01)):
        if len(kit.rows()) >= n:
            break
        await asyncio.sleep(0.01)
    return kit.rows()


# ---- in process: the replica's own counts and metered energy -----------------------------------


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
@pytest.mark.parametrize("energy_j", [40.0, None], ids=["metered", "predicted"])
async def test_in_process_a_stream_and_a_whole_answer_bill_alike(
    tmp_path: Path, chat: bool, energy_j: float | None
) -> None:
    fakes = [FakeReplicaClient(n, words=PIECES, energy_j=energy_j) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes, config=BUDGETED) as kit:
        whole = await ask(kit, chat=chat, stream=False)
        streamed = await ask(kit, chat=chat, stream=True)
        quiet = await ask(kit, chat=chat, stream=True, include_usage=False)
        rows = [kit.sink.ledger.get(a.request_id) for a in (whole, streamed, quiet)]
        assert all(r is not None for r in rows)
        a, b, c = rows  # type: ignore[misc]
        assert whole.text == streamed.text == quiet.text == "".join(PIECES)
        assert (a.prompt_tokens, a.completion_tokens) == (12, 6)  # the replica's counts
        assert_same_bill(a, b)
        assert_same_bill(a, c)
        assert a.energy_source == ("measured" if energy_j else "predicted")
        assert_usage_is_the_row(whole.usage, a)
        assert_usage_is_the_row(streamed.usage, b)
        assert whole.usage["energy_source"] == streamed.usage["energy_source"] == a.energy_source  # type: ignore[index]
        assert quiet.usage is None  # not asked for; billed all the same
        kit.assert_billed_once([a, b, c])


# ---- proxied: the server's counts, the same whether it streamed or not ---------------------------


class Deployment:
    """The proxied replica's deployment as the ingress sees it (``send`` of
    :class:`ProxiedMetering`): it takes the timelines and the predicted bills, and never
    reports a measurement, so each bill is billed as predicted at its deadline."""

    def __init__(self) -> None:
        self.bills: dict[str, dict[str, Any]] = {}

    async def __call__(self, i: int, batch: TimelineBatch) -> list[str]:
        self.bills.update(batch.bills)
        return []


@dataclass
class Timer:
    now_s: float = 0.0

    def __call__(self) -> float:
        return self.now_s


@dataclass
class Proxied:
    kit: Kit
    metering: ProxiedMetering
    deployment: Deployment
    timer: Timer
    script: Scripted
    backend: OpenAIBackend = field(repr=False)

    async def deadline(self) -> None:
        """Send the deployment its timelines and bills, then let their measurement's time
        pass: the predicted bills reach the ledger (``estimated``)."""
        await self.metering.send(self.deployment)
        self.timer.now_s += 31.0
        await self.metering.send(self.deployment)


@asynccontextmanager
async def proxied_kit(tmp_path: Path, script: Scripted) -> AsyncIterator[Proxied]:
    """The service with eu-north-0 (where everything goes: clean and cheap) behind ``script``'s
    server, and its metering as in production (the bill handed to the replica's deployment)."""
    async with scripted_openai(script) as url:
        backend = OpenAIBackend(url, "smollm2-135m")
        sink = LedgerSink(tmp_path / "ledger.sqlite")
        timer = Timer()
        metering = ProxiedMetering([0], sink, AwaitingBills(30.0, clock=timer))
        replicas = [ProxiedReplica(0, "eu-north-0", backend, metering),
                    FakeReplicaClient("eu-central-0"), FakeReplicaClient("us-south-0")]  # fmt: skip
        async with service_kit(
            tmp_path,
            replicas=replicas,
            config=BUDGETED,
            sink=sink,
            proxied=metering,  # type: ignore[arg-type]
        ) as kit:
            yield Proxied(kit, metering, Deployment(), timer, script, backend)
        await backend.aclose()


def estimated_tokens(text: str) -> int:
    """The router's own count where a server reports none: 4 characters a token."""
    return max(1, len(text) // 4) if text else 0


@pytest.mark.parametrize("usage", USAGE_MODES)
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
async def test_proxied_a_stream_and_a_whole_answer_bill_alike(
    tmp_path: Path, chat: bool, usage: str
) -> None:
    script = Scripted(PIECES, prompt_tokens=9, usage=usage)
    async with proxied_kit(tmp_path, script) as px:
        kit = px.kit
        whole = await ask(kit, chat=chat, stream=False)
        streamed = await ask(kit, chat=chat, stream=True)
        assert whole.text == streamed.text == "".join(PIECES)
        await px.deadline()
        a, b = (kit.sink.ledger.get(x.request_id) for x in (whole, streamed))
        assert a is not None and b is not None
        if usage == "none":  # counted by the router, the same way streamed or not
            expected = (estimated_tokens(QUESTION), estimated_tokens("".join(PIECES)))
        else:  # the server's, once: running totals are not summed
            expected = (9, len(PIECES))
        assert (a.prompt_tokens, a.completion_tokens) == expected
        assert_same_bill(a, b)
        assert a.energy_source == "predicted"  # never measured here: billed as predicted
        for asked, row in ((whole, a), (streamed, b)):
            assert_usage_is_the_row(asked.usage, row)
            assert asked.usage["energy_source"] == "predicted"  # type: ignore[index]
            # the replica's deployment was handed the same counts to price its measurement
            template = px.deployment.bills[row.request_id]
            assert (template["prompt_tokens"], template["completion_tokens"]) == expected
        kit.assert_billed_once([a, b])
    if usage == "final":
        streamed_body = next(b for b in script.bodies if b["stream"])
        assert streamed_body["stream_options"] == {"include_usage": True}


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    pieces=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]),
                            min_size=1, max_size=12), min_size=1, max_size=10),
    usage=st.sampled_from(USAGE_MODES),
    chat=st.booleans(),
)  # fmt: skip
def test_property_a_proxied_answer_counts_the_same_streamed_or_whole(
    tmp_path: Path, pieces: list[str], usage: str, chat: bool
) -> None:
    """Whatever the answer's pieces and however the server reports usage, the replica's
    Final has the same counts for the stream as for the whole answer."""

    async def both() -> tuple[Final, Final]:
        script = Scripted(pieces, prompt_tokens=5, usage=usage)
        async with scripted_openai(script) as url:
            backend = OpenAIBackend(url, "m")
            metering = ProxiedMetering([0], LedgerSink(tmp_path / "unused.sqlite"))
            replica = ProxiedReplica(0, "r", backend, metering)
            request = CompletionRequest(
                messages=[{"role": "user", "content": QUESTION}] if chat else None,
                prompt=None if chat else QUESTION,
            )
            whole = (await replica.complete("w", request)).final
            items = [i async for i in replica.stream("s", request)]
            await backend.aclose()
        last = items[-1]
        assert isinstance(last, Final)
        return whole, last

    whole, streamed = asyncio.run(both())
    assert (whole.prompt_tokens, whole.completion_tokens) == (
        streamed.prompt_tokens, streamed.completion_tokens,
    )  # fmt: skip
    if usage != "none":
        assert (streamed.prompt_tokens, streamed.completion_tokens) == (5, len(pieces))


# ---- cut streams: billed once, for what was sent -------------------------------------------------


async def cut_after_first_chunk(kit: Kit, request_id: str, *, chat: bool) -> bytes:
    """Start a stream as the ASGI front does and hang up after its first chunk: what the
    client got."""
    svc = kit.service
    parsed = parse_body(json.dumps(body_of(chat=chat, stream=True)).encode(), chat=chat)
    caller = svc.authenticate(DEMO["Authorization"])
    admitted = await svc.completions.admit(caller, parsed)
    pref = svc.live.router.preference(None)
    started = await svc.completions.start(
        request_id, "demo", parsed, admitted.cands, pref, hold=admitted.hold
    )
    out = sse_events(svc.completions.relay(started, request_id, "demo", parsed), request_id,
                     parsed, 0)  # fmt: skip
    first = await anext(out)
    await out.aclose()  # the client hangs up
    return first


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
async def test_in_process_a_cut_stream_is_billed_once_for_what_it_was_sent(
    tmp_path: Path, chat: bool
) -> None:
    fakes = [FakeReplicaClient(n, words=PIECES, delay_s=0.01) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes, config=BUDGETED) as kit:
        first = await cut_after_first_chunk(kit, "cmpl-cut", chat=chat)
        assert b"Strawberries" in first and b"raspberries" not in first
        (row,) = await until_rows(kit, 1)
        await asyncio.sleep(0.1)  # nothing else comes: no second bill of the same request
        assert row.request_id == "cmpl-cut" and row.energy_source == "predicted"
        assert row.completion_tokens == 1  # the one chunk it was sent
        assert kit.replicas["eu-north-0"].closed == ["cmpl-cut"]  # generation stopped
        kit.assert_billed_once([row])


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "text"])
async def test_proxied_a_cut_stream_is_billed_once_for_what_it_was_sent(
    tmp_path: Path, chat: bool
) -> None:
    script = Scripted(PIECES, usage="final", pause_s=0.05)
    async with proxied_kit(tmp_path, script) as px:
        first = await cut_after_first_chunk(px.kit, "cmpl-cut", chat=chat)
        assert b"Strawberries" in first and b"raspberries" not in first
        for _ in range(200):  # the cut's bill is settled on a task of its own
            if "cmpl-cut" in px.metering.waiting(None):
                break
            await asyncio.sleep(0.01)
        await px.deadline()
        (row,) = px.kit.rows()
        assert row.request_id == "cmpl-cut" and row.energy_source == "predicted"
        assert row.completion_tokens == 1  # the server's usage never came: one chunk sent
        assert row.prompt_tokens == len(QUESTION) // 4
        px.kit.assert_billed_once([row])
        await asyncio.sleep(0.2)
        assert script.cut == 1  # the server saw the hang-up: it stopped generating


# ---- a stream that ends without its figures is billed for what was sent, not 0 tokens -----------


class Unfinished(FakeReplicaClient):
    """A replica whose stream ends without its :class:`Final` (a broken deployment, a proxy
    that drops the end): the client got its text all the same."""

    async def stream(
        self, request_id: str, request: CompletionRequest
    ) -> AsyncIterator[StreamItem]:
        async for item in super().stream(request_id, request):
            if isinstance(item, Chunk):
                yield item


async def test_a_stream_that_ends_without_its_figures_is_billed_for_what_it_sent(
    tmp_path: Path,
) -> None:
    fakes = [Unfinished(n, words=PIECES) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes, config=BUDGETED) as kit:
        streamed = await ask(kit, chat=True, stream=True)
        assert streamed.text == "".join(PIECES)
        (row,) = await until_rows(kit, 1)
        assert row.energy_source == "predicted"
        assert (row.prompt_tokens, row.completion_tokens) == (len(QUESTION) // 4, len(PIECES))
        assert row.kwh_billed > 0 and row.cost_usd > 0
        assert_usage_is_the_row(streamed.usage, row)
        # collected whole (a batch line that asked for a stream): the same bill
        svc = kit.service
        parsed = parse_body(json.dumps(body_of(chat=True, stream=True)).encode(), chat=True)
        admitted = await svc.completions.admit(svc.authenticate(DEMO["Authorization"]), parsed)
        pref = svc.live.router.preference(None)
        started = await svc.completions.start(
            "job-x", "demo", parsed, admitted.cands, pref, hold=admitted.hold
        )
        done = await svc.completions.collect(started, "job-x", "demo", parsed)
        collected = kit.sink.ledger.get("job-x")
        assert collected is not None and done.text == "".join(PIECES)
        assert_same_bill(row, collected)
        assert_usage_is_the_row(done.usage, collected)
        kit.assert_billed_once([row, collected])
