"""What ``router simulate`` writes: per-request Parquet, per-hour CSV, a Markdown report and
PNG plots (intensity per region with the traffic it received; carbon and cost per policy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from router.simulate import SimulationResult, deferral_capture

SUMMARY_COLUMNS = {
    "policy": "policy",
    "requests": "requests",
    "kwh": "kWh",
    "t_co2e": "t CO2e",
    "energy_tariff_usd": "energy tariff $",
    "token_tariff_usd": "token tariff $",
    "mean_added_latency_ms": "mean added ms",
    "p99_added_latency_ms": "p99 added ms",
    "slo_violations": "SLO violations",
    "share_deferred": "deferred",
    "mean_delay_s": "mean delay s",
    "co2_saved_vs_round_robin": "CO2 saved vs RR",
    "share_of_oracle_saving": "of oracle saving",
}


def _labels(codes: np.ndarray, names: list[str]) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int16)), pa.array(names))


def per_request(result: SimulationResult, policy: str, sample: int = 0) -> pa.Table:
    """One row per request; ``sample`` > 0 keeps that many, drawn uniformly (seeded)."""
    o, req, w = result.outcomes[policy], result.requests, result.world
    idx = np.arange(len(req))
    if 0 < sample < len(req):
        idx = np.sort(np.random.default_rng(0).choice(len(req), sample, replace=False))
    t0_us = int(w.hours[0].value // 1000)
    arrival_us = t0_us + (req.arrival_s[idx] * 1e6).astype(np.int64)
    return pa.table({
        "arrival": pa.array(arrival_us, type=pa.timestamp("us", tz="UTC")),
        "start_delay_s": (o.start_s - req.arrival_s)[idx].astype(np.float32),
        "region": _labels(w.replica_region[o.replica[idx]], w.region_names),
        "replica": _labels(o.replica[idx], w.replica_names),
        "prompt_tokens": req.prompt[idx],
        "output_tokens": req.output[idx],
        "queue_wait_s": o.wait_s[idx].astype(np.float32),
        "service_s": o.service_s[idx].astype(np.float32),
        "energy_j": o.energy_j[idx].astype(np.float32),
        "kwh": o.kwh[idx].astype(np.float32),
        "carbon_g": o.carbon_g[idx].astype(np.float32),
        "cost_usd": o.cost_usd[idx].astype(np.float32),
        "token_cost_usd": o.token_cost_usd[idx].astype(np.float32),
        "deferred": o.deferred[idx],
        "slo_violation": o.slo_violation[idx],
    })  # fmt: skip


def per_hour(result: SimulationResult) -> pd.DataFrame:
    w = result.world
    frames = []
    for name, o in result.outcomes.items():
        h = np.minimum((o.start_s // 3600).astype(int), len(w.hours) - 1)
        g = w.replica_region[o.replica]
        df = pd.DataFrame({"hour": h, "region": g, "kwh": o.kwh, "carbon_g": o.carbon_g,
                           "cost_usd": o.cost_usd, "requests": 1})  # fmt: skip
        agg = df.groupby(["hour", "region"], as_index=False).sum()
        agg["policy"] = name
        agg["time"] = w.hours[agg["hour"]]
        agg["intensity_g_per_kwh"] = w.intensity[agg["hour"], agg["region"]]
        agg["region"] = np.array(w.region_names)[agg["region"]]
        frames.append(agg.drop(columns="hour"))
    return pd.concat(frames, ignore_index=True)


def markdown_report(result: SimulationResult) -> str:
    s = result.summary.rename(columns=SUMMARY_COLUMNS)
    w = result.world
    capture = deferral_capture(result.summary)
    lines = [
        "# Simulation report",
        "",
        f"Period {w.hours[0]:%Y-%m-%d} .. {w.hours[-1]:%Y-%m-%d %H:00} UTC, "
        f"{len(result.requests):,} requests per policy, regions "
        + ", ".join(f"{n} ({z})" for n, z in zip(w.region_names, w.zones, strict=True))
        + f". Run took {result.seconds:.1f} s.",
        "",
        _md_table(s),
        "",
        "## Per region",
        "",
        _md_table(result.by_region),
        "",
        "## Day-ahead forecast error used for deferral (MAPE %, all hours and horizons)",
        "",
        ", ".join(f"{z}: {m:.1f}" for z, m in w.forecast_mape.items()),
        "",
    ]
    if capture is not None:
        lines += [
            "## Deferral",
            "",
            f"Forecast-driven deferral (greenest+defer) captured {capture:.0%} of the carbon the "
            "perfect-foresight oracle saved by deferring (both against greenest without deferral).",
            "",
        ]
    return "\n".join(lines)


def _md_table(df: pd.DataFrame) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    sep = "|" + "---|" * len(df.columns)
    rows = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def plots(result: SimulationResult, hourly: pd.DataFrame, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = result.world
    paths = []
    focus = "price_carbon" if "price_carbon" in result.outcomes else next(iter(result.outcomes))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    daily = pd.DataFrame(w.intensity, index=w.hours, columns=w.region_names).resample("D").mean()
    daily.plot(ax=ax1)
    ax1.set_ylabel("g CO2e / kWh (daily mean)")
    ax1.set_title("Grid intensity per region, and the traffic each received")
    traffic = (
        hourly[hourly["policy"] == focus]
        .pivot_table(index="time", columns="region", values="requests", aggfunc="sum")
        .reindex(columns=w.region_names)
        .fillna(0)
        .resample("D")
        .sum()
    )
    share = traffic.div(traffic.sum(axis=1), axis=0)
    share.plot.area(ax=ax2, linewidth=0)
    ax2.set_ylabel(f"share of requests ({focus})")
    fig.tight_layout()
    p = out / "intensity_and_traffic.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    s = result.summary.set_index("policy")
    s["t_co2e"].plot.bar(ax=a, color="tab:green")
    a.set_ylabel("t CO2e")
    a.set_title("Carbon per policy")
    s["energy_tariff_usd"].plot.bar(ax=b, color="tab:blue")
    b.set_ylabel("$ (energy tariff)")
    b.set_title("Cost per policy")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    p = out / "carbon_and_cost.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write_outputs(result: SimulationResult, out: Path, *, sample: int = 100_000) -> list[Path]:
    """Write the report folder; per-request files keep ``sample`` requests (0: all)."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in result.outcomes:
        p = out / f"requests_{name.replace('+', '_')}.parquet"
        pq.write_table(per_request(result, name, sample), p, compression="zstd")
        written.append(p)
    hourly = per_hour(result)
    p = out / "hourly.csv"
    hourly.to_csv(p, index=False)
    written.append(p)
    p = out / "summary.csv"
    result.summary.to_csv(p, index=False)
    written.append(p)
    p = out / "by_region.csv"
    result.by_region.to_csv(p, index=False)
    written.append(p)
    p = out / "report.md"
    p.write_text(markdown_report(result))
    written.append(p)
    written += plots(result, hourly, out)
    return written
