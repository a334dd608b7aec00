"""Golden bills: meter readings and request timelines, by hand, to the ledger row and ``usage``.

Each case goes the whole way a bill goes: the readings and timelines through attribution
(:func:`router.metering.attribution.attribute`), the replica's PUE, the price at the request's
start (:class:`router.billing.PriceSchedule`), the tariff, the grid's intensity at that hour,
into the ledger row (:func:`router.billing.bill_line`, stored and read back by
:class:`router.ledger.Ledger`, with the receipt's prefill_j, held_s and first token) and the
response's ``usage`` block (:func:`router.service.settlement.usage_fields`).

Every expected figure is worked out by hand and written as literals with the arithmetic in a
comment; none comes from the code under test. Compared to 1e-9 relative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from regions.config import Billing, Price, TouPeriod
from regions.meters import MeterReading
from router.billing import PriceSchedule, bill_line, tariff_for
from router.ledger import Ledger, utc_iso
from router.metering.attribution import Timeline, attribute
from router.receipts import receipt_view
from router.service.settlement import usage_fields


def approx(x: float) -> Any:
    return pytest.approx(x, rel=1e-9, abs=1e-15)


def R(t: float, e: float) -> MeterReading:  # noqa: N802
    return MeterReading(t, e)


CSV = """time,usd_per_kwh
2026-11-02T09:00:00Z,0.10
2026-11-02T10:00:02Z,0.30
2026-11-02T11:00:00Z,0.50
"""
WEEKDAYS: Any = ["mon", "tue", "wed", "thu", "fri"]
CSV_PRICE = Price(csv="prices.csv")  # relative: the test's tmp_path is its base_dir


@dataclass(frozen=True)
class Golden:
    name: str
    t0: datetime  # wall time of monotonic second 0
    readings: list[MeterReading]
    timelines: list[Timeline]
    prefill_weight: float
    price: Price
    billing: Billing
    pue: float
    intensity_by_hour: dict[int, float]  # the grid's average intensity, g/kWh, by UTC hour
    idle_j: float
    measured_j: float
    attributed: dict[str, dict[str, Any]]  # request -> its Attributed figures
    bills: dict[str, dict[str, float]]  # request -> the ledger row's money and carbon
    receipt: dict[str, Any] = field(default_factory=dict)  # the service's own receipt fields
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)  # request -> usage block


CASES = [
    Golden(
        name="prefill that starts late, idle before and after, flat price, markup",
        t0=datetime(2026, 11, 2, 10, tzinfo=UTC),
        readings=[R(0, 0), R(2, 1000), R(4, 37000), R(6, 73000), R(8, 75000)],
        # prompt of 6 tokens prefilled over [2, 4], its first token at 4, then 5 and 6
        timelines=[Timeline("a", 2.0, 6, (4.0, 5.0, 6.0), 6.0)],
        prefill_weight=0.5,
        price=Price(flat_usd_per_kwh=0.20),
        billing=Billing(tariff="energy", markup=0.1, token_price_usd_per_1k=0.002),
        pue=1.25,
        intensity_by_hour={10: 400.0},
        # (0, 2]: nobody, 1000 J idle; (6, 8]: a ended at 6, 2000 J idle
        idle_j=1000.0 + 2000.0,
        measured_j=75000.0,
        attributed={
            "a": {
                # (2, 4]: 36000 J, all a's (work 0.5 x 6 prompt + 1 token at 4);
                # (4, 6]: 36000 J, all a's (tokens at 5 and 6)
                "energy_j": 36000.0 + 36000.0,
                "prefill_j": 36000.0 * 3 / 4,  # prompt work 3 of 4 in (2, 4]
                "held_s": 2.0 + 2.0,
                "first_token_s": 4.0,
                "decode_tokens": 3,
            }
        },
        bills={
            "a": {
                "price_usd_per_kwh": 0.20,
                "kwh_billed": 0.025,  # 72000 J / 3.6e6 x PUE 1.25
                "carbon_g": 10.0,  # 0.025 kWh x 400 g/kWh
                "energy_cost_usd": 0.0055,  # 0.025 x 0.20 x 1.1
                "cost_usd": 0.0055,
                "token_cost_usd": 0.000018,  # (6 + 3) / 1000 x 0.002
                "carbon_cost_usd": 0.0,
            }
        },
        receipt={"baseline_replica": "us-south-0", "baseline_carbon_g": 25.0, "embodied_g": 0.004},
        usage={
            "a": {
                "energy_kwh": 0.025,
                "carbon_g": 10.0,
                "cost_usd": 0.0055,
                "carbon_avoided_g": 15.0,  # baseline 25 g - 10 g billed
                "embodied_carbon_g": 0.004,
            }
        },
    ),
    Golden(
        name="overlapping lifetimes, a price exactly at a CSV row, hybrid tariff, carbon price",
        t0=datetime(2026, 11, 2, 10, tzinfo=UTC),
        readings=[R(0, 0), R(2, 20000), R(4, 80000), R(6, 110000)],
        timelines=[
            Timeline("a", 0.0, 4, (1.0, 2.0, 3.0, 4.0), 4.0),  # prefill over [0, 1]
            Timeline("b", 2.0, 8, (3.0, 4.0, 5.0, 6.0), 6.0),  # prefill over [2, 3]
        ],
        prefill_weight=0.5,
        price=CSV_PRICE,
        billing=Billing(
            tariff="hybrid",
            hybrid_token_fee_usd_per_1k=0.0005,
            token_price_usd_per_1k=0.002,
            carbon_price_usd_per_tco2e=50.0,
        ),
        pue=1.2,
        intensity_by_hour={10: 300.0},
        idle_j=0.0,
        measured_j=110000.0,
        attributed={
            # (0, 2]: 20000 J, a alone: work 0.5 x 4 prompt + tokens at 1, 2 = 4
            # (2, 4]: 60000 J: a tokens 3, 4 = 2; b 0.5 x 8 prompt + tokens 3, 4 = 6; of 8
            # (4, 6]: 30000 J, b alone (a ended at 4): tokens 5, 6
            "a": {
                "energy_j": 20000.0 + 60000.0 * 2 / 8,  # 35000
                "prefill_j": 20000.0 * 2 / 4,  # 10000
                "held_s": 2.0 + 2.0 * 2 / 8,  # 2.5
                "first_token_s": 1.0,
                "decode_tokens": 4,
            },
            "b": {
                "energy_j": 60000.0 * 6 / 8 + 30000.0,  # 75000
                "prefill_j": 45000.0 * 4 / 6,  # 30000
                "held_s": 2.0 * 6 / 8 + 2.0,  # 3.5
                "first_token_s": 3.0,
                "decode_tokens": 4,
            },
        },
        bills={
            "a": {
                "price_usd_per_kwh": 0.10,  # 10:00:00 is in the 09:00 row
                "kwh_billed": 35000.0 / 3.6e6 * 1.2,  # 7/600
                "carbon_g": 3.5,  # 7/600 kWh x 300 g/kWh
                "energy_cost_usd": 7 / 6000,  # 7/600 x 0.10
                "carbon_cost_usd": 0.000175,  # 3.5 g / 1e6 x $50
                "cost_usd": 0.000004 + 7 / 6000 + 0.000175,  # fee (4 + 4) / 1000 x 0.0005
                "token_cost_usd": 0.000016,  # 8 / 1000 x 0.002
            },
            "b": {
                "price_usd_per_kwh": 0.30,  # starts at 10:00:02, exactly the row: its price
                "kwh_billed": 0.025,  # 75000 J / 3.6e6 x 1.2
                "carbon_g": 7.5,  # 0.025 x 300
                "energy_cost_usd": 0.0075,  # 0.025 x 0.30
                "carbon_cost_usd": 0.000375,  # 7.5 / 1e6 x 50
                "cost_usd": 0.000006 + 0.0075 + 0.000375,  # fee 12 / 1000 x 0.0005: 0.007881
                "token_cost_usd": 0.000024,  # 12 / 1000 x 0.002
            },
        },
    ),
    Golden(
        name="a zero-length request, disjoint lifetimes, idle gaps, time of use past midnight",
        t0=datetime(2026, 11, 2, 8, tzinfo=UTC),  # 03:00 in New York (EST, UTC-5)
        readings=[R(0, 0), R(1, 500), R(2, 4100), R(3, 4200), R(4, 7800)],
        timelines=[
            Timeline("z", 1.5, 10, (), 1.5),  # starts and ends at 1.5: a prompt, no output
            Timeline("c", 3.0, 0, (4.0,), 4.0),
        ],
        prefill_weight=1.0,
        # starts at 07:00, not midnight: 03:00 is still the 22:00 period of the day before
        price=Price(
            timezone="America/New_York",
            time_of_use=[
                TouPeriod(start="07:00", usd_per_kwh=0.30),
                TouPeriod(start="22:00", usd_per_kwh=0.10),
            ],
        ),
        billing=Billing(tariff="energy", min_charge_usd=0.01, token_price_usd_per_1k=0.002),
        pue=1.0,
        intensity_by_hour={8: 250.0},
        idle_j=500.0 + 100.0,  # (0, 1] and (2, 3]: nobody
        measured_j=7800.0,
        attributed={
            # (1, 2]: 3600 J, z's prompt is the only work in it: the whole interval
            "z": {
                "energy_j": 3600.0,
                "prefill_j": 3600.0,
                "held_s": 1.0,
                "first_token_s": 1.5,
                "decode_tokens": 0,
            },
            # (3, 4]: 3600 J, c alone (it starts at 3, on the reading: nothing before)
            "c": {
                "energy_j": 3600.0,
                "prefill_j": 0.0,
                "held_s": 1.0,
                "first_token_s": 4.0,
                "decode_tokens": 1,
            },
        },
        bills={
            "z": {
                "price_usd_per_kwh": 0.10,
                "kwh_billed": 0.001,  # 3600 J / 3.6e6 x 1.0
                "carbon_g": 0.25,  # 0.001 x 250
                "energy_cost_usd": 0.0001,  # 0.001 x 0.10
                "cost_usd": 0.01,  # the minimum charge
                "token_cost_usd": 0.00002,  # 10 / 1000 x 0.002
                "carbon_cost_usd": 0.0,
            }
        },
    ),
    Golden(
        name="readings at one timestamp, a request starting on it, token tariff, Berlin time",
        t0=datetime(2026, 11, 2, 10, tzinfo=UTC),  # 11:00 CET
        readings=[R(0, 0), R(1, 36000), R(1, 50400), R(2, 86400)],
        timelines=[
            Timeline("a", 0.0, 0, (0.5, 1.5), 2.0),
            Timeline("b", 1.0, 0, (1.5, 2.0), 2.0),
        ],
        prefill_weight=1.0,
        price=Price(
            timezone="Europe/Berlin",
            time_of_use=[
                TouPeriod(start="06:00", usd_per_kwh=0.25),
                TouPeriod(start="18:00", usd_per_kwh=0.15),
            ],
        ),
        billing=Billing(
            tariff="token", token_price_usd_per_1k=0.002, carbon_price_usd_per_tco2e=100.0
        ),
        pue=1.5,
        intensity_by_hour={10: 200.0},
        idle_j=0.0,
        measured_j=86400.0,
        attributed={
            # (0, 1]: 36000 J, a alone. The 14400 J read again at 1 joins (1, 2]:
            # 86400 - 36000 = 50400 J, a's token at 1.5 against b's at 1.5 and 2: 1 : 2
            "a": {
                "energy_j": 36000.0 + 50400.0 / 3,  # 52800
                "prefill_j": 0.0,
                "held_s": 1.0 + 1.0 / 3,
                "first_token_s": 0.5,
                "decode_tokens": 2,
            },
            "b": {
                "energy_j": 50400.0 * 2 / 3,  # 33600
                "prefill_j": 0.0,
                "held_s": 2.0 / 3,
                "first_token_s": 1.5,
                "decode_tokens": 2,
            },
        },
        bills={
            "b": {
                "price_usd_per_kwh": 0.25,  # 11:00:01 CET: the 06:00 period
                "kwh_billed": 0.014,  # 33600 J / 3.6e6 x 1.5
                "carbon_g": 2.8,  # 0.014 x 200
                "energy_cost_usd": 0.0035,  # 0.014 x 0.25, for comparison
                "carbon_cost_usd": 0.00028,  # 2.8 / 1e6 x 100
                "token_cost_usd": 0.000004,  # 2 / 1000 x 0.002
                "cost_usd": 0.000004 + 0.00028,
            }
        },
    ),
    Golden(
        name="a weekday schedule: Saturday 03:00 still pays Friday's night rate",
        t0=datetime(2026, 11, 28, 3, tzinfo=UTC),  # a Saturday
        readings=[R(0, 0), R(1, 7200)],
        timelines=[Timeline("a", 0.0, 0, (1.0,), 1.0)],
        prefill_weight=1.0,
        price=Price(
            time_of_use=[
                TouPeriod(start="07:00", usd_per_kwh=0.30, days=WEEKDAYS),
                TouPeriod(start="22:00", usd_per_kwh=0.10, days=WEEKDAYS),
                TouPeriod(start="08:00", usd_per_kwh=0.05, days=["sat", "sun"]),
            ]
        ),
        billing=Billing(tariff="energy", markup=0.5, token_price_usd_per_1k=0.002),
        pue=1.0,
        intensity_by_hour={3: 500.0},
        idle_j=0.0,
        measured_j=7200.0,
        attributed={
            "a": {
                "energy_j": 7200.0,
                "prefill_j": 0.0,
                "held_s": 1.0,
                "first_token_s": 1.0,
                "decode_tokens": 1,
            }
        },
        bills={
            "a": {
                "price_usd_per_kwh": 0.10,
                "kwh_billed": 0.002,  # 7200 / 3.6e6
                "carbon_g": 1.0,  # 0.002 x 500
                "energy_cost_usd": 0.0003,  # 0.002 x 0.10 x 1.5
                "cost_usd": 0.0003,
                "token_cost_usd": 0.000002,  # 1 / 1000 x 0.002
                "carbon_cost_usd": 0.0,
            }
        },
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_bill(case: Golden, tmp_path: Path) -> None:
    (tmp_path / "prices.csv").write_text(CSV)
    out = attribute(case.readings, case.timelines, prefill_weight=case.prefill_weight)
    assert out.idle_j == approx(case.idle_j)
    assert out.measured_j == approx(case.measured_j)
    for rid, want in case.attributed.items():
        got = out.attributed[rid]
        assert got.energy_j == approx(want["energy_j"]), rid
        assert got.prefill_j == approx(want["prefill_j"]), rid
        assert got.held_s == approx(want["held_s"]), rid
        assert got.first_token_s == want["first_token_s"], rid
        assert got.decode_tokens == want["decode_tokens"], rid

    ledger = Ledger(tmp_path / "ledger.sqlite")
    prices = PriceSchedule(case.price, base_dir=tmp_path)
    timelines = {tl.request_id: tl for tl in case.timelines}
    for rid, want in case.bills.items():
        tl, got = timelines[rid], out.attributed[rid]
        assert got.first_token_s is not None
        started_at = case.t0 + timedelta(seconds=tl.start_s)
        row = bill_line(
            request_id=rid,
            tenant="acme",
            region="eu-north",
            replica="eu-north-0",
            model="m",
            started_at=started_at,
            ended_at=case.t0 + timedelta(seconds=tl.end_s),
            prompt_tokens=tl.prefill_tokens,
            completion_tokens=got.decode_tokens,
            energy_j=got.energy_j,
            energy_source="measured",
            pue=case.pue,
            intensity_g_per_kwh=case.intensity_by_hour[started_at.hour],
            signal="average",
            carbon_stale=False,
            price_usd_per_kwh=prices.at(started_at),
            tariff=tariff_for(case.billing),
            receipt={
                "first_token_at": utc_iso(case.t0 + timedelta(seconds=got.first_token_s)),
                "prefill_j": got.prefill_j,
                "held_s": got.held_s,
                **case.receipt,
            },
        )
        for name, value in want.items():
            assert getattr(row, name) == approx(value), (rid, name)
        assert row.energy_j == approx(case.attributed[rid]["energy_j"])
        assert row.prefill_j == approx(case.attributed[rid]["prefill_j"])
        assert row.held_s == approx(case.attributed[rid]["held_s"])
        assert row.tariff == case.billing.tariff
        ledger.write([row])
        assert ledger.get(rid) == row  # stored as billed, every figure exact
        stored = ledger.receipt(rid)
        assert stored is not None
        receipt = receipt_view(stored)  # what GET /v1/receipts/{id} answers
        energy = case.attributed[rid]["energy_j"]
        prefill = case.attributed[rid]["prefill_j"]
        assert receipt["energy"]["it_j"] == approx(energy)
        assert receipt["energy"]["prefill_j"] == approx(prefill)
        assert receipt["energy"]["decode_j"] == approx(energy - prefill)
        assert receipt["energy"]["replica_seconds_held"] == approx(case.attributed[rid]["held_s"])
        assert receipt["energy"]["billed_kwh"] == approx(want["kwh_billed"])
        assert receipt["times"]["first_token_at"] == utc_iso(
            case.t0 + timedelta(seconds=case.attributed[rid]["first_token_s"])
        )

        usage = usage_fields(row)
        expected_usage = {
            "energy_kwh": want["kwh_billed"],
            "carbon_g": want["carbon_g"],
            "cost_usd": want["cost_usd"],
            "carbon_avoided_g": 0.0,
            "embodied_carbon_g": 0.0,
            **case.usage.get(rid, {}),
        }
        assert usage == {
            **{k: approx(v) for k, v in expected_usage.items()},
            "region": "eu-north",
            "replica": "eu-north-0",
            "energy_source": "measured",
        }
