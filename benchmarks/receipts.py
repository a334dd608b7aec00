"""Receipts: what they cost the ingress per request, and how fast an auditor checks them.

    python benchmarks/receipts.py [--rows 1000000] [--repeat 3]

1. Ingress CPU per request, side by side in one run: a bill as it was before receipts (the
   price of the energy only: ``bill_line`` without its receipt) and as it is now (the receipt's
   fields, the carbon-agnostic baseline of the decision, the embodied share); for 3 and for 20
   candidate replicas. CPU time of this thread (``time.thread_time``: another process on the
   machine does not count), the two in turn in each of ``--rounds`` rounds; the added cost is
   the median of the rounds' differences, and the least round of each beside it (``--rows
   0``: this part alone). The receipt's chaining runs in the metering actor, off the ingress;
   its cost per row is the write throughput below, with and without the chain.
2. A ledger of ``--rows`` rows over 20 tenants, written in batches of 5,000 as the metering
   actor does, then every tenant's head signed; ``router verify`` of the whole ledger; one
   tenant's export and its verification.
Medians of ``--repeat`` runs; the machine is noisy, so ratios matter more than the figures.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from regions.config import Billing, Embodied, Replica
from router.accounting import embodied_rate, prefill_share_j
from router.billing import bill_line, tariff_for
from router.ledger import Ledger, LedgerRow, utc_iso
from router.policy import Candidates, carbon_agnostic_baseline
from router.receipts import Signer, export, sign_heads, verify_export, verify_ledger

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def candidates(n: int) -> Candidates:
    rng = np.random.default_rng(0)
    return Candidates(
        names=[f"r{i}" for i in range(n)], regions=[f"g{i % 5}" for i in range(n)],
        residency=[("eu",)] * n, healthy=np.ones(n, bool), has_capacity=np.ones(n, bool),
        kwh=rng.uniform(1e-5, 2e-5, n), pue=np.full(n, 1.2),
        price_usd_per_kwh=rng.uniform(0.05, 0.2, n),
        intensity_g_per_kwh=rng.uniform(20, 600, n), rtt_ms=np.zeros(n),
        queue_wait_ms=np.zeros(n), service_ms=np.full(n, 200.0), load=rng.uniform(0, 1, n),
    )  # fmt: skip


def per_request_us(n_cands: int, receipt: bool, loops: int = 20_000) -> float:
    """µs of the ingress's billing step for one request: the old bill, or the new one."""
    tariff = tariff_for(Billing(tariff="energy"))
    rate, basis = embodied_rate(Replica.model_validate(
        {"name": "r0", "backend": {"kind": "llama_cpp", "model": "m"}}), Embodied())  # fmt: skip
    c = candidates(n_cands)
    allowed = np.ones(n_cands, bool)
    start, end = T0, T0 + timedelta(seconds=2)
    intensity_at = utc_iso(start)  # formatted once per carbon reading (CarbonReading.at_iso)
    t = time.thread_time()
    for i in range(loops):
        extra = None
        if receipt:
            c._billed_kwh = None  # each request has its own candidates
            name, g_per_kwh = carbon_agnostic_baseline(c, allowed, 0)
            held = 0.4
            extra = {
                "zone": "SE", "first_token_at": utc_iso(start), "prefill_j": prefill_share_j(
                    40.0, 120, 50), "static_j": 10.0, "held_s": held, "meter": "nvml",
                "method": "work-share/1", "intensity_at": intensity_at,
                "intensity_source": "electricitymaps (SE)", "intensity_kind": "actual",
                "marginal_g_per_kwh": None, "embodied_g": rate * held, "embodied_basis": basis,
                "policy": "price_carbon", "binding": "score", "baseline_replica": name,
                "baseline_carbon_g": 40.0 / 3.6e6 * g_per_kwh,
            }  # fmt: skip
        bill_line(
            request_id=f"r{i}", tenant="acme", region="eu-north", replica="r0", model="m",
            started_at=start, ended_at=end, prompt_tokens=120, completion_tokens=50,
            energy_j=40.0, energy_source="measured", pue=1.2, intensity_g_per_kwh=40.0,
            signal="average", carbon_stale=False, price_usd_per_kwh=0.07, tariff=tariff,
            receipt=extra,
        )  # fmt: skip
    return (time.thread_time() - t) / loops * 1e6


def rows(n: int, tenants: int, prefix: str = "q") -> list[LedgerRow]:
    return [
        LedgerRow(
            request_id=f"{prefix}{i}",
            tenant=f"t{i % tenants}",
            region="eu-north",
            replica="eu-north-0",
            model="m",
            started_at=utc_iso(T0 + timedelta(seconds=i)),
            ended_at=utc_iso(T0 + timedelta(seconds=i + 1)),
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
            zone="SE",
            first_token_at=utc_iso(T0 + timedelta(seconds=i, milliseconds=80)),
            prefill_j=2.5,
            static_j=4.0,
            held_s=0.05,
            meter="nvml",
            method="work-share/1",
            intensity_at=utc_iso(T0),
            intensity_source="electricitymaps (SE)",
            embodied_g=1e-4,
            embodied_basis="x",
            policy="price_carbon",
            binding="score",
            baseline_replica="us-0",
            baseline_carbon_g=4e-4,
            avoided_g=3e-4,
        )  # fmt: skip
        for i in range(n)
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=15, help="rounds of the ingress CPU part")
    args = ap.parse_args(argv)
    console = Console()

    cpu = Table(title=f"ingress CPU per request for its bill (µs of thread CPU; {args.rounds} "
                      "rounds of 5,000 bills each way, in turn)")  # fmt: skip
    for col in ("candidates", "before (price only)", "after (with receipt)",
                "added (median of rounds)", "least round: before / after / added"):  # fmt: skip
        cpu.add_column(col, justify="right")
    for n in (3, 20):
        runs = [(per_request_us(n, False, 5000), per_request_us(n, True, 5000))
                for _ in range(args.rounds)]  # fmt: skip
        before = statistics.median(r[0] for r in runs)
        after = statistics.median(r[1] for r in runs)
        added = statistics.median(r[1] - r[0] for r in runs)
        lo_b, lo_a = min(r[0] for r in runs), min(r[1] for r in runs)
        cpu.add_row(str(n), f"{before:.1f}", f"{after:.1f}", f"{added:+.1f}",
                    f"{lo_b:.1f} / {lo_a:.1f} / {lo_a - lo_b:+.1f}")  # fmt: skip
    console.print(cpu)
    if args.rows <= 0:
        return 0

    audit = Table(title=f"a ledger of {args.rows:,} rows over 20 tenants (median of runs, s)")
    for col in ("step", "seconds", "rows/s"):
        audit.add_column(col, justify="right")
    data = rows(args.rows, 20)
    times: dict[str, list[float]] = {}
    exported = 0
    for r in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            ledger = Ledger(Path(tmp) / "l.sqlite")
            signer = Signer.load(Path(tmp) / "k.pem", create=True)
            t = time.perf_counter()
            for i in range(0, len(data), 5000):
                ledger.write(data[i : i + 5000])
            times.setdefault("write with the chain (batches of 5,000)", []).append(
                time.perf_counter() - t
            )
            t = time.perf_counter()
            sign_heads(ledger, signer)
            times.setdefault("first signing of 20 heads (each chain checked from its start)",
                             []).append(time.perf_counter() - t)  # fmt: skip
            t = time.perf_counter()
            report = verify_ledger(ledger, [signer.public_key], sums=False)
            times.setdefault("router verify --ledger --no-sums (chains, signatures)", []).append(
                time.perf_counter() - t
            )
            assert report.ok and report.rows == args.rows, report.problems
            t = time.perf_counter()
            report = verify_ledger(ledger, [signer.public_key])
            times.setdefault("router verify --ledger (and the kept sums)", []).append(
                time.perf_counter() - t
            )
            assert report.ok and report.rows == args.rows, report.problems
            out = io.BytesIO()
            t = time.perf_counter()
            trailer = export(ledger, "t0", None, None, signer, out)
            times.setdefault("export one tenant", []).append(time.perf_counter() - t)
            exported = int(trailer["count"])
            t = time.perf_counter()
            report = verify_export(io.BytesIO(out.getvalue()), [signer.public_key])
            times.setdefault("verify that export", []).append(time.perf_counter() - t)
            assert report.ok
            ledger.close()
        console.print(f"run {r + 1} done", style="dim")
    for step, ts in times.items():
        n = exported if "export" in step else 20 if step.startswith("first signing") else args.rows
        med = statistics.median(ts)
        audit.add_row(step, f"{med:.2f}", f"{n / med:,.0f}")
    console.print(audit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
