"""What the lean HTTP/1.1 client (regions/http1.py) saves against aiohttp, on the proxy's calls.

    python benchmarks/http_client.py [--seconds 1.0] [--repeat 3] [--conc 1,8,32] [--json]

One run starts the fake OpenAI-compatible server (``python -m regions.fake_openai``, aiohttp, on
loopback, in its own process so its CPU is not counted), then drives it with two clients doing
the same work: :class:`regions.openai_backend.OpenAIBackend` (the router's client, on
:mod:`regions.http1`) and an equivalent ``aiohttp.ClientSession`` client (one session,
kept-alive connections, the same orjson body, a timeout, the answer parsed: the JSON of a
non-streamed completion, every SSE ``data:`` event of a stream, whose usage event both ask
for). Each does non-streamed and streamed (8 chunks) chat completions with N concurrent
callers in a closed loop for ``--seconds``; the two clients alternate within each repetition.

Figures per (mode, concurrency, client): requests/s, p50 and p99 latency (to the last byte),
and CPU microseconds per request of this (the client) process (``time.process_time``). Each is
the median of ``--repeat`` runs; the ratio column is aiohttp / http1. The server is shared by
both clients, so at high concurrency requests/s is bounded by it on a 2-core machine; the CPU
per request is the client's own cost. Nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from regions.backends import CompletionRequest  # noqa: E402
from regions.openai_backend import OpenAIBackend  # noqa: E402

REQUEST = CompletionRequest(
    messages=[{"role": "user", "content": "Say hello in one word."}], max_tokens=16
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "regions.fake_openai", str(port)], cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"the fake server on port {port} did not start")


class Http1Client:
    """The router's own client."""

    name = "http1"

    def __init__(self, url: str) -> None:
        self.backend = OpenAIBackend(url, "fake", timeout_s=30.0)

    async def complete(self) -> None:
        answer = await self.backend.answer(REQUEST)
        assert answer.text

    async def stream(self) -> None:
        n = 0
        async for batch in self.backend.stream_batches(REQUEST):
            n += len(batch.chunks)
        assert n == 8, n

    async def aclose(self) -> None:
        await self.backend.aclose()


class AiohttpClient:
    """The same calls on one aiohttp session: same body, a timeout, the answer parsed."""

    name = "aiohttp"

    def __init__(self, url: str) -> None:
        self.url = url + "/chat/completions"
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=30.0),
        )
        body = {"model": "fake", "max_tokens": REQUEST.max_tokens,
                "temperature": REQUEST.temperature, "top_p": REQUEST.top_p,
                "messages": REQUEST.messages}  # fmt: skip
        usage = {"stream_options": {"include_usage": True}}  # as the router asks on streams
        self.body = {s: orjson.dumps({**body, "stream": s, **(usage if s else {})})
                     for s in (False, True)}  # fmt: skip
        self.headers = {
            s: {"Content-Type": "application/json",
                "Accept": "text/event-stream" if s else "application/json"}
            for s in (False, True)
        }  # fmt: skip

    async def complete(self) -> None:
        async with self.session.post(
            self.url, data=self.body[False], headers=self.headers[False]
        ) as resp:
            if resp.status >= 400:
                raise RuntimeError(f"HTTP {resp.status}")
            data = orjson.loads(await resp.read())
        assert data["choices"][0]["message"]["content"]

    async def stream(self) -> None:
        n = 0
        async with self.session.post(
            self.url, data=self.body[True], headers=self.headers[True]
        ) as resp:
            if resp.status >= 400:
                raise RuntimeError(f"HTTP {resp.status}")
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = orjson.loads(data)
                for choice in event.get("choices") or []:
                    (choice.get("delta") or {}).get("content")
                    n += 1
        assert n == 8, n

    async def aclose(self) -> None:
        await self.session.close()


async def drive(call: Callable[[], Awaitable[None]], conc: int, seconds: float) -> dict[str, float]:
    """``conc`` callers in a closed loop for ``seconds``: req/s, p50/p99 ms, client CPU us/req."""
    for _ in range(conc):  # warm the connections
        await call()
    lat: list[float] = []
    stop_at = 0.0

    async def caller() -> None:
        while (t0 := time.perf_counter()) < stop_at:
            await call()
            lat.append(time.perf_counter() - t0)

    cpu0, t0 = time.process_time(), time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(caller() for _ in range(conc)))
    cpu1, t1 = time.process_time(), time.perf_counter()
    q = statistics.quantiles(lat, n=100, method="inclusive")
    return {
        "rps": len(lat) / (t1 - t0),
        "p50_ms": statistics.median(lat) * 1e3,
        "p99_ms": q[98] * 1e3,
        "cpu_us": (cpu1 - cpu0) / len(lat) * 1e6,
    }


async def run(url: str, concs: list[int], seconds: float, repeat: int) -> list[dict[str, Any]]:
    clients = {"http1": Http1Client(url), "aiohttp": AiohttpClient(url)}
    runs: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    try:
        for mode in ("complete", "stream"):
            for conc in concs:
                for rep in range(repeat):
                    order = ["http1", "aiohttp"] if rep % 2 == 0 else ["aiohttp", "http1"]
                    for name in order:
                        call = getattr(clients[name], mode)
                        runs.setdefault((mode, conc, name), []).append(
                            await drive(call, conc, seconds)
                        )
    finally:
        for c in clients.values():
            await c.aclose()
    rows = []
    for (mode, conc, name), rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        rows.append({"mode": mode, "concurrency": conc, "client": name, **med})
    return rows


def table(rows: list[dict[str, Any]], seconds: float, repeat: int) -> str:
    by = {(r["mode"], r["concurrency"], r["client"]): r for r in rows}
    out = [
        f"HTTP client on the proxy path: medians of {repeat} runs of {seconds:g} s each; "
        "ratio = aiohttp / http1",
        f"{'mode':<9} {'conc':>4} | {'req/s':>17} {'ratio':>5} | {'p50 ms':>13} | "
        f"{'p99 ms':>13} | {'client CPU us/req':>17} {'ratio':>5}",
        f"{'':<9} {'':>4} | {'http1':>8} {'aiohttp':>8} {'':>5} | {'http1':>6} {'aiohttp':>6} | "
        f"{'http1':>6} {'aiohttp':>6} | {'http1':>8} {'aiohttp':>8} {'':>5}",
    ]
    for mode, conc in dict.fromkeys((r["mode"], r["concurrency"]) for r in rows):
        h, a = by[mode, conc, "http1"], by[mode, conc, "aiohttp"]
        rps_ratio, cpu_ratio = a["rps"] / h["rps"], a["cpu_us"] / h["cpu_us"]
        out.append(
            f"{mode:<9} {conc:>4} | {h['rps']:>8.0f} {a['rps']:>8.0f} {rps_ratio:>5.2f} | "
            f"{h['p50_ms']:>6.2f} {a['p50_ms']:>6.2f} | {h['p99_ms']:>6.2f} {a['p99_ms']:>6.2f} | "
            f"{h['cpu_us']:>8.0f} {a['cpu_us']:>8.0f} {cpu_ratio:>5.2f}"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="length of each run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--conc", default="1,8,32", help="concurrencies, comma-separated")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    concs = [int(c) for c in args.conc.split(",")]
    proc, url = start_server()
    try:
        t0 = time.monotonic()
        rows = asyncio.run(run(url, concs, args.seconds, args.repeat))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(table(rows, args.seconds, args.repeat))
        print(f"({time.monotonic() - t0:.0f} s; event loop: asyncio default; "
              f"aiohttp {aiohttp.__version__})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
