"""The request path without Ray: the real service and ASGI front on scripted replicas, a
static carbon source and a real ledger. Failover, streams (whole and cut), deferral, batches
and the error table, each in milliseconds."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from forecasting.energy import EnergyPredictor
from router.http.completions import sse_events
from router.http.wire import EventStream, parse_body
from router.service.completions import Settled
from router.service.fakes import FakeLoadSource, FakeReplicaClient
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


async def test_the_configs_first_token_budget_bounds_requests_that_set_none(
    tmp_path: Path,
) -> None:
    # policy.max_latency_ms is the operator's default budget for the first token: without it,
    # a full replica whose queue is cheap at the margin keeps taking requests while others idle
    config = CONFIG.replace(
        "policy: {name: price_carbon, weight: 0.5}",
        "policy: {name: price_carbon, weight: 0.5, max_latency_ms: 500}",
    )
    async with service_kit(tmp_path, config=config) as kit:
        for st in kit.service.live.router.states:  # every batch full: all would queue ...
            st.active = st.replica.max_concurrency
        north = kit.service.live.router.states[0]
        north.active = 3 * north.replica.max_concurrency  # ... the cleanest the longest
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200, r.text
        assert r.headers["x-carbon-replica"] != "eu-north-0"
        assert r.headers["x-carbon-binding"] == "latency"
        # a client's own budget still wins over the default
        loose = {**DEMO, "X-Carbon-Preference": "mode=carbon, max-latency-ms=10000000"}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=loose)
        assert r.headers["x-carbon-replica"] == "eu-north-0"


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


async def test_the_wait_in_a_queue_depends_on_the_requests_ahead_not_on_this_one(
    tmp_path: Path,
) -> None:
    # those ahead end after their own answers (the router's expected length), so asking for
    # one token does not make a long queue look short
    async with service_kit(tmp_path) as kit:
        router = kit.service.live.router
        north = router.states[0]
        north.active = north.replica.max_concurrency + 20
        short = (await router.candidates(100, 1.0)).queue_wait_ms[0]
        long = (await router.candidates(100, 500.0)).queue_wait_ms[0]
        assert short == pytest.approx(long) and short > 0


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
        assert row.request_id == "chatcmpl-cut" and row.energy_source == "predicted"
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
    good = [json.dumps({"custom_id": f"ok-{k}", "body": chat()}) for k in (1, 2)]
    jsonl = f'{good[0]}\n{good[1]}\n{{"custom_id": "bad", "body": {{"model": 3}}}}\n'.encode()
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
        assert row.request_id == "chatcmpl-gone" and row.energy_source == "predicted"
        assert svc.live.router.states[started.index].active == 0
        assert kit.replicas[svc.replicas[started.index].name].closed == ["chatcmpl-gone"]


# ---- the live policy on the replica model: packing, spreading, load reports -----------------

LLAMA_8B = "meta-llama/Llama-3.1-8B-Instruct"
GPU_REPLICA = (
    "{{name: {name}, backend: {{kind: openai, url: 'http://127.0.0.1:9/v1', model: " + LLAMA_8B
    + "}}, gpu: {{type: H100, count: 1}}, max_concurrency: 64}}"
)  # fmt: skip
# two identical H100 replicas of Llama-3.1-8B in one region: one price, one intensity
GPU_CONFIG = f"""
carbon_sources:
  grid: {{kind: replay, dataset: electricitymaps_hourly}}
regions:
  - name: eu-north
    zone: SE
    carbon_source: grid
    price: {{flat_usd_per_kwh: 0.07}}
    replicas:
      - {GPU_REPLICA.format(name="gpu-a")}
      - {GPU_REPLICA.format(name="gpu-b")}
""" + CONFIG[CONFIG.index("tenants:") :].replace(
    "policy: {name: price_carbon, weight: 0.5}",
    "policy: {name: price_carbon, weight: 0.5, load_report_s: 0.2}",
)


@pytest.fixture(scope="module")
def gpu_predictor() -> EnergyPredictor:
    return EnergyPredictor.from_mlenergy()


async def until(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.002)


async def test_at_low_load_requests_join_a_busy_replica_rather_than_wake_an_idle_one(
    tmp_path: Path, gpu_predictor: EnergyPredictor
) -> None:
    # once one replica runs a request, joining its batch costs almost no energy more (the
    # replica model's marginal energy: power is flat over small batches), while waking the other
    # costs its step up from static power: every request while the first runs goes there
    gate = asyncio.Event()
    fakes = [FakeReplicaClient(n, gate=gate) for n in ("gpu-a", "gpu-b")]
    async with service_kit(tmp_path, replicas=fakes, config=GPU_CONFIG,
                           predictor=gpu_predictor) as kit:  # fmt: skip
        states = kit.service.live.router.states
        tasks = []
        for k in range(6):
            post = kit.client.post("/v1/chat/completions", json=chat(model=LLAMA_8B), headers=DEMO)
            tasks.append(asyncio.create_task(post))
            await until(lambda k=k: sum(st.active for st in states) == k + 1)  # type: ignore[misc]
        assert sorted(st.active for st in states) == [0, 6]
        gate.set()
        answers = await asyncio.gather(*tasks)
        assert all(r.status_code == 200 for r in answers)
        assert len({r.headers["x-carbon-replica"] for r in answers}) == 1


async def test_a_request_joins_the_batch_another_ingress_started(
    tmp_path: Path, gpu_predictor: EnergyPredictor
) -> None:
    # gpu-b runs one sequence for another ingress (its report says so), gpu-a nothing: the
    # energy predictor's average J/token at batch max(1, load) ties them; the marginal energy
    # does not (joining costs gpu-b almost nothing, waking gpu-a its step up from static)
    fakes = [FakeReplicaClient(n) for n in ("gpu-a", "gpu-b")]
    loads = [FakeLoadSource("gpu-a"), FakeLoadSource("gpu-b", running=1)]
    async with service_kit(tmp_path, replicas=fakes, config=GPU_CONFIG,
                           predictor=gpu_predictor, loads=loads) as kit:  # fmt: skip
        assert kit.service.loads is not None
        for _ in range(5):
            await kit.service.loads.poll_once()
            r = await kit.client.post(
                "/v1/chat/completions", json=chat(model=LLAMA_8B), headers=DEMO
            )
            assert r.status_code == 200 and r.headers["x-carbon-replica"] == "gpu-b"


async def test_near_the_batch_limit_the_latency_bounds_spread_the_load(
    tmp_path: Path, gpu_predictor: EnergyPredictor
) -> None:
    # answers of 256 tokens: the length the router expects of this tenant's requests
    fakes = [FakeReplicaClient(n, words=["w "] * 256) for n in ("gpu-a", "gpu-b")]
    loads = [FakeLoadSource("gpu-a", running=64, waiting=40), FakeLoadSource("gpu-b")]
    # the reports must stay fresh across three requests: with 0.2 s, a loaded machine made them
    # stale (the ingress's own count, empty, then decided) and the test failed by chance
    config = GPU_CONFIG.replace("load_report_s: 0.2", "load_report_s: 30")
    assert config != GPU_CONFIG
    async with service_kit(tmp_path, replicas=fakes, config=config,
                           predictor=gpu_predictor, loads=loads) as kit:  # fmt: skip
        assert kit.service.loads is not None
        await kit.service.loads.poll_once()

        async def ask(preference: str | None = None) -> httpx.Response:
            headers = {**DEMO, "X-Carbon-Preference": preference} if preference else DEMO
            body = chat(model=LLAMA_8B, max_tokens=512)
            r = await kit.client.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 200, r.text
            return r

        # gpu-a's batch is full and 40 wait: its queue costs less energy at the margin than
        # waking gpu-b, but a request there would wait; gpu-b has room, so it goes there
        r = await ask()
        assert r.headers["x-carbon-replica"] == "gpu-b"
        assert r.headers["x-carbon-binding"] == "batch"
        # below the limit (60 of 64 running) nothing queues, but a token takes 11 ms there
        # against 7 ms alone on gpu-b
        loads[0].running, loads[0].waiting = 60, 0
        await kit.service.loads.poll_once()
        assert (await ask()).headers["x-carbon-replica"] == "gpu-a"
        r = await ask("max-tpot-ms=10")
        assert r.headers["x-carbon-replica"] == "gpu-b" and r.headers["x-carbon-binding"] == "tpot"


async def test_load_comes_from_fresh_reports_and_the_decision_says_when_it_is_estimated(
    tmp_path: Path, gpu_predictor: EnergyPredictor
) -> None:
    fakes = [FakeReplicaClient(n) for n in ("gpu-a", "gpu-b")]
    loads = [FakeLoadSource("gpu-a", running=3), FakeLoadSource("gpu-b", fail="down")]
    async with service_kit(tmp_path, replicas=fakes, config=GPU_CONFIG,
                           predictor=gpu_predictor, loads=loads) as kit:  # fmt: skip
        router = kit.service.live.router
        assert kit.service.loads is not None

        async def ask() -> httpx.Response:
            r = await kit.client.post(
                "/v1/chat/completions", json=chat(model=LLAMA_8B), headers=DEMO
            )
            assert r.status_code == 200, r.text
            return r

        # no report yet: the ingress's own count (nothing in flight), said so; and a GPU
        # replica's prefill time is the model's compute-bound estimate
        r = await ask()
        assert r.headers["x-carbon-estimated"] == "load, prefill"
        now = router.clock()
        router.clock = lambda: now  # frozen: a slow machine must not age the report under test
        await kit.service.loads.poll_once()
        a, b = router.states
        assert a.in_flight(router.clock(), 0.2) == (3, False)  # gpu-a reports 3 running
        assert b.in_flight(router.clock(), 0.2) == (0, True)  # gpu-b's source is down
        r = await ask()  # joins gpu-a's running batch; its load is the report's
        assert r.headers["x-carbon-replica"] == "gpu-a"
        assert r.headers["x-carbon-estimated"] == "prefill"
        c = await router.candidates(100, 50.0)
        explained = router.decide(c, router.preference(None)).explain(c)
        assert explained["estimated"] == ["prefill"]
        assert explained["candidates"]["gpu-b"]["estimated"] == ["load", "prefill"]
        # requests the ingress sent since the report are added to it
        a.active += 2
        assert a.in_flight(router.clock(), 0.2) == (5, False)
        a.active -= 2
        # a report older than one interval (0.2 s here) is not used
        t0 = router.clock()
        router.clock = lambda: t0 + 0.25
        assert a.in_flight(router.clock(), 0.2) == (0, True)
        r = await ask()
        assert "load" in r.headers["x-carbon-estimated"].split(", ")


async def test_an_implausible_load_report_is_not_kept_and_never_fails_a_request(
    tmp_path: Path, gpu_predictor: EnergyPredictor
) -> None:
    # a source reporting counts past any float (or a hostile /metrics) must not reach routing:
    # the replica's load is the ingress's own count, marked estimated
    fakes = [FakeReplicaClient(n) for n in ("gpu-a", "gpu-b")]
    loads = [FakeLoadSource("gpu-a", running=10**400, waiting=10**400),
             FakeLoadSource("gpu-b", running=1)]  # fmt: skip
    async with service_kit(tmp_path, replicas=fakes, config=GPU_CONFIG,
                           predictor=gpu_predictor, loads=loads) as kit:  # fmt: skip
        assert kit.service.loads is not None
        await kit.service.loads.poll_once()
        router = kit.service.live.router
        a, b = router.states
        assert a.report is None and b.report is not None
        assert a.in_flight(router.clock(), 0.2) == (0, True)
        for _ in range(3):
            r = await kit.client.post(
                "/v1/chat/completions", json=chat(model=LLAMA_8B), headers=DEMO
            )
            assert r.status_code == 200, r.text


async def test_a_hanging_or_failing_load_source_never_holds_up_a_request(
    tmp_path: Path, gpu_predictor: EnergyPredictor
) -> None:
    fakes = [FakeReplicaClient(n) for n in ("gpu-a", "gpu-b")]
    loads = [FakeLoadSource("gpu-a", fail="hang"), FakeLoadSource("gpu-b", running=1)]
    # reports every 4 s: a read is given 2 s, so a request that waited for the hanging one
    # would take 2 s; one that does not takes milliseconds (the bound below is 1 s: this
    # machine's load cannot make the one look like the other)
    config = GPU_CONFIG.replace("load_report_s: 0.2", "load_report_s: 4")
    assert config != GPU_CONFIG
    async with service_kit(tmp_path, replicas=fakes, config=config,
                           predictor=gpu_predictor, loads=loads) as kit:  # fmt: skip
        poller = kit.service.loads
        assert poller is not None
        t0 = time.monotonic()
        await poller.poll_once()  # each read is bounded by half an interval (2 s)
        assert time.monotonic() - t0 < 3.0
        a, b = kit.service.live.router.states
        assert a.report is None and b.report is not None
        loop = asyncio.create_task(poller.loop())  # as the ingress runs it
        try:
            first = b.report_at
            for _ in range(5):
                t0 = time.monotonic()
                r = await kit.client.post(
                    "/v1/chat/completions", json=chat(model=LLAMA_8B), headers=DEMO
                )
                assert r.status_code == 200 and time.monotonic() - t0 < 1.0
            await until(lambda: b.report_at > first, timeout_s=6.0)  # gpu-b's keep coming
            assert a.report is None
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop


async def test_a_bad_preference_is_answered_word_for_word(tmp_path: Path) -> None:
    # the 400 a client reads: the problem, then what is allowed, in OpenAI's error format
    async with service_kit(tmp_path) as kit:
        bad = {**DEMO, "X-Carbon-Preference": "mode=fast"}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=bad)
        assert r.status_code == 400
        assert r.json() == {
            "error": {
                "message": "invalid X-Carbon-Preference: mode must be one of balanced, carbon, "
                "cost, got 'fast'; allowed keys: mode (balanced|carbon|cost), weight (0.0-1.0), "
                'max-latency-ms (> 0), max-tpot-ms (> 0), regions (inner list of names or globs, '
                'e.g. ("eu-*")), defer (seconds >= 0), max-carbon-g (> 0)',
                "type": "invalid_request_error",
                "param": "X-Carbon-Preference",
                "code": None,
            }
        }
        assert kit.rows() == []
