"""The ledger: durable, idempotent, crash-consistent, versioned."""

from __future__ import annotations

import logging
import sqlite3
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from router.chain import HASHED_NAMES
from router.chain import VERSION as CHAIN_VERSION
from router.ledger import _INSERT, COLUMNS, SCHEMA_VERSION, Ledger, LedgerError, LedgerRow, utc_iso

V4_COLUMNS = COLUMNS[: COLUMNS.index("zone")]  # a row's columns before the receipt (v5)


def row(rid: str, when: datetime | None = None, **kw: object) -> LedgerRow:
    when = when or datetime(2026, 11, 3, 12, tzinfo=UTC)
    base: dict[str, object] = dict(
        request_id=rid, tenant="acme", region="eu-north", replica="eu-north-0", model="m",
        started_at=utc_iso(when), ended_at=utc_iso(when + timedelta(seconds=2)),
        prompt_tokens=100, completion_tokens=50, energy_j=360.0, energy_source="measured",
        pue=1.2, kwh_billed=360.0 / 3.6e6 * 1.2, intensity_g_per_kwh=50.0, signal="average",
        carbon_stale=False, carbon_g=0.006, price_usd_per_kwh=0.1, tariff="energy",
        cost_usd=1.2e-5, energy_cost_usd=1.2e-5, token_cost_usd=3e-4, carbon_cost_usd=0.0,
    )  # fmt: skip
    base.update(kw)
    return LedgerRow(**base)  # type: ignore[arg-type]


def test_write_is_idempotent_by_request_id(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger.write([row("a"), row("b")]) == 2
    assert ledger.write([row("a", energy_j=999.0), row("c")]) == 1  # retried a: not billed twice
    assert ledger.count() == 3
    got = ledger.get("a")
    assert got is not None and got.energy_j == 360.0
    assert got == row("a")


def test_rows_survive_reopen_and_use_wal(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    ledger = Ledger(path)
    ledger.write([row("a")])
    ledger.close()
    again = Ledger(path)
    assert again.get("a") == row("a")
    with closing(sqlite3.connect(path)) as db:
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal" and again.schema_version == SCHEMA_VERSION


def test_bad_rows_are_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="negative"):
        row("x", energy_j=-1.0)
    with pytest.raises(LedgerError, match="must be UTC"):
        row("x", started_at="2026-11-03T12:00:00+01:00")
    ledger = Ledger(tmp_path / "l.sqlite")
    with pytest.raises(LedgerError, match="write of 2 rows failed"):
        ledger.write([row("ok"), row("bad", pue=0.5)])  # CHECK (pue >= 1) fails: whole batch out
    assert ledger.count() == 0


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    Ledger(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match=f"schema v{SCHEMA_VERSION + 1} is newer"):
        Ledger(path)


def test_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE t (x)")
    db.commit()
    db.close()
    with pytest.raises(LedgerError, match="not a carbon-router ledger"):
        Ledger(path)


def test_v1_file_is_migrated(tmp_path: Path) -> None:
    from router.ledger import MIGRATIONS

    path = tmp_path / "v1.sqlite"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0])
    cols = [c for c in V4_COLUMNS if c != "carbon_cost_usd"]
    r = row("old")
    db.execute(
        f"INSERT INTO requests ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
        [getattr(r, c) for c in cols],
    )
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    ledger = Ledger(path)
    assert ledger.schema_version == SCHEMA_VERSION
    assert ledger.get("old") == row("old")  # carbon_cost_usd defaults to 0


def test_raw_readings_idle_and_refit_rows_are_kept(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write_readings(
        "eu-north-0",
        [(1.0, "2026-11-03T12:00:00+00:00", 10.0), (2.0, "2026-11-03T12:00:01+00:00", 25.0)],
        "measured",
    )
    ledger.write_readings("eu-north-0", [(2.0, "2026-11-03T12:00:01+00:00", 25.0)], "measured")
    assert [r[2] for r in ledger.readings("eu-north-0")] == [10.0, 25.0]
    t = datetime(2026, 11, 3, 12, tzinfo=UTC)
    ledger.write_idle("eu-north-0", t, t + timedelta(minutes=1), 5.0)
    ledger.write_idle("eu-north-0", t, t + timedelta(minutes=1), 5.0)  # retried: once
    assert ledger.idle_j("eu-north-0") == 5.0
    ledger.write([row("a"), row("b", replica="other", prompt_tokens=7)])
    assert ledger.measured_rows("eu-north-0") == [(100, 50, 360.0)]


@pytest.mark.parametrize(
    "bad",
    [
        {"prompt_tokens": 10**30},
        {"completion_tokens": -1},
        {"energy_j": float("inf")},
        {"carbon_g": float("nan")},
        {"prompt_tokens": 1.5},
    ],
)
def test_an_absurd_row_is_refused_where_it_is_made(bad: dict[str, object]) -> None:
    with pytest.raises(LedgerError):
        row("absurd", **bad)


def test_a_failed_write_leaves_no_transaction_open(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    good = row("ok")
    bad = row("ok2")
    object.__setattr__(bad, "prompt_tokens", 10**30)  # past the row's own checks
    with pytest.raises(LedgerError):
        ledger.write([good, bad])
    assert not ledger._db.in_transaction  # other writers are not locked out
    assert ledger.write([good]) == 1  # and nothing of the failed batch was kept


def test_usage_pages_and_totals_come_from_sql(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    ledger.write([row(f"r{k:03d}", t0 + timedelta(minutes=k)) for k in range(250)])
    ledger.write([row("other", t0, tenant="globex")])
    page = ledger.usage_page("acme", limit=100)
    assert [r.request_id for r in page.rows] == [f"r{k:03d}" for k in range(100)]
    assert page.has_more and page.totals["requests"] == 250
    assert page.totals["kwh"] == pytest.approx(250 * row("x").kwh_billed)
    last = ledger.usage_page("acme", limit=100, after="r199")
    assert [r.request_id for r in last.rows] == [f"r{k:03d}" for k in range(200, 250)]
    assert not last.has_more
    window = ledger.usage_page("acme", start=t0 + timedelta(minutes=10),
                               end=t0 + timedelta(minutes=20), limit=1000)  # fmt: skip
    assert window.totals["requests"] == 10 and len(window.rows) == 10
    assert ledger.spend("acme", t0) == pytest.approx(
        (250 * row("x").kwh_billed, 250 * row("x").carbon_g, 250 * row("x").cost_usd)
    )
    with pytest.raises(LedgerError, match="no row"):
        ledger.usage_page("acme", after="nope")


def test_reads_do_not_see_a_write_that_is_rolled_back(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger._db.execute("BEGIN IMMEDIATE")  # a write in progress on the writer's connection
    ledger._db.executemany(_INSERT, ledger._chained([row("pending")]))
    assert ledger.usage_page(None).rows == []  # not committed: not seen
    ledger._db.execute("ROLLBACK")
    assert ledger.usage_page(None).rows == []


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    start=st.none() | st.integers(-30, 80 * 60),
    length=st.none() | st.integers(0, 80 * 60),
)
def test_period_totals_equal_the_sum_of_their_rows(
    tmp_path: Path, start: int | None, length: int | None
) -> None:
    # whole days come from daily sums and the partial days at either end from the rows: any
    # period, midnight edges included, sums exactly what its rows sum (minutes from t0 below)
    path = tmp_path / "p.sqlite"
    ledger = Ledger(path)
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    if not ledger.count():
        at = [t0 + timedelta(minutes=m) for m in range(-20, 80 * 60, 37)] + [
            t0 + timedelta(days=d)
            for d in range(4)  # rows at midnight exactly
        ]
        ledger.write([
            row(f"r{k}", when, tenant=("acme", "globex")[k % 2], kwh_billed=k * 1e-3,
                carbon_g=k * 0.5, cost_usd=k * 1e-4, avoided_g=k * -0.25, embodied_g=k * 0.125)
            for k, when in enumerate(at)
        ])  # fmt: skip
        ledger.write([row("r3", t0)])  # a duplicate of a written row: skipped, not summed again
    s = None if start is None else t0 + timedelta(minutes=start)
    e = None if length is None else (s or t0) + timedelta(minutes=length)
    for tenant in ("acme", None):
        rows = [r for r in ledger.rows() if tenant in (None, r.tenant)
                and (s is None or r.started_at >= utc_iso(s))
                and (e is None or r.started_at < utc_iso(e))]  # fmt: skip
        totals = ledger.usage_page(tenant, start=s, end=e).totals
        assert totals["requests"] == len(rows)
        assert totals["kwh"] == pytest.approx(sum(r.kwh_billed for r in rows), abs=1e-12)
        assert totals["carbon_g"] == pytest.approx(sum(r.carbon_g for r in rows), abs=1e-9)
        assert totals["cost_usd"] == pytest.approx(sum(r.cost_usd for r in rows), abs=1e-12)
        assert totals["carbon_avoided_g"] == pytest.approx(sum(r.avoided_g for r in rows))
        assert totals["embodied_g"] == pytest.approx(sum(r.embodied_g for r in rows))
        if tenant and s is not None and e is None:
            assert ledger.spend(tenant, s) == pytest.approx(
                (totals["kwh"], totals["carbon_g"], totals["cost_usd"]), abs=1e-9)  # fmt: skip


def test_a_v3_ledger_gets_its_daily_sums_when_migrated(tmp_path: Path) -> None:
    from router.ledger import MIGRATIONS

    path = tmp_path / "v3.sqlite"
    db = sqlite3.connect(path)
    for v in range(3):
        db.executescript(MIGRATIONS[v])
    r = row("old")
    marks = ", ".join("?" for _ in V4_COLUMNS)
    db.execute(f"INSERT INTO requests ({', '.join(V4_COLUMNS)}) VALUES ({marks})",
               [getattr(r, c) for c in V4_COLUMNS])  # fmt: skip
    db.execute("PRAGMA user_version=3")
    db.commit()
    db.close()
    ledger = Ledger(path)
    assert ledger.schema_version == SCHEMA_VERSION
    assert ledger.usage_page("acme").totals["requests"] == 1
    ledger.write([row("new")])
    assert ledger.usage_page("acme").totals["kwh"] == pytest.approx(2 * r.kwh_billed)


@pytest.mark.parametrize(
    "form",
    [
        "2026-11-01T23:00:00Z",  # Z for +00:00
        "2026-11-01 23:00:00+00:00",  # a space for T
        "2026-11-01T23:00:00-00:00",
        "2026-11-01T23:00:00+00:00",  # no microseconds
        "20261101T230000Z",  # ISO 8601 basic format
    ],
)
def test_a_utc_time_in_any_iso_form_is_summed_and_paged_alike(tmp_path: Path, form: str) -> None:
    # the daily sums take a row's day from the first 10 characters of its started_at and the
    # rows are filtered by string comparison with utc_iso's form: a UTC time written in another
    # ISO form was counted in a period's totals but not among its rows (or in no day at all)
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([row("odd", started_at=form)])
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    for s, e in [(t0, t0 + timedelta(days=1)), (t0 + timedelta(hours=22), None),
                 (t0 + timedelta(days=1), None), (None, t0 + timedelta(days=1))]:  # fmt: skip
        page = ledger.usage_page("acme", start=s, end=e)
        assert page.totals["requests"] == len(page.rows) == (1 if s != t0 + timedelta(days=1)
                                                             else 0), (s, e)  # fmt: skip
    stored = ledger.get("odd")
    assert stored is not None and stored.started_at == "2026-11-01T23:00:00.000000+00:00"


# ---- the chain, its signatures and the kept sums, read back exactly ---------------------------

H = datetime(2026, 11, 3, 12, tzinfo=UTC)
# binary fractions: sums of them are exact, so the expected sums below are too
FIGS: dict[str, object] = dict(kwh_billed=0.5, carbon_g=2.0, cost_usd=0.25, avoided_g=-1.0,
                               embodied_g=0.125, binding="score")  # fmt: skip


def chained(path: Path) -> Ledger:
    """acme's a1..a3 and bolt's b1, written in that order over two writes."""
    ledger = Ledger(path)
    ledger.write([row("a1", H, **FIGS), row("b1", H, tenant="bolt", **FIGS)])
    ledger.write([row("a2", H + timedelta(minutes=1), **FIGS),
                  row("a3", H + timedelta(minutes=2), **FIGS)])  # fmt: skip
    return ledger


def test_each_tenants_chain_reads_back_in_order_and_links(tmp_path: Path) -> None:
    from router.chain import GENESIS, canonical, link

    ledger = chained(tmp_path / "l.sqlite")
    rows = list(ledger.chain("acme", batch=1))
    assert [(r[0], r[1], r[2]) for r in rows] == [("a1", "acme", 1), ("a2", "acme", 2),
                                                  ("a3", "acme", 3)]  # fmt: skip
    prev = GENESIS
    for rid, _, seq, at, prev_hash, h, receipt in rows:
        assert prev_hash == prev
        want = canonical({**ledger.receipt(rid), "tenant_seq": seq, "chained_at": at})  # type: ignore[dict-item]
        assert receipt.encode() == want and h == link(prev, want)
        prev = h
    b1 = ledger.receipt("b1")
    assert b1 is not None and ledger.heads() == {
        "acme": (3, rows[2][5]),
        "bolt": (1, b1["row_hash"]),
    }
    assert ledger.head("acme") == (3, rows[2][5]) and ledger.head("nobody") is None
    assert list(ledger.chain("acme", first_seq=2, last_seq=2)) == [rows[1]]
    assert list(ledger.chain("acme", first_seq=3)) == [rows[2]]
    assert list(ledger.chain("nobody")) == []
    assert ledger.link_before("acme", 2) == rows[0][5]
    with pytest.raises(LedgerError, match="tenant acme has no row 4 in its chain"):
        ledger.link_before("acme", 4)
    # every row as stored, in the order written
    stored = list(ledger.stored_receipts(batch=1))
    t, q = HASHED_NAMES.index("tenant"), HASHED_NAMES.index("tenant_seq")
    places = [(s[0], orjson.loads(s[4])[t], orjson.loads(s[4])[q]) for s in stored]
    assert places == [(1, "acme", 1), (2, "bolt", 1), (3, "acme", 2), (4, "acme", 3)]
    acme = [s for s, p in zip(stored, places, strict=True) if p[1] == "acme"]
    assert [(s[1], s[2], s[4]) for s in acme] == [(r[4], r[5], r[6]) for r in rows]
    assert {s[3] for s in stored} == {CHAIN_VERSION}
    assert ledger.request_at(2) == "b1" and ledger.request_at(99) == "rowid 99"
    assert (ledger.tenants(), ledger.count(), ledger.integrity_ok()) == (["acme", "bolt"], 4, True)


def test_a_receipt_is_its_row_and_its_place_in_the_chain(tmp_path: Path) -> None:
    ledger = chained(tmp_path / "l.sqlite")
    (a2,) = [r for r in ledger.chain("acme") if r[0] == "a2"]
    got = ledger.receipt("a2")
    assert got is not None
    want = {**{c: getattr(row("a2", H + timedelta(minutes=1), **FIGS), c) for c in COLUMNS},
            "tenant_seq": 2, "chained_at": a2[3], "prev_hash": a2[4], "row_hash": a2[5],
            "chain_version": 1}  # fmt: skip
    assert got == want and got["carbon_stale"] is False
    assert ledger.receipt("a2", tenant="acme") == want
    assert ledger.receipt("a2", tenant="bolt") is None  # another tenant's id reads as unknown
    assert ledger.receipt("nope") is None
    stale = Ledger(tmp_path / "s.sqlite")
    stale.write([row("s", carbon_stale=True)])
    assert stale.receipt("s")["carbon_stale"] is True  # type: ignore[index]


def test_a_period_of_the_chain_is_the_seqs_chained_in_it(tmp_path: Path) -> None:
    ledger = chained(tmp_path / "l.sqlite")
    ats = [datetime.fromisoformat(r[3]) for r in ledger.chain("acme")]
    first, last = ats[0], ats[-1]
    assert ledger.seq_range("acme", None, None) == (1, 3)
    assert ledger.seq_range("acme", first, None) == (1, 3)  # from: inclusive
    assert ledger.seq_range("acme", None, first) is None  # to: exclusive
    assert ledger.seq_range("acme", last + timedelta(microseconds=1), None) is None
    assert ledger.seq_range("acme", None, last + timedelta(microseconds=1)) == (1, 3)
    assert ledger.seq_range("bolt", first, None) == (1, 1)
    assert ledger.seq_range("nobody", None, None) is None


def test_signed_heads_are_kept_and_read_back_by_tenant_seq_and_key(tmp_path: Path) -> None:
    ledger = chained(tmp_path / "l.sqlite")
    assert ledger.signatures() == [] and ledger.last_signed_at() is None
    assert ledger.last_signed("k1", "acme") is None
    sig = [("acme", 2, "h2", "2026-11-03T13:00:00", "k1", "pub1", "s1"),
           ("acme", 1, "h1", "2026-11-03T12:00:00", "k1", "pub1", "s0"),
           ("acme", 3, "h3", "2026-11-03T11:00:00", "k2", "pub2", "s2"),
           ("bolt", 1, "hb", "2026-11-03T14:00:00", "k1", "pub1", "s3")]  # fmt: skip
    ledger.add_signatures(sig)
    ledger.add_signatures(sig[:1])  # the same head again: kept once
    cols = ("tenant", "tenant_seq", "row_hash", "signed_at", "key_id", "public_key", "signature")
    as_dicts = [dict(zip(cols, s, strict=True)) for s in sig]
    assert ledger.signatures() == [as_dicts[i] for i in (1, 0, 2, 3)]
    assert ledger.signatures("acme") == [as_dicts[i] for i in (1, 0, 2)]
    assert ledger.signatures("acme", 2) == [as_dicts[i] for i in (0, 2)]
    assert ledger.signatures("acme", 1, 2) == [as_dicts[i] for i in (1, 0)]
    assert ledger.signatures(None, 1, 1) == [as_dicts[i] for i in (1, 3)]
    assert ledger.last_signed("k1", "acme") == (2, "h2")
    assert ledger.last_signed("k2", "acme") == (3, "h3")
    assert ledger.last_signed("k2", "bolt") is None
    assert ledger.last_signed_at() == "2026-11-03T14:00:00"
    with pytest.raises(sqlite3.IntegrityError, match="kept as signed"):
        ledger._db.execute("DELETE FROM chain_signatures")
    # a batch that fails is kept whole or not at all, and leaves no transaction open
    with pytest.raises(sqlite3.Error):
        ledger.add_signatures([("bolt", 2, "h", "t", "k1", "p", "s"), ("bolt", 3)])  # type: ignore[list-item]
    assert not ledger._db.in_transaction
    assert len(ledger.signatures("bolt")) == 1


def test_the_schema_is_the_one_verify_expects(tmp_path: Path) -> None:
    from router.ledger import V5_INDEXES, V5_REQUESTS_SQL

    ledger = chained(tmp_path / "l.sqlite")
    # SQLite quotes the name it renamed the migrated table to
    assert ledger.schema_sql() == V5_REQUESTS_SQL.replace("requests", '"requests"', 1)
    assert ledger.index_sql() == {
        **V5_INDEXES,
        "requests_tenant_time": "CREATE INDEX requests_tenant_time ON requests "
        "(tenant, started_at)",
        "requests_time": "CREATE INDEX requests_time ON requests (started_at, request_id)",
    }
    ledger._db.execute("DROP TABLE requests")
    assert ledger.schema_sql() == "" and ledger.index_sql() == {}


def hour_row(rid: str, minutes: int, **kw: object) -> LedgerRow:
    return row(rid, H + timedelta(minutes=minutes), **{**FIGS, **kw})


def sums(n: int, k: float = 1.0) -> dict[str, Any]:
    """``n`` rows' sums of FIGS, kWh times ``k``."""
    return {"requests": n, "kwh": 0.5 * n * k, "carbon_g": 2.0 * n, "avoided_g": -1.0 * n,
            "embodied_g": 0.125 * n, "cost_usd": 0.25 * n}  # fmt: skip


def test_hourly_sums_by_region_and_deciding_constraint(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([
        hour_row("before", -1),  # 11:59, outside
        hour_row("a", 0), hour_row("b", 30), hour_row("c", 10, tenant="bolt"),
        hour_row("d", 65, region="us-east", binding="latency"),
        hour_row("e", 70, binding="latency"),
        hour_row("end", 120),  # 14:00, the hour holding the end: outside
    ])  # fmt: skip
    # the hours from the one holding the start (12:20 is in 12) up to the end's hour
    got = ledger.hourly(H + timedelta(minutes=20), H + timedelta(hours=2))
    assert got == [
        {"hour": "2026-11-03T12", "region": "eu-north", "binding": "score", **sums(3)},
        {"hour": "2026-11-03T13", "region": "eu-north", "binding": "latency", **sums(1)},
        {"hour": "2026-11-03T13", "region": "us-east", "binding": "latency", **sums(1)},
    ]
    assert ledger.hourly(H, H + timedelta(hours=1), tenant="bolt") == [
        {"hour": "2026-11-03T12", "region": "eu-north", "binding": "score", **sums(1)}
    ]
    assert ledger.hourly(H, H) == []


def test_top_tenants_by_kwh_then_name(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([
        hour_row("a1", 0), hour_row("a2", 61), hour_row("a3", 121),  # 14:01: outside
        hour_row("z", 5, tenant="zed"), hour_row("b", 5, tenant="bolt"),
        hour_row("big", -1, tenant="big", kwh_billed=9.0),  # 11:59: outside
    ])  # fmt: skip
    top = ledger.top_tenants(H, H + timedelta(hours=2))

    def t(name: str, n: int) -> dict[str, Any]:
        s = sums(n)
        return {"tenant": name, "requests": n, "kwh": s["kwh"], "carbon_g": s["carbon_g"],
                "avoided_g": s["avoided_g"], "cost_usd": s["cost_usd"]}  # fmt: skip

    assert top == [t("acme", 2), t("bolt", 1), t("zed", 1)]
    assert ledger.top_tenants(H, H + timedelta(hours=2), limit=2) == [t("acme", 2), t("bolt", 1)]


def test_the_kept_sums_are_checked_against_the_rows(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([hour_row("a", 0), hour_row("b", 30), hour_row("e", 60), hour_row("c", 60 * 25),
                  hour_row("d", 10, tenant="bolt", embodied_g=0.0)])  # fmt: skip
    assert ledger.sums_check() == []
    db = ledger._db
    # within the tolerance (a relative 1e-9, or 1e-12 near zero): float sums in another
    # order, not an edit
    db.execute("UPDATE usage_hourly SET kwh = kwh * (1 + 1e-10) WHERE tenant = 'bolt'")
    db.execute("UPDATE usage_daily SET kwh = kwh + 1e-13, embodied_g = 1e-13 "
               "WHERE tenant = 'bolt'")  # fmt: skip
    assert ledger.sums_check() == []
    db.execute("UPDATE usage_hourly SET kwh = 2.0, carbon_g = 5.0, cost_usd = 0.75 "
               "WHERE hour = '2026-11-03T12' AND tenant = 'acme'")  # fmt: skip
    db.execute("DELETE FROM usage_hourly WHERE tenant = 'acme' AND hour = '2026-11-04T13'")
    db.execute("UPDATE usage_daily SET requests = 4, embodied_g = 0.0 WHERE tenant = 'acme' "
               "AND day = '2026-11-03'")  # fmt: skip
    db.execute("INSERT INTO usage_daily VALUES ('acme', '2026-11-05', 1, 1, 1, 1, 1, 1)")
    db.execute("UPDATE usage_daily SET avoided_g = -1.0 * (1 + 1e-8) WHERE tenant = 'bolt'")
    assert ledger.sums_check() == [
        "hourly sums 2026-11-03T12 acme eu-north score: kwh 2.0 (rows: 1.0), "
        "carbon_g 5.0 (rows: 4.0), cost_usd 0.75 (rows: 0.5)",
        "hourly sums 2026-11-04T13 acme eu-north score: no sum",
        "daily sums acme 2026-11-03: requests 4 (rows: 3), embodied_g 0.0 (rows: 0.375)",
        "daily sums acme 2026-11-05: no rows",
        "daily sums bolt 2026-11-03: avoided_g -1.00000001 (rows: -1.0)",
    ]


def test_row_sums_are_exact_only_for_receipts_of_the_chains_types() -> None:
    """RowSums sums a receipt whose key is text and figures floats, as the chain writes them;
    any other JSON (a forged row) makes it not exact, and the sums check then takes SQLite's
    reading of the columns instead."""
    from router.chain import HASHED_NAMES
    from router.ledger import RowSums

    def receipt(**kw: Any) -> list[Any]:
        values: dict[str, Any] = {n: 0.5 for n in HASHED_NAMES}
        values |= {"started_at": "2026-11-03T12:30:00.000000+00:00", "tenant": "acme",
                   "region": "eu-north", "binding": "score", "avoided_g": -0.25, **kw}  # fmt: skip
        return [values[n] for n in HASHED_NAMES]

    sums = RowSums()
    sums.add(receipt())
    sums.add(receipt(kwh_billed=1.0, binding="latency"))
    sums.add(receipt(embodied_g=0.125))
    assert sums.exact and sums.hourly == {
        ("2026-11-03T12", "acme", "eu-north", "score"): [2, 1.0, 1.0, 1.0, -0.5, 0.625],
        ("2026-11-03T12", "acme", "eu-north", "latency"): [1, 1.0, 0.5, 0.5, -0.25, 0.5],
    }
    odd: list[dict[str, Any]] = [
        {"kwh_billed": 1}, {"carbon_g": "0.5"}, {"cost_usd": None}, {"avoided_g": True},
        {"embodied_g": 1}, {"tenant": 7}, {"region": None}, {"binding": 1.0},
        {"started_at": 20261103},
    ]  # fmt: skip
    for kw in odd:
        one = RowSums()
        one.add(receipt(**kw))
        assert not one.exact and one.hourly == {}, kw
    short = RowSums()
    short.add(["a", "acme"])
    assert not short.exact


def test_the_kept_sums_are_read_as_of_the_rows_summed(tmp_path: Path) -> None:
    """A ledger written to while it is checked (the metering actor runs beside router verify):
    the kept sums are read in the scan's own snapshot, so a row written meanwhile is in
    neither the rows summed nor the kept sums, and is no difference."""
    import orjson

    from router.ledger import RowSums

    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([hour_row("a", 0), hour_row("b", 30)])
    rows = RowSums()
    scan = ledger.stored_receipts(batch=1, sums=rows)
    first = next(scan)
    ledger.write([hour_row("c", 10)])  # committed while the scan reads
    for *_, receipt in [first, *scan]:
        rows.add(orjson.loads(receipt))
    assert sum(f[0] for f in rows.hourly.values()) == 2
    assert ledger.sums_check(rows) == []
    assert ledger.sums_check() == []  # alone: its own scan and kept sums, at one time


# ---- a row is refused where it is made, and says why -------------------------------------------

ZERO: dict[str, object] = dict(energy_j=0.0, kwh_billed=0.0, carbon_g=0.0, cost_usd=0.0,
                               prefill_j=0.0, static_j=0.0, held_s=0.0, embodied_g=0.0,
                               baseline_carbon_g=0.0)  # fmt: skip


def refused(**kw: object) -> str:
    with pytest.raises(LedgerError) as e:
        row("x", **kw)
    return str(e.value)


def test_token_counts_are_ints_from_0_to_a_billion() -> None:
    from router.ledger import MAX_TOKENS

    assert MAX_TOKENS == 1_000_000_000
    row("x", prompt_tokens=0, completion_tokens=0)
    row("x", prompt_tokens=MAX_TOKENS, completion_tokens=MAX_TOKENS)
    assert refused(prompt_tokens=MAX_TOKENS + 1) == (
        "request x: token counts 1000000001, 50 are not 0..1000000000"
    )
    assert refused(completion_tokens=MAX_TOKENS + 1) == (
        "request x: token counts 100, 1000000001 are not 0..1000000000"
    )
    assert refused(prompt_tokens=-1).startswith("request x: token counts -1, 50 ")
    assert refused(completion_tokens=-1).startswith("request x: token counts 100, -1 ")
    assert refused(prompt_tokens=True).startswith("request x: token counts True, 50 ")
    assert refused(completion_tokens=50.0).startswith("request x: token counts 100, 50.0 ")


FLOATS = [
    "energy_j",
    "pue",
    "kwh_billed",
    "intensity_g_per_kwh",
    "carbon_g",
    "price_usd_per_kwh",
    "cost_usd",
    "energy_cost_usd",
    "token_cost_usd",
    "carbon_cost_usd",
    "prefill_j",
    "static_j",
    "held_s",
    "embodied_g",
    "baseline_carbon_g",
    "avoided_g",
]


@pytest.mark.parametrize("name", FLOATS)
def test_a_figure_that_is_not_finite_is_named(name: str) -> None:
    assert refused(**{name: float("nan")}) == f"request x: {name} is not a finite number"
    assert refused(**{name: float("inf")}) == f"request x: {name} is not a finite number"


def test_figures_each_finite_but_past_float_together_are_refused() -> None:
    from router.ledger import FLOAT_COLUMNS

    big = 1.1e307  # 16 of them stay a float, 17 do not
    every = {n: big for n in FLOAT_COLUMNS}
    row("x", **every)
    assert refused(**every, marginal_g_per_kwh=big) == (
        "request x: the sum of its figures is not a finite number"
    )
    assert refused(marginal_g_per_kwh=float("nan")) == (
        "request x: the sum of its figures is not a finite number"
    )
    row("x", marginal_g_per_kwh=-big)  # a marginal signal can be negative, not unbounded


@pytest.mark.parametrize("name", list(ZERO))
def test_a_negative_figure_is_named(name: str) -> None:
    row("zero", **ZERO)  # zero is a figure
    assert refused(**{**ZERO, name: -1e-300}) == (
        f"request x: negative energy, carbon or cost ({name})"
    )


def test_figures_that_may_be_negative_are_kept() -> None:
    got = row("x", avoided_g=-1.0, token_cost_usd=-0.5, marginal_g_per_kwh=-3.0)
    assert (got.avoided_g, got.token_cost_usd, got.marginal_g_per_kwh) == (-1.0, -0.5, -3.0)


def test_energys_parts_cannot_exceed_it() -> None:
    row("x", energy_j=10.0, prefill_j=10.0, static_j=10.0)  # equal: all of it
    assert refused(energy_j=10.0, prefill_j=10.5) == (
        "request x: prefill_j 10.5 or static_j 0.0 is more than its energy_j 10.0"
    )
    assert refused(energy_j=10.0, static_j=11.0) == (
        "request x: prefill_j 0.0 or static_j 11.0 is more than its energy_j 10.0"
    )


def test_times_are_utc_and_stored_in_one_form() -> None:
    canonical = "2026-11-01T23:00:00.000000+00:00"
    for name in ("started_at", "ended_at", "first_token_at", "intensity_at"):
        assert getattr(row("x", **{name: "2026-11-01T23:00:00Z"}), name) == canonical
        assert refused(**{name: "2026-11-01T23:00:00+01:00"}) == (
            f"request x: {name} must be UTC, got 2026-11-01T23:00:00+01:00"
        )
        assert refused(**{name: "2026-11-01T23:00:00"}) == (
            f"request x: {name} must be UTC, got 2026-11-01T23:00:00"
        )
        assert refused(**{name: "yesterday"}) == (
            f"request x: {name} 'yesterday': Invalid isoformat string: 'yesterday'"
        )
    # not known: the first token of an answer that had none, the time of an intensity
    got = row("x", first_token_at=None, intensity_at="")
    assert (got.first_token_at, got.intensity_at) == (None, "")
    assert refused(started_at="").startswith("request x: started_at '': ")
    assert refused(ended_at="").startswith("request x: ended_at '': ")
    # each near miss of the stored form is stored in it
    near_misses = (
        "2026-11-01t23:00:00.000000+00:00",
        "2026-11-01 23:00:00.000000+00:00",
        "2026-11-01T23:00:00,000000+00:00",
        "2026-11-01T23:00:00.000000-00:00",
        "2026-11-01T23:00:00.000000+00:00:00",
    )
    for near in near_misses:
        assert row("x", started_at=near).started_at == canonical, near
    assert row("x", started_at=canonical).started_at == canonical


# ---- opening, migrating and writing, exactly -------------------------------------------------


def test_a_ledger_that_cannot_be_opened_or_is_not_ours_says_so(tmp_path: Path) -> None:
    nowhere = tmp_path / "no" / "l.sqlite"
    with pytest.raises(LedgerError) as e:
        Ledger(nowhere)
    assert str(e.value) == f"{nowhere}: cannot open the ledger: unable to open database file"
    newer = tmp_path / "newer.sqlite"
    Ledger(newer).close()
    with closing(sqlite3.connect(newer)) as db:
        db.execute("PRAGMA user_version=6")
    with pytest.raises(LedgerError) as e:
        Ledger(newer)
    assert str(e.value) == (
        f"{newer}: ledger schema v6 is newer than this carbon-router (v5); upgrade "
        "carbon-router to read it. Nothing was changed"
    )
    foreign = tmp_path / "foreign.sqlite"
    with closing(sqlite3.connect(foreign)) as db:
        db.execute("CREATE TABLE t (x)")
        db.execute("CREATE TABLE s (x)")
    with pytest.raises(LedgerError) as e:
        Ledger(foreign)
    assert str(e.value) == (
        f"{foreign}: not a carbon-router ledger (tables ['s', 't'] and no schema version); "
        "point --ledger at a new file"
    )


def test_a_failed_migration_changes_nothing_and_names_its_version(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from router.ledger import MIGRATIONS

    path = tmp_path / "v3.sqlite"
    with closing(sqlite3.connect(path)) as db:
        for v in range(3):
            db.executescript(MIGRATIONS[v])  # type: ignore[arg-type]
        db.execute("CREATE TABLE usage_daily (x)")  # in the way of v4's
        db.execute("PRAGMA user_version=3")
        db.commit()
    with pytest.raises(LedgerError) as e:
        Ledger(path)
    assert str(e.value) == (f"{path}: migration from v3 failed: table usage_daily already exists")
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        assert (
            db.execute("SELECT sql FROM sqlite_master WHERE name = 'requests_v5'").fetchall() == []
        )
    with closing(sqlite3.connect(path)) as db:
        db.execute("DROP TABLE usage_daily")
    with caplog.at_level(logging.INFO, logger="router.ledger"):
        assert Ledger(path).schema_version == 5
    assert caplog.messages == [f"migrated ledger {path} from schema v3 to v5"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="router.ledger"):
        Ledger(tmp_path / "new.sqlite")  # made, not migrated: nothing to say
        Ledger(path)
    assert caplog.messages == []


def test_the_ledger_is_durable_and_usable_from_any_thread(tmp_path: Path) -> None:
    import threading

    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert ledger._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert ledger._db.isolation_level is None and ledger._reader.isolation_level is None
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(ledger.write([row("t")])))
    t.start()
    t.join()
    got: list[LedgerRow | None] = []
    t = threading.Thread(target=lambda: got.append(ledger.get("t")))
    t.start()
    t.join()
    assert done == [1] and got == [row("t")]


def test_a_batch_of_thousands_skips_each_known_id_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger.write([]) == 0
    batch = [row(f"r{k}") for k in range(1400)]
    assert ledger.write(batch) == 1400
    # every id known but one, past SQLite's bound parameters in one query, the new one twice
    assert ledger.write([*batch, row("new"), row("new")]) == 1
    assert ledger.count() == 1401
    assert ledger.heads()["acme"][0] == 1401


def test_one_write_chains_each_tenants_rows_after_its_own_head(tmp_path: Path) -> None:
    from router.chain import GENESIS

    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([row("a1")])
    ledger.write([row("b1", tenant="bolt"), row("a2"), row("b2", tenant="bolt"), row("a3")])
    a = [ledger.receipt(f"a{k}") for k in (1, 2, 3)]
    b = [ledger.receipt(f"b{k}") for k in (1, 2)]
    assert [r["tenant_seq"] for r in a] == [1, 2, 3]  # type: ignore[index]
    assert [r["tenant_seq"] for r in b] == [1, 2]  # type: ignore[index]
    assert b[0]["prev_hash"] == GENESIS and b[1]["prev_hash"] == b[0]["row_hash"]  # type: ignore[index]
    assert a[1]["prev_hash"] == a[0]["row_hash"] and a[2]["prev_hash"] == a[1]["row_hash"]  # type: ignore[index]
    # one write, one time joined
    assert a[1]["chained_at"] == a[2]["chained_at"] == b[0]["chained_at"] > a[0]["chained_at"]  # type: ignore[index]


def test_rows_billed_before_receipts_are_chained_per_tenant_in_time_order(tmp_path: Path) -> None:
    from router.chain import GENESIS, canonical, link
    from router.ledger import MIGRATIONS

    path = tmp_path / "v4.sqlite"
    t = datetime(2026, 11, 3, 12, tzinfo=UTC)
    later = t + timedelta(minutes=2)
    old = [row("b", later), row("a", later), row("c", t, carbon_stale=True),
           row("z", t + timedelta(minutes=1), tenant="bolt")]  # fmt: skip
    with closing(sqlite3.connect(path)) as db:
        for v in range(4):
            step = MIGRATIONS[v]
            for stmt in step.split(";") if isinstance(step, str) else step:
                assert isinstance(stmt, str)
                db.execute(stmt)
        marks = ", ".join("?" for _ in V4_COLUMNS)
        db.executemany(f"INSERT INTO requests ({', '.join(V4_COLUMNS)}) VALUES ({marks})",
                       [[getattr(r, c) for c in V4_COLUMNS] for r in old])  # fmt: skip
        db.execute("PRAGMA user_version=4")
        db.commit()
    before = datetime.now(UTC)
    ledger = Ledger(path)
    # acme's by start time, then request id; bolt's its own chain
    chain = list(ledger.chain("acme"))
    assert [(r[0], r[2]) for r in chain] == [("c", 1), ("a", 2), ("b", 3)]
    assert [(r[0], r[2]) for r in ledger.chain("bolt")] == [("z", 1)]
    prev = GENESIS
    for rid, _, _, at, prev_hash, h, receipt in chain:
        assert datetime.fromisoformat(at) >= before
        got = ledger.receipt(rid)
        assert got is not None and prev_hash == prev
        assert receipt.encode() == canonical(got) and h == link(prev, receipt.encode())
        prev = h
    assert ledger.heads() == {"acme": (3, prev), "bolt": (1, ledger.receipt("z")["row_hash"])}  # type: ignore[index]
    # a row billed on a stale intensity says so in the field receipts added; the rest default
    c, a = ledger.get("c"), ledger.get("a")
    assert c is not None and a is not None
    assert (c.intensity_kind, a.intensity_kind) == ("stale", "actual")
    assert c == row("c", t, carbon_stale=True, intensity_kind="stale")
    assert ledger.write([row("d", t)]) == 1 and ledger.receipt("d")["tenant_seq"] == 4  # type: ignore[index]


def test_each_column_is_generated_from_the_receipt_with_its_type_and_check() -> None:
    from router.chain import _bool, _float, _int, _str
    from router.ledger import _column

    gen = "GENERATED ALWAYS AS (json_extract(receipt, '$[{}]')) VIRTUAL"
    assert _column(9, "energy_j", _float) == (
        f"energy_j REAL {gen.format(9)} NOT NULL CHECK (energy_j >= 0)"
    )
    assert _column(7, "prompt_tokens", _int) == (
        f"prompt_tokens INTEGER {gen.format(7)} NOT NULL CHECK (prompt_tokens >= 0)"
    )
    assert _column(15, "carbon_stale", _bool) == f"carbon_stale INTEGER {gen.format(15)} NOT NULL"
    assert _column(0, "request_id", _str) == f"request_id TEXT {gen.format(0)} NOT NULL"
    assert _column(25, "first_token_at", _str) == f"first_token_at TEXT {gen.format(25)}"
    assert _column(34, "marginal_g_per_kwh", _float) == f"marginal_g_per_kwh REAL {gen.format(34)}"
    assert _column(3, "pue", _float) == f"pue REAL {gen.format(3)} NOT NULL CHECK (pue >= 1)"


def test_a_writer_waits_half_a_minute_for_anothers_lock(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    assert ledger._db.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000
    assert ledger._reader.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000


def test_ledger_times_are_utc_whatever_the_local_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time
    from datetime import timezone

    with pytest.raises(LedgerError) as e:
        utc_iso(datetime(2026, 11, 3, 12))  # noqa: DTZ001  # naive on purpose
    assert str(e.value) == "naive datetime 2026-11-03 12:00:00; ledger times are UTC"
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        when = datetime(2026, 11, 3, 14, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
        assert utc_iso(when) == "2026-11-03T12:00:00.000005+00:00"
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_period_starting_or_ending_inside_a_second_sums_its_own_rows(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    d1 = datetime(2026, 11, 1, tzinfo=UTC)
    ledger.write([row("a", d1 + timedelta(hours=23, minutes=59, seconds=59)),
                  row("b", d1 + timedelta(days=1, seconds=10)),
                  row("c", d1 + timedelta(days=1, microseconds=500)),
                  row("f", d1 + timedelta(days=1, microseconds=100)),
                  row("d", d1 + timedelta(days=2, seconds=20)),
                  row("e", d1 + timedelta(days=3, hours=1))])  # fmt: skip
    # from 05:00:30.5 on day 1 to 00:00:15.25 on day 3
    start = d1 + timedelta(hours=5, seconds=30, microseconds=500)
    end = d1 + timedelta(days=2, seconds=15, microseconds=250)
    assert ledger.usage_page("acme", start=start, end=end).totals["requests"] == 4
    assert (
        ledger.usage_page("acme", start=start, end=end + timedelta(seconds=5)).totals["requests"]
        == 5
    )
    assert ledger.spend("acme", d1 + timedelta(days=1, seconds=5))[0] == pytest.approx(
        3 * row("x").kwh_billed
    )


def test_a_page_is_its_limit_and_says_whether_more_follow(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    t0 = datetime(2026, 11, 1, tzinfo=UTC)
    ledger.write([row(f"r{k:03d}", t0 + timedelta(seconds=k)) for k in range(101)])
    ledger.write([row("z", t0, tenant="bolt")])
    page = ledger.usage_page("acme")
    assert len(page.rows) == 100 and page.has_more  # 100 a page by default
    exact = ledger.usage_page("acme", limit=101)
    assert len(exact.rows) == 101 and not exact.has_more
    everyone = ledger.usage_page(None, after="r099")
    assert [r.request_id for r in everyone.rows] == ["r100"] and not everyone.has_more
    # everyone's rows by start time, then request id: z (at t0) is after r000
    assert [r.request_id for r in ledger.usage_page(None, after="z", limit=2).rows] == [
        "r001",
        "r002",
    ]
    with pytest.raises(LedgerError, match="^no row z to page after$"):
        ledger.usage_page("acme", after="z")  # another tenant's id: unknown
    assert ledger.get("nope") is None


def test_idle_energy_and_readings_per_replica(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    t = datetime(2026, 11, 3, 12, tzinfo=UTC)
    assert ledger.idle_j() == 0.0 and ledger.idle_j("a") == 0.0
    ledger.write_idle("a", t, t + timedelta(minutes=1), 5.0)
    ledger.write_idle("b", t, t + timedelta(minutes=1), 7.0)
    assert (ledger.idle_j("a"), ledger.idle_j("b"), ledger.idle_j()) == (5.0, 7.0, 12.0)
    ledger.write_readings("a", [(2.0, "w2", 20.0), (1.0, "w1", 10.0)], "measured")
    ledger.write_readings("b", [(1.0, "w1", 99.0)], "estimated")
    assert ledger.readings("a") == [(1.0, "w1", 10.0), (2.0, "w2", 20.0)]
    ledger.write([row("new", t + timedelta(seconds=1), prompt_tokens=1),
                  row("old", t, prompt_tokens=2), row("bad", t, status="error"),
                  row("far", t, replica="other")])  # fmt: skip
    assert ledger.measured_rows("eu-north-0") == [(1, 50, 360.0), (2, 50, 360.0)]
    assert ledger.measured_rows("eu-north-0", limit=1) == [(1, 50, 360.0)]


def test_a_periods_whole_days_are_read_from_their_sums_not_their_rows(tmp_path: Path) -> None:
    """The small form of test_ledger_scale's: a thousand more rows inside a period's whole
    days cost its totals nothing; inside its partial days they would. Day 2 is whole in a
    period from noon on day 1 and in one from midnight starting it."""
    ledger = Ledger(tmp_path / "l.sqlite")
    d1 = datetime(2026, 11, 1, tzinfo=UTC)
    d2, end = d1 + timedelta(days=1), d1 + timedelta(days=2, hours=12)
    ledger.write([row("a", d1 + timedelta(hours=12)), row("b", end - timedelta(hours=1))])

    def steps(start: datetime) -> int:
        n = 0

        def tick() -> int:
            nonlocal n
            n += 1
            return 0

        ledger._reader.set_progress_handler(tick, 100)
        try:
            assert ledger.usage_page("acme", start=start, end=end, limit=1).totals
        finally:
            ledger._reader.set_progress_handler(None, 0)
        return n

    starts = (d1 + timedelta(hours=12), d2)
    before = [steps(s) for s in starts]
    ledger.write([row(f"m{k}", d2 + timedelta(seconds=k)) for k in range(1000)])
    assert ledger.usage_page("acme", start=starts[0], end=end).totals["requests"] == 1002
    assert ledger.usage_page("acme", start=d2, end=end).totals["requests"] == 1001
    after = [steps(s) for s in starts]
    assert after[0] <= before[0] + 2 and after[1] <= before[1] + 2, (before, after)


def test_a_tenants_rows_of_a_period_in_time_order(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    t = datetime(2026, 11, 3, 12, tzinfo=UTC)
    m = timedelta(minutes=1)
    ledger.write([row("c", t + 2 * m), row("a", t), row("b", t + m), row("x", t, tenant="bolt")])
    assert [r.request_id for r in ledger.tenant_rows("acme")] == ["a", "b", "c"]
    assert [r.request_id for r in ledger.tenant_rows(None)] == ["a", "x", "b", "c"]
    got = ledger.tenant_rows("acme", t + timedelta(minutes=1), t + timedelta(minutes=2))
    assert got == [row("b", t + timedelta(minutes=1))]
    assert [r.request_id for r in ledger.tenant_rows("acme", end=t + timedelta(minutes=1))] == ["a"]


def test_a_top_list_is_ten_tenants_by_default(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    t = datetime(2026, 11, 3, 12, tzinfo=UTC)
    ledger.write([row("r", t), row("r2", t)])
    ledger.write([row(f"t{k}", t, tenant=f"t{k:02d}") for k in range(11)])
    top = ledger.top_tenants(t, t + timedelta(hours=1))
    assert [x["tenant"] for x in top] == ["acme"] + [f"t{k:02d}" for k in range(9)]


def test_a_chain_read_can_go_on_in_another_thread(tmp_path: Path) -> None:
    import threading

    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([row("a"), row("b")])
    rows = ledger.chain("acme", batch=1)
    got = [next(rows)]
    t = threading.Thread(target=lambda: got.extend(rows))
    t.start()
    t.join()
    assert [r[0] for r in got] == ["a", "b"]
