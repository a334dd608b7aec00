"""Prices, tariffs, bill lines, usage and invoices."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from regions.config import Billing, Price, TouPeriod
from router.billing import (
    EnergyTariff,
    HybridTariff,
    PriceError,
    PriceSchedule,
    TokenTariff,
    Usage,
    bill_line,
)
from router.cli import main
from router.invoice import ARTICLE_KWH, invoice, seed_table
from router.ledger import Ledger, LedgerRow

U = Usage(energy_j=3.6e6, pue=1.5, price_usd_per_kwh=0.2, intensity_g_per_kwh=400.0,
          prompt_tokens=1000, completion_tokens=1000)  # fmt: skip


def test_energy_tariff_is_kwh_pue_price_markup() -> None:
    c = EnergyTariff(Billing(markup=0.25, token_price_usd_per_1k=0.002)).charge(U)
    assert U.kwh == pytest.approx(1.5) and U.carbon_g == pytest.approx(600.0)
    assert c.cost_usd == pytest.approx(1.5 * 0.2 * 1.25)
    assert c.token_cost_usd == pytest.approx(2 * 0.002)


def test_minimum_charge_and_carbon_price() -> None:
    tiny = Usage(1.0, 1.1, 0.1, 300.0, 1, 1)
    assert EnergyTariff(Billing(min_charge_usd=0.01)).charge(tiny).cost_usd == 0.01
    c = EnergyTariff(Billing(carbon_price_usd_per_tco2e=100.0)).charge(U)
    # money: equal to float rounding, not approx's default 1 ppm (a 1e6 + 1 g tonne passes that)
    assert c.carbon_cost_usd == pytest.approx(600 / 1e6 * 100, rel=1e-12)
    assert c.cost_usd == pytest.approx(1.5 * 0.2 + 0.06)


def _line(**over: object) -> LedgerRow:
    args: dict[str, object] = dict(
        request_id="r1", tenant="acme", region="eu-north", replica="eu-north-0", model="m",
        started_at=datetime(2026, 11, 2, tzinfo=UTC),
        ended_at=datetime(2026, 11, 2, 0, 0, 3, tzinfo=UTC),
        prompt_tokens=100, completion_tokens=200, energy_j=3600.0, energy_source="measured",
        pue=1.5, intensity_g_per_kwh=400.0, signal="average", carbon_stale=True,
        price_usd_per_kwh=0.2, tariff=EnergyTariff(Billing()),
    )  # fmt: skip
    args.update(over)
    return bill_line(**args)  # type: ignore[arg-type]


def test_a_bill_line_carries_its_status_staleness_and_avoided_carbon() -> None:
    plain = _line()
    assert (plain.status, plain.carbon_stale, plain.avoided_g) == ("ok", True, 0.0)
    assert plain.carbon_g == pytest.approx(0.6)  # 1.5 Wh x 400 g/kWh
    assert _line(status="error").status == "error"
    chosen = _line(receipt={"baseline_replica": "us-south-0", "baseline_carbon_g": 2.0})
    assert chosen.baseline_carbon_g == 2.0
    assert chosen.avoided_g == pytest.approx(2.0 - 0.6)
    # without a baseline replica nothing was avoided, whatever the receipt says
    assert _line(receipt={"baseline_carbon_g": 2.0}).avoided_g == 0.0


def test_hybrid_and_token_tariffs() -> None:
    b = Billing(hybrid_token_fee_usd_per_1k=0.0005, token_price_usd_per_1k=0.002)
    assert HybridTariff(b).charge(U).cost_usd == pytest.approx(2 * 0.0005 + 1.5 * 0.2)
    assert TokenTariff(b).charge(U).cost_usd == pytest.approx(2 * 0.002)


def test_time_of_use_in_local_time() -> None:
    p = PriceSchedule(Price(timezone="Europe/Berlin", time_of_use=[
        TouPeriod(start="00:00", usd_per_kwh=0.1),
        TouPeriod(start="07:00", usd_per_kwh=0.3),
        TouPeriod(start="20:00", usd_per_kwh=0.2),
    ]))  # fmt: skip
    assert p.at(datetime(2026, 1, 5, 5, 59, tzinfo=UTC)) == 0.1  # 06:59 CET
    assert p.at(datetime(2026, 1, 5, 6, 0, tzinfo=UTC)) == 0.3  # 07:00 CET
    assert p.at(datetime(2026, 1, 5, 5, 0, tzinfo=UTC)) == 0.1  # 06:00 CET
    assert p.at(datetime(2026, 7, 5, 5, 0, tzinfo=UTC)) == 0.3  # 07:00 CEST
    assert p.at(datetime(2026, 7, 5, 19, 30, tzinfo=UTC)) == 0.2  # 21:30 CEST


def test_time_of_use_by_weekday() -> None:
    p = PriceSchedule(Price(time_of_use=[
        TouPeriod(start="00:00", usd_per_kwh=0.1, days=["sat", "sun"]),
        TouPeriod(start="00:00", usd_per_kwh=0.2, days=["mon", "tue", "wed", "thu", "fri"]),
    ]))  # fmt: skip
    assert p.at(datetime(2026, 11, 28, 12, tzinfo=UTC)) == 0.1  # Saturday
    assert p.at(datetime(2026, 11, 26, 12, tzinfo=UTC)) == 0.2  # Thursday


def test_csv_price_series_and_its_gaps(tmp_path: Path) -> None:
    f = tmp_path / "p.csv"
    f.write_text(
        "time,usd_per_kwh\n2026-11-01T00:00Z,0.10\n2026-11-01T01:00Z,0.12\n2026-11-01T09:00Z,0.2\n"
    )
    p = PriceSchedule(Price(csv=str(f)))
    assert p.at(datetime(2026, 11, 1, 0, 30, tzinfo=UTC)) == 0.10
    with pytest.raises(PriceError, match="gap at 2026-11-01 01:00"):
        p.at(datetime(2026, 11, 1, 3, tzinfo=UTC))
    assert p.at(datetime(2026, 11, 1, 9, 30, tzinfo=UTC)) == 0.2
    with pytest.raises(PriceError, match="starts"):
        p.at(datetime(2026, 10, 31, tzinfo=UTC))
    bad = tmp_path / "bad.csv"
    bad.write_text("time,usd_per_kwh\n2026-11-01T00:00Z,-1\n")
    with pytest.raises(PriceError, match="bad.csv:2: price must be a number >= 0"):
        PriceSchedule(Price(csv=str(bad)))


def test_a_price_series_edges(tmp_path: Path) -> None:
    """The gap limit is inclusive, a relative path is the config's, offsets are UTC, zero is a
    price, and each error names what to fix."""
    (tmp_path / "p.csv").write_text(
        "time,usd_per_kwh\n2026-11-01T01:00+01:00,0.10\n2026-11-01T02:00Z,0\n"
        "2026-11-01T04:00:01Z,0.3\n"
    )
    p = PriceSchedule(Price(csv="p.csv"), base_dir=tmp_path)
    # without a config folder a relative path is the working directory's
    here = PriceSchedule(Price(csv=os.path.relpath(tmp_path / "p.csv")))
    assert here.at(datetime(2026, 11, 1, 0, 0, tzinfo=UTC)) == 0.10
    assert p.at(datetime(2026, 11, 1, 0, 0, tzinfo=UTC)) == 0.10  # 01:00+01:00 is 00:00Z
    assert p.at(datetime(2026, 11, 1, 1, 59, tzinfo=UTC)) == 0.10  # a step of exactly 7200 s
    with pytest.raises(PriceError, match=r"gap at 2026-11-01 02:00.*raise max_gap_s"):
        p.at(datetime(2026, 11, 1, 3, tzinfo=UTC))  # a step of 7201 s
    with pytest.raises(PriceError, match=r"starts 2026-11-01 00:00:00\+00:00"):
        p.at(datetime(2026, 10, 31, 23, 59, tzinfo=UTC))
    with pytest.raises(PriceError, match="cannot read the price series"):
        PriceSchedule(Price(csv="missing.csv"), base_dir=tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,usd_per_kwh\n2026-11-01T00:00Z,0.1\n2026-11-01T01:00Z,0\n2026-11-01T02:00Z,\n")
    with pytest.raises(PriceError, match="bad.csv:4: price must be a number >= 0"):
        PriceSchedule(Price(csv=str(bad)))
    assert PriceSchedule(Price(flat_usd_per_kwh=0.15)).at(datetime(2026, 11, 1, tzinfo=UTC)) == 0.15


def test_time_of_use_before_the_first_start_continues_the_last_period() -> None:
    p = PriceSchedule(Price(time_of_use=[
        TouPeriod(start="07:00", usd_per_kwh=0.3),
        TouPeriod(start="22:00", usd_per_kwh=0.1),
    ]))  # fmt: skip
    assert p.at(datetime(2026, 11, 2, 3, tzinfo=UTC)) == 0.1
    weekdays = PriceSchedule(Price(time_of_use=[TouPeriod(start="00:00", usd_per_kwh=0.2,
                                                          days=["mon"])]))  # fmt: skip
    with pytest.raises(PriceError, match="no time-of-use period covers sun"):
        weekdays.at(datetime(2026, 11, 1, 12, tzinfo=UTC))


def fill(ledger: Ledger) -> None:
    tariff = EnergyTariff(Billing(markup=0.1, token_price_usd_per_1k=0.002))
    t0 = datetime(2026, 11, 2, 10, tzinfo=UTC)
    rows = []
    for i in range(6):
        region = "eu-north" if i % 2 else "us-south"
        rows.append(bill_line(
            request_id=f"r{i}", tenant="acme" if i < 5 else "other", region=region,
            replica=f"{region}-0", model="m", started_at=t0 + timedelta(days=i),
            ended_at=t0 + timedelta(days=i, seconds=3), prompt_tokens=100, completion_tokens=200,
            energy_j=3600.0 * (i + 1), energy_source="measured", pue=1.2,
            intensity_g_per_kwh=100.0 if i % 2 else 400.0, signal="average", carbon_stale=False,
            price_usd_per_kwh=0.1, tariff=tariff,
        ))  # fmt: skip
    ledger.write(rows)


def test_invoice_is_traceable_to_rows(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    fill(ledger)
    inv = invoice(ledger, "acme", "2026-11")
    rows = ledger.tenant_rows("acme")
    assert inv.requests == 5 == len(rows)
    assert inv.energy_kwh == pytest.approx(sum(r.kwh_billed for r in rows))
    assert inv.energy_kwh == pytest.approx(3600 * (1 + 2 + 3 + 4 + 5) / 3.6e6 * 1.2)
    assert inv.carbon_g == pytest.approx(sum(r.carbon_g for r in rows))
    assert inv.billed_usd == pytest.approx(inv.energy_kwh * 0.1 * 1.1)
    assert inv.token_tariff_usd == pytest.approx(5 * 300 / 1000 * 0.002)
    assert inv.saving_usd == pytest.approx(inv.token_tariff_usd - inv.billed_usd)
    assert (inv.first_request, inv.last_request) == ("r0", "r4")
    assert set(inv.by_region["region"]) == {"eu-north", "us-south"}
    assert invoice(ledger, "acme", "2026-12").requests == 0


def test_usage_and_bill_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "l.sqlite"
    fill(Ledger(path))
    assert main(["usage", "--ledger", str(path), "--tenant", "acme", "--by", "region",
                 "--format", "json"]) == 0  # fmt: skip
    by_region = {r["region"]: r for r in json.loads(capsys.readouterr().out)}
    assert by_region["eu-north"]["requests"] == 2 and by_region["us-south"]["requests"] == 3
    assert main(["usage", "--ledger", str(path), "--tenant", "acme", "--from", "2026-11-04",
                 "--by", "day", "--format", "csv"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("day,requests") and len(lines) == 1 + 3
    assert main(["bill", "--ledger", str(path), "--tenant", "acme", "--month", "2026-11",
                 "--format", "json"]) == 0  # fmt: skip
    inv = json.loads(capsys.readouterr().out)
    assert inv["requests"] == 5 and inv["saving_usd"] > 0
    assert main(["bill", "--ledger", str(path), "--tenant", "acme", "--month", "2026-11"]) == 0
    assert "token tariff" in capsys.readouterr().out


def test_seed_table_compares_the_article_with_measurement() -> None:
    table = seed_table()
    assert list(table["output_tokens"]) == list(ARTICLE_KWH)
    assert list(table["token_cost_usd"]) == pytest.approx([0.01, 0.24, 0.9, 3.0])
    ratio = table["article/measured batch 32 (Mistral-7B, v2)"]
    # Mistral-7B at batch 32 on A100 measured 0.2326 J/token
    assert ratio.iloc[1] == pytest.approx(0.012 / (120 * 0.23260312 / 3.6e6), rel=1e-6)
    assert (table.filter(like="article/measured") > 10).all().all()


def test_unknown_tenant_is_named(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    fill(Ledger(path))
    with pytest.raises(SystemExit, match="tenant 'nobody' has no rows .*tenants: acme, other"):
        main(["usage", "--ledger", str(path), "--tenant", "nobody"])


def test_time_of_use_before_the_day_s_first_period_is_the_previous_day_s_last() -> None:
    # weekdays 07:00 peak, 22:00 night; weekends from 08:00 cheap. Saturday 03:00 is still
    # Friday's night rate (it runs to Saturday's first period), not Saturday's 08:00 rate
    p = PriceSchedule(Price(time_of_use=[
        TouPeriod(start="07:00", usd_per_kwh=0.30, days=["mon", "tue", "wed", "thu", "fri"]),
        TouPeriod(start="22:00", usd_per_kwh=0.10, days=["mon", "tue", "wed", "thu", "fri"]),
        TouPeriod(start="08:00", usd_per_kwh=0.05, days=["sat", "sun"]),
    ]))  # fmt: skip
    assert p.at(datetime(2026, 11, 28, 3, tzinfo=UTC)) == 0.10  # Saturday 03:00: Friday's 22:00
    assert p.at(datetime(2026, 11, 28, 9, tzinfo=UTC)) == 0.05  # Saturday 09:00
    assert p.at(datetime(2026, 11, 30, 3, tzinfo=UTC)) == 0.05  # Monday 03:00: Sunday's 08:00
    assert p.at(datetime(2026, 11, 30, 7, tzinfo=UTC)) == 0.30  # Monday 07:00
    assert p.at(datetime(2026, 12, 1, 3, tzinfo=UTC)) == 0.10  # Tuesday 03:00: Monday's 22:00
