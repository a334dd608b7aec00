"""Every line of a batch is billed exactly once (issue 13 §1, the OpenAI Batch API of
router/service/batches.py on the jobs of router/jobs.py).

The rule, as the README states it: a line is billed once, under its own request id (its job's
id, the output line's ``id``), for the attempt whose answer the output file carries, and the
``usage`` of that answer is its ledger row. A line that ends without an answer (the upstream
refused it, every replica it may use failed) is not billed: its output line carries the error,
as a synchronous request that fails gets an error and no bill. A line retried (replicas full, a
runner stopped or crashed, a second ingress started on the same job store) keeps its request
id and is not billed again. Duplicate ``custom_id`` values are refused when the batch is
created (400), so that each output line maps to one input line.

The scripted replica answers one word more on each call, as a sampled model never answers twice
alike: a line run twice shows in its output's usage or its ledger row."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regions.backends import CompletionRequest
from router.errors import ReplicaFailed, UpstreamRefused
from router.jobs import JobError, JobStore
from router.ledger import LedgerRow
from router.service.fakes import FakeReplicaClient
from router.service.ports import Answer, StreamItem
from tests.service_kit import ADMIN, BUDGETED, DEMO, Kit, service_kit, upload

NAMES = ("eu-north-0", "eu-central-0", "us-south-0")
WORDS = ("One", " two", " three", " four", " five", " six", " seven")


def prompt_of(request: CompletionRequest) -> str:
    return request.prompt or "".join(m["content"] for m in request.messages or [])


class LineReplica(FakeReplicaClient):
    """Answers one word more on each call (1 to 7, then round again); refuses (the server's
    400) a prompt that says REFUSE, and fails (a 5xx) on one that says FAIL. ``gate``: when
    set, every call waits for it."""

    def __init__(self, name: str, **kw: Any) -> None:
        super().__init__(name, words=WORDS, **kw)
        self.answered = 0

    async def complete(self, request_id: str, request: CompletionRequest) -> Answer:
        self.calls.append(request_id)
        started = datetime.now(UTC)
        await self._begin()
        said = prompt_of(request)
        if "REFUSE" in said:
            raise UpstreamRefused(f"replica {self.name}: HTTP 400: no, not {said!r}")
        if "FAIL" in said:
            raise ReplicaFailed("HTTP 500", replica=self.name)
        await asyncio.sleep(self.delay_s)
        self.answered += 1
        n = 1 + (self.answered - 1) % len(WORDS)
        return Answer("".join(WORDS[:n]), "stop", self._final(started, n))

    async def stream(
        self, request_id: str, request: CompletionRequest
    ) -> AsyncIterator[StreamItem]:
        raise AssertionError("batch lines here are not streamed")
        yield  # pragma: no cover


def replicas(**kw: Any) -> list[LineReplica]:
    return [LineReplica(n, **kw) for n in NAMES]


def calls(kit: Kit) -> int:
    return sum(len(r.calls) for r in kit.replicas.values())


def line(custom_id: Any, say: str, *, chat: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "smollm2-135m", "max_tokens": 16}
    if chat:
        body["messages"] = [{"role": "user", "content": say}]
    else:
        body["prompt"] = say
    url = "/v1/chat/completions" if chat else "/v1/completions"
    out = {"method": "POST", "url": url, "body": body}
    if custom_id is not None:
        out["custom_id"] = custom_id
    return out


def jsonl(lines: Sequence[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(x) for x in lines) + "\n").encode()


async def create(kit: Kit, lines: Sequence[dict[str, Any]], *, chat: bool = True) -> Any:
    up = await upload(kit, jsonl(lines))
    assert up.status_code == 200, up.text
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"input_file_id": up.json()["id"], "endpoint": endpoint, "completion_window": "24h"}
    return await kit.client.post("/v1/batches", json=body, headers=DEMO)


async def due_now(kit: Kit, batch_id: str) -> None:
    r = await kit.client.post(f"/v1/batches/{batch_id}/run", headers=ADMIN)
    assert r.status_code == 200, r.text


async def drain(kit: Kit) -> None:
    """Run what is due until nothing runs."""
    deferral = kit.service.deferral
    while True:
        deferral.run_due()
        if not deferral._running:
            return
        await asyncio.gather(*deferral._running)


async def run(kit: Kit, lines: Sequence[dict[str, Any]], *, chat: bool = True) -> str:
    r = await create(kit, lines, chat=chat)
    assert r.status_code == 200, r.text
    await due_now(kit, r.json()["id"])
    await drain(kit)
    return str(r.json()["id"])


async def output(kit: Kit, batch_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    status = (await kit.client.get(f"/v1/batches/{batch_id}", headers=DEMO)).json()
    assert status["status"] == "completed", status
    r = await kit.client.get(f"/v1/files/{status['output_file_id']}/content", headers=DEMO)
    return status, [json.loads(x) for x in r.text.splitlines()]


async def until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def row_of(kit: Kit, request_id: str) -> LedgerRow:
    row = kit.sink.ledger.get(request_id)
    assert row is not None, f"{request_id} was not billed"
    return row


def assert_answer_is_its_bill(kit: Kit, out: dict[str, Any]) -> LedgerRow:
    """An output line's answer and its ledger row: the same request id, the same tokens."""
    response = out["response"]
    assert out["error"] is None and response["status_code"] == 200
    assert response["request_id"] == out["id"] == response["body"]["id"]
    row = row_of(kit, out["id"])
    usage = response["body"]["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        row.prompt_tokens, row.completion_tokens,
    )  # fmt: skip
    assert usage["energy_kwh"] == pytest.approx(row.kwh_billed, rel=1e-12)
    return row


# ---- N lines, N bills ------------------------------------------------------------------------


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ids=st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=9, unique=True),
    chat=st.booleans(),
)
def test_property_a_batch_of_n_lines_is_n_bills_under_distinct_ids(
    tmp_path_factory: pytest.TempPathFactory, ids: list[str], chat: bool
) -> None:
    async def check() -> None:
        tmp = tmp_path_factory.mktemp("batch")
        async with service_kit(tmp, replicas=replicas(), config=BUDGETED) as kit:
            batch_id = await run(kit, [line(c, f"line {k}", chat=chat) for k, c in enumerate(ids)],
                                 chat=chat)  # fmt: skip
            status, out = await output(kit, batch_id)
            assert status["request_counts"] == {"total": len(ids), "completed": len(ids),
                                                "failed": 0}  # fmt: skip
            assert [x["custom_id"] for x in out] == ids  # in the input's order
            rows = [assert_answer_is_its_bill(kit, x) for x in out]
            assert len({r.request_id for r in rows}) == len(ids)
            kit.assert_billed_once(rows)
            assert calls(kit) == len(ids)  # each line ran once

    asyncio.run(check())


# ---- duplicate custom_ids ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ids", "named"),
    [(["a", "b", "a"], "'a'"),  # the same id twice
     (["line-2", None], "'line-2'"),  # an id the router would give a line without one
     ([7, "7"], "'7'")],  # the same id once a number, once a string
)  # fmt: skip
async def test_duplicate_custom_ids_are_refused_when_the_batch_is_created(
    tmp_path: Path, ids: list[Any], named: str
) -> None:
    async with service_kit(tmp_path, replicas=replicas()) as kit:
        r = await create(kit, [line(c, f"line {k}") for k, c in enumerate(ids)])
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "input_file_id" and "custom_id" in error["message"]
        assert named in error["message"]
        assert kit.service.jobs.due(datetime(2100, 1, 1, tzinfo=UTC)) == []  # nothing stored
        assert kit.rows() == []


# ---- lines that fail -----------------------------------------------------------------------------


async def test_a_line_the_upstream_refuses_is_not_billed_as_a_request_it_refuses(
    tmp_path: Path,
) -> None:
    async with service_kit(tmp_path, replicas=replicas(), config=BUDGETED) as kit:
        batch_id = await run(kit, [line("ok-1", "hello"), line("no", "REFUSE this"),
                                   line("ok-2", "hello again")])  # fmt: skip
        status, out = await output(kit, batch_id)
        assert status["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
        refused = out[1]
        assert refused["custom_id"] == "no" and refused["response"] is None
        assert "HTTP 400" in refused["error"]["message"]  # the server's refusal
        rows = [assert_answer_is_its_bill(kit, x) for x in (out[0], out[2])]
        kit.assert_billed_once(rows)  # the refused line is not in the ledger
        assert calls(kit) == 3  # the refusal was not retried elsewhere
        # the same request, synchronously: 400, not billed either
        sync = await kit.client.post("/v1/chat/completions", headers=DEMO,
                                     json=line(None, "REFUSE this")["body"])  # fmt: skip
        assert sync.status_code == 400
        kit.assert_billed_once(rows)
        # a failed line is final: running what is due again runs nothing and bills nothing
        await drain(kit)
        assert calls(kit) == 4
        kit.assert_billed_once(rows)


async def test_a_line_whose_replicas_all_fail_is_not_billed(tmp_path: Path) -> None:
    async with service_kit(tmp_path, replicas=replicas(), config=BUDGETED) as kit:
        batch_id = await run(kit, [line("broken", "FAIL please")])
        status, out = await output(kit, batch_id)
        assert status["request_counts"] == {"total": 1, "completed": 0, "failed": 1}
        assert out[0]["response"] is None and out[0]["error"]["message"]
        assert calls(kit) == 3  # failed over to every replica, then gave up
        assert kit.rows() == []


# ---- retried lines keep their request id, and are billed once --------------------------------


async def test_a_line_retried_when_every_replica_is_full_keeps_its_request_id(
    tmp_path: Path,
) -> None:
    async with service_kit(tmp_path, replicas=replicas(), config=BUDGETED) as kit:
        r = await create(kit, [line("full", "hello")])
        batch_id = r.json()["id"]
        (job_id,) = kit.service.jobs.batch(batch_id).jobs  # type: ignore[union-attr]
        states = kit.service.live.router.states
        for s in states:
            s.active = 10_000  # every replica full: the line waits its turn
        await due_now(kit, batch_id)
        await drain(kit)
        job = kit.service.jobs.get(job_id)
        assert job is not None and job.status == "scheduled" and kit.rows() == []
        for s in states:
            s.active = 0
        await due_now(kit, batch_id)
        await drain(kit)
        _, out = await output(kit, batch_id)
        assert out[0]["id"] == job_id
        kit.assert_billed_once([assert_answer_is_its_bill(kit, out[0])])


async def test_a_runner_stopped_mid_line_bills_each_line_once_after_a_restart(
    tmp_path: Path,
) -> None:
    """The ingress stops (its job tasks cancelled) while a line waits for its replica; a fresh
    service on the same job store and ledger runs the batch to its end."""
    lines = [line(f"q{k}", f"line {k}") for k in range(3)]
    gate = asyncio.Event()  # never set: the replicas hang until the runner is stopped
    async with service_kit(tmp_path, replicas=replicas(gate=gate), config=BUDGETED) as first:
        r = await create(first, lines)
        batch_id = r.json()["id"]
        await due_now(first, batch_id)
        first.service.deferral.run_due()
        running = list(first.service.deferral._running)
        await until(lambda: calls(first) == len(lines))
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await asyncio.sleep(0.05)  # bills settling on tasks of their own, if any
    async with service_kit(tmp_path, replicas=replicas(), config=BUDGETED) as fresh:
        await due_now(fresh, batch_id)
        await drain(fresh)
        status, out = await output(fresh, batch_id)
        assert status["request_counts"]["completed"] == len(lines)
        rows = [assert_answer_is_its_bill(fresh, x) for x in out]
        fresh.assert_billed_once(rows)


class FailingStore(JobStore):
    """A job store whose writes of a job's outcome fail ``times`` times (a full disk, a store
    locked past its timeout): the line was billed, its answer is not stored. ``None``: always,
    as a runner that dies before it stores anything."""

    def __init__(self, path: Path, times: int | None, **kw: Any) -> None:
        super().__init__(path, **kw)
        self.times = times

    def _fail(self) -> None:
        if self.times is None or self.times > 0:
            self.times = None if self.times is None else self.times - 1
            raise JobError(f"{self.path}: database or disk is full")

    def finish(self, job_id: str, **kw: Any) -> bool:
        self._fail()
        return super().finish(job_id, **kw)

    def retry_at(self, job_id: str, at: datetime, claim: str | None = None) -> None:
        if self.times is None:
            self._fail()
        super().retry_at(job_id, at, claim)


async def test_a_line_billed_whose_answer_was_not_stored_runs_again_and_is_billed_once(
    tmp_path: Path,
) -> None:
    store = FailingStore(tmp_path / "jobs.sqlite", times=1)
    async with service_kit(tmp_path, replicas=replicas(), config=BUDGETED, jobs=store) as kit:
        batch_id = await run(kit, [line("once", "hello")])
        status, out = await output(kit, batch_id)
        assert status["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
        assert calls(kit) == 2  # its answer was lost once: the line ran again
        (billed,) = kit.rows()
        assert assert_answer_is_its_bill(kit, out[0]) == billed  # the first attempt's bill
        kit.assert_billed_once([billed])  # counted against its budget once


async def test_a_line_billed_before_its_runner_died_is_billed_once_after_a_restart(
    tmp_path: Path,
) -> None:
    store = FailingStore(tmp_path / "jobs.sqlite", times=None, lease_s=0.2)
    async with service_kit(tmp_path, replicas=replicas(), config=BUDGETED, jobs=store) as first:
        r = await create(first, [line("once", "hello")])
        batch_id = r.json()["id"]
        await due_now(first, batch_id)
        await drain(first)
        (billed,) = first.rows()
        (job_id,) = first.service.jobs.batch(batch_id).jobs  # type: ignore[union-attr]
        assert billed.request_id == job_id
        job = first.service.jobs.get(job_id)
        assert job is not None and job.status == "running"  # nothing stored: as if it died
    await asyncio.sleep(0.3)  # the dead runner's lease runs out
    async with service_kit(tmp_path, replicas=replicas(), config=BUDGETED) as fresh:
        await due_now(fresh, batch_id)
        await drain(fresh)
        _, out = await output(fresh, batch_id)
        row = assert_answer_is_its_bill(fresh, out[0])  # the answer says what was billed
        assert row == billed
        assert fresh.rows() == [billed]
        # its budget counts it once (from the ledger), not once more for the rerun
        r = await fresh.client.post("/v1/chat/completions", headers=DEMO,
                                    json=line(None, "and now")["body"])  # fmt: skip
        assert r.status_code == 200, r.text
        now = row_of(fresh, r.json()["id"])
        spend = fresh.service.live.budgets.spend["demo"]
        assert spend.kwh == pytest.approx(billed.kwh_billed + now.kwh_billed, rel=1e-9)


async def test_a_second_ingress_on_the_same_job_store_leaves_a_running_line_alone(
    tmp_path: Path,
) -> None:
    """Two ingresses share the job store (several ingress replicas on one node); one starts
    while the other runs a line."""
    gate = asyncio.Event()
    async with service_kit(tmp_path, replicas=replicas(gate=gate), config=BUDGETED) as first:
        r = await create(first, [line("shared", "hello")])
        batch_id = r.json()["id"]
        await due_now(first, batch_id)
        first.service.deferral.run_due()
        await until(lambda: calls(first) == 1)
        async with service_kit(tmp_path, replicas=replicas(), config=BUDGETED) as second:
            await drain(second)  # its loop claims what is due
            assert calls(second) == 0  # the running line is the first's
            gate.set()
            await drain(first)
            status, out = await output(second, batch_id)
            assert status["request_counts"]["completed"] == 1
            row = assert_answer_is_its_bill(second, out[0])
            first.assert_billed_once([row])
            assert calls(first) + calls(second) == 1  # and it ran once


async def test_a_line_running_longer_than_its_lease_keeps_it_while_its_runner_lives(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    store = JobStore(tmp_path / "jobs.sqlite", lease_s=0.2)
    async with service_kit(
        tmp_path, replicas=replicas(gate=gate), config=BUDGETED, jobs=store
    ) as first:
        r = await create(first, [line("slow", "hello")])
        batch_id = r.json()["id"]
        await due_now(first, batch_id)
        loop = asyncio.get_running_loop().create_task(first.service.deferral.loop(period_s=0.02))
        await until(lambda: calls(first) == 1)
        other = JobStore(tmp_path / "jobs.sqlite", lease_s=0.2)  # another ingress's
        for _ in range(10):  # five leases long: renewed all along
            await asyncio.sleep(0.1)
            assert other.due(datetime.now(UTC)) == []
        gate.set()
        await until(lambda: not first.service.deferral._running)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        other.close()
        _, out = await output(first, batch_id)
        first.assert_billed_once([assert_answer_is_its_bill(first, out[0])])
        assert calls(first) == 1


async def test_the_runner_stops_with_its_ingress_even_as_a_line_ends(tmp_path: Path) -> None:
    # a stopping ingress cancels the runner's loop; when a line had just ended (the loop woken
    # to claim more), asyncio.wait_for (Python 3.11) swallowed the cancellation and the loop
    # went on claiming lines that its stopping ingress would never finish
    async with service_kit(tmp_path, replicas=replicas()) as kit:
        deferral = kit.service.deferral
        loop = asyncio.get_running_loop().create_task(deferral.loop(period_s=10.0))
        await asyncio.sleep(0.01)  # waiting for room
        deferral._room.set()  # a line ended
        loop.cancel()  # and the ingress stops
        done, _ = await asyncio.wait([loop], timeout=1.0)
        assert done == {loop} and loop.cancelled()
