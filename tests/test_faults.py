"""Faults and bad input on the request path, without Ray: each test reproduces a way one
client or one upstream could hurt others (issue 11) and checks that it no longer does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from regions.openai_backend import OpenAIBackend
from router.service.fakes import FakeReplicaClient, LedgerSink
from router.service.proxied import ProxiedMetering, ProxiedReplica
from tests.service_kit import DEMO, chat, service_kit
from tests.test_http1 import server, status


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
