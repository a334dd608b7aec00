"""Faults and bad input on the request path, without Ray: each test reproduces a way one
client or one upstream could hurt others (issue 11) and checks that it no longer does."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from forecasting.errors import CarbonSourceError
from forecasting.sources.base import Forecast, Intensity
from regions.config import Budget
from regions.openai_backend import OpenAIBackend
from router.errors import CarbonUnavailable
from router.metering.remote import AwaitingBills
from router.service.fakes import FakeReplicaClient, LedgerSink, StaticCarbonSource
from router.service.proxied import ProxiedMetering, ProxiedReplica
from tests.conftest import loop_turns
from tests.service_kit import ADMIN, CONFIG, DEMO, Kit, chat, create_batch, service_kit, upload
from tests.test_http1 import keep_answering, server, status


async def test_an_upstream_4xx_is_the_callers_400_and_cools_no_replica_down(
    tmp_path: Path,
) -> None:
    body = b'{"error": {"message": "top_p must be in (0, 1]"}}'
    async with server(status(400, body)) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "smollm2-135m")
        metering = ProxiedMetering([0], LedgerSink(tmp_path / "unused.sqlite"))
        refusing = ProxiedReplica(0, "eu-north-0", backend, metering)
        others = [FakeReplicaClient("eu-central-0"), FakeReplicaClient("us-south-0")]
        async with service_kit(tmp_path, replicas=[refusing, *others]) as kit:  # type: ignore[list-item]
            for stream in (False, True):
                r = await kit.client.post(
                    "/v1/chat/completions", json=chat(stream=stream), headers=DEMO
                )
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["code"] == "upstream_refused" and "top_p" in error["message"]
            # the replica is not cooled down and no other replica was tried for it
            assert kit.service.live.router.states[0].cooldown_until <= time.monotonic()
            assert others[0].calls == [] and others[1].calls == []
            assert kit.service.ready() == ["eu-north-0", "eu-central-0", "us-south-0"]
            assert kit.rows() == []
        await backend.aclose()


@pytest.mark.parametrize("top_p", [-7, 0, 1.5])
async def test_a_top_p_out_of_range_is_refused_at_the_front(tmp_path: Path, top_p: float) -> None:
    async with service_kit(tmp_path) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(top_p=top_p), headers=DEMO)
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"
        assert all(f.calls == [] for f in kit.replicas.values())


NAMES = ("eu-north-0", "eu-central-0", "us-south-0")


async def test_requests_in_flight_count_as_load_before_they_answer(tmp_path: Path) -> None:
    gate = asyncio.Event()
    fakes = [FakeReplicaClient(n, gate=gate) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes) as kit:
        calls = [
            asyncio.create_task(kit.client.post("/v1/chat/completions", json=chat(stream=s),
                                                headers=DEMO))
            for s in (False, False, True)
        ]  # fmt: skip
        await until(lambda: sum(len(f.calls) for f in fakes) == 3)
        states = kit.service.live.router.states
        assert sum(st.active for st in states) == 3  # seen by the policy and queue estimates
        gate.set()
        assert [r.status_code for r in await asyncio.gather(*calls)] == [200, 200, 200]
        assert sum(st.active for st in states) == 0
        assert len(kit.rows()) == 3


async def test_when_every_allowed_replica_is_full_the_answer_is_429_with_retry_after(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    fakes = [FakeReplicaClient(n, gate=gate) for n in NAMES]
    config = CONFIG.replace("meter: cpu}", "meter: cpu, max_concurrency: 1}")
    async with service_kit(tmp_path, replicas=fakes, config=config) as kit:
        eu = {**DEMO, "X-Carbon-Preference": 'regions=("eu-*")'}
        post = kit.client.post
        held = [
            asyncio.create_task(post("/v1/chat/completions", json=chat(), headers=eu))
            for _ in range(8)  # 4 a replica (the queue allowed per slot) x 2 eu replicas
        ]
        try:
            await until(lambda: sum(len(f.calls) for f in fakes) == 8)
            r = await asyncio.wait_for(post("/v1/chat/completions", json=chat(), headers=eu), 5)
            assert r.status_code == 429, r.text
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "at_capacity"
            # a request that may also run in us-south still goes there
            anywhere = asyncio.create_task(post("/v1/chat/completions", json=chat(), headers=DEMO))
            await until(lambda: len(kit.replicas["us-south-0"].calls) == 1)
        finally:
            gate.set()  # lets everything held end, whatever happened
        assert all(x.status_code == 200 for x in await asyncio.gather(*held))
        assert (await anywhere).headers["x-carbon-region"] == "us-south"
        assert len(kit.rows()) == 9


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_a_non_streaming_request_whose_client_hangs_up_is_billed(tmp_path: Path) -> None:
    fakes = [FakeReplicaClient(n, delay_s=0.05) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes) as kit:
        call = asyncio.create_task(
            kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        )
        await asyncio.sleep(0.1)  # it is running on its replica
        call.cancel()  # the client hangs up (Serve cancels the request)
        with pytest.raises(asyncio.CancelledError):
            await call
        await until(lambda: bool(kit.rows()))
        (row,) = kit.rows()
        assert row.energy_source == "predicted" and row.energy_j > 0
        assert sum(st.active for st in kit.service.live.router.states) == 0


async def test_a_stream_whose_upstream_dies_mid_way_is_billed_and_ends_with_an_error(
    tmp_path: Path,
) -> None:
    fakes = [FakeReplicaClient(n, fail="die_mid_stream") for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(stream=True), headers=DEMO)
        assert r.status_code == 200  # its head was sent with the first chunk
        data = [line[6:] for line in r.text.split("\n") if line.startswith("data: ")]
        assert "Hello" in data[0]
        error = json.loads(data[-1])["error"]
        assert error["code"] == "replica_failed" and "mid-stream" in error["message"]
        await until(lambda: bool(kit.rows()))  # the bill is settled on a task of its own
        (row,) = kit.rows()
        assert row.completion_tokens == 1 and row.energy_source == "predicted"
        i = next(k for k, f in enumerate(fakes) if f.calls)
        assert kit.service.live.router.states[i].cooldown_until > time.monotonic()
        assert kit.service.live.router.states[i].active == 0


async def test_absurd_usage_from_an_upstream_does_not_stop_billing(tmp_path: Path) -> None:
    answer = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1e30, "completion_tokens": -3},
    }  # fmt: skip
    async with server(keep_answering(json.dumps(answer).encode())) as seen:
        backend = OpenAIBackend(f"http://127.0.0.1:{seen.port}/v1", "smollm2-135m")
        sink = LedgerSink(tmp_path / "ledger.sqlite")
        metering = ProxiedMetering([0], sink, AwaitingBills(timeout_s=0.0))
        proxied = ProxiedReplica(0, "eu-north-0", backend, metering)
        others = [FakeReplicaClient("eu-central-0"), FakeReplicaClient("us-south-0")]
        async with service_kit(tmp_path, replicas=[proxied, *others]) as kit:  # type: ignore[list-item]
            for _ in range(3):
                r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
                assert r.status_code == 200, r.text
                usage = r.json()["usage"]
                assert 0 < usage["prompt_tokens"] < 100 and usage["completion_tokens"] == 1
            await asyncio.sleep(0.01)
            await metering.send(no_replica_answers)  # measurements never come: bill predictions
            assert len(sink.ledger.tenant_rows(None)) == 3
        await backend.aclose()


async def test_usage_waits_only_for_the_bills_of_requests_answered_before_it(
    tmp_path: Path,
) -> None:
    # under a tenant's steady proxied traffic some bill always awaited its measurement, so
    # every /v1/usage call of that tenant waited its whole 5 s (benchmarks/usage.py: 5-6.5 s)
    from router.service.settlement import Settlement

    sink = LedgerSink(tmp_path / "ledger.sqlite")
    awaiting = AwaitingBills(timeout_s=30.0)
    metering = ProxiedMetering([0], sink, awaiting)
    settlement = Settlement(lambda: None, [], sink, sink, metering, None)  # type: ignore[arg-type]
    awaiting.add({"request_id": "before", "tenant": "demo"})
    wait = asyncio.create_task(settlement.wait_settled("demo", timeout_s=5.0))
    await asyncio.sleep(0.06)
    assert not wait.done()  # read-your-writes: it waits for the bill answered before it
    awaiting.add({"request_id": "after", "tenant": "demo"})  # answered after the call
    awaiting.measured(["before"])
    await asyncio.wait_for(wait, 1.0)


async def test_usage_says_so_when_the_ledger_is_behind_not_500(tmp_path: Path) -> None:
    # the outbox's flush raises TimeoutError when the ledger does not take its rows in time:
    # /v1/usage let it escape, an unhandled 500 (a plain-text one, not an OpenAI error)
    async with service_kit(tmp_path) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200, r.text
        timeouts: list[float] = []

        async def flush(timeout_s: float = 30.0) -> None:
            timeouts.append(timeout_s)
            raise TimeoutError

        kit.sink.flush = flush  # type: ignore[method-assign]
        try:
            r = await kit.client.get("/v1/usage", headers=DEMO)
        except TimeoutError:
            pytest.fail("/v1/usage raised TimeoutError: an unhandled 500")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "ledger_behind"
        assert timeouts and max(timeouts) <= 5.0


async def no_replica_answers(i: int, batch: object) -> list[str]:
    raise ConnectionError("replica down")


async def per_request_kwh(kit: Kit) -> float:
    """The predicted kWh (x PUE) of one chat() request on its cheapest replica."""
    from router.http.wire import parse_body

    parsed = parse_body(json.dumps(chat()).encode(), chat=True)
    router = kit.service.live.router
    expected = router.lengths.expected("demo", parsed.model, parsed.completion.max_tokens)
    cands = await router.candidates(parsed.prompt_estimate(), expected)
    return float((cands.kwh * cands.pue).min())


async def test_concurrent_requests_cannot_overspend_a_budget(tmp_path: Path) -> None:
    gate = asyncio.Event()
    fakes = [FakeReplicaClient(n, gate=gate) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes) as kit:
        per = await per_request_kwh(kit)
        kit.service.live.budgets.limits["demo"] = Budget(period="month", kwh=3.5 * per)
        calls = [
            asyncio.create_task(kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO))
            for _ in range(40)
        ]
        await until(lambda: sum(len(f.calls) for f in fakes) >= 3)
        await asyncio.sleep(0.05)
        gate.set()
        statuses = [r.status_code for r in await asyncio.gather(*calls)]
        assert statuses.count(200) == 3 and statuses.count(402) == 37
        spend = kit.service.live.budgets.spend["demo"]
        assert spend.held_kwh == pytest.approx(0.0, abs=1e-15)  # every hold released
        assert len(kit.rows()) == 3


async def test_a_deferred_job_is_checked_against_the_budget_when_it_runs(tmp_path: Path) -> None:
    async with service_kit(tmp_path, profile=(1.0, 0.2)) as kit:
        per = await per_request_kwh(kit)
        budgets = kit.service.live.budgets
        budgets.limits["demo"] = Budget(period="month", kwh=1.5 * per)
        pref = {**DEMO, "X-Carbon-Preference": "defer=7200"}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
        assert r.status_code == 202
        job = r.json()["id"]
        assert (await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)).is_success
        # the budget is spent now; the job, due, must not run and bill
        kit.service.jobs.run_now(job, datetime.now(UTC))
        kit.service.deferral.run_due()
        await asyncio.gather(*kit.service.deferral._running)
        done = kit.service.jobs.get(job)
        assert done is not None and done.status == "failed" and "budget" in (done.error or "")
        assert [row.request_id for row in kit.rows()] != [] and job not in {
            row.request_id for row in kit.rows()
        }


async def test_a_batch_over_the_budget_is_refused_before_anything_runs(tmp_path: Path) -> None:
    lines = [json.dumps({"custom_id": f"q{k}", "body": chat()}) for k in range(20)]
    jsonl = ("\n".join(lines) + "\n").encode()
    async with service_kit(tmp_path) as kit:
        per = await per_request_kwh(kit)
        kit.service.live.budgets.limits["demo"] = Budget(period="month", kwh=3.5 * per)
        up = await upload(kit, jsonl)
        r = await create_batch(kit, up.json()["id"])
        assert r.status_code == 402, r.text
        assert r.json()["error"]["code"] == "budget_exceeded"
        assert kit.service.jobs.due(datetime(2100, 1, 1, tzinfo=UTC)) == []


async def test_a_deferred_job_keeps_its_data_residency_when_it_fails_over(tmp_path: Path) -> None:
    fakes = [FakeReplicaClient(n) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes, profile=(1.0, 0.2)) as kit:
        pref = {**DEMO, "X-Carbon-Preference": 'defer=7200, regions=("eu-*")'}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
        assert r.status_code == 202 and r.json()["region"].startswith("eu-")
        job = r.json()["id"]
        for f in fakes[:2]:  # both eu replicas are down when it runs
            f.fail = "down"
        kit.service.jobs.run_now(job, datetime.now(UTC))
        kit.service.deferral.run_due()
        await asyncio.gather(*kit.service.deferral._running)
        done = kit.service.jobs.get(job)
        assert done is not None and done.status == "failed", done
        assert fakes[2].calls == [] and kit.rows() == []  # never ran in us-south


async def test_a_due_job_whose_replicas_are_full_waits_and_runs_later(tmp_path: Path) -> None:
    # a job accepted with 202 failed for good when every replica it may use was at capacity
    # at its hour: load shedding is for clients that can retry, and a job's client is us
    async with service_kit(tmp_path, profile=(1.0, 0.2)) as kit:
        pref = {**DEMO, "X-Carbon-Preference": "defer=7200"}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        states = kit.service.live.router.states
        for st in states:  # every replica full
            st.active = 4 * st.replica.max_concurrency
        kit.service.jobs.run_now(job, datetime.now(UTC))
        kit.service.deferral.run_due()
        await asyncio.gather(*kit.service.deferral._running)
        waiting = kit.service.jobs.get(job)
        assert waiting is not None and waiting.status == "scheduled", waiting
        assert waiting.start_at > datetime.now(UTC).isoformat()  # after the Retry-After given
        for st in states:
            st.active = 0
        kit.service.jobs.run_now(job, datetime.now(UTC))
        kit.service.deferral.run_due()
        await asyncio.gather(*kit.service.deferral._running)
        done = kit.service.jobs.get(job)
        assert done is not None and done.status == "completed", done
        assert [r.request_id for r in kit.rows()] == [job]


async def test_a_due_job_whose_replicas_stay_full_past_its_deadline_fails(
    tmp_path: Path,
) -> None:
    # a shed job was scheduled again after Retry-After with no regard to its deadline: with
    # its replicas full it was put back forever (its batch never ended), days past the time
    # its tenant allowed it
    async with service_kit(tmp_path, profile=(1.0, 0.2)) as kit:
        pref = {**DEMO, "X-Carbon-Preference": "defer=7200"}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        for st in kit.service.live.router.states:  # every replica full
            st.active = 4 * st.replica.max_concurrency
        past = datetime.now(UTC).isoformat()
        kit.service.jobs._db.execute("UPDATE jobs SET deadline=? WHERE id=?", (past, job))
        kit.service.jobs.run_now(job, datetime.now(UTC))
        kit.service.deferral.run_due()
        await asyncio.gather(*kit.service.deferral._running)
        failed = kit.service.jobs.get(job)
        assert failed is not None and failed.status == "failed", failed
        assert "capacity" in (failed.error or "") and "deadline" in (failed.error or "")
        assert kit.rows() == []


async def test_due_jobs_are_claimed_as_running_ones_finish_not_16_a_period(
    tmp_path: Path,
) -> None:
    # the loop claimed 16 due jobs a second whatever the replicas could take: a 2,000-line
    # batch took 2 minutes on instant upstreams. Now a finished job makes room for the next
    async with service_kit(tmp_path, profile=(1.0, 0.2)) as kit:
        pref = {**DEMO, "X-Carbon-Preference": "defer=7200"}
        jobs = []
        for _ in range(40):
            r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
            assert r.status_code == 202, r.text
            jobs.append(r.json()["id"])
        for job in jobs:
            kit.service.jobs.run_now(job, datetime.now(UTC))
        kit.service.deferral.run_due()  # a claim, then no timed claim for an hour
        loop = asyncio.create_task(kit.service.deferral.loop(period_s=3600))
        try:
            for _ in range(300):
                done = [kit.service.jobs.get(j) for j in jobs]
                if all(j is not None and j.status == "completed" for j in done):
                    break
                await asyncio.sleep(0.01)
        finally:
            loop.cancel()
        assert all(j is not None and j.status == "completed" for j in done), done
        assert len(kit.rows()) == 40


async def test_a_job_cancelled_while_it_runs_is_scheduled_again_not_left_running(
    tmp_path: Path,
) -> None:
    # the ingress stopping cancels its running jobs: each stayed 'running' until the store was
    # reopened (and never ran where that was another ingress's store)
    gate = asyncio.Event()
    fakes = [FakeReplicaClient(n, gate=gate) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes, profile=(1.0, 0.2)) as kit:
        pref = {**DEMO, "X-Carbon-Preference": "defer=7200"}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        kit.service.jobs.run_now(job, datetime.now(UTC))
        kit.service.deferral.run_due()
        await asyncio.sleep(0.05)  # it is running, held by the replica
        for task in list(kit.service.deferral._running):
            task.cancel()
        await asyncio.gather(*kit.service.deferral._running, return_exceptions=True)
        again = kit.service.jobs.get(job)
        assert again is not None and again.status == "scheduled", again
        gate.set()


class CountingSource(StaticCarbonSource):
    """A static source that counts its calls and can be switched off (fails like a dead API)."""

    def __init__(self, values: dict[str, float]) -> None:
        super().__init__(values)
        self.calls = 0
        self.down = False
        self.gate: asyncio.Event | None = None  # when set, latest() waits for it (a slow API)

    async def latest(self, zone: str) -> Intensity:
        self.calls += 1
        await asyncio.sleep(0.01)
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise CarbonSourceError("HTTP 503", source=self.name, zone=zone)
        return await super().latest(zone)

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        self.calls += 1
        if self.down:
            raise CarbonSourceError("HTTP 503", source=self.name, zone=zone)
        return await super().forecast(zone, horizon_h)


async def test_a_reload_keeps_what_was_known_of_each_regions_carbon(tmp_path: Path) -> None:
    # a reload built a new, empty view: the next request waited for every region's API again
    async with service_kit(tmp_path) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200, r.text
        source = kit.service.live.router.carbon.sources["grid"]
        gate, latest = asyncio.Event(), source.latest

        async def hangs(zone: str) -> Intensity:
            await gate.wait()
            return await latest(zone)

        source.latest = hangs  # type: ignore[method-assign]  # every API hangs from now on
        r = await kit.client.post("/v1/admin/reload", headers=ADMIN)
        assert r.status_code == 200, r.text
        r = await asyncio.wait_for(
            kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO), 5.0
        )
        assert r.status_code == 200, r.text
        gate.set()


async def test_a_region_without_carbon_data_is_unavailable_and_the_others_serve(
    tmp_path: Path,
) -> None:
    async with service_kit(tmp_path) as kit:
        # us-south's zone is unknown to the source: no value, no cache, no forecast
        kit.service.live.router.carbon.sources["grid"] = StaticCarbonSource(
            {"SE": 30.0, "DE": 400.0}
        )
        for pref in ('regions=("eu-*")', "mode=cost"):
            headers = {**DEMO, "X-Carbon-Preference": pref}
            r = await kit.client.post("/v1/chat/completions", json=chat(), headers=headers)
            assert r.status_code == 200, r.text
            assert r.headers["x-carbon-region"].startswith("eu-")
        us = {**DEMO, "X-Carbon-Preference": 'regions=("us-*")'}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=us)
        assert r.status_code == 503 and "us-south" in r.json()["error"]["message"]


async def test_a_dead_carbon_api_is_asked_once_not_by_every_request() -> None:
    from router.service.carbon import CarbonView

    clock = FakeMonotonic()
    source = CountingSource({"SE": 30.0})
    source.down = True
    region = load_config_text(CONFIG).regions[0]
    view = CarbonView([region], {"grid": source}, clock=clock, fail_ttl_s=10.0)
    results = await asyncio.gather(*(view.get(region) for _ in range(20)), return_exceptions=True)
    assert all(isinstance(r, CarbonUnavailable) for r in results)
    assert source.calls <= 2  # one latest and one forecast, shared by all twenty
    calls = source.calls
    await asyncio.gather(*(view.get(region) for _ in range(5)), return_exceptions=True)
    assert source.calls == calls  # the failure is remembered for fail_ttl_s
    clock.t += 11
    source.down = False
    with pytest.raises(CarbonUnavailable):  # answered from the failure on record...
        await view.get(region)
    await view.idle()  # ...while the API is asked again, beside the request
    assert (await view.get(region)).g_per_kwh == 30.0


async def test_a_request_does_not_wait_for_a_carbon_refresh_once_its_region_is_known() -> None:
    # on the live stack a dead carbon API of one region held a request of every tenant, once
    # per fail_ttl_s, for the length of its failed fetch (2-3 s): every request gathers all the
    # regions' intensities. Once a region has a value or a failure on record, its refresh runs
    # beside the requests, which answer from what is known
    from router.service.carbon import CarbonView

    clock = FakeMonotonic()
    source = CountingSource({"SE": 30.0})
    region = load_config_text(CONFIG).regions[0]
    view = CarbonView([region], {"grid": source}, clock=clock, ttl_s=60, fail_ttl_s=10)
    assert (await view.get(region)).g_per_kwh == 30.0  # nothing known yet: awaited
    source.gate, source.values["SE"] = asyncio.Event(), 40.0
    clock.t += 61
    reading = await asyncio.wait_for(view.get(region), 1.0)  # the API hangs: not waited for
    assert reading.g_per_kwh == 30.0 and not reading.stale
    source.gate.set()
    await view.idle()
    assert (await view.get(region)).g_per_kwh == 40.0  # the refresh landed
    source.gate, source.down = asyncio.Event(), True
    clock.t += 61
    assert (await asyncio.wait_for(view.get(region), 1.0)).g_per_kwh == 40.0
    source.gate.set()
    await view.idle()
    stale = await view.get(region)  # the refresh failed: the last value, marked stale
    assert stale.stale and stale.g_per_kwh == 40.0
    calls = source.calls
    for _ in range(5):
        await view.get(region)
    await view.idle()
    assert source.calls == calls  # asked again only after fail_ttl_s


async def test_a_stale_value_is_not_served_past_max_stale_s() -> None:
    from router.service.carbon import CarbonView

    clock = FakeMonotonic()
    source = CountingSource({"SE": 30.0})
    region = load_config_text(CONFIG).regions[0]
    view = CarbonView([region], {"grid": source}, clock=clock, ttl_s=60, max_stale_s=3600)
    assert not (await view.get(region)).stale
    source.down = True
    clock.t += 600
    await view.get(region)  # starts the refresh, which fails
    await view.idle()
    reading = await view.get(region)
    assert reading.stale and reading.g_per_kwh == 30.0  # within its stated age
    clock.t += 3600
    with pytest.raises(CarbonUnavailable):
        await view.get(region)


async def test_a_refresh_that_never_lands_does_not_keep_a_value_fresh_forever() -> None:
    # once refreshes ran beside the requests, a refresh that hung kept the region's last value
    # served as fresh (not stale) for as long as it hung, past max_stale_s too
    from router.service.carbon import CarbonView

    clock = FakeMonotonic()
    source = CountingSource({"SE": 30.0})
    region = load_config_text(CONFIG).regions[0]
    view = CarbonView([region], {"grid": source}, clock=clock, ttl_s=60, fail_ttl_s=10,
                      max_stale_s=3600)  # fmt: skip
    assert not (await view.get(region)).stale
    source.gate = asyncio.Event()  # the API hangs from now on
    clock.t += 61
    assert not (await view.get(region)).stale  # a refresh is under way
    clock.t += 600
    reading = await view.get(region)  # it has not landed in ten minutes: the value is stale
    assert reading.stale and reading.g_per_kwh == 30.0 and reading.age_s >= 661
    clock.t += 3600
    with pytest.raises(CarbonUnavailable):  # and not served past max_stale_s
        await view.get(region)
    source.gate.set()
    await view.idle()


async def test_a_source_that_raises_an_unexpected_error_makes_its_region_unavailable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # an error other than CarbonSourceError (a source's bug) failed every request on its first
    # fetch (not a region without data, a 500), and in a background refresh it was swallowed
    # without a word while the region's last value went on being served as fresh
    from router.service.carbon import CarbonView

    class Buggy(CountingSource):
        broken = False

        async def latest(self, zone: str) -> Intensity:
            if self.broken:
                raise KeyError("carbonIntensity")
            return await super().latest(zone)

        async def forecast(self, zone: str, horizon_h: int) -> Forecast:
            raise KeyError("forecast")

    clock = FakeMonotonic()
    source = Buggy({"SE": 30.0})
    region = load_config_text(CONFIG).regions[0]
    view = CarbonView([region], {"grid": source}, clock=clock, ttl_s=60, max_stale_s=3600)
    assert (await view.get(region)).g_per_kwh == 30.0
    source.broken = True
    clock.t += 61
    await view.get(region)
    await view.idle()
    reading = await view.get(region)  # the refresh failed: the last value, marked stale
    assert reading.stale and reading.g_per_kwh == 30.0
    assert "carbonIntensity" in caplog.text  # and the failure is in the log
    clock.t += 3600
    with pytest.raises(CarbonUnavailable):
        await view.get(region)
    fresh = CarbonView([region], {"grid": source}, clock=clock)
    with pytest.raises(CarbonUnavailable):  # the first fetch: the region is unavailable
        await fresh.get(region)


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def load_config_text(text: str) -> Any:
    import tempfile

    from regions.config import load_config

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text)
        return load_config(path)


@pytest.mark.parametrize(
    ("content", "window", "expect"),
    [
        (b"\xff\xfe not utf-8\n", "24h", "UTF-8"),
        (b"[" * 100_000 + b"\n", "24h", "line 1"),
        (b"[]\n", "24h", "line 1"),
        (json.dumps({"custom_id": "a", "body": chat()}).encode(), "\u00b2h", "completion_window"),
        (json.dumps({"custom_id": "a", "body": chat()}).encode(), "0h", "completion_window"),
    ],
)
async def test_bad_batch_input_is_a_400_that_says_why(
    tmp_path: Path, content: bytes, window: str, expect: str
) -> None:
    async with service_kit(tmp_path) as kit:
        up = await upload(kit, content)
        assert up.status_code == 200
        r = await create_batch(kit, up.json()["id"], completion_window=window)
        assert r.status_code == 400, r.text
        assert expect in r.json()["error"]["message"] + str(r.json()["error"]["param"])
        assert kit.service.jobs.due(datetime(2100, 1, 1, tzinfo=UTC)) == []


async def test_batch_uploads_and_line_counts_are_capped(tmp_path: Path) -> None:
    from router.service.batches import MAX_FILE_BYTES, MAX_LINES

    async with service_kit(tmp_path) as kit:
        r = await upload(kit, b"x" * (MAX_FILE_BYTES + 1))
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        line = json.dumps({"custom_id": "a", "body": chat()}).encode()
        up = await upload(kit, b"\n".join([line] * (MAX_LINES + 1)))
        r = await create_batch(kit, up.json()["id"])
        assert r.status_code == 400 and str(MAX_LINES) in r.json()["error"]["message"]


async def test_a_large_batch_does_not_stall_the_event_loop(tmp_path: Path) -> None:
    lines = [json.dumps({"custom_id": f"a{k}", "body": chat()}).encode() for k in range(2000)]
    async with service_kit(tmp_path) as kit:
        up = await upload(kit, b"\n".join(lines))
        async with loop_turns() as turns:
            r = await create_batch(kit, up.json()["id"])
        assert r.status_code == 200 and r.json()["request_counts"]["total"] == 2000
        assert turns[0] >= 20  # other work ran while the 2,000 lines were planned


async def test_files_can_be_deleted(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        up = await upload(kit, b'{"custom_id": "a"}\n')
        file_id = up.json()["id"]
        r = await kit.client.delete(f"/v1/files/{file_id}", headers=DEMO)
        assert r.status_code == 200 and r.json() == {"id": file_id, "object": "file",
                                                     "deleted": True}  # fmt: skip
        assert (
            await kit.client.get(f"/v1/files/{file_id}/content", headers=DEMO)
        ).status_code == 404


async def test_an_unknown_model_is_a_404_and_is_not_kept(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        for k in range(3):
            r = await kit.client.post(
                "/v1/chat/completions", json=chat(model=f"gpt-{k}"), headers=DEMO
            )
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            assert "smollm2-135m" in r.json()["error"]["message"]  # what there is
        assert all(f.calls == [] for f in kit.replicas.values()) and kit.rows() == []
        lengths = kit.service.live.router.lengths
        assert not any("gpt-" in str(key) for key in lengths._seen)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
    ],
)
async def test_what_the_router_cannot_do_is_refused_not_dropped(
    tmp_path: Path, extra: dict[str, Any], param: str
) -> None:
    async with service_kit(tmp_path) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(**extra), headers=DEMO)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
        ok = await kit.client.post(
            "/v1/chat/completions", json=chat(n=1, response_format={"type": "text"}),
            headers=DEMO,
        )  # fmt: skip
        assert ok.status_code == 200


def test_a_job_that_fails_with_an_empty_message_reads_failed(tmp_path: Path) -> None:
    from router.jobs import JobStore
    from tests.test_jobs import T0, job

    store = JobStore(tmp_path / "j.sqlite")
    store.add(job("a", T0))
    store.finish("a", result=None, error="")  # e.g. str(TimeoutError())
    done = store.get("a")
    assert done is not None and done.status == "failed" and done.error


def test_two_ingress_replicas_never_claim_the_same_job(tmp_path: Path) -> None:
    from router.jobs import JobStore
    from tests.test_jobs import T0, job

    a, b = JobStore(tmp_path / "j.sqlite"), JobStore(tmp_path / "j.sqlite")
    a.add_many([job(f"j{k}", T0) for k in range(40)])
    claimed_a = {j.id for j in a.due(T0, limit=30)}
    claimed_b = {j.id for j in b.due(T0, limit=30)}
    assert not claimed_a & claimed_b and len(claimed_a | claimed_b) == 40


@pytest.mark.parametrize("value", ["sk-abc\r\nX-Evil: 1", "sk-abc\nX", "sk\x1b[31m"])
def test_a_secret_with_control_characters_is_refused_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    from regions.config import ConfigError, load_config

    monkeypatch.setenv("UPSTREAM_KEY", value)
    text = CONFIG.replace(
        "{name: us-south-0, backend: {kind: llama_cpp, model: smollm2-135m}, meter: cpu}",
        '{name: us-south-0, backend: {kind: openai, url: "http://127.0.0.1:9/v1", '
        'model: smollm2-135m, api_key: "${UPSTREAM_KEY}"}, meter: cpu}',
    )
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="api_key"):
        load_config(path)


def test_hash_key_reads_the_secret_from_stdin_not_argv(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import hashlib
    import io

    from router.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("sk-secret\n"))
    assert main(["hash-key"]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(b"sk-secret").hexdigest()
    assert main(["hash-key", "sk-secret"]) == 2  # on argv it would sit in ps and shell history
    assert "stdin" in capsys.readouterr().err


def test_the_demo_keys_are_refused_off_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    from router.cli import main
    from tests.conftest import ROOT

    config = str(ROOT / "configs/local.yaml")
    assert main(["serve", "--config", config, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "demo" in err and "sk-local-admin" in err


async def test_a_deferred_job_holds_its_budget_for_its_whole_prompt(tmp_path: Path) -> None:
    # a job ran with candidates for a prompt of 0 tokens: its budget hold (and its routing
    # figures) left out the prompt, so a job with a long prompt held a fraction of its spend
    long = chat(messages=[{"role": "user", "content": "word " * 3000}])
    async with service_kit(tmp_path, profile=(1.0, 0.2)) as kit:
        settlement = kit.service.completions.settlement
        held: list[Any] = []
        reserve = settlement.reserve

        async def spy(tenant: str, cands: Any) -> Any:
            held.append(cands.billed_kwh.copy())
            return await reserve(tenant, cands)

        settlement.reserve = spy  # type: ignore[method-assign]
        assert (await kit.client.post("/v1/chat/completions", json=long, headers=DEMO)).is_success
        pref = {**DEMO, "X-Carbon-Preference": "defer=7200"}
        r = await kit.client.post("/v1/chat/completions", json=long, headers=pref)
        assert r.status_code == 202, r.text
        kit.service.jobs.run_now(r.json()["id"], datetime.now(UTC))
        kit.service.deferral.run_due()
        await asyncio.gather(*kit.service.deferral._running)
        now, planned, ran = held
        # the job holds what it was planned with (the expected output learnt from the first
        # answer moves both a little from the first request's)
        assert ran == pytest.approx(planned, rel=1e-9)
        assert ran == pytest.approx(now, rel=0.05)
