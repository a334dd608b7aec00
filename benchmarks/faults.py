"""The live fault-injection suite as a table: one line per fault with its requests, the
statuses they got, the bystander tenant's requests meanwhile (all should be 200), and the
ledger rows expected (requests answered or cut) and found. Exit status 1 if any guarantee
broke (the last column says which).

Run: python benchmarks/faults.py [--only SUBSTRING]   (about 4 minutes on 2 cores; starts Ray
on this machine, four fake upstreams on loopback and one llama.cpp replica)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.live_faults import SCENARIOS, live_stack, run  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="run the faults whose name contains this")
    args = ap.parse_args()
    names = [n for n in SCENARIOS if args.only in n]
    table = Table(title="faults on the live stack (Ray Serve, loopback upstreams)")
    for col in ("fault", "requests", "statuses", "bystander 200/all", "bystander p50/max s",
                "rows expected", "rows found", "s", "problems"):  # fmt: skip
        table.add_column(
            col, justify="left" if col in ("fault", "statuses", "problems") else "right"
        )
    failed = 0
    with tempfile.TemporaryDirectory() as tmp, live_stack(Path(tmp)) as stack:
        for name in names:
            out = run(stack, name)
            by = out.bystander
            secs = [r.seconds for r in by] or [0.0]
            failed += bool(out.problems)
            table.add_row(
                name,
                str(len(out.results)),
                ", ".join(f"{k}: {v}" for k, v in sorted(out.statuses().items())),
                f"{sum(r.label == '200' for r in by)}/{len(by)}",
                f"{statistics.median(secs):.3f}/{max(secs):.2f}",
                str(out.rows_expected),
                str(out.rows_found),
                f"{out.seconds:.0f}",
                "; ".join(out.problems) or "none",
            )
    Console(width=220).print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
