"""The embedded default: SmolLM2-135M on llama.cpp, metered with the CPU-time model."""

from __future__ import annotations

import asyncio

import pytest

from regions.backends import BackendRefused, CompletionRequest, LlamaCppBackend
from regions.meters import CpuModelMeter
from router.metering.replica import MeteredReplica


@pytest.fixture(scope="module")
def backend() -> LlamaCppBackend:
    return LlamaCppBackend(slots=2, n_threads=1)


def ask(text: str, max_tokens: int = 24) -> CompletionRequest:
    return CompletionRequest(messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                             temperature=0.0, seed=3)  # fmt: skip


async def test_metered_requests_conserve_energy(backend: LlamaCppBackend) -> None:
    replica = MeteredReplica("local-0", backend, CpuModelMeter(15.0, idle_share=0.1),
                             prefill_weight=0.35, period_s=0.05)  # fmt: skip

    async def one(i: int, text: str) -> tuple[int, int, float]:
        rec = await replica.complete(f"r{i}", ask(text))
        att = await replica.energy(f"r{i}")
        assert att.decode_tokens == rec.completion_tokens
        return rec.prompt_tokens, rec.completion_tokens, att.energy_j

    results = await asyncio.gather(
        one(0, "Name a color."), one(1, "Count from one to five."), one(2, "What is rain?")
    )
    last = replica.readings[-1]
    await replica.aclose()
    assert all(p > 10 and 0 < d <= 24 and e > 0 for p, d, e in results)
    measured = last.energy_j - replica.readings[0].energy_j  # since the replica's first reading
    attributed = sum(e for _, _, e in results)
    assert attributed + replica.attributor.idle_j == pytest.approx(measured, rel=1e-9)
    assert replica.meter.energy_source == "estimated"


async def test_same_seed_same_text(backend: LlamaCppBackend) -> None:
    a = "".join([c.text async for c in backend.stream(ask("Say hello.", 12))])
    b = "".join([c.text async for c in backend.stream(ask("Say hello.", 12))])
    assert a == b and a.strip()


async def test_too_long_prompt_is_refused(backend: LlamaCppBackend) -> None:
    with pytest.raises(BackendRefused, match="exceed the context window of 2048 tokens"):
        async for _ in backend.stream(ask("word " * 3000, 16)):
            pass
