"""Usage reports and monthly invoices from the ledger, and the seed article's comparison.

Every figure is a sum over ledger rows; the invoice lists the row count and the request-id range
so each total can be traced back with ``router usage --format csv``.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from forecasting.mlenergy import table_path
from router.billing import J_PER_KWH
from router.ledger import COLUMNS, Ledger, LedgerRow

GroupBy = Literal["day", "region", "model", "replica"]
SUMS = ["requests", "prompt_tokens", "completion_tokens", "energy_j", "kwh_billed", "carbon_g",
        "cost_usd", "energy_cost_usd", "token_cost_usd", "carbon_cost_usd", "avoided_g",
        "embodied_g"]  # fmt: skip


def frame(rows: list[LedgerRow]) -> pd.DataFrame:
    df = pd.DataFrame([[getattr(r, c) for c in COLUMNS] for r in rows], columns=COLUMNS)
    df["requests"] = 1
    df["day"] = df["started_at"].str.slice(0, 10)
    return df


def usage(rows: list[LedgerRow], by: GroupBy | None) -> pd.DataFrame:
    df = frame(rows)
    if df.empty:
        return pd.DataFrame(columns=[by or "total", *SUMS])
    if by is None:
        out = df[SUMS].sum().to_frame().T
        out.insert(0, "total", "all")
        return out
    return df.groupby(by, as_index=False)[SUMS].sum()


def month_bounds(month: str) -> tuple[datetime, datetime]:
    try:
        year, mon = (int(x) for x in month.split("-"))
        start = datetime(year, mon, 1, tzinfo=UTC)
    except ValueError as e:
        raise ValueError(f"--month must look like 2026-11, got {month!r}") from e
    days = calendar.monthrange(year, mon)[1]
    end = datetime(year + (mon == 12), mon % 12 + 1, 1, tzinfo=UTC)
    assert (end - start).days == days
    return start, end


@dataclass(frozen=True)
class Invoice:
    tenant: str
    month: str
    requests: int
    energy_kwh: float
    carbon_g: float
    carbon_avoided_g: float  # against power of two over the same replicas (receipts)
    embodied_g: float  # amortized manufacturing carbon, apart from carbon_g
    billed_usd: float
    energy_tariff_usd: float
    token_tariff_usd: float
    carbon_cost_usd: float
    measured_share: float
    first_request: str | None
    last_request: str | None
    by_region: pd.DataFrame

    @property
    def saving_usd(self) -> float:
        """What the tenant saves on the energy tariff against the token tariff."""
        return self.token_tariff_usd - self.billed_usd


def invoice(ledger: Ledger, tenant: str, month: str) -> Invoice:
    start, end = month_bounds(month)
    rows = ledger.tenant_rows(tenant, start, end)
    df = frame(rows)
    n = len(df)
    return Invoice(
        tenant=tenant,
        month=month,
        requests=n,
        energy_kwh=float(df["kwh_billed"].sum()) if n else 0.0,
        carbon_g=float(df["carbon_g"].sum()) if n else 0.0,
        carbon_avoided_g=float(df["avoided_g"].sum()) if n else 0.0,
        embodied_g=float(df["embodied_g"].sum()) if n else 0.0,
        billed_usd=float(df["cost_usd"].sum()) if n else 0.0,
        energy_tariff_usd=float(df["energy_cost_usd"].sum()) if n else 0.0,
        token_tariff_usd=float(df["token_cost_usd"].sum()) if n else 0.0,
        carbon_cost_usd=float(df["carbon_cost_usd"].sum()) if n else 0.0,
        measured_share=float((df["energy_source"] == "measured").mean()) if n else 0.0,
        first_request=rows[0].request_id if rows else None,
        last_request=rows[-1].request_id if rows else None,
        by_region=usage(rows, "region"),
    )


# ---- the seed article's table -------------------------------------------------------------

ARTICLE_KWH = {5: 0.0008, 120: 0.012, 450: 0.045, 1500: 0.150}
ARTICLE_TOKEN_PRICE_USD = 0.002  # per token
ARTICLE_ENERGY_PRICE_USD_PER_KWH = 0.15


def measured_j_per_token(data_dir: Path | None = None) -> dict[str, float]:
    """J per output token for the article's Mistral-7B-on-A100 case, from ML.ENERGY:
    batch 1 (v1, 2023, transformers: no Mistral there, so the median of its 7B models on A100)
    and Mistral-7B-Instruct-v0.3 served by vLLM on A100-40GB at batch 32 and at the largest
    batch measured (v2)."""

    def path(name: str) -> Path:
        return data_dir / name if data_dir else table_path(name)

    v1 = pd.read_csv(path("energy/mlenergy_v1_legacy_bs1/A100_chat_benchmark.csv"))
    seven_b = v1[v1["model"].str.contains(r"7[bB]", regex=True)]
    bs1 = float(np.median(seven_b["energy"] / seven_b["response_length"]))
    v2 = pd.read_csv(path("energy/mlenergy_v2/mlenergy_v2_llm_configurations.csv"))
    m = v2[
        (v2["model"] == "mistralai/Mistral-7B-Instruct-v0.3")
        & (v2["gpu"] == "NVIDIA A100-SXM4-40GB")
        & (v2["task"] == "chat")
    ].sort_values("max_batch_size")
    bs32 = float(m.loc[m["max_batch_size"] == 32, "energy_per_output_token_J"].iloc[0])
    top = m.iloc[-1]
    return {
        "batch 1 (7B, v1)": bs1,
        "batch 32 (Mistral-7B, v2)": bs32,
        f"batch {int(top['max_batch_size'])} (Mistral-7B, v2)": float(
            top["energy_per_output_token_J"]
        ),
    }


def seed_table(data_dir: Path | None = None) -> pd.DataFrame:
    jpt = measured_j_per_token(data_dir)
    rows = []
    for tokens, article_kwh in ARTICLE_KWH.items():
        row: dict[str, object] = {
            "output_tokens": tokens,
            "token_cost_usd": tokens * ARTICLE_TOKEN_PRICE_USD,
            "article_kwh": article_kwh,
            "article_energy_cost_usd": article_kwh * ARTICLE_ENERGY_PRICE_USD_PER_KWH,
        }
        for label, j in jpt.items():
            kwh = tokens * j / J_PER_KWH
            row[f"kwh {label}"] = kwh
            row[f"energy_cost_usd {label}"] = kwh * ARTICLE_ENERGY_PRICE_USD_PER_KWH
            row[f"article/measured {label}"] = article_kwh / kwh
        rows.append(row)
    return pd.DataFrame(rows)
