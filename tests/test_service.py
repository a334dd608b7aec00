"""The request path without Ray: the real service and ASGI front on scripted replicas, a
static carbon source and a real ledger. Failover, streams (whole and cut), deferral, batches
and the error table, each in milliseconds."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from router.http.completions import sse_events
from router.http.wire import EventStream, parse_body
from router.service.completions import Settled
from router.service.fakes import FakeReplicaClient
from router.service.ports import Chunk
from tests.service_kit import ADMIN, CONFIG, DEMO, chat, create_batch, service_kit, upload

NAMES = ("eu-north-0", "eu-central-0", "us-south-0")


def events(body: str) -> list[str]:
    return [line[6:] for line in body.split("\n") if line.startswith("data: ")]


async def test_a_completion_is_answered_and_billed_once(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["message"]["content"] == "Hello from a fake replica."
        usage = body["usage"]
        assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] == 12
        assert usage["energy_source"] == "measured" and usage["energy_kwh"] > 0
        assert r.headers["x-carbon-region"] == "eu-north"  # clean and cheap
        (row,) = kit.rows()
        assert row.request_id == body["id"] and row.tenant == "demo"
        assert row.energy_j == pytest.approx(40.0)  # the replica's metered figure


async def test_failover_before_the_first_byte_cools_the_replica_down(tmp_path: Path) -> None:
    fakes = [FakeReplicaClient(n, fail="down" if n == "eu-north-0" else None) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes) as kit:
        for stream in (False, True):
            r = await kit.client.post(
                "/v1/chat/completions", json=chat(stream=stream), headers=DEMO
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-carbon-replica"] != "eu-north-0"
        # the first request tried it and cooled it down; the second did not try it again
        assert len(kit.replicas["eu-north-0"].calls) == 1
        north = kit.service.live.router.states[0]
        assert north.cooldown_until > time.monotonic()
        assert {row.replica for row in kit.rows()} == {r.headers["x-carbon-replica"]}
        assert len(kit.rows()) == 2


async def test_the_cooldown_is_the_operators_setting(tmp_path: Path) -> None:
    fakes = [FakeReplicaClient(n, fail="down" if n == "eu-north-0" else None) for n in NAMES]
    config = CONFIG.replace("policy: {name: price_carbon, weight: 0.5}",
                            "policy: {name: price_carbon, weight: 0.5, cooldown_s: 2}")  # fmt: skip
    async with service_kit(tmp_path, replicas=fakes, config=config) as kit:
        t0 = time.monotonic()
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200 and r.headers["x-carbon-replica"] != "eu-north-0"
        north = kit.service.live.router.states[0]
        assert t0 + 1.5 < north.cooldown_until <= time.monotonic() + 2.0


async def test_max_tpot_ms_steers_away_from_a_replica_whose_batch_is_slow(tmp_path: Path) -> None:
    # the time per output token at the batch a request joins comes from the replica model: on
    # eu-north (the cleanest) 7 sequences share 100 tok/s, so an eighth gets 80 ms a token
    async with service_kit(tmp_path) as kit:
        north = kit.service.live.router.states[0]
        north.active = 7
        pref = {**DEMO, "X-Carbon-Preference": "mode=carbon, max-tpot-ms=50"}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
        assert r.status_code == 200, r.text
        assert r.headers["x-carbon-replica"] != "eu-north-0"
        assert r.headers["x-carbon-binding"] == "tpot"
        north.active = 0  # alone there: 10 ms a token
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
        assert r.headers["x-carbon-replica"] == "eu-north-0"
        bad = {**DEMO, "X-Carbon-Preference": "max-tpot-ms=-1"}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=bad)
        assert r.status_code == 400 and "max-tpot-ms must be > 0" in r.text


async def test_candidates_predict_the_first_token_from_the_replica_model(tmp_path: Path) -> None:
    # time to first token = RTT + queue wait + prefill; on these CPU replicas prefill is
    # prefill_weight of a decode token's time per prompt token at the configured decode rate
    async with service_kit(tmp_path) as kit:
        router = kit.service.live.router
        c = await router.candidates(1000, 10.0)
        for i, st in enumerate(router.states):
            prefill = 1000 * st.replica.prefill_weight / st.replica.tokens_per_s * 1000.0
            assert c.ttft_ms[i] == pytest.approx(st.region.rtt_ms + prefill)


async def test_when_every_replica_is_down_the_answer_is_503_in_openai_format(
    tmp_path: Path,
) -> None:
    fakes = [FakeReplicaClient(n, fail="down") for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "no_replica"
        assert kit.rows() == []  # nothing ran, nothing billed


async def test_a_stream_ends_with_its_usage_and_done(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(stream=True), headers=DEMO)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = events(r.text)
        assert data[-1] == "[DONE]"
        usage = json.loads(data[-2])["usage"]
        text = "".join(json.loads(d)["choices"][0]["delta"]["content"] for d in data[:-2])
        assert text == "Hello from a fake replica." and usage["completion_tokens"] == 5
        (row,) = kit.rows()
        assert row.request_id == json.loads(data[0])["id"]


async def test_a_stream_cut_by_its_client_is_billed_for_what_it_was_sent(
    tmp_path: Path,
) -> None:
    fakes = [FakeReplicaClient(n, delay_s=0.01) for n in NAMES]
    async with service_kit(tmp_path, replicas=fakes) as kit:
        svc = kit.service
        parsed = parse_body(json.dumps(chat(stream=True)).encode(), chat=True)
        caller = svc.authenticate(DEMO["Authorization"])
        pref = svc.live.router.preference(None)
        cands = (await svc.completions.admit(caller, parsed)).cands
        started = await svc.completions.start("chatcmpl-cut", "demo", parsed, cands, pref)
        out = sse_events(
            svc.completions.relay(started, "chatcmpl-cut", "demo", parsed), "chatcmpl-cut",
            parsed, 0,
        )  # fmt: skip
        first = await anext(out)
        assert b"Hello" in first
        await out.aclose()  # the client hangs up after one chunk
        for _ in range(100):  # the cut bill is settled on its own task
            if kit.rows():
                break
            await asyncio.sleep(0.01)
        (row,) = kit.rows()
        assert row.request_id == "chatcmpl-cut" and row.energy_source == "estimated"
        assert row.completion_tokens == 1  # what it was sent, not what it asked for
        assert kit.replicas[svc.replicas[started.index].name].closed == ["chatcmpl-cut"]
        assert svc.live.router.states[started.index].active == 0


async def test_relay_yields_chunks_then_the_bill(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        svc = kit.service
        parsed = parse_body(json.dumps(chat(stream=True, max_tokens=2)).encode(), chat=True)
        pref = svc.live.router.preference(None)
        cands = (
            await svc.completions.admit(svc.authenticate("Bearer sk-local-demo"), parsed)
        ).cands
        started = await svc.completions.start("r1", "demo", parsed, cands, pref)
        items = [i async for i in svc.completions.relay(started, "r1", "demo", parsed)]
        assert [type(i) for i in items] == [Chunk, Chunk, Settled]
        assert items[-1].usage["completion_tokens"] == 2  # type: ignore[union-attr]


async def test_a_deferred_job_runs_later_in_its_planned_region_and_is_billed(
    tmp_path: Path,
) -> None:
    # the grid is five times cleaner from the next hour on: waiting pays
    async with service_kit(tmp_path, profile=(1.0, 0.2)) as kit:
        r = await kit.client.post(
            "/v1/chat/completions",
            json=chat(),
            headers={**DEMO, "X-Carbon-Preference": "defer=7200"},
        )
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}" and job["status"] == "scheduled"
        assert kit.rows() == []  # not run yet
        assert (await kit.client.post(f"/v1/jobs/{job['id']}/run", headers=DEMO)).status_code == 403
        assert (
            await kit.client.post(f"/v1/jobs/{job['id']}/run", headers=ADMIN)
        ).status_code == 200
        kit.service.deferral.run_due()
        await asyncio.gather(*kit.service.deferral._running)
        done = (await kit.client.get(f"/v1/jobs/{job['id']}", headers=DEMO)).json()
        assert done["status"] == "completed", done
        assert done["result"]["usage"]["energy_kwh"] > 0
        (row,) = kit.rows()
        assert row.request_id == job["id"] and row.region == job["region"]


async def test_batch_lines_run_and_each_is_billed_once(tmp_path: Path) -> None:
    lines = [
        {"custom_id": f"q{k}", "method": "POST", "url": "/v1/chat/completions", "body": chat()}
        for k in range(3)
    ]
    jsonl = "\n".join(json.dumps(line) for line in lines).encode()
    async with service_kit(tmp_path) as kit:
        up = await kit.client.post(
            "/v1/files", files={"file": ("in.jsonl", jsonl)}, data={"purpose": "batch"},
            headers=DEMO,
        )  # fmt: skip
        assert up.status_code == 200, up.text
        created = await kit.client.post(
            "/v1/batches",
            json={"input_file_id": up.json()["id"], "endpoint": "/v1/chat/completions",
                  "completion_window": "24h"},
            headers=DEMO,
        )  # fmt: skip
        assert created.status_code == 200, created.text
        batch = created.json()
        assert batch["request_counts"]["total"] == 3
        assert (await kit.client.post(f"/v1/batches/{batch['id']}/run", headers=ADMIN)).is_success
        kit.service.deferral.run_due()
        await asyncio.gather(*kit.service.deferral._running)
        status = (await kit.client.get(f"/v1/batches/{batch['id']}", headers=DEMO)).json()
        assert status["status"] == "completed" and status["request_counts"]["completed"] == 3
        out = await kit.client.get(f"/v1/files/{status['output_file_id']}/content", headers=DEMO)
        results = [json.loads(line) for line in out.text.splitlines()]
        assert [x["custom_id"] for x in results] == ["q0", "q1", "q2"]
        assert sorted(row.request_id for row in kit.rows()) == sorted(x["id"] for x in results)


async def test_a_batch_with_a_bad_line_is_refused_whole(tmp_path: Path) -> None:
    good = json.dumps({"custom_id": "ok", "body": chat()})
    jsonl = f'{good}\n{good}\n{{"custom_id": "bad", "body": {{"model": 3}}}}\n'.encode()
    async with service_kit(tmp_path) as kit:
        up = await upload(kit, jsonl)
        r = await create_batch(kit, up.json()["id"])
        assert r.status_code == 400 and "line 3" in r.json()["error"]["message"]
        # lines 1 and 2 were not left scheduled: nothing runs, nothing is billed
        assert kit.service.jobs.due(datetime(2100, 1, 1, tzinfo=UTC)) == []


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "expect"),
    [
        ("POST", "/v1/chat/completions", {}, chat(), 401, "invalid_api_key"),
        ("POST", "/v1/chat/completions", {"Authorization": "Bearer nope"}, chat(), 401,
         "invalid_api_key"),
        ("POST", "/v1/chat/completions", {**DEMO, "X-Carbon-Preference": "mode=fast"}, chat(),
         400, "X-Carbon-Preference"),
        ("POST", "/v1/chat/completions", DEMO, {"model": "m"}, 400, "messages"),
        ("GET", "/v1/jobs/job-missing", DEMO, None, 404, "not_found"),
        ("GET", "/v1/usage", {}, None, 401, "invalid_api_key"),
        ("POST", "/v1/admin/reload", DEMO, None, 403, None),
        ("POST", "/v1/batches", DEMO, [], 400, None),
    ],
)  # fmt: skip
async def test_errors_come_from_one_table_in_openai_format(
    tmp_path: Path,
    method: str,
    path: str,
    headers: dict[str, str],
    body: object,
    status: int,
    expect: str | None,
) -> None:
    async with service_kit(tmp_path) as kit:
        r = await kit.client.request(method, path, json=body, headers=headers)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["message"] and error["type"]
        if expect is not None:
            assert expect in (error["code"], error["param"])
        assert kit.rows() == []


async def test_usage_comes_in_pages_with_the_periods_totals(tmp_path: Path) -> None:
    async with service_kit(tmp_path) as kit:
        for _ in range(3):
            assert (await kit.client.post("/v1/chat/completions", json=chat(),
                                          headers=DEMO)).is_success  # fmt: skip
        first = (await kit.client.get("/v1/usage?limit=2", headers=DEMO)).json()
        assert len(first["data"]) == 2 and first["has_more"] and first["totals"]["requests"] == 3
        rest = (
            await kit.client.get(f"/v1/usage?limit=2&after={first['last_id']}", headers=DEMO)
        ).json()
        assert len(rest["data"]) == 1 and not rest["has_more"]
        ids = [r["request_id"] for r in first["data"] + rest["data"]]
        assert sorted(ids) == sorted(r.request_id for r in kit.rows())
        future = (await kit.client.get("/v1/usage?start=2100-01-01", headers=DEMO)).json()
        assert future["data"] == [] and future["totals"]["requests"] == 0
        for bad in ("limit=0", "limit=5000", "start=yesterday", "after=nope"):
            r = await kit.client.get(f"/v1/usage?{bad}", headers=DEMO)
            assert r.status_code in (400, 422), (bad, r.text)


async def test_a_stream_whose_client_is_gone_before_it_starts_is_stopped_and_billed(
    tmp_path: Path,
) -> None:
    async with service_kit(tmp_path) as kit:
        svc = kit.service
        parsed = parse_body(json.dumps(chat(stream=True)).encode(), chat=True)
        caller = svc.authenticate(DEMO["Authorization"])
        pref = svc.live.router.preference(None)
        admitted = await svc.completions.admit(caller, parsed)
        started = await svc.completions.start(
            "chatcmpl-gone", "demo", parsed, admitted.cands, pref, hold=admitted.hold
        )
        events = sse_events(
            svc.completions.relay(started, "chatcmpl-gone", "demo", parsed), "chatcmpl-gone",
            parsed, 0,
        )  # fmt: skip

        async def gone() -> None:
            await svc.completions.abandon(started, "chatcmpl-gone", "demo", parsed)

        async def send(message: dict[str, object]) -> None:
            raise OSError("the client is gone")  # before the response could start

        with pytest.raises(OSError):
            await EventStream(events, {}, on_unstarted=gone)({}, None, send)
        for _ in range(100):
            if kit.rows():
                break
            await asyncio.sleep(0.01)
        (row,) = kit.rows()
        assert row.request_id == "chatcmpl-gone" and row.energy_source == "estimated"
        assert svc.live.router.states[started.index].active == 0
        assert kit.replicas[svc.replicas[started.index].name].closed == ["chatcmpl-gone"]
