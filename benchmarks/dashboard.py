"""The operator's view with a million ledger rows: each ``/v1/dashboard`` endpoint's latency and
the page's first render in headless Chromium.

    python benchmarks/dashboard.py [--rows 1000000] [--days 30] [--calls 20] [--renders 7]
                                   [--ledger PATH]

Builds a ledger of ``--rows`` rows over the last ``--days`` days through the Ledger API
(``Ledger.write`` in batches of 100,000: chained, the daily and hourly sums kept by their
triggers), 200 tenants of Zipf-like sizes (the first has about a sixth of the rows) in three
regions, and 2,000 deferred jobs. ``--ledger PATH`` keeps it there and reuses it on the next
run (its clock is stored beside it: the dashboard then reads at the time it was built).

Serves the Ray-free service (tests/service_kit.py: fake replicas, a static carbon source) on
loopback with uvicorn, then:

- times each JSON endpoint, as the admin and as the largest tenant, ``--calls`` calls each
  (the first call, cold, is shown apart);
- loads ``/dashboard`` ``--renders`` times in headless Chromium (a new tab each time, HTTP
  cache off) as the admin and as that tenant; the first render is the page's own figure:
  ``performance.now()`` (from the start of navigation) in the animation frame after all four
  panels are drawn with their data.

Prints medians (and the slowest call). Needs Debian's ``chromium`` for the page's figures
(the endpoints are timed without it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from router.jobs import Job, JobStore  # noqa: E402
from router.ledger import Ledger, LedgerRow, utc_iso  # noqa: E402
from tests.dashboard_kit import on_clock, serve  # noqa: E402
from tests.headless import CHROMIUM, NO_CHROMIUM, Chromium  # noqa: E402
from tests.service_kit import ADMIN, DEMO, service_kit  # noqa: E402

BATCH = 100_000
TENANTS = ["demo", *(f"tenant-{k:03d}" for k in range(1, 200))]  # demo is the largest
WEIGHTS = [1.0 / (k + 1) for k in range(len(TENANTS))]
REGIONS = [("eu-north", 30.0, 0.07), ("eu-central", 400.0, 0.20), ("us-south", 450.0, 0.06)]
BINDINGS = ["score"] * 14 + ["batch"] * 3 + ["latency"] * 2 + ["tpot"]
ENDPOINTS = [
    "/v1/dashboard/regions",
    "/v1/dashboard/hourly?hours=24",
    "/v1/dashboard/hourly?hours=168",
    "/v1/dashboard/tenants?hours=24&limit=10",
    "/v1/dashboard/tenants?hours=168&limit=100",
    "/v1/dashboard/jobs?limit=10",
]
RENDERED = "Number(document.documentElement.dataset.rendered || 0)"


def build(path: Path, rows: int, days: int) -> tuple[datetime, float]:
    """A ledger of ``rows`` rows over the ``days`` days before now, through ``Ledger.write``;
    (its now, seconds taken)."""
    rng = random.Random(1)
    now = datetime.now(UTC)
    t0 = time.perf_counter()
    ledger = Ledger(path)
    step = timedelta(days=days) / rows
    start = now - timedelta(days=days)
    for base in range(0, rows, BATCH):
        n = min(BATCH, rows - base)
        tenants = rng.choices(TENANTS, weights=WEIGHTS, k=n)
        batch = []
        for i in range(n):
            k = base + i
            region, g, price = REGIONS[k % 3]
            at = utc_iso(start + k * step)
            energy_j = 20.0 + (k % 97)
            kwh = energy_j / 3.6e6 * 1.2
            carbon = kwh * g
            batch.append(LedgerRow(
                request_id=f"bench-{k:08d}", tenant=tenants[i], region=region,
                replica=f"{region}-0", model="smollm2-135m", started_at=at, ended_at=at,
                prompt_tokens=64, completion_tokens=32, energy_j=energy_j,
                energy_source="measured", pue=1.2, kwh_billed=kwh, intensity_g_per_kwh=g,
                signal="average", carbon_stale=False, carbon_g=carbon, price_usd_per_kwh=price,
                tariff="energy", cost_usd=kwh * price, energy_cost_usd=kwh * price,
                token_cost_usd=0.0, carbon_cost_usd=0.0, zone="SE", policy="price_carbon",
                binding=BINDINGS[k % len(BINDINGS)], baseline_carbon_g=kwh * 300.0,
                avoided_g=kwh * 300.0 - carbon, embodied_g=kwh * 20.0,
            ))  # fmt: skip
        ledger.write(batch)
        print(f"  {base + n:>9,} rows", file=sys.stderr, flush=True)
    ledger.close()
    return now, time.perf_counter() - t0


def add_jobs(store: JobStore, now: datetime, n: int = 2000) -> None:
    jobs = [
        Job(
            id=f"job-bench-{k:05d}",
            tenant=TENANTS[k % 20],
            status="scheduled",
            created_at=now.isoformat(),
            start_at=(now + timedelta(minutes=k % 1440)).isoformat(),
            deadline=(now + timedelta(days=1)).isoformat(),
            replica=f"{REGIONS[k % 3][0]}-0",
            region=REGIONS[k % 3][0],
            chat=True,
            body={"messages": []},
            forecast_score=1.0,
        )  # fmt: skip
        for k in range(n)
    ]
    store.add_many(jobs)


def ms(seconds: list[float]) -> tuple[float, float]:
    return statistics.median(seconds) * 1000, max(seconds) * 1000


async def time_endpoints(url: str, calls: int) -> list[tuple[str, str, float, float, float]]:
    """(who, endpoint, first call ms, median ms, max ms) of each endpoint."""
    out = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for who, headers in (("admin", ADMIN), ("tenant", DEMO)):
            for path in ENDPOINTS:
                took = []
                for _ in range(calls + 1):
                    t0 = time.perf_counter()
                    r = await client.get(path, headers=headers)
                    took.append(time.perf_counter() - t0)
                    assert r.status_code == 200, r.text
                med, worst = ms(took[1:])
                out.append((who, path, took[0] * 1000, med, worst))
    return out


async def time_renders(url: str, renders: int, workdir: Path) -> list[tuple[str, list[float]]]:
    """Each key's first renders (s), of the default view (24 h) and of 7 days."""
    browser = Chromium.start(workdir)
    out = []
    try:
        for who, headers, hours in (
            ("admin", ADMIN, 24), ("tenant", DEMO, 24), ("admin", ADMIN, 168),
            ("tenant", DEMO, 168),
        ):  # fmt: skip
            key = headers["Authorization"][7:]
            figures = []
            for _ in range(renders):
                async with browser.page() as page:
                    await page.send("Network.setCacheDisabled", cacheDisabled=True)
                    await page.goto(f"{url}/dashboard?hours={hours}#key={key}")
                    figures.append(float(await page.wait_for(RENDERED, poll_s=0.05)) / 1000)
                    assert page.exceptions == [] and page.dialogs == [], page.exceptions
            out.append((f"{who}, last {hours} h", figures))
    finally:
        browser.close()
    return out


async def run(args: argparse.Namespace, ledger_path: Path, now: datetime, tmp: Path) -> None:
    ledger_path = ledger_path.resolve()
    (tmp / "ledger.sqlite").symlink_to(ledger_path)
    async with service_kit(tmp) as kit:
        add_jobs(kit.service.jobs, now)
        on_clock(kit.service, now)
        count = kit.sink.ledger.count()
        async with serve(kit.service) as served:
            endpoints = await time_endpoints(served.url, args.calls)
            renders = []
            if CHROMIUM is not None and args.renders:
                renders = await time_renders(served.url, args.renders, tmp)
    console = Console(width=100)
    print(f"\n/v1/dashboard with {count:,} ledger rows over {args.days} days, ms: median of "
          f"{args.calls} calls after a first, cold one")  # fmt: skip
    table = Table()
    for col in ("key", "endpoint", "first", "median", "max"):
        table.add_column(col, justify="left" if col in ("key", "endpoint") else "right")
    for who, path, first, med, worst in endpoints:
        table.add_row(who, path, f"{first:.1f}", f"{med:.1f}", f"{worst:.1f}")
    console.print(table)
    if not renders:
        print(f"page first render: not measured ({NO_CHROMIUM})" if CHROMIUM is None else "")
        return
    print(f"\nGET /dashboard, first render in headless Chromium, ms: {args.renders} loads per "
          "key, a new tab each, HTTP cache off")  # fmt: skip
    table = Table()
    for col in ("key, view", "median", "min", "max", "target"):
        table.add_column(col, justify="left" if col == "key, view" else "right")
    for who, figures in renders:
        med, worst = ms(figures)
        table.add_row(who, f"{med:.0f}", f"{min(figures) * 1000:.0f}", f"{worst:.0f}",
                      "< 1000" + (" ok" if med < 1000 else " MISSED"))  # fmt: skip
    console.print(table)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--calls", type=int, default=20, help="per endpoint and key")
    ap.add_argument("--renders", type=int, default=7, help="page loads per key")
    ap.add_argument("--ledger", type=Path, help="build the ledger here, or reuse it")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dashboard-bench-") as tmp_s:
        tmp = Path(tmp_s)
        path = args.ledger or tmp / "bench-ledger.sqlite"
        stamp = path.with_suffix(".json")
        if args.ledger and path.exists() and stamp.exists():
            meta = json.loads(stamp.read_text())
            now = datetime.fromisoformat(meta["now"])
            args.days = meta["days"]
            print(f"reusing {path} ({meta['rows']:,} rows built at {meta['now']})")
        else:
            print(f"building {args.rows:,} rows in {path} ...", file=sys.stderr)
            now, took = build(path, args.rows, args.days)
            stamp.write_text(json.dumps({"now": now.isoformat(), "rows": args.rows,
                                         "days": args.days}))  # fmt: skip
            print(f"built {args.rows:,} rows through Ledger.write in {took:.0f} s "
                  f"({args.rows / took:,.0f} rows/s)")  # fmt: skip
        (tmp / "kit").mkdir()
        asyncio.run(run(args, path, now, tmp / "kit"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
