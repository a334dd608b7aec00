"""Ledger write throughput: rows/s for batched inserts vs one transaction per row.

    python benchmarks/ledger.py [--rows 50000]

Each configuration writes to a fresh file on local disk with the ledger's real settings
(WAL, synchronous=FULL, one durable transaction per write call). Repeated 5 times; medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from router.ledger import Ledger, LedgerRow, utc_iso


def rows(n: int, prefix: str) -> list[LedgerRow]:
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    return [
        LedgerRow(
            request_id=f"{prefix}-{i}",
            tenant=f"t{i % 7}",
            region="eu-north",
            replica="eu-north-0",
            model="m",
            started_at=utc_iso(t0 + timedelta(seconds=i)),
            ended_at=utc_iso(t0 + timedelta(seconds=i + 1)),
            prompt_tokens=100,
            completion_tokens=50,
            energy_j=12.5,
            energy_source="measured",
            pue=1.2,
            kwh_billed=12.5 / 3.6e6 * 1.2,
            intensity_g_per_kwh=40.0,
            signal="average",
            carbon_stale=False,
            carbon_g=1e-4,
            price_usd_per_kwh=0.07,
            tariff="energy",
            cost_usd=3e-7,
            energy_cost_usd=3e-7,
            token_cost_usd=3e-4,
            carbon_cost_usd=0.0,
        )  # fmt: skip
        for i in range(n)
    ]


def measure(batch: int, total: int, repeat: int = 5) -> float:
    rates = []
    for r in range(repeat):
        data = rows(total, f"b{batch}-{r}")
        with tempfile.TemporaryDirectory() as d:
            ledger = Ledger(Path(d) / "bench.sqlite")
            t0 = time.perf_counter()
            for i in range(0, total, batch):
                ledger.write(data[i : i + batch])
            rates.append(total / (time.perf_counter() - t0))
            assert ledger.count() == total
            ledger.close()
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=50_000)
    args = ap.parse_args()
    table = Table(title="Ledger writes (WAL, synchronous=FULL), median of 5")
    for col in ("rows per write", "rows written", "rows/s", "vs 1 row/write"):
        table.add_column(col, justify="right")
    base = measure(1, 2_000)
    table.add_row("1 (baseline)", "2,000", f"{base:,.0f}", "1.0x")
    for batch in (100, 1_000, 10_000):
        rate = measure(batch, args.rows)
        table.add_row(f"{batch:,}", f"{args.rows:,}", f"{rate:,.0f}", f"{rate / base:.0f}x")
    Console(width=100).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
