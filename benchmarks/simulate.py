"""The simulator's figures and speed, and one live decision.

    python benchmarks/simulate.py [--period 2024-01-01..2025-01-01] [--day 160]

1. The shipped scenario (configs/simulate.yaml) over the period, every policy: carbon, its
   saving against each baseline, J/token, SLO attainment, p99 first token; and the issue's
   targets (price_carbon vs power-of-two, fleet scaling vs always-on, deferral vs the oracle).
2. Speed: building the world (forecasts cached in the user cache after the first run; serving
   tables too) and running all policies.
3. The fast model against the iteration-level reference on one day of the scenario at its
   full rate, request by request, and the reference's time.
4. One live routing decision over 10 candidates (Policy.rank with a preference), median over
   20,000 decisions, beside the bare NumPy score call it is built on.
"""

from __future__ import annotations

import argparse
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
from router.simulate import build_world, compare_day, deferral_capture, simulate

ROOT = Path(__file__).resolve().parent.parent


def scenario_tables(period: str, day: int) -> list[Table]:
    cfg = load_config(ROOT / "configs/simulate.yaml")
    start, _, end = period.partition("..")
    sim = cfg.simulation.model_copy(update={"start": start, "end": end})
    cfg = cfg.model_copy(update={"simulation": sim})
    policies = list(dict.fromkeys([*sim.policies, "power_of_two+scale", "price_carbon+scale"]))
    t0 = time.perf_counter()
    world = build_world(cfg, base_dir=ROOT / "configs", cache_dir=cache_dir().parent / "forecasts")
    world_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = simulate(cfg, base_dir=ROOT / "configs", policies=policies, world=world)
    run_s = time.perf_counter() - t1
    s = result.summary.set_index("policy")
    fleet = f"{len(world.replica_names)} replicas ({world.fleet_capacity_rps:.1f} req/s at SLOs)"
    t = Table(title=f"{period}: {result.requests:,.0f} requests per policy, {fleet}")
    cols = ("policy", "t CO2e", "vs P2C", "vs greenest", "vs cleanest hour", "of oracle",
            "J/token", "SLO met", "TTFT p99 ms", "replicas on")  # fmt: skip
    for col in cols:
        t.add_column(col, justify="right")
    for p, row in s.iterrows():
        t.add_row(str(p), f"{row['t_co2e']:.2f}", f"{row['co2_saved_vs_power_of_two']:+.1%}",
                  f"{row['co2_saved_vs_greenest']:+.1%}",
                  f"{row['co2_saved_vs_cleanest_hour']:+.1%}",
                  f"{row.get('share_of_oracle_saving', float('nan')):.0%}",
                  f"{row['j_per_token']:.2f}", f"{row['slo_attainment']:.2%}",
                  f"{row['ttft_p99_ms']:,.0f}", f"{row['replicas_on_mean']:.1f}")  # fmt: skip
    targets = Table(title="Targets (issue 12)")
    for col in ("target", "figure", "met"):
        targets.add_column(col, justify="right")
    pc, p2c = s.loc["price_carbon"], s.loc["power_of_two"]
    gap = p2c["slo_attainment"] - pc["slo_attainment"]
    targets.add_row("price_carbon CO2e vs power_of_two <= -45 %",
                    f"{-pc['co2_saved_vs_power_of_two']:+.1%}",
                    str(pc["co2_saved_vs_power_of_two"] >= 0.45))  # fmt: skip
    targets.add_row("... with SLO attainment >= 99 %, within 0.5 pt of P2C",
                    f"{pc['slo_attainment']:.2%} ({gap * 100:+.2f} pt)",
                    str(pc["slo_attainment"] >= 0.99 and gap <= 0.005))  # fmt: skip
    for base in ("power_of_two", "price_carbon"):
        a, b = s.loc[base], s.loc[f"{base}+scale"]
        cut = 1 - b["j_per_token"] / a["j_per_token"]
        attained = f"attainment {b['slo_attainment']:.2%} vs {a['slo_attainment']:.2%}"
        targets.add_row(f"fleet scaling ({base}): J/token vs always-on <= -25 %",
                        f"{-cut:+.1%} ({attained})", str(cut >= 0.25))  # fmt: skip
    capture = deferral_capture(result.summary)
    targets.add_row("deferral (greenest+defer) keeps >= 90 % of the oracle's saving",
                    f"{capture:.0%}" if capture is not None else "n/a",
                    str(capture is not None and capture >= 0.9))  # fmt: skip
    speed = Table(title="Speed")
    for col in ("what", "seconds"):
        speed.add_column(col, justify="right")
    speed.add_row("world: carbon, forecasts, prices, serving tables", f"{world_s:.1f}")
    speed.add_row(
        f"  of which serving tables ({len(world.tables)} kind(s))", f"{world.table_seconds:.1f}"
    )
    speed.add_row(f"all {len(policies)} policies over the period", f"{run_s:.1f}")
    t2 = time.perf_counter()
    cmp = compare_day(world, cfg, "price_carbon", day)
    speed.add_row(f"reference, one day ({world.hours[day * 24]:%Y-%m-%d}, "
                  f"{cmp.set_index('figure').loc['requests', 'reference']:,.0f} requests), "
                  "with the fast model's day", f"{time.perf_counter() - t2:.1f}")  # fmt: skip
    agree = Table(title=f"Fast model vs reference, price_carbon, {world.hours[day * 24]:%Y-%m-%d}")
    for col in ("figure", "fast", "reference", "error"):
        agree.add_column(col, justify="right")
    for _, row in cmp.iterrows():
        agree.add_row(row["figure"], f"{row['fast']:,.4g}", f"{row['reference']:,.4g}",
                      f"{row['error']:+.1%}")  # fmt: skip
    return [t, targets, speed, agree]


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
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--period", default="2024-01-01..2025-01-01")
    ap.add_argument("--day", type=int, default=160, help="day of the period for the reference")
    args = ap.parse_args()
    console = Console(width=140)
    console.print(decision_table())
    for table in scenario_tables(args.period, args.day):
        console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
