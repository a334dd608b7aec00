"""The OpenAI-compatible proxy backend against a real llama.cpp server process on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from regions.backends import BackendUnavailable, CompletionRequest, embedded_model_path
from regions.meters import CpuModelMeter
from regions.openai_backend import OpenAIBackend
from router.metering.replica import MeteredReplica

pytest.importorskip("llama_cpp.server.app")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()),
         "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1",
         "--model_alias", "smollm2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/models", timeout=2):
                break
        except OSError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def chat(max_tokens: int = 12) -> CompletionRequest:
    return CompletionRequest(messages=[{"role": "user", "content": "Name a planet."}],
                             max_tokens=max_tokens, temperature=0.0, seed=2)  # fmt: skip


async def test_streams_a_chat_completion(server: str) -> None:
    backend = OpenAIBackend(server, "smollm2")
    chunks = [c async for c in backend.stream(chat())]
    await backend.aclose()
    text = "".join(c.text for c in chunks)
    assert text.strip()
    assert 0 < sum(c.n_tokens for c in chunks) <= 12
    assert chunks[-1].finish_reason in ("stop", "length")


async def test_plain_completion_and_metering(server: str) -> None:
    backend = OpenAIBackend(server, "smollm2")
    replica = MeteredReplica("remote-0", backend, CpuModelMeter(15.0), period_s=0.05)
    rec = await replica.complete("r1", CompletionRequest(prompt="The sky is", max_tokens=6,
                                                         temperature=0.0))  # fmt: skip
    att = await replica.energy("r1")
    await replica.aclose()
    await backend.aclose()
    assert rec.completion_tokens > 0 and "".join(rec.text)
    assert att.decode_tokens == rec.completion_tokens and att.energy_j >= 0


async def test_down_server_is_unavailable_before_any_output() -> None:
    backend = OpenAIBackend(f"http://127.0.0.1:{free_port()}/v1", "smollm2", timeout_s=5)
    with pytest.raises(BackendUnavailable, match="cannot connect"):
        async for _ in backend.stream(chat()):
            pass
    await backend.aclose()
