"""The ``router`` command line. Only this module configures logging."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

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


def cmd_forecast_show(args: argparse.Namespace) -> int:
    source = _show_source(args)

    async def run() -> tuple[object, object]:
        try:
            latest = await source.latest(args.zone)  # type: ignore[attr-defined]
            fc = await source.forecast(args.zone, args.hours)  # type: ignore[attr-defined]
            return latest, fc
        finally:
            await source.aclose()  # type: ignore[attr-defined]

    latest, fc = asyncio.run(run())
    series = fc.g_per_kwh  # type: ignore[attr-defined]
    if args.json:
        print(
            json.dumps(
                {
                    "zone": args.zone,
                    "source": fc.source,  # type: ignore[attr-defined]
                    "now_g_per_kwh": latest.g_per_kwh,  # type: ignore[attr-defined]
                    "forecast": {t.isoformat(): round(float(v), 2) for t, v in series.items()},
                }
            )
        )
        return 0
    console = _console()
    console.print(
        f"[bold]{args.zone}[/] now {latest.g_per_kwh:.0f} g/kWh "  # type: ignore[attr-defined]
        f"({fc.source}, {fc.signal}); next {len(series)} h:"  # type: ignore[attr-defined]
    )
    lo, hi = float(series.min()), float(series.max())
    width = 40
    best = series.idxmin()
    for t, v in series.items():
        n = 1 + int((float(v) - lo) / (hi - lo or 1.0) * (width - 1))
        mark = "  <- cleanest" if t == best else ""
        console.print(f"{t:%a %H:%M}Z {float(v):7.1f} {'█' * n}{mark}")
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
    print(hashlib.sha256(args.key.encode()).hexdigest())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Until the serving issue lands: show each region's carbon now and its 24 h forecast."""
    from regions.config import load_config

    cfg = load_config(args.config)
    for region in cfg.regions:
        ns = argparse.Namespace(zone=region.zone, config=args.config, hours=24, json=False)
        _console().rule(f"{region.name} ({region.zone})")
        cmd_forecast_show(ns)
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
    h.add_argument("key")
    h.set_defaults(func=cmd_hash_key)

    sv = sub.add_parser("serve", help="run the router on a config")
    sv.add_argument("--config", default="configs/local.yaml")
    sv.set_defaults(func=cmd_serve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from forecasting.errors import ForecastingError
    from regions.config import RegionsError

    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ForecastingError, RegionsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
