"""The ``router`` command line. Only this module configures logging."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from router.ledger import Ledger

EXIT_INVALID = 2

log = logging.getLogger("router")


def _console() -> Console:
    # a pipe or a file gets wide tables instead of cells cut with an ellipsis
    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)


# ---- validate ---------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from regions.config import ConfigError, load_config

    console, status = _console(), 0
    for path in args.configs:
        try:
            cfg = load_config(path)
        except ConfigError as e:
            status = EXIT_INVALID
            print(f"{path}: INVALID", file=sys.stderr)
            for line in e.problems:
                print(f"  {line}", file=sys.stderr)
            continue
        table = Table(title=f"{path}: valid", title_justify="left")
        for col in ("region", "zone", "source", "signal", "PUE", "price", "replicas"):
            table.add_column(col)
        for r in cfg.regions:
            p = r.price
            if p.flat_usd_per_kwh is not None:
                price = f"${p.flat_usd_per_kwh:.3f}/kWh"
            elif p.time_of_use is not None:
                price = f"ToU {len(p.time_of_use)} periods ({p.timezone})"
            else:
                price = f"CSV {p.csv}"
            reps = ", ".join(
                f"{x.name} ({x.backend.kind}, {x.gpu.count}x{x.gpu.type}, {x.meter})"
                for x in r.replicas
            )
            table.add_row(r.name, r.zone, r.carbon_source, r.signal, f"{r.pue:.2f}", price, reps)
        console.print(table)
        b = cfg.billing
        console.print(
            f"tariff {b.tariff}, markup {b.markup:.0%}, minimum ${b.min_charge_usd}, token price "
            f"${b.token_price_usd_per_1k}/1k tokens, carbon price "
            f"${b.carbon_price_usd_per_tco2e}/tCO2e; {len(cfg.tenants)} tenants; policy "
            f"{cfg.policy.name} (w={cfg.policy.weight})"
        )
    return status


# ---- forecast -----------------------------------------------------------------------------------


def cmd_backtest(args: argparse.Namespace) -> int:
    from forecasting.backtest import backtest

    result = backtest(args.data, train_end=args.train_end, test_end=args.test_end)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    console = _console()
    console.print(
        f"{result.zone}: day-ahead MAPE {result.mape_day_ahead:.2f} % vs seasonal-naive "
        f"{result.naive_mape_day_ahead:.2f} % (ratio {result.ratio_to_naive:.2f}) over "
        f"{result.issues} issues; fit {result.fit_seconds:.1f}s"
    )
    console.print(
        f"80 % band (q10-q90) covered {result.coverage_80:.1f} % of test hours; pinball loss "
        f"{result.pinball_loss:.2f} g/kWh"
    )
    return 0


def _show_source(args: argparse.Namespace) -> object:
    """The carbon source that serves ``--zone``: from ``--config``, else the replayed export."""
    from forecasting.datasets import dataset_path, zone_file
    from forecasting.sources import FileSource, ReplaySource, ZoneFile, build_sources

    if args.config:
        from regions.config import load_config

        cfg = load_config(args.config)
        for region in cfg.regions:
            if region.zone == args.zone:
                sources = build_sources(cfg, base_dir=Path(args.config).parent)
                return sources[region.carbon_source]
        raise SystemExit(f"zone {args.zone} is not used by any region of {args.config}")
    path = dataset_path(zone_file("electricitymaps_hourly", args.zone))
    return ReplaySource(FileSource({args.zone: ZoneFile(path)}))


def _weights_by_bucket(weights: Any) -> dict[str, dict[str, float]]:
    """An ensemble's member weights as ``{"1-1 h": {member: weight}, ...}``."""
    starts = [int(b) for b in weights.index]
    ends = [b - 1 for b in starts[1:]] + [None]

    def label(b: int, e: int | None) -> str:
        return f"{b}+ h" if e is None else f"{b} h" if e == b else f"{b}-{e} h"

    return {
        label(b, e): {str(m): round(float(w), 3) for m, w in weights.loc[b].items()}
        for b, e in zip(starts, ends, strict=True)
    }


def _ensemble_lines(fc: Any) -> list[str]:
    """What ``router forecast show`` says of how a forecast was made: the note (a fallback,
    a member missing) and, for an ensemble, each member's weight per horizon bucket."""
    lines = []
    if getattr(fc, "note", ""):
        lines.append(f"note: {fc.note}")
    weights = getattr(fc, "weights", None)
    if weights is not None:
        lines.append("ensemble weights by hours ahead:")
        table = _weights_by_bucket(weights)
        members = list(weights.columns)
        lines.append(f"  {'':8}" + "".join(f"{m:>11}" for m in members))
        for bucket, row in table.items():
            lines.append(f"  {bucket:8}" + "".join(f"{row[m]:11.2f}" for m in members))
    return lines


def cmd_forecast_show(args: argparse.Namespace) -> int:
    source = _show_source(args)

    async def run() -> tuple[object, object, dict[str, object] | None]:
        try:
            latest = await source.latest(args.zone)  # type: ignore[attr-defined]
            fc = await source.forecast(args.zone, args.hours)  # type: ignore[attr-defined]
            error = None
            if hasattr(source, "recent_error"):  # file and replay sources: scored on the file
                error = await asyncio.to_thread(source.recent_error, args.zone, 7)
            return latest, fc, error
        finally:
            await source.aclose()  # type: ignore[attr-defined]

    latest, fc, error = asyncio.run(run())
    series = fc.g_per_kwh  # type: ignore[attr-defined]
    band = fc.quantiles  # type: ignore[attr-defined]
    if args.json:
        out: dict[str, object] = {
            "zone": args.zone,
            "source": fc.source,  # type: ignore[attr-defined]
            "now_g_per_kwh": latest.g_per_kwh,  # type: ignore[attr-defined]
            "forecast": {t.isoformat(): round(float(v), 2) for t, v in series.items()},
            "recent_error": error,
        }
        weights = fc.weights  # type: ignore[attr-defined]
        if weights is not None:
            out["weights"] = _weights_by_bucket(weights)
        if fc.note:  # type: ignore[attr-defined]
            out["note"] = fc.note  # type: ignore[attr-defined]
        if band is not None:
            out["quantiles"] = {
                t.isoformat(): {str(q): round(float(v), 2) for q, v in row.items()}
                for t, row in band.iterrows()
            }
        print(json.dumps(out))
        return 0
    console = _console()
    console.print(
        f"[bold]{args.zone}[/] now {latest.g_per_kwh:.0f} g/kWh "  # type: ignore[attr-defined]
        f"({fc.source}, {fc.signal}); next {len(series)} h:"  # type: ignore[attr-defined]
    )
    for line in _ensemble_lines(fc):
        console.print(line)
    if error is not None:
        console.print(
            f"recent error (day-ahead forecasts, last {error['days']} days): MAPE "
            f"{error['mape']:.1f} % (seasonal naive {error['naive_mape']:.1f} %), "
            f"{error['coverage_80']:.0f} % of actuals inside the 80 % band"
        )
    lo, hi = float(series.min()), float(series.max())
    width = 40
    best = series.idxmin()
    if band is not None:
        console.print(f"{'':11} {'g/kWh':>7} {'80 % band (q10-q90)':>19}")
    for t, v in series.items():
        n = 1 + int((float(v) - lo) / (hi - lo or 1.0) * (width - 1))
        mark = "  <- cleanest" if t == best else ""
        interval = ""
        if band is not None and t in band.index:
            interval = f" {float(band.loc[t, 0.1]):7.1f} - {float(band.loc[t, 0.9]):7.1f}  "
        console.print(f"{t:%a %H:%M}Z {float(v):7.1f}{interval} {'█' * n}{mark}")
    return 0


# ---- datasets / keys ------------------------------------------------------------------------


def cmd_datasets(args: argparse.Namespace) -> int:
    from forecasting.datasets import cache_dir, data_dir, dataset_path, registry

    if args.action == "list":
        for name, entry in sorted(registry().items()):
            print(f"{name}\t{entry.repo}@{entry.commit[:10]}\t{entry.path}")
        print(f"# data dir: {data_dir() or '(CARBON_ROUTER_DATA not set)'}; cache: {cache_dir()}")
        return 0
    names = args.names or sorted(registry())
    for name in names:
        print(dataset_path(name))
    return 0


def cmd_hash_key(args: argparse.Namespace) -> int:
    """The sha256 of a key read from stdin (a prompt on a terminal): on the command line it
    would sit in the process list and the shell's history."""
    if args.key is not None:
        print("error: pass the key on stdin, not as an argument: printf %s \"$KEY\" | "
              "router hash-key", file=sys.stderr)  # fmt: skip
        return 2
    if sys.stdin.isatty():
        import getpass

        key = getpass.getpass("API key: ")
    else:
        key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("error: no key on stdin", file=sys.stderr)
        return 2
    print(hashlib.sha256(key.encode()).hexdigest())
    return 0


# sha256 of the keys that configs/local.yaml documents: fine on loopback, never beyond it
DEMO_KEYS = {
    "4ff444b1a79536cc47732956cf5bc6256abf64bc1b8adff6843fac08bbb6be9f": "sk-local-demo",
    "dd64c8e8eaafa1abb74fd2a2ccad64f4dcb9f2bd6fae158f50e000958395a29e": "sk-local-admin",
}
LOOPBACK = ("127.", "localhost", "::1")


def _demo_keys_off_loopback(cfg: Any, host: str) -> str | None:
    """Why the config may not be served on ``host``: it holds the published demo keys."""
    if host.startswith(LOOPBACK):
        return None
    found = sorted({DEMO_KEYS[h] for t in cfg.tenants for h in t.api_key_sha256 if h in DEMO_KEYS})
    if not found:
        return None
    return (
        f"error: the config holds the published demo keys ({', '.join(found)}); anyone could "
        f"use them on {host}. Replace them (router hash-key) or serve on 127.0.0.1"
    )


def _parse_day(value: str | None) -> datetime | None:
    if value is None:
        return None
    ts = datetime.fromisoformat(value)
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def _open_ledger(path: str) -> Ledger:
    from router.ledger import Ledger

    if not Path(path).is_file():
        raise SystemExit(f"error: no ledger at {path}")
    return Ledger(path)


def _check_tenant(ledger: Ledger, tenant: str | None) -> None:
    if tenant is not None and tenant not in ledger.tenants():
        known = ", ".join(ledger.tenants()) or "none yet"
        raise SystemExit(f"error: tenant {tenant!r} has no rows in {ledger.path}; tenants: {known}")


def cmd_usage(args: argparse.Namespace) -> int:
    from router.invoice import usage

    ledger = _open_ledger(args.ledger)
    _check_tenant(ledger, args.tenant)
    rows = ledger.tenant_rows(args.tenant, _parse_day(args.from_), _parse_day(args.to))
    if args.format == "csv" and args.rows:
        from router.invoice import frame

        print(frame(rows).drop(columns=["requests", "day"]).to_csv(index=False), end="")
        return 0
    table = usage(rows, args.by)
    if args.format == "json":
        print(table.to_json(orient="records"))
    elif args.format == "csv":
        print(table.to_csv(index=False), end="")
    else:
        _print_frame(table, f"usage of {args.tenant or 'all tenants'} ({len(rows)} requests)")
    return 0


def _print_frame(df: object, title: str) -> None:
    import pandas as pd

    assert isinstance(df, pd.DataFrame)
    table = Table(title=title, title_justify="left")
    for col in df.columns:
        table.add_column(str(col), justify="left" if df[col].dtype == object else "right")
    for row in df.itertuples(index=False):
        table.add_row(*(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row))
    _console().print(table)


def cmd_bill(args: argparse.Namespace) -> int:
    if args.compare_seed:
        from router.invoice import seed_table

        table = seed_table()
        if args.format == "json":
            print(table.to_json(orient="records"))
        else:
            wide = table.set_index("output_tokens").T.reset_index()
            wide.columns = ["output tokens ->", *(str(c) for c in wide.columns[1:])]
            _print_frame(
                wide, "seed article vs measured (ML.ENERGY); prices $0.002/token, $0.15/kWh"
            )
        return 0
    if not (args.ledger and args.tenant and args.month):
        raise SystemExit(
            "error: router bill needs --ledger, --tenant and --month (or --compare-seed)"
        )
    from router.invoice import invoice

    ledger = _open_ledger(args.ledger)
    _check_tenant(ledger, args.tenant)
    inv = invoice(ledger, args.tenant, args.month)
    if args.format == "json":
        out = {k: v for k, v in inv.__dict__.items() if k != "by_region"}
        out["saving_usd"] = inv.saving_usd
        out["by_region"] = inv.by_region.to_dict(orient="records")
        print(json.dumps(out))
        return 0
    console = _console()
    console.print(
        f"[bold]Invoice {inv.tenant} {inv.month}[/]  ({inv.requests} requests, "
        f"{inv.first_request} .. {inv.last_request})"
    )
    console.print(f"  energy        {inv.energy_kwh:.6f} kWh  ({inv.measured_share:.0%} measured)")
    console.print(
        f"  carbon        {inv.carbon_g:.3f} g CO2e operational (location-based), "
        f"{inv.embodied_g:.3f} g embodied"
    )
    console.print(f"  avoided       {inv.carbon_avoided_g:.3f} g CO2e against power-of-two routing")
    console.print(
        f"  billed        ${inv.billed_usd:.6f}  (energy tariff ${inv.energy_tariff_usd:.6f}"
        f", carbon price ${inv.carbon_cost_usd:.6f})"
    )
    console.print(f"  token tariff  ${inv.token_tariff_usd:.6f}  -> saving ${inv.saving_usd:.6f}")
    _print_frame(inv.by_region, "by region")
    return 0


def cmd_energy_evaluate(args: argparse.Namespace) -> int:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from forecasting.energy import EnergyPredictor, leave_one_model_out, load_mlenergy

    data = load_mlenergy()
    # one fit per held-out model family (about 50), one process per core; spawned, because a
    # forked child can hang in an OpenMP runtime its parent already started
    workers = args.workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        result: dict[str, object] = {
            "v3_leave_one_model_out": leave_one_model_out(data, source="v3", pool=pool),
            "v2_a100_leave_one_model_out": leave_one_model_out(
                data, source="v2", gpu="A100-40GB", pool=pool
            ),
        }
    if args.local:
        result["local"] = _local_error(args.local, EnergyPredictor())
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


def cmd_replica_evaluate(args: argparse.Namespace) -> int:
    from forecasting.replica_eval import NAMES, evaluate

    result = evaluate()
    if args.json:
        print(json.dumps(result))
        return 0
    lobo, lomo = result["leave_one_batch_size_out"], result["leave_one_model_out"]
    table = Table(
        title=f"replica model vs ML.ENERGY chat runs ({result['runs']} runs, "
        f"{result['configurations']} configurations, {result['model_families']} model families): "
        "absolute % error",
        title_justify="left",
    )
    table.add_column("metric")
    for ev in ("batch size out", "model out"):
        for col in ("median %", "p90 %", "points"):
            table.add_column(f"{ev}: {col}" if col != "points" else col, justify="right")
    cells = ("median_ape_pct", "p90_ape_pct", "points")
    for metric in NAMES.values():
        table.add_row(metric, *(str(e[metric][k]) for e in (lobo, lomo) for k in cells))
    console = _console()
    console.print(table)
    for t in result["targets"]:
        console.print(
            f"target: {t['evaluation']} median {t['metric']} error <= "
            f"{t['median_ape_pct_at_most']:g} %: {'met' if t['met'] else 'NOT met'}"
        )
    return 0


def _local_error(path: str, predictor: object) -> dict[str, object]:
    """Fit the per-replica model on the first half of measured local requests, test on the rest."""
    import numpy as np

    from forecasting.energy import EnergyPredictor, ReplicaProfile

    assert isinstance(predictor, EnergyPredictor)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [(r["prompt_tokens"], r["completion_tokens"], r["energy_j"]) for r in rows]
    half = len(rows) // 2
    predictor.min_rows_for_fit = min(predictor.min_rows_for_fit, half)
    profile = ReplicaProfile(name="local", model="smollm2-135m", gpu="cpu")
    if not predictor.refit("local", rows[:half]):
        return {"error": "too few measured requests"}
    test = np.array(rows[half:], dtype=float)
    pred = predictor.predict_many(profile, test[:, 0], test[:, 1])
    ape = np.abs(pred - test[:, 2]) / test[:, 2] * 100
    return {
        "requests_fit": half,
        "requests_tested": len(test),
        "median_ape_pct": round(float(np.median(ape)), 2),
        "p90_ape_pct": round(float(np.percentile(ape, 90)), 2),
    }


def _finite(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """JSON has no inf or NaN: such a figure (a latency past the histograms, a share of
    nothing) is null."""
    import math

    return [
        {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
        for r in rows
    ]


def cmd_simulate(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from forecasting.datasets import cache_dir
    from regions.config import load_config
    from router.simreport import CONSOLE_COLUMNS, SUMMARY_COLUMNS, write_outputs
    from router.simulate import build_world, compare_day, deferral_capture, parse_policy, simulate

    cfg = load_config(args.config)
    if args.period:
        from pydantic import ValidationError

        from regions.config import Simulation
        from router.simulate import SimulationError

        start, dots, end = args.period.partition("..")
        try:
            if not dots:
                raise ValueError("it has no '..'")
            sim = Simulation.model_validate(
                {**cfg.simulation.model_dump(), "start": start, "end": end}
            )
        except (ValueError, ValidationError) as e:
            why = "; ".join(x["msg"] for x in e.errors()) if isinstance(e, ValidationError) else e
            raise SimulationError(
                f"--period {args.period!r}: give START..END, e.g. 2024-06-01..2024-07-01 ({why})"
            ) from None
        cfg = cfg.model_copy(update={"simulation": sim})
    policies = args.policies.split(",") if args.policies else cfg.simulation.policies
    for spec in policies:
        parse_policy(spec)
    base_dir = Path(args.config).parent
    fc_cache = cache_dir().parent / "forecasts"
    if args.reference_day is not None:
        world = build_world(cfg, base_dir=base_dir, cache_dir=fc_cache)
        frames = {
            spec: compare_day(world, cfg, spec, args.reference_day).assign(policy=spec)
            for spec in policies
        }
        import pandas as pd

        df = pd.concat(frames.values(), ignore_index=True)
        if args.json:
            print(json.dumps(df.to_dict(orient="records")))
            return 0
        day = world.hours[args.reference_day * 24]
        _print_frame(df, f"fast model against the iteration-level reference, {day:%Y-%m-%d}")
        return 0
    with Progress(transient=True, disable=args.json or not sys.stderr.isatty()) as progress:
        task = progress.add_task("simulating", total=len(policies))
        result = simulate(
            cfg,
            base_dir=base_dir,
            policies=policies,
            cache_dir=fc_cache,
            progress=lambda _name: progress.advance(task),
        )
    written = write_outputs(result, Path(args.out)) if args.out else []
    if args.json:
        print(json.dumps({
            "summary": _finite(result.summary.to_dict(orient="records")),
            "by_region": _finite(result.by_region.to_dict(orient="records")),
            "fleet_capacity_rps": result.world.fleet_capacity_rps,
            "deferral_capture": deferral_capture(result.summary),
            "defer_quantile": result.world.gate_quantile,
            "forecast_gate_coverage": result.world.gate_coverage,
            "forecast_mape": result.world.forecast_mape,
            "seconds": result.seconds,
            "outputs": [str(p) for p in written],
        }))  # fmt: skip
        return 0
    shown = result.summary[[c for c in CONSOLE_COLUMNS if c in result.summary.columns]]
    w = result.world
    _print_frame(
        shown.rename(columns=SUMMARY_COLUMNS).round(4),
        f"{result.requests:,.0f} requests per policy on {len(w.replica_names)} replicas "
        f"({w.fleet_capacity_rps:.3g} requests/s at the SLOs), {result.seconds:.1f} s",
    )
    capture = deferral_capture(result.summary)
    if capture is not None:
        regret = result.summary.set_index("policy").loc["greenest+defer", "deferral_regret"]
        print(f"forecast-driven deferral captured {capture:.0%} of the oracle's deferral saving; "
              f"{regret:.1%} of the requests it deferred ran in a dirtier hour than they "
              f"arrived in (regret; waiting for gains that hold at the forecast's "
              f"{result.world.gate_quantile:.0%} quantile)")  # fmt: skip
    if written:
        print(f"wrote {len(written)} files to {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Fetch the config's data, start Ray (or join a cluster), deploy the router, wait until
    ready, print how to call it."""
    import time

    from regions.config import load_config
    from router.prefetch import prefetch

    cfg = load_config(args.config)
    refused = _demo_keys_off_loopback(cfg, args.host)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    # before Ray starts: a file that cannot be had is one line here, not a failed deployment
    # whose cause is only in Ray's log files (MissingInputError is printed by main)
    prefetch(cfg, Path(args.config).resolve().parent)

    import ray
    from ray import serve

    from router.serve_app import build_app, wait_ready

    local = args.address in (None, "", "local")
    direct = (args.port + 1 if args.direct_port is None else args.direct_port) if local else 0
    if direct:
        # the ingress replica serves HTTP itself (Ray's throughput-optimized mode); replicas
        # inherit this environment from the raylet that ray.init starts below
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
        os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(direct)
        os.environ["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(direct + 15)
    if local:
        # this machine plays every region: give it each region's custom resource
        ray.init(resources={f"region:{r.name}": 1.0 for r in cfg.regions},
                 include_dashboard=False, namespace="carbon-router")  # fmt: skip
    else:
        ray.init(address=args.address, namespace="carbon-router")
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app({"config": args.config}), name="carbon-router", route_prefix="/")
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '') else args.host}:{args.port}"
    if not wait_ready(url):
        print(f"error: the router at {url} did not become ready in 300 s", file=sys.stderr)
        return 1
    print(f"carbon-router is serving {len(cfg.regions)} regions at {url}/v1")
    if direct:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
        fast = f"http://{host}:{direct}"
        if wait_ready(fast, timeout_s=30):
            print(f"  fast path (direct to the ingress, no proxy hop): {fast}/v1")
            url = fast
        else:
            print(f"  warning: direct ingress did not answer on {fast}", file=sys.stderr)
    print(
        f"  curl {url}/v1/chat/completions -H 'Authorization: Bearer sk-local-demo' "
        "-H 'Content-Type: application/json' -H 'X-Carbon-Preference: mode=carbon' "
        '-d \'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hello"}]}\''
    )
    if args.once:
        serve.shutdown()
        ray.shutdown()
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0


# ---- main -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="router", description="carbon-aware LLM router")
    p.add_argument("-v", "--verbose", action="count", default=0)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="validate config files and summarize them")
    v.add_argument("configs", nargs="+")
    v.set_defaults(func=cmd_validate)

    f = sub.add_parser("forecast", help="carbon-intensity forecasts")
    fsub = f.add_subparsers(dest="forecast_command", required=True)
    b = fsub.add_parser("backtest", help="day-ahead backtest on one zone's file")
    b.add_argument("--data", required=True, help="Electricity Maps, CarbonCast or DACF CSV")
    b.add_argument("--train-end", default="2021-07-01")
    b.add_argument("--test-end", default="2022-01-01")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_backtest)
    s = fsub.add_parser("show", help="the next hours' forecast for a zone, as a chart")
    s.add_argument("--zone", required=True)
    s.add_argument("--config", help="use this config's carbon source for the zone")
    s.add_argument("--hours", type=int, default=24)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_forecast_show)

    d = sub.add_parser("datasets", help="list or fetch the pinned public data files")
    d.add_argument("action", choices=["list", "fetch"])
    d.add_argument("names", nargs="*")
    d.set_defaults(func=cmd_datasets)

    h = sub.add_parser("hash-key", help="sha256 of an API key, for the config's tenants")
    h.add_argument("key", nargs="?", help=argparse.SUPPRESS)  # refused: read from stdin
    h.set_defaults(func=cmd_hash_key)

    u = sub.add_parser("usage", help="a tenant's usage from the ledger")
    u.add_argument("--ledger", required=True)
    u.add_argument("--tenant", help="default: all tenants")
    u.add_argument("--from", dest="from_", help="ISO date/time, UTC")
    u.add_argument("--to", help="ISO date/time, UTC (exclusive)")
    u.add_argument("--by", choices=["day", "region", "model", "replica"])
    u.add_argument("--format", choices=["table", "csv", "json"], default="table")
    u.add_argument("--rows", action="store_true", help="with --format csv: every ledger row")
    u.set_defaults(func=cmd_usage)

    bl = sub.add_parser("bill", help="a tenant's monthly invoice, or the seed comparison")
    bl.add_argument("--ledger")
    bl.add_argument("--tenant")
    bl.add_argument("--month", help="YYYY-MM")
    bl.add_argument("--compare-seed", action="store_true")
    bl.add_argument("--format", choices=["table", "json"], default="table")
    bl.set_defaults(func=cmd_bill)

    e = sub.add_parser("energy", help="the per-request energy predictor")
    esub = e.add_subparsers(dest="energy_command", required=True)
    ev = esub.add_parser("evaluate", help="leave-one-model-out error on ML.ENERGY")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--local", help="JSONL of measured local requests (attribution benchmark)")
    ev.add_argument("--workers", type=int, default=0,
                    help="processes fitting the held-out models (default: one a core)")  # fmt: skip
    ev.set_defaults(func=cmd_energy_evaluate)

    r = sub.add_parser("replica", help="the replica model (decode rate, ITL, power by batch)")
    rsub = r.add_subparsers(dest="replica_command", required=True)
    rev = rsub.add_parser(
        "evaluate", help="leave-one-batch-size-out and leave-one-model-out error on ML.ENERGY"
    )
    rev.add_argument("--json", action="store_true")
    rev.set_defaults(func=cmd_replica_evaluate)

    sm = sub.add_parser("simulate", help="offline what-if of routing policies")
    sm.add_argument("--config", default="configs/simulate.yaml")
    sm.add_argument("--out", default="out/simulate", help="report folder ('' for none)")
    sm.add_argument(
        "--policies", help="comma-separated, e.g. power_of_two,greenest+defer,price_carbon+scale"
    )
    sm.add_argument("--period", help="START..END, e.g. 2024-06-01..2024-07-01")
    sm.add_argument("--reference-day", type=int, metavar="N",
                    help="instead: compare the fast model with the iteration-level reference "
                    "on day N of the period (0 is the first), request by request")  # fmt: skip
    sm.add_argument("--json", action="store_true")
    sm.set_defaults(func=cmd_simulate)

    from router.cli_receipts import register as register_receipts

    register_receipts(sub)

    sv = sub.add_parser("serve", help="run the OpenAI-compatible router on a config")
    sv.add_argument("--config", default="configs/local.yaml")
    sv.add_argument("--address", default="local", help="local, auto or ray://host:10001")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000, help="the Ray Serve proxy's port")
    sv.add_argument(
        "--direct-port",
        type=int,
        default=None,
        help="the ingress's own port (Ray Serve direct ingress: no proxy hop, the fast path); "
        "default --port + 1, 0 to turn it off (local Ray only)",
    )
    sv.add_argument("--once", action="store_true", help="exit once ready (smoke test)")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from forecasting.errors import ForecastingError
    from regions.config import RegionsError
    from router.errors import RouterError

    args = build_parser().parse_args(argv)
    if not os.environ.get("OMP_NUM_THREADS"):
        # this process's fits are small (at most a few years of hourly rows): one native thread
        # each. An OpenMP team on a busy host waits at every barrier for a descheduled member:
        # `router forecast show` took 68 s with two threads on a loaded 2-core machine, 22 s
        # with one. Commands that want parallelism run fits in processes.
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ForecastingError, RegionsError, RouterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
