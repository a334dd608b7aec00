"""Router overhead against calling the same fast fake backend directly.

    python benchmarks/overhead.py [--seconds 10]

Starts regions/fake_openai.py on loopback, then the router (Ray Serve, one region replica
proxying to the fake backend, auth, preference parsing, policy and metering on the path) and
measures, each beside the direct figure in the same run, with wrk (so the client does not eat
the 2 cores): p50/p99 latency at concurrency 1 and 32, throughput at 32, and time to first byte
of a stream at concurrency 8 (a small Python client: wrk cannot time first bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-local-demo"
BODY = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}

CONFIG = """
carbon_sources:
  replay: {{kind: replay, dataset: electricitymaps_hourly}}
regions:
  - name: eu-north
    zone: SE
    carbon_source: replay
    price: {{flat_usd_per_kwh: 0.07}}
    replicas:
      - name: eu-north-0
        backend: {{kind: openai, url: "http://127.0.0.1:{port}/v1", model: fake}}
        meter: cpu
        max_concurrency: 64
tenants:
  - name: demo
    api_key_sha256: [4ff444b1a79536cc47732956cf5bc6256abf64bc1b8adff6843fac08bbb6be9f]
ledger: {ledger}
"""

LUA = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.headers["X-Carbon-Preference"] = "mode=balanced"
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(url: str, method: str = "GET") -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        try:
            data = json.dumps(BODY).encode() if method == "POST" else None
            req = urllib.request.Request(
                url,
                data=data,
                method=method,
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not come up")


def wrk(url: str, conns: int, seconds: int, script: Path) -> dict[str, float]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        v, unit = float(m.group(1)), m.group(2)
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "p50": ms("50%"),
        "p99": ms("99%"),
        "rps": rps,
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


async def ttfb(url: str, conns: int, n: int) -> float:
    import aiohttp

    times: list[float] = []
    body = {**BODY, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    async with aiohttp.ClientSession() as s:

        async def worker() -> None:
            for _ in range(n // conns):
                t0 = time.perf_counter()
                async with s.post(url, json=body, headers=headers) as r:
                    await r.content.readany()
                    times.append((time.perf_counter() - t0) * 1000)
                    await r.read()

        await asyncio.gather(*(worker() for _ in range(conns)))
    return statistics.median(times)


async def soak(url: str, conns: int, seconds: float) -> tuple[int, int]:
    """``conns`` streams back to back for ``seconds``: (completed, failed or incomplete)."""
    import aiohttp

    ok = bad = 0
    body = {**BODY, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession() as s:

        async def worker() -> None:
            nonlocal ok, bad
            while time.monotonic() < end:
                try:
                    async with s.post(url, json=body, headers=headers) as r:
                        text = await r.text()
                        if r.status == 200 and text.rstrip().endswith("data: [DONE]"):
                            ok += 1
                        else:
                            bad += 1
                except aiohttp.ClientError:
                    bad += 1

        await asyncio.gather(*(worker() for _ in range(conns)))
    return ok, bad


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--soak-seconds", type=int, default=60)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    fake_port, router_port = free_port(), free_port()
    fake = subprocess.Popen([sys.executable, "-m", "regions.fake_openai", str(fake_port)], cwd=ROOT)
    cfg = tmp / "bench.yaml"
    cfg.write_text(CONFIG.format(port=fake_port, ledger=tmp / "ledger.sqlite"))
    router = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "router.cli",
            "serve",
            "--config",
            str(cfg),
            "--port",
            str(router_port),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    direct = f"http://127.0.0.1:{fake_port}/v1/chat/completions"
    routed = f"http://127.0.0.1:{router_port}/v1/chat/completions"
    script = tmp / "post.lua"
    script.write_text(LUA.format(body=json.dumps(BODY), key=KEY))
    try:
        wait(direct, "POST")
        wait(routed, "POST")
        rows = []
        for conns in (1, 32):
            d = wrk(direct, conns, args.seconds, script)
            r = wrk(routed, conns, args.seconds, script)
            rows.append((conns, d, r))
        t_direct = asyncio.run(ttfb(direct, 8, 400))
        t_routed = asyncio.run(ttfb(routed, 8, 400))
        soaked = asyncio.run(soak(routed, 32, args.soak_seconds))
    finally:
        router.terminate()
        router.wait(timeout=60)
        fake.terminate()
        subprocess.run(
            [sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
            capture_output=True,
            check=False,
        )
    table = Table(title="Router overhead vs direct (fake backend), wrk -t1")
    for col in (
        "concurrency",
        "direct p50 ms",
        "router p50 ms",
        "added p50 ms",
        "direct p99 ms",
        "router p99 ms",
        "direct req/s",
        "router req/s",
        "router non-2xx",
    ):
        table.add_column(col, justify="right")
    for conns, d, r in rows:
        table.add_row(
            str(conns),
            f"{d['p50']:.2f}",
            f"{r['p50']:.2f}",
            f"{r['p50'] - d['p50']:.2f}",
            f"{d['p99']:.2f}",
            f"{r['p99']:.2f}",
            f"{d['rps']:,.0f}",
            f"{r['rps']:,.0f}",
            f"{r['non2xx']:.0f}",
        )
    console = Console(width=140)
    console.print(table)
    console.print(
        f"stream time to first byte, concurrency 8, median: direct {t_direct:.2f} ms, "
        f"router {t_routed:.2f} ms"
    )
    console.print(
        f"soak: 32 concurrent streams for {args.soak_seconds} s through the router: "
        f"{soaked[0]} completed, {soaked[1]} failed or incomplete"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
