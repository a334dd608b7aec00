"""Day-ahead forecast accuracy, bands and speed: ours vs seasonal naive vs the published DACF.

    python benchmarks/forecast.py [--json]

DACF zones: train before 2021-07-01, test Jul-Dec 2021 on the DACF files (exogenous production
and weather forecasts). Electricity Maps zones: train 2021-2023, test 2024, no exogenous data.
"naive" is the same hour of the day before. Targets: MAPE below the published DACF figure (DACF
zones) or <= 0.85 x naive (Electricity Maps zones); the 80 % band (q10..q90) covering 77-83 % of
test hours; fit + backtest under 30 s per zone-year.
Reads the data through the project's data cache (CARBON_ROUTER_DATA or downloads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from rich.console import Console
from rich.table import Table

from forecasting.backtest import backtest
from forecasting.datasets import dataset_path

# DACF paper, Table 4: mean day-ahead MAPE, 2021-07-01 .. 2021-12-31, direct intensity
PUBLISHED_DACF = {"CISO": 7.41, "PJM": 3.30, "ERCO": 8.05, "SE": 6.47}
EM_ZONES = [
    "DE", "ES", "FR", "GB", "NL", "PL", "SE", "SG",
    "US-CAL-CISO", "US-MIDA-PJM", "US-MIDW-MISO", "US-NW-BPAT", "US-NY-NYIS", "US-TEX-ERCO",
]  # fmt: skip
NAIVE_RATIO_TARGET = 0.85
COVERAGE_TARGET = (77.0, 83.0)
SECONDS_TARGET = 30.0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--zones", nargs="*", help="limit to these zones")
    args = ap.parse_args()
    rows = []
    jobs = [
        (f"DACF {z}", f"carbon/dacf_2021/{z}_direct_emissions.csv", "2021-07-01", "2022-01-01", z)
        for z in PUBLISHED_DACF
    ] + [
        (f"EM {z}", f"carbon/electricitymaps_hourly/{z}.csv", "2024-01-01", "2025-01-01", None)
        for z in EM_ZONES
    ]
    for label, name, train_end, test_end, dacf in jobs:
        if args.zones and label.split()[1] not in args.zones:
            continue
        r = backtest(dataset_path(name), train_end=train_end, test_end=test_end)
        published = PUBLISHED_DACF.get(dacf) if dacf else None
        if published is not None:
            target_ok = r.mape_day_ahead < published
        else:
            target_ok = r.ratio_to_naive <= NAIVE_RATIO_TARGET
        cov_ok = COVERAGE_TARGET[0] <= r.coverage_80 <= COVERAGE_TARGET[1]
        rows.append(
            {
                "zone": label,
                "test": f"{train_end[:7]}..{test_end[:7]}",
                "ours_mape": r.mape_day_ahead,
                "naive_mape": r.naive_mape_day_ahead,
                "ratio": r.ratio_to_naive,
                "published_mape": published,
                "coverage_80": r.coverage_80,
                "pinball_loss": r.pinball_loss,
                "mape_by_member": r.mape_by_member,
                "fit_plus_backtest_s": r.backtest_seconds,
                "target_met": target_ok,
                "coverage_met": cov_ok,
                "seconds_met": r.backtest_seconds < SECONDS_TARGET,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table(title="Day-ahead carbon-intensity forecast (MAPE %, 24 h from 00:00 UTC daily)")
    cols = ("zone", "test", "ours", "model", "naive", "ours/naive", "published", "MAPE target",
            "cov80 %", "pinball", "fit+bt s")  # fmt: skip
    for col in cols:
        table.add_column(col, justify="right" if col not in ("zone", "test") else "left")
    for row in rows:
        pub = row["published_mape"]
        table.add_row(
            str(row["zone"]),
            str(row["test"]),
            f"{row['ours_mape']:.2f}",
            f"{row['mape_by_member']['model']:.2f}",  # type: ignore[index]
            f"{row['naive_mape']:.2f}",
            f"{row['ratio']:.3f}",
            f"{pub:.2f}" if pub is not None else "-",
            "met" if row["target_met"] else "MISSED",
            f"{row['coverage_80']:.1f}" + ("" if row["coverage_met"] else " MISSED"),
            f"{row['pinball_loss']:.2f}",
            f"{row['fit_plus_backtest_s']:.1f}" + ("" if row["seconds_met"] else " MISSED"),
        )
    console = Console(width=140)
    console.print(table)
    times = [float(r["fit_plus_backtest_s"]) for r in rows]  # type: ignore[arg-type]
    console.print(
        f"targets: DACF zones below the published MAPE; Electricity Maps zones <= "
        f"{NAIVE_RATIO_TARGET} x naive: met {sum(bool(r['target_met']) for r in rows)}/{len(rows)}"
        f"; 80 % band covering {COVERAGE_TARGET[0]:.0f}-{COVERAGE_TARGET[1]:.0f} % of hours: met "
        f"{sum(bool(r['coverage_met']) for r in rows)}/{len(rows)}; fit+backtest median "
        f"{statistics.median(times):.1f}s, max {max(times):.1f}s (target < {SECONDS_TARGET:.0f}s)"
    )
    beaten = [
        str(r["zone"])
        for r in rows
        if float(r["ours_mape"]) > min(r["mape_by_member"].values())  # type: ignore[arg-type, attr-defined]
    ]
    console.print(
        "ours: the ensemble; model: its learned member alone. pinball: mean pinball loss over "
        f"q10/q50/q90, g/kWh. The ensemble is worse than its best member on {len(beaten)}/"
        f"{len(rows)} zones" + (f" ({', '.join(beaten)})" if beaten else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
