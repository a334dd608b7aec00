"""``GET /v1/usage`` latency with a million ledger rows, idle and while 32 streams run; this
tree, or this tree against a baseline commit side by side.

    python benchmarks/usage.py [--baseline REF] [--rows 1000000] [--calls 300]

Fills a ledger with ``--rows`` rows over the last 30 days (90 % of them one tenant's), starts
the live fault-suite stack on it (Ray Serve, fake upstreams on loopback: tests/live_faults.py)
and, as that tenant, calls ``/v1/usage`` one call after another: the default (all-time totals
and the first page), this month's, and a page deep in the rows; idle, then while 32 streams of
another tenant run, then while 32 streams of the same tenant run (a fake upstream sending 8
chunks 0.25 s apart: each call waits for the measured bills of that tenant's streams answered
before it, read-your-writes).
Prints p50 / p99 / max per phase and tree. With ``--baseline`` the baseline runs first from a
temporary git worktree (its ``router`` package, this tree's stack and fakes). Starts and stops
Ray on this machine: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TENANT = "budget"  # a tenant of the stack's config; its budget is far above these rows
STREAMS = 32
MAX_QUERY_S = 45.0  # per query and phase


def _harness() -> Any:
    """tests/live_faults.py of this tree, whichever tree's ``router`` is on the path."""
    spec = importlib.util.spec_from_file_location("live_faults", ROOT / "tests/live_faults.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["live_faults"] = mod
    spec.loader.exec_module(mod)
    return mod


def prefill(n: int) -> Any:
    from router.ledger import Ledger, LedgerRow

    def fill(path: Path) -> None:
        ledger = Ledger(path)
        t0 = datetime.now(UTC) - timedelta(days=30)
        step = timedelta(days=30) / n
        for base in range(0, n, 100_000):
            rows = []
            for i in range(base, min(n, base + 100_000)):
                at = (t0 + i * step).isoformat(timespec="microseconds")
                rows.append(LedgerRow(
                    request_id=f"pre-{i:07d}", tenant=TENANT if i % 10 else "bystander",
                    region="eu-a", replica="eu-a-0", model="smollm2-135m", started_at=at,
                    ended_at=at, prompt_tokens=8, completion_tokens=12, energy_j=36.0,
                    energy_source="measured", pue=1.2, kwh_billed=1.2e-5,
                    intensity_g_per_kwh=30.0, signal="average", carbon_stale=False,
                    carbon_g=3.6e-4, price_usd_per_kwh=0.05, tariff="energy", cost_usd=1e-6,
                    energy_cost_usd=6e-7, token_cost_usd=0.0, carbon_cost_usd=0.0,
                ))  # fmt: skip
            ledger.write(rows)
        ledger.close()

    return fill


def _stats(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in seconds)
    return {"p50": statistics.median(ms), "p99": ms[int(0.99 * (len(ms) - 1))], "max": ms[-1]}


def measure(rows: int, calls: int) -> dict[str, Any]:
    """This process's tree: the figures of each phase."""
    import httpx

    h = _harness()
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    queries = {
        "default": {},
        "this month": {"start": month.isoformat()},
        "deep page": {"after": f"pre-{rows // 2 + 1:07d}"},
    }
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, h.live_stack(Path(tmp), prefill(rows)) as stack:
        headers = {"Authorization": f"Bearer {h.key(TENANT)}"}

        def phase(name: str) -> None:
            with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as c:
                for q, params in queries.items():
                    took: list[float] = []
                    stop_at = time.monotonic() + MAX_QUERY_S  # a slow tree: fewer calls
                    while len(took) < calls // len(queries) and time.monotonic() < stop_at:
                        t0 = time.perf_counter()
                        r = c.get("/v1/usage", params=params)
                        took.append(time.perf_counter() - t0)
                        assert r.status_code == 200, r.text
                    out[f"{name}, {q}"] = _stats(took)

        phase("idle")
        stack.fakes["eu-b"].fault("slow")
        done = {}

        async def streams(tenant: str, name: str) -> None:
            async with h.client(stack) as c:
                stop = asyncio.Event()
                done[name] = 0

                async def one() -> None:
                    while not stop.is_set():
                        r = await h.call(c, tenant, stream=True, headers=h.regions("eu-b"))
                        assert r.label == "200", r
                        done[name] += 1

                tasks = [asyncio.create_task(one()) for _ in range(STREAMS)]
                await asyncio.to_thread(time.sleep, 3.0)  # all streams under way
                await asyncio.to_thread(phase, name)
                stop.set()
                await asyncio.gather(*tasks)

        asyncio.run(streams("bystander", f"{STREAMS} streams of another tenant"))
        asyncio.run(streams(TENANT, f"{STREAMS} streams of the same tenant"))
        out["streams completed"] = done
    return out


def run_tree(tree: Path, rows: int, calls: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(ROOT / "benchmarks/usage.py"), "--measure",
           "--rows", str(rows), "--calls", str(calls)]  # fmt: skip
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if p.returncode:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"measuring {tree} failed")
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="a git ref to measure first, side by side")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=150, help="per phase, over the three queries")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        sys.path.insert(0, os.getcwd())
        print(json.dumps(measure(args.rows, args.calls)))
        return 0
    trees: dict[str, Path] = {}
    base_dir = None
    if args.baseline:
        base_dir = Path(tempfile.mkdtemp(prefix="usage-baseline-"))
        subprocess.run(["git", "worktree", "add", "--detach", str(base_dir), args.baseline],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
        trees[f"baseline {args.baseline}"] = base_dir
    trees["this tree"] = ROOT
    try:
        results = {name: run_tree(tree, args.rows, args.calls) for name, tree in trees.items()}
    finally:
        if base_dir is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=ROOT,
                           check=False, capture_output=True)  # fmt: skip
    print(f"\n/v1/usage, {args.rows:,} ledger rows ({TENANT}: 90 %), ms per call "
          f"({args.calls // 3} calls per line, or {MAX_QUERY_S:.0f} s of them)")  # fmt: skip
    print(f"{'phase, query':<32}" + "".join(f"{n:>34}" for n in results))
    for phase in [k for k in next(iter(results.values())) if k != "streams completed"]:
        cells = [results[n][phase] for n in results]
        line = "".join(f"{c['p50']:>10.1f} /{c['p99']:>8.1f} /{c['max']:>8.1f}    " for c in cells)
        print(f"{phase:<32}{line}")
    print(f"{'(p50 / p99 / max)':<32}")
    for n, r in results.items():
        print(f"{n}: streams completed per phase: {r['streams completed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
