"""What the dashboard's tests and benchmark share: ledger rows and jobs seeded around a fixed
``now`` (with the sums they should show, computed from the seed, not from the ledger), a
dashboard on that clock, and the ASGI app served by uvicorn on loopback for a real browser."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import uvicorn

from router.http.app import make_api
from router.jobs import Job, JobStore
from router.ledger import Ledger, LedgerRow
from router.service.app import RouterService
from router.service.dashboard import Dashboard
from tests.test_ledger import row

# names a tenant or a region must show as text, never as markup that runs
HOSTILE_TENANT = "<img src=x onerror=alert(1)>"
HOSTILE_TENANT_2 = '"><svg onload=alert(2)>'
HOSTILE_REGION = "<b>us-east</b>"
TENANTS = ("acme", "demo", "bolt", HOSTILE_TENANT, HOSTILE_TENANT_2)
REGIONS = ("eu-north", "eu-central", "us-south", HOSTILE_REGION)
BINDINGS = ("score", "score", "batch", "latency", "")
SECRET = "SECRET-PROMPT-TEXT"  # in job bodies: never shown


@dataclass
class Seeded:
    now: datetime
    rows: list[LedgerRow] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)

    def window_rows(self, hours: int, tenant: str | None = None) -> list[LedgerRow]:
        """The rows a ``hours`` view at ``now`` holds: started since the top of the hour
        ``hours - 1`` hours before the current one."""
        start = self.now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=hours - 1)
        return [
            r for r in self.rows
            if datetime.fromisoformat(r.started_at) >= start and tenant in (None, r.tenant)
        ]  # fmt: skip


def hour_of(r: LedgerRow) -> str:
    return r.started_at[:13]


def sums(rows: list[LedgerRow]) -> dict[str, Any]:
    """The figures the dashboard sums, from the rows themselves."""
    return {
        "requests": len(rows),
        "kwh": sum(r.kwh_billed for r in rows),
        "carbon_g": sum(r.carbon_g for r in rows),
        "avoided_g": sum(r.avoided_g for r in rows),
        "embodied_g": sum(r.embodied_g for r in rows),
        "cost_usd": sum(r.cost_usd for r in rows),
    }


def seed(ledger: Ledger, jobs: JobStore, now: datetime, n: int = 300) -> Seeded:
    """``n`` rows over the last 21 hours (acme most, the hostile names too), 5 of acme's 30
    hours ago, and jobs of acme and demo: scheduled, overdue, running."""
    rng = random.Random(7)
    out = Seeded(now)
    for i in range(n):
        tenant = rng.choices(TENANTS, weights=(6, 3, 2, 1, 1))[0]
        region = rng.choice(REGIONS)
        at = now - timedelta(hours=rng.randint(0, 20), minutes=rng.randint(0, 59))
        at = min(at, now - timedelta(seconds=1))
        carbon = rng.uniform(0.001, 0.05)
        out.rows.append(
            row(
                f"seed-{i}",
                at,
                tenant=tenant,
                region=region,
                replica=f"{region}-0",
                kwh_billed=rng.uniform(1e-5, 1e-3),
                carbon_g=carbon,
                avoided_g=rng.uniform(-0.01, 0.03),
                baseline_carbon_g=carbon + 0.01,
                embodied_g=rng.uniform(0, 0.002),
                cost_usd=rng.uniform(1e-6, 1e-4),
                binding=rng.choice(BINDINGS),
                zone="SE",
                policy="price_carbon",
            )  # fmt: skip
        )
    for i in range(5):
        out.rows.append(row(f"old-{i}", now - timedelta(hours=30), tenant="acme",
                            kwh_billed=0.5, carbon_g=20.0))  # fmt: skip
    ledger.write(out.rows)
    plan = [  # tenant, status, start in minutes from now, region
        ("acme", "scheduled", 60, "eu-north"), ("acme", "scheduled", 180, "eu-north"),
        ("acme", "scheduled", -5, "us-south"), ("demo", "scheduled", 120, "eu-central"),
        ("demo", "running", -1, "eu-north"), ("acme", "completed", -90, "eu-north"),
    ]  # fmt: skip
    for k, (tenant, status, minutes, region) in enumerate(plan):
        out.jobs.append(
            Job(
                id=f"job-{k:02d}-{tenant}",
                tenant=tenant,
                status=status,
                created_at=(now - timedelta(hours=2)).isoformat(),
                start_at=(now + timedelta(minutes=minutes)).isoformat(),
                deadline=(now + timedelta(hours=12)).isoformat(),
                replica=f"{region}-0",
                region=region,
                chat=True,
                forecast_score=0.5,
                body={"messages": [{"role": "user", "content": SECRET}]},
                result={"answer": SECRET} if status == "completed" else None,
            )  # fmt: skip
        )
    jobs.add_many(out.jobs)
    return out


def on_clock(
    service: RouterService,
    now: datetime,
    wait_s: float = 0.25,
    clock: Callable[[], float] = time.monotonic,
) -> Dashboard:
    """The service's dashboard with its wall clock fixed at ``now`` (and ``clock`` its
    monotonic one)."""
    dash = service.dashboard
    service.dashboard = Dashboard(
        service.current, dash._ledger, dash._jobs, service.fleet, wall=lambda: now,
        clock=clock, wait_s=wait_s,
    )  # fmt: skip
    return service.dashboard


@dataclass
class Served:
    url: str
    paths: list[str]  # every path and query the server was asked for
    headers: list[dict[str, str]]


@asynccontextmanager
async def serve(service: RouterService) -> AsyncIterator[Served]:
    """The service's ASGI app on a free loopback port, in this event loop, recording what it
    was asked for (to show no key ever reached a URL)."""
    api = make_api()
    api.state.service = service
    seen = Served("", [], [])

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.paths.append(scope["path"] + "?" + scope["query_string"].decode())
            seen.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        await api(scope, receive, send)

    config = uvicorn.Config(
        recording, host="127.0.0.1", port=0, log_level="warning", lifespan="off", ws="none",
        access_log=False,
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises why it did not start
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    seen.url = f"http://127.0.0.1:{port}"
    try:
        yield seen
    finally:
        server.should_exit = True
        await task
