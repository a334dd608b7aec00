"""Router overhead against calling the same fast fake backend directly.

    python benchmarks/overhead.py [--seconds 10]

Starts regions/fake_openai.py on loopback, then the router (Ray Serve, one region replica
proxying to the fake backend, auth, preference parsing, policy and metering on the path) and
measures, each beside the direct figure in the same run, with wrk (so the client does not eat
the 2 cores): p50/p99 latency at concurrency 1 and 32, throughput at 32, and time to first byte
of a stream at concurrency 8 (wrk cannot time first bytes: a lean client on regions.http1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    raise SystemExit(f"{url} did not come up (logs in {tempfile.gettempdir()})")


def wrk(url: str, conns: int, seconds: int, script: Path, repeat: int = 1) -> dict[str, float]:
    """wrk's figures; with ``repeat``, the median of each over that many runs (requests and
    non-2xx summed)."""
    if repeat > 1:
        runs = [wrk(url, conns, seconds, script) for _ in range(repeat)]
        out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        out["requests"] = sum(r["requests"] for r in runs)
        out["non2xx"] = sum(r["non2xx"] for r in runs)
        return out
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
    total = re.search(r"(\d+) requests in", out)
    return {
        "requests": float(total.group(1)) if total else float("nan"),
        "p50": ms("50%"),
        "p99": ms("99%"),
        "rps": rps,
        "non2xx": float(errors.group(1)) if errors else 0.0,
    }


async def ttfb(url: str, conns: int, n: int) -> float:
    """Median ms from sending a streamed request to the first byte of its body, ``conns`` at a
    time. The client is regions.http1 (httptools on asyncio, keep-alive): about a fifth of
    aiohttp's CPU per request, which on 2 cores is CPU the server under test keeps."""
    from regions.http1 import Http1Pool

    base, _, path = url.partition("/v1")
    pool = Http1Pool(base + "/v1")
    head = pool.head(
        "POST", path, {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
    )
    body = json.dumps({**BODY, "stream": True}).encode()
    times: list[float] = []

    async def worker() -> None:
        for _ in range(n // conns):
            t0 = time.perf_counter()
            async with await pool.request(head, body, timeout_s=30) as resp:
                chunks = resp.chunks()
                await anext(chunks)
                times.append((time.perf_counter() - t0) * 1000)
                async for _ in chunks:
                    pass
            if resp.status != 200:
                raise SystemExit(f"{url}: HTTP {resp.status}")

    await asyncio.gather(*(worker() for _ in range(conns)))
    await pool.aclose()
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


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
    subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
        capture_output=True,
        check=False,
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="wrk runs per figure (median)")
    ap.add_argument("--soak-seconds", type=int, default=60)
    ap.add_argument("--no-floor", action="store_true", help="skip the bare-forwarder floor")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    env = {**os.environ, "CARBON_ROUTER_DATA": os.environ.get("CARBON_ROUTER_DATA", "")}
    if not env["CARBON_ROUTER_DATA"]:
        env["CARBON_ROUTER_DATA"] = str(ROOT.parent / "shared" / "data")
    fake_port, router_port, direct_port = free_port(), free_port(), free_port()
    fake = subprocess.Popen([sys.executable, "-m", "regions.fake_openai", str(fake_port)], cwd=ROOT)
    cfg = tmp / "bench.yaml"
    cfg.write_text(CONFIG.format(port=fake_port, ledger=tmp / "ledger.sqlite"))
    router = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(cfg),
         "--port", str(router_port), "--direct-port", str(direct_port)],
        cwd=ROOT, env=env, stdout=(tmp / "router.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    direct = f"http://127.0.0.1:{fake_port}/v1/chat/completions"
    paths = {
        "router, direct ingress": f"http://127.0.0.1:{direct_port}/v1/chat/completions",
        "router, Serve proxy": f"http://127.0.0.1:{router_port}/v1/chat/completions",
    }
    script = tmp / "post.lua"
    script.write_text(LUA.format(body=json.dumps(BODY), key=KEY))
    rows: list[tuple[str, int, dict[str, float], dict[str, float]]] = []
    ttfbs: dict[str, float] = {}
    try:
        wait(direct, "POST")
        for url in paths.values():
            wait(url, "POST")
        for conns in (1, 32):
            d = wrk(direct, conns, args.seconds, script, args.repeat)
            for name, url in paths.items():
                before = cpu_by_process()
                r = wrk(url, conns, args.seconds, script, args.repeat)
                if conns == 32 and name == "router, direct ingress":
                    cpu = per_request(before, cpu_by_process(), r["requests"])
                rows.append((name, conns, d, r))
        ttfbs["direct"] = asyncio.run(ttfb(direct, 8, 400))
        for name, url in paths.items():
            ttfbs[name] = asyncio.run(ttfb(url, 8, 400))
        fast = paths["router, direct ingress"]
        soaked = asyncio.run(soak(fast, 32, args.soak_seconds))
        answered = (
            len(paths)  # the readiness probes
            + sum(r["requests"] - r["non2xx"] for _, _, _, r in rows)
            + 400 * len(paths)  # the time-to-first-byte streams
            + soaked[0]
        )
        ledger_rows = count_rows(tmp / "ledger.sqlite")
    finally:
        stop(router)
    if not args.no_floor:  # what Ray Serve alone costs here, measured in the same run
        floor_port, floor_direct = free_port(), free_port()
        floor_env = {
            **env,
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(floor_direct),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(floor_direct + 15),
        }
        bare = subprocess.Popen(
            [sys.executable, str(ROOT / "benchmarks/bare_forwarder.py"), str(fake_port),
             str(floor_port)],
            cwd=ROOT, env=floor_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{floor_direct}/v1/chat/completions"
            wait(url, "POST")
            for conns in (1, 32):
                d = wrk(direct, conns, args.seconds, script, args.repeat)
                r = wrk(url, conns, args.seconds, script, args.repeat)
                rows.append(("bare forwarder (floor)", conns, d, r))
        finally:
            stop(bare)
    fake.terminate()
    table = Table(
        title=f"Router overhead vs calling the fake backend directly (wrk -t1, median of "
        f"{args.repeat} x {args.seconds} s)"
    )
    for col in ("path", "conc.", "direct p50 ms", "path p50 ms", "added p50 ms", "direct p99 ms",
                "path p99 ms", "direct req/s", "path req/s", "non-2xx"):  # fmt: skip
        table.add_column(col, justify="right")
    for name, conns, d, r in sorted(rows, key=lambda x: (x[1], x[0])):
        table.add_row(
            name, str(conns), f"{d['p50']:.2f}", f"{r['p50']:.2f}", f"{r['p50'] - d['p50']:.2f}",
            f"{d['p99']:.2f}", f"{r['p99']:.2f}", f"{d['rps']:,.0f}", f"{r['rps']:,.0f}",
            f"{r['non2xx']:.0f}",
        )  # fmt: skip
    console = Console(width=160)
    console.print(table)
    console.print(
        "stream time to first byte, concurrency 8, median ms: "
        + ", ".join(f"{k} {v:.2f}" for k, v in ttfbs.items())
    )
    console.print(f"answered by the router: {answered:,.0f}; rows in its ledger: {ledger_rows:,}")
    console.print(
        "CPU per request, direct ingress at concurrency 32 (us): "
        + ", ".join(f"{k} {v:.0f}" for k, v in cpu.items())
    )
    console.print(
        f"soak: 32 concurrent streams for {args.soak_seconds} s through the direct ingress: "
        f"{soaked[0]} completed, {soaked[1]} failed or incomplete"
    )
    return 0


PROCESSES = {
    "ingress": "ServeReplica:carbon-router:Ingress",
    "replica deployment (attribution)": "ServeReplica:carbon-router:replica-",
    "metering actor (ledger)": "ray::MeteringActor",
    "fake backend": "regions.fake_openai",
}


def cpu_by_process() -> dict[str, float]:
    """CPU seconds so far of the router's processes (and the fake backend), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = dict.fromkeys(PROCESSES, 0.0)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        for name, pattern in PROCESSES.items():
            if pattern in cmd:
                out[name] += (int(stat[11]) + int(stat[12])) / ticks  # utime + stime
    return out


def per_request(before: dict[str, float], after: dict[str, float], n: float) -> dict[str, float]:
    return {k: (after[k] - before[k]) / n * 1e6 for k in before}


def count_rows(path: Path, settle_s: float = 40.0) -> int:
    """Ledger rows once metering has caught up (measured bills trail the answers by ~1 s)."""
    import sqlite3

    deadline, last = time.monotonic() + settle_s, -1
    while time.monotonic() < deadline:
        with sqlite3.connect(path) as db:
            n = int(db.execute("SELECT count(*) FROM requests").fetchone()[0])
        if n == last:
            return n
        last = n
        time.sleep(3)
    return last


if __name__ == "__main__":
    sys.exit(main())
