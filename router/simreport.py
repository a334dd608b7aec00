"""What ``router simulate`` writes: per-hour CSV (policy, region), summary and per-region CSV, a
Markdown report and PNG plots (intensity per region with the traffic each received; carbon and
cost per policy; carbon against p99 time to first token, one point per policy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from router.simulate import SimulationResult, deferral_capture

SUMMARY_COLUMNS = {
    "policy": "policy",
    "requests": "requests",
    "kwh": "kWh",
    "it_kwh_static": "static IT kWh",
    "j_per_token": "J/token",
    "t_co2e": "t CO2e",
    "energy_tariff_usd": "energy tariff $",
    "slo_attainment": "SLO met",
    "ttft_p50_ms": "TTFT p50 ms",
    "ttft_p99_ms": "TTFT p99 ms",
    "tpot_p50_ms": "TPOT p50 ms",
    "tpot_p99_ms": "TPOT p99 ms",
    "replicas_on_mean": "replicas on",
    "share_deferred": "deferred",
    "mean_delay_h": "mean delay h",
    "deferral_regret": "deferred into dirtier",
    "regret_t_co2e": "regret t CO2e",
    "co2_saved_vs_power_of_two": "CO2 saved vs P2C",
    "share_of_oracle_saving": "of oracle saving",
}

# what `router simulate` prints (the folder's summary.csv has every column)
CONSOLE_COLUMNS = ("policy", "t_co2e", "co2_saved_vs_power_of_two", "j_per_token", "slo_attainment",
                   "ttft_p99_ms", "tpot_p99_ms", "replicas_on_mean", "share_deferred",
                   "deferral_regret")  # fmt: skip


def per_hour(result: SimulationResult) -> pd.DataFrame:
    """One row per policy, hour and region: requests, replicas on, energy, carbon, cost."""
    w = result.world
    frames = []
    g_of = w.replica_region
    g_n = len(w.region_names)
    for name, o in result.outcomes.items():

        def by_region(a: np.ndarray) -> np.ndarray:
            return np.stack([a[:, g_of == g].sum(axis=1) for g in range(g_n)], axis=1)

        cols = {
            "requests": by_region(o.requests),
            "replicas_on": by_region(o.on.astype(float)),
            "kwh": by_region(o.kwh),
            "carbon_g": by_region(o.carbon_g),
            "cost_usd": by_region(o.cost_usd),
        }
        frames.append(pd.DataFrame({
            "policy": name,
            "time": np.repeat(w.hours, g_n),
            "region": np.tile(w.region_names, len(w.hours)),
            "intensity_g_per_kwh": w.intensity.ravel(),
            **{k: v.ravel() for k, v in cols.items()},
        }))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def fleet_table(result: SimulationResult) -> pd.DataFrame:
    """Each replica kind per region: capacity at the SLOs and energy per request there."""
    w = result.world
    rows = []
    for r, name in enumerate(w.replica_names):
        rows.append({
            "replica": name,
            "region": w.region_names[w.replica_region[r]],
            "capacity_rps": float(w.capacity_rps[r]),
            "static_w": float(w.static_w[r]),
            "j_per_request_at_target": float(w.j_per_request[r]),
        })  # fmt: skip
    return pd.DataFrame(rows)


def markdown_report(result: SimulationResult) -> str:
    shown = [c for c in SUMMARY_COLUMNS if c in result.summary.columns]
    s = result.summary[shown].rename(columns=SUMMARY_COLUMNS)
    w = result.world
    capture = deferral_capture(result.summary)
    lines = [
        "# Simulation report",
        "",
        f"Period {w.hours[0]:%Y-%m-%d} .. {w.hours[-1]:%Y-%m-%d %H:00} UTC, "
        f"{result.requests:,.0f} requests per policy on {len(w.replica_names)} replicas "
        f"(capacity at the SLOs {w.fleet_capacity_rps:.1f} requests/s), regions "
        + ", ".join(f"{n} ({z})" for n, z in zip(w.region_names, w.zones, strict=True))
        + f". Run took {result.seconds:.1f} s.",
        "",
        _md_table(s),
        "",
        "## Per region",
        "",
        _md_table(result.by_region),
        "",
        "## Fleet",
        "",
        _md_table(fleet_table(result).drop_duplicates(subset=["region", "capacity_rps"])),
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
            f"It waited only for gains that held at the forecast's {w.gate_quantile:.0%} quantile"
            + (" (the point forecast)" if w.gate_quantile == 0.5 else "")
            + "; of the requests it deferred, "
            f"{result.summary.set_index('policy').loc['greenest+defer', 'deferral_regret']:.1%} "
            "ran in a dirtier hour than they arrived in (regret).",
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
    paths.append(carbon_vs_latency(result, out / "carbon_vs_p99_ttft.png"))
    return paths


def carbon_vs_latency(result: SimulationResult, path: Path) -> Path:
    """Carbon against p99 time to first token, one point per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.summary
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter(s["ttft_p99_ms"], s["t_co2e"], color="tab:green")
    for _, row in s.iterrows():
        ax.annotate(f"{row['policy']} ({row['slo_attainment']:.1%})",
                    (row["ttft_p99_ms"], row["t_co2e"]), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("p99 time to first token, ms (at the client)")
    ax.set_ylabel("t CO2e")
    ax.set_title("Carbon against tail latency (SLO attainment in brackets)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: SimulationResult, out: Path) -> list[Path]:
    """Write the report folder."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    hourly = per_hour(result)
    p = out / "hourly.csv"
    hourly.to_csv(p, index=False)
    written.append(p)
    for name, frame in (("summary", result.summary), ("by_region", result.by_region),
                        ("fleet", fleet_table(result))):  # fmt: skip
        p = out / f"{name}.csv"
        frame.to_csv(p, index=False)
        written.append(p)
    p = out / "report.md"
    p.write_text(markdown_report(result))
    written.append(p)
    written += plots(result, hourly, out)
    return written
