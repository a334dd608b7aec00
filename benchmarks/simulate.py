"""Simulator and policy speed.

    python benchmarks/simulate.py

1. Requests per second per policy over a month of the Azure conversation trace
   (configs/simulate.yaml): routing alone (stateless: scoring and assignment) and routing plus
   queueing (the whole run_policy), median of 3.
2. One live routing decision over 10 candidates (Policy.rank with a preference), median over
   20,000 decisions, beside the bare NumPy score call it is built on.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from forecasting.datasets import cache_dir
from regions.config import load_config
from router.policy import Candidates, make_policy, score
from router.preference import parse_preference
from router.simulate import build_world, make_requests, run_policy

ROOT = Path(__file__).resolve().parent.parent


def simulator_table() -> Table:
    cfg = load_config(ROOT / "configs/simulate.yaml")
    sim = cfg.simulation.model_copy(update={"start": "2024-06-01", "end": "2024-07-01",
                                            "requests_per_hour": 6000})  # fmt: skip
    cfg = cfg.model_copy(update={"simulation": sim})
    world = build_world(cfg, base_dir=ROOT / "configs", cache_dir=cache_dir().parent / "forecasts")
    req = make_requests(cfg, world.hours, np.random.default_rng(0))
    table = Table(title=f"Simulator, {len(req):,} requests (June 2024), median of 3")
    for col in ("policy", "routing req/s", "routing + queueing req/s"):
        table.add_column(col, justify="right")
    for spec in cfg.simulation.policies:
        route, total = [], []
        for _ in range(3):
            t0 = time.perf_counter()
            out = run_policy(spec, world, req, cfg, np.random.default_rng(0))
            total.append(len(req) / (time.perf_counter() - t0))
            route.append(len(req) / out.route_seconds)
        table.add_row(spec, f"{statistics.median(route):,.0f}", f"{statistics.median(total):,.0f}")
    return table


def decision_table() -> Table:
    n = 10
    rng = np.random.default_rng(0)
    c = Candidates(
        names=[f"r{i}" for i in range(n)],
        regions=[f"eu-{i}" if i < 5 else f"us-{i}" for i in range(n)],
        residency=[("eu",) if i < 5 else ("us",) for i in range(n)],
        healthy=np.ones(n, bool), has_capacity=np.ones(n, bool),
        kwh=rng.uniform(1e-5, 1e-4, n), pue=rng.uniform(1.1, 1.4, n),
        price_usd_per_kwh=rng.uniform(0.05, 0.25, n), intensity_g_per_kwh=rng.uniform(20, 600, n),
        rtt_ms=rng.uniform(5, 150, n), queue_wait_ms=rng.uniform(0, 50, n),
        service_ms=rng.uniform(100, 400, n), load=rng.uniform(0, 1, n),
    )  # fmt: skip
    pref = parse_preference('mode=balanced, max-latency-ms=800, regions=("eu-*" "us-*")')
    policy = make_policy("price_carbon", rng=random.Random(0))
    rows = []
    for label, fn in (
        (
            "score() only",
            lambda: score(c.kwh, c.pue, c.price_usd_per_kwh, c.intensity_g_per_kwh, 0.5),
        ),
        ("Policy.rank (constraints, ties, decision)", lambda: policy.rank(c, pref)),
    ):
        times = []
        for _ in range(20_000):
            t0 = time.perf_counter_ns()
            fn()
            times.append(time.perf_counter_ns() - t0)
        rows.append((label, statistics.median(times) / 1000, np.percentile(times, 99) / 1000))
    table = Table(title="One routing decision, 10 candidates, 20,000 runs")
    for col in ("what", "median us", "p99 us"):
        table.add_column(col, justify="right")
    for label, med, p99 in rows:
        table.add_row(label, f"{med:.1f}", f"{p99:.1f}")
    return table


def main() -> int:
    console = Console(width=110)
    console.print(decision_table())
    console.print(simulator_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
