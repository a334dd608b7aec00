"""Receipts an auditor can check: the per-tenant hash chain, signed heads, exports, and
`router verify` failing on any edited, inserted, reordered or deleted row."""

from __future__ import annotations

import io
import shutil
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.chain import GENESIS, HASHED_NAMES, row_hash
from router.ledger import Ledger, LedgerRow, utc_iso
from router.receipts import (
    ReceiptError,
    Signer,
    export,
    sign_heads,
    verify_export,
    verify_ledger,
)

T0 = datetime(2026, 11, 3, 12, tzinfo=UTC)


def receipt_row(rid: str, tenant: str = "acme", k: int = 0, **kw: Any) -> LedgerRow:
    when = T0 + timedelta(minutes=k)
    base: dict[str, Any] = dict(
        request_id=rid, tenant=tenant, region="eu-north", replica="eu-north-0", model="m",
        started_at=utc_iso(when), ended_at=utc_iso(when + timedelta(seconds=2)),
        prompt_tokens=100 + k, completion_tokens=50, energy_j=360.0 + k, energy_source="measured",
        pue=1.2, kwh_billed=(360.0 + k) / 3.6e6 * 1.2, intensity_g_per_kwh=50.0,
        signal="average", carbon_stale=False, carbon_g=0.006, price_usd_per_kwh=0.1,
        tariff="energy", cost_usd=1.2e-5, energy_cost_usd=1.2e-5, token_cost_usd=0.0,
        carbon_cost_usd=0.0, zone="SE-SE1", first_token_at=utc_iso(when + timedelta(seconds=1)),
        prefill_j=60.0, static_j=100.0, held_s=0.5, meter="nvml-energy", method="work-share/1",
        intensity_at=utc_iso(when.replace(minute=0)), intensity_source="electricitymaps",
        intensity_kind="actual", marginal_g_per_kwh=None, embodied_g=0.0021, policy="price_carbon",
        binding="score", baseline_replica="us-east-0", baseline_carbon_g=0.05, avoided_g=0.044,
    )  # fmt: skip
    base.update(kw)
    return LedgerRow(**base)


def filled(path: Path, n: int = 6) -> Ledger:
    ledger = Ledger(path)
    rows = []
    for k in range(n):
        rows.append(receipt_row(f"a{k}", "acme", k, avoided_g=-0.01 if k == 2 else 0.044))
        rows.append(receipt_row(f"b{k}", "bolt", k, marginal_g_per_kwh=420.0))
    ledger.write(rows[:6])
    ledger.write(rows[6:])
    return ledger


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.load(tmp_path / "key.pem", create=True)


def test_each_tenants_rows_form_a_chain_from_genesis(tmp_path: Path) -> None:
    ledger = filled(tmp_path / "l.sqlite")
    a = [ledger.receipt(f"a{k}") for k in range(6)]
    assert [r["tenant_seq"] for r in a if r] == [1, 2, 3, 4, 5, 6]
    assert a[0] is not None and a[0]["prev_hash"] == GENESIS
    for before, after in zip(a, a[1:], strict=False):
        assert before is not None and after is not None
        assert after["prev_hash"] == before["row_hash"]
        assert after["row_hash"] == row_hash(after["prev_hash"], after)
    # a retried write neither bills twice nor moves the chain
    assert ledger.write([receipt_row("a3", "acme", 3, energy_j=999.0)]) == 0
    assert ledger.heads()["acme"] == (6, a[-1]["row_hash"] if a[-1] else "")


def test_a_clean_ledger_verifies_with_its_signed_heads(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite")
    assert sign_heads(ledger, signer) == 2
    assert sign_heads(ledger, signer) == 0  # heads already signed are not signed again
    ledger.write([receipt_row("a9", "acme", 9)])
    report = verify_ledger(ledger, [signer.public_key])
    assert report.ok, report.problems
    assert (report.rows, report.tenants, report.signatures) == (13, 2, 2)
    assert report.notes == ["acme: rows 7..7 are after its last signed head"]


def test_rows_are_append_only_in_the_ledger(tmp_path: Path) -> None:
    ledger = filled(tmp_path / "l.sqlite")
    with (
        closing(sqlite3.connect(ledger.path)) as db,
        pytest.raises(sqlite3.IntegrityError, match="append-only"),
    ):
        db.execute("UPDATE requests SET row_hash = '' WHERE request_id = 'a1'")
    with (
        closing(sqlite3.connect(ledger.path)) as db,
        pytest.raises(sqlite3.IntegrityError, match="append-only"),
    ):
        db.execute("DELETE FROM requests WHERE request_id = 'a1'")


def _tampered(
    tmp_path: Path, ledger: Ledger, sql: str, params: tuple[Any, ...] = (), *,
    chain_index: bool = True,
) -> Ledger:  # fmt: skip
    """A copy of ``ledger`` changed by someone who dropped the append-only triggers and the
    chain's unique index, then made them again exactly as they were (their SQL read before
    they were dropped), so that verify finds the change itself, not a missing index.
    ``chain_index=False``: left dropped, for a change the index refuses (two rows at one seq
    of one chain), which verify must name besides the index."""
    ledger.close()
    copy = tmp_path / f"t{len(list(tmp_path.iterdir()))}.sqlite"
    shutil.copy(ledger.path, copy)
    with closing(sqlite3.connect(copy)) as db:
        (index_sql,) = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = 'requests_chain'"
        ).fetchone()
        triggers = [sql for (sql,) in db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name IN "
            "('requests_append_only_update', 'requests_append_only_delete')")]  # fmt: skip
        assert len(triggers) == 2
        db.execute("DROP TRIGGER requests_append_only_update")
        db.execute("DROP TRIGGER requests_append_only_delete")
        db.execute("DROP INDEX requests_chain")
        db.execute(sql, params)
        if chain_index:
            db.execute(index_sql)
        for trigger in triggers:  # put back as they were: verify finds the change itself
            db.execute(trigger)
        db.commit()
    return Ledger(copy)


ENUMS = {"energy_source": "estimated", "intensity_kind": "forecast", "signal": "marginal",
         "status": "error"}  # fmt: skip


def _other(value: Any, column: str = "") -> Any:
    if column in ENUMS:
        return ENUMS[column]
    if isinstance(value, bool):
        return int(not value)
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.000001 + 1e-12
    if value is None:
        return 1.0
    return str(value) + "x"


def _edit(field: str) -> str:
    """SQL that sets ``field`` of request ? to ?: in the hashed receipt, which every column is
    generated from, or the chain's own columns."""
    if field in ("prev_hash", "row_hash", "chain_version"):
        return f"UPDATE requests SET {field} = ? WHERE request_id = ?"
    k = HASHED_NAMES.index(field)
    return f"UPDATE requests SET receipt = json_set(receipt, '$[{k}]', ?) WHERE request_id = ?"


def test_a_column_cannot_be_edited_apart_from_its_hashed_receipt(tmp_path: Path) -> None:
    ledger = filled(tmp_path / "l.sqlite")
    bad = _tampered(tmp_path, ledger, _edit("cost_usd"), (0.0, "a2"))
    assert bad.get("a2").cost_usd == 0.0  # type: ignore[union-attr]  # the column follows
    with (
        closing(sqlite3.connect(bad.path)) as db,
        pytest.raises(sqlite3.OperationalError, match="generated column"),
    ):
        db.execute("UPDATE requests SET cost_usd = 0 WHERE request_id = 'a3'")
    _names(verify_ledger(bad), EDITED.format(rid="a2", seq=3))


def test_a_redefined_table_is_found(tmp_path: Path) -> None:
    """An attacker who rebuilds the table with a column no longer generated from the receipt
    (so it can show another figure than the one hashed) is found by its schema."""
    ledger = filled(tmp_path / "l.sqlite")
    ledger.close()
    with closing(sqlite3.connect(ledger.path)) as db:
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'requests'").fetchone()[0]
        db.execute("PRAGMA writable_schema = ON")
        db.execute(
            "UPDATE sqlite_master SET sql = ? WHERE name = 'requests'",
            (sql.replace("json_extract(receipt, '$[19]')", "json_extract(receipt, '$[20]')"),),
        )
        db.commit()
    report = verify_ledger(Ledger(ledger.path))
    assert not report.ok and "redefined" in report.problems[0]


@pytest.mark.parametrize("column", [*HASHED_NAMES, "prev_hash", "row_hash", "chain_version"])
def test_verify_finds_any_field_of_any_row_edited(
    tmp_path: Path, signer: Signer, column: str
) -> None:
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    before = ledger.receipt("a2")
    assert before is not None
    # tenant_seq: to a seq no row has, or the chain's unique index would refuse it
    value = 99 if column == "tenant_seq" else _other(before[column], column)
    bad = _tampered(tmp_path, ledger, _edit(column), (value, "a2"))
    report = verify_ledger(bad, [signer.public_key])
    rid = value if column == "request_id" else "a2"
    if column == "chain_version":  # not hashed: the version the rest was hashed by
        _names(report, "ledger (request a2, seq 3): its chain_version is 2, a version this "
               "carbon-router does not know (it hashes version 1): edited, or written by a "
               "newer carbon-router")  # fmt: skip
        assert len(report.problems) == 1, report.problems
        return
    _names(report, EDITED.format(rid=rid, seq=value if column == "tenant_seq" else 3))


DUE = "ledger (request {rid}, seq {seq}): seq {seq} where {due} was due (a row deleted, inserted or reordered)"  # noqa: E501
EDITED = "ledger (request {rid}, seq {seq}): its fields do not hash to its row_hash (edited)"
NO_CHAIN_INDEX = "the index requests_chain (CREATE UNIQUE INDEX requests_chain ON requests (tenant, tenant_seq)) is missing or changed: without it a request could be billed twice"  # noqa: E501


def _names(report: Any, *problems: str, chain_index: bool = True) -> None:
    """``report`` names each of ``problems`` (a problem, or the end of one: what follows the
    place it names), and the chain's unique index is reported only when the change dropped
    it: a tamper test fails on its change, never on the index alone."""
    for want in problems:
        assert any(p == want or p.endswith(want) for p in report.problems), (
            want, report.problems)  # fmt: skip
    assert (NO_CHAIN_INDEX in report.problems) is not chain_index, report.problems


@pytest.mark.parametrize(
    "sql,params,named",
    [
        ("DELETE FROM requests WHERE request_id = ?", ("a2",),  # from the middle
         DUE.format(rid="a3", seq=4, due=3)),
        ("DELETE FROM requests WHERE request_id = ?", ("a0",),  # the first
         DUE.format(rid="a1", seq=2, due=1)),
        ("DELETE FROM requests WHERE request_id = ?", ("a5",),  # the last, under a signed head
         "the chain has no row 6 (rows deleted)"),
        (_edit("tenant_seq"), (99, "a1"), DUE.format(rid="a1", seq=99, due=2)),  # moved
    ],
)  # fmt: skip
def test_verify_finds_rows_deleted_or_moved(
    tmp_path: Path, signer: Signer, sql: str, params: tuple[Any, ...], named: str
) -> None:
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    _names(verify_ledger(_tampered(tmp_path, ledger, sql, params), [signer.public_key]), named)


def test_verify_finds_a_row_moved_to_another_chain(tmp_path: Path, signer: Signer) -> None:
    """a3 made bolt's: bolt has a row 4 already, so the chain's unique index had to go."""
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    b2 = ledger.receipt("b2")
    assert b2 is not None
    bad = _tampered(tmp_path, ledger, _edit("tenant"), ("bolt", "a3"), chain_index=False)
    report = verify_ledger(bad, [signer.public_key])
    _names(report, EDITED.format(rid="a3", seq=4), DUE.format(rid="a4", seq=5, due=4),
           DUE.format(rid="b3", seq=4, due=5), chain_index=False)  # fmt: skip
    assert any(p.startswith("ledger (request a3, seq 4): follows ") and
               p.endswith(f"the row before it hashes to {b2['row_hash'][:12]}… (a row deleted, "
                          "inserted, reordered or edited before it)")
               for p in report.problems), report.problems  # fmt: skip


def test_verify_finds_two_rows_swapped(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    k = HASHED_NAMES.index("tenant_seq")
    bad = _tampered(tmp_path, ledger,
                    f"UPDATE requests SET receipt = json_set(receipt, '$[{k}]', "
                    "CASE request_id WHEN 'a0' THEN 2 ELSE 1 END) "
                    "WHERE request_id IN ('a0', 'a1')")  # fmt: skip
    _names(verify_ledger(bad, [signer.public_key]), DUE.format(rid="a0", seq=2, due=1),
           DUE.format(rid="a1", seq=1, due=3), EDITED.format(rid="a0", seq=2))  # fmt: skip


def _write_receipt(db: sqlite3.Connection, r: dict[str, Any], prev: str) -> str:
    """Store ``r`` as a forger would: its receipt, its link and a hash that is right."""
    from router.chain import canonical, link

    body = canonical(r)
    h = link(prev, body)
    db.execute(
        "INSERT INTO requests (receipt, prev_hash, row_hash, chain_version) VALUES (?, ?, ?, 1)",
        (body.decode(), prev, h),
    )
    return h


def test_verify_finds_an_inserted_row_even_with_its_own_hash_right(
    tmp_path: Path, signer: Signer
) -> None:
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    a1 = ledger.receipt("a1")
    assert a1 is not None
    # a second row 2 of acme's chain: its unique index had to go
    bad = _tampered(tmp_path, ledger, "SELECT 1", chain_index=False)
    with closing(sqlite3.connect(bad.path)) as db:
        _write_receipt(db, {**a1, "request_id": "forged", "tenant_seq": 2}, a1["row_hash"])
        db.commit()
    report = verify_ledger(bad, [signer.public_key])
    _names(report, DUE.format(rid="forged", seq=2, due=7), chain_index=False)


def test_history_rewritten_with_fresh_hashes_fails_on_the_signed_head(
    tmp_path: Path, signer: Signer
) -> None:
    """An attacker who edits a row and recomputes every hash after it keeps the chain whole;
    the head signed before the edit no longer matches."""
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    bad = rewrite_acme(tmp_path, ledger)
    report = verify_ledger(bad, [signer.public_key])
    assert not report.ok
    assert any("history rewritten" in p for p in report.problems), report.problems
    _names(report)  # the chain itself is whole again, and so is its index


@pytest.mark.parametrize("kwh", [1.5, "1.5"], ids=["float", "text"])
def test_verify_sums_the_figures_of_the_receipts_it_hashes(
    tmp_path: Path, signer: Signer, kwh: Any
) -> None:
    """verify reads each row's figures for the sums check from the receipt it hashes, in the
    same pass, and reports what Ledger.sums_check reports on its own; a figure forged as
    JSON text (SQLite reads '1.5' as 1.5 in a REAL column) is summed as SQLite reads it."""
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    bad = _tampered(tmp_path, ledger, _edit("kwh_billed"), (kwh, "a2"))
    report = verify_ledger(bad, [signer.public_key])
    sums = bad.sums_check()
    assert len(sums) == 2 and report.problems[-2:] == sums, report.problems
    hourly, daily = sums
    assert hourly.startswith("hourly sums 2026-11-03T12 acme eu-north score: kwh 0.0007")
    assert daily.startswith("daily sums acme 2026-11-03: kwh 0.0007")
    assert "(rows: 1.500" in hourly and "(rows: 1.500" in daily
    assert verify_ledger(bad, [signer.public_key], sums=False).problems == report.problems[:-2]


def test_a_head_signed_by_an_untrusted_key_is_a_problem(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite")
    other = Signer.load(tmp_path / "other.pem", create=True)
    sign_heads(ledger, other)
    assert not verify_ledger(ledger, [signer.public_key]).ok
    assert verify_ledger(ledger, [other.public_key]).ok


# ---- exports --------------------------------------------------------------------------------


def _export(ledger: Ledger, signer: Signer, tenant: str = "acme") -> list[bytes]:
    out = io.BytesIO()
    export(ledger, tenant, None, None, signer, out)
    return out.getvalue().splitlines(keepends=True)


def _check(lines: list[bytes], signer: Signer) -> Any:
    return verify_export(io.BytesIO(b"".join(lines)), [signer.public_key])


def test_an_export_verifies_and_holds_only_its_tenant(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    lines = _export(ledger, signer)
    report = _check(lines, signer)
    assert report.ok, report.problems
    assert report.rows == 6 and report.signatures == 1
    names = orjson.loads(lines[0])["fields"]
    receipts = [dict(zip(names, orjson.loads(x)["receipt"], strict=True)) for x in lines[1:-1]]
    assert {r["tenant"] for r in receipts} == {"acme"}
    assert [r["request_id"] for r in receipts] == [f"a{k}" for k in range(6)]
    # without a trusted key it still checks, and says whose key it used
    alone = verify_export(io.BytesIO(b"".join(lines)))
    assert alone.ok and signer.key_id in alone.notes[0]


@pytest.mark.parametrize("field", [*HASHED_NAMES, "prev_hash", "row_hash"])
def test_an_export_fails_on_any_field_edited(tmp_path: Path, signer: Signer, field: str) -> None:
    lines = _export(filled(tmp_path / "l.sqlite"), signer)
    rec = orjson.loads(lines[3])
    if field in ("prev_hash", "row_hash"):
        rec[field] = _other(rec[field], field)
    else:
        k = HASHED_NAMES.index(field)
        rec["receipt"][k] = _other(rec["receipt"][k], field)
    lines[3] = orjson.dumps(rec) + b"\n"
    assert not _check(lines, signer).ok


def _delete(lines: list[bytes], i: int) -> list[bytes]:
    return lines[:i] + lines[i + 1 :]


def _swap(lines: list[bytes], i: int) -> list[bytes]:
    return lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2 :]


@pytest.mark.parametrize(
    "change",
    [
        lambda ls: _delete(ls, 1),  # the first receipt
        lambda ls: _delete(ls, 3),  # one in the middle
        lambda ls: _delete(ls, len(ls) - 2),  # the last receipt
        lambda ls: _delete(ls, len(ls) - 1),  # the trailer: cut short
        lambda ls: ls[:3] + [ls[3]] + ls[3:],  # a receipt twice
        lambda ls: _swap(ls, 2),  # two reordered
        lambda ls: ls[:-1] + [ls[2]] + ls[-1:],  # an earlier receipt appended
        lambda ls: ls + [ls[2]],  # a line after the end
    ],
    ids=["first", "middle", "last", "trailer", "twice", "swapped", "appended", "after-end"],
)
def test_an_export_fails_on_rows_deleted_inserted_or_reordered(
    tmp_path: Path, signer: Signer, change: Any
) -> None:
    lines = _export(filled(tmp_path / "l.sqlite"), signer)
    assert not _check(change(lines), signer).ok


@pytest.mark.parametrize("part,key", [(0, "tenant"), (0, "anchor"), (0, "period_start"),
                                      (-1, "count"), (-1, "exported_at")])  # fmt: skip
def test_an_export_fails_when_its_header_or_trailer_is_edited(
    tmp_path: Path, signer: Signer, part: int, key: str
) -> None:
    lines = _export(filled(tmp_path / "l.sqlite"), signer)
    rec = orjson.loads(lines[part])
    rec[key] = _other(rec[key])
    lines[part] = orjson.dumps(rec) + b"\n"
    assert not _check(lines, signer).ok


def test_an_export_signed_by_another_key_is_refused(tmp_path: Path, signer: Signer) -> None:
    other = Signer.load(tmp_path / "other.pem", create=True)
    lines = _export(filled(tmp_path / "l.sqlite"), other)
    report = _check(lines, signer)
    assert not report.ok and "not a trusted key" in report.problems[0]


def test_a_month_export_links_to_the_month_before(tmp_path: Path, signer: Signer) -> None:
    """Exports of consecutive periods chain: the second's anchor is the first's head."""
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([receipt_row("m1", "acme", 0), receipt_row("m2", "acme", 1)])
    cut = datetime.now(UTC)
    ledger.write([receipt_row("m3", "acme", 2)])
    first, second = io.BytesIO(), io.BytesIO()
    t1 = export(ledger, "acme", None, cut, signer, first)
    export(ledger, "acme", cut, None, signer, second)
    head = orjson.loads(second.getvalue().splitlines()[0])
    assert t1["count"] == 2 and head["first_seq"] == 3 and head["anchor"] == t1["head_hash"]
    assert verify_export(io.BytesIO(second.getvalue()), [signer.public_key]).ok


def test_not_an_export_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ReceiptError, match="not a carbon-router-receipts/1 export"):
        verify_export(io.BytesIO(b'{"format": "x"}\n'))
    with pytest.raises(ReceiptError, match="line 1: not JSON"):
        verify_export(io.BytesIO(b"garbage\n"))
    with pytest.raises(ReceiptError, match="empty"):
        verify_export(io.BytesIO(b""))


def v4_ledger(path: Path, rows: Iterable[LedgerRow]) -> Path:
    """A schema-v4 ledger (before receipts) holding ``rows``' v4 columns."""
    from router.ledger import COLUMNS, MIGRATIONS

    v4 = COLUMNS[: COLUMNS.index("zone")]
    with closing(sqlite3.connect(path)) as db:
        for v in range(4):
            step = MIGRATIONS[v]
            for stmt in step.split(";") if isinstance(step, str) else step:
                assert isinstance(stmt, str)
                if stmt.strip():
                    db.execute(stmt)
        db.executemany(
            f"INSERT INTO requests ({', '.join(v4)}) VALUES ({', '.join('?' * len(v4))})",
            ([getattr(r, c) for c in v4] for r in rows),
        )
        db.execute("PRAGMA user_version=4")
        db.commit()
    return path


def rewrite_acme(tmp_path: Path, ledger: Ledger) -> Ledger:
    """A copy of ``ledger`` with acme's chain rebuilt, a2 free, every hash recomputed (no
    secret needed)."""
    rows = [ledger.receipt(f"a{k}") for k in range(6)]
    bad = _tampered(tmp_path, ledger, "DELETE FROM requests WHERE tenant = 'acme'")
    with closing(sqlite3.connect(bad.path)) as db:
        prev = GENESIS
        for r in rows:
            assert r is not None
            if r["request_id"] == "a2":
                r["cost_usd"] = 0.0
            prev = _write_receipt(db, r, prev)
        db.commit()
    return bad


def test_a_v4_ledger_is_chained_when_migrated(tmp_path: Path, signer: Signer) -> None:
    old = [receipt_row(f"old{k}", t, k) for k, t in enumerate(["acme", "bolt", "acme"])]
    ledger = Ledger(v4_ledger(tmp_path / "v4.sqlite", old))
    ledger.write([receipt_row("new", "acme", 9)])
    assert ledger.heads() == {"acme": (3, ledger.receipt("new")["row_hash"]),  # type: ignore[index]
                              "bolt": (1, ledger.receipt("old1")["row_hash"])}  # type: ignore[index]  # fmt: skip
    assert verify_ledger(ledger).ok
    hours = ledger.hourly(T0, T0 + timedelta(hours=1))
    assert sum(h["requests"] for h in hours) == 4


# ---- receipts from the request path ---------------------------------------------------------


async def test_a_billed_request_has_a_receipt_that_names_where_each_figure_came_from(
    tmp_path: Path,
) -> None:
    from tests.service_kit import DEMO, INTENSITY, chat, service_kit

    async with service_kit(tmp_path) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(stream=True), headers=DEMO)
        assert r.status_code == 200
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200
        streamed, whole = kit.rows()
        for row in (streamed, whole):
            assert (row.zone, row.region, row.intensity_kind) == ("SE", "eu-north", "actual")
            assert row.intensity_source == "static (SE)" and row.intensity_at
            assert (row.meter, row.method, row.energy_source) == ("cpu", "work-share/1", "measured")
            assert (row.policy, row.binding) == ("price_carbon", "score")
            assert 0 < row.prefill_j < row.energy_j and row.held_s > 0
            assert row.embodied_g > 0 and "CPU replica" in row.embodied_basis
            # the baseline: power of two over three idle replicas takes each a third of the
            # time; they predict the same energy, all at PUE 1.2
            per_kwh = 1.2 * sum(INTENSITY.values()) / 3
            assert row.baseline_carbon_g == pytest.approx(row.energy_j / 3.6e6 * per_kwh)
            assert row.avoided_g == pytest.approx(row.baseline_carbon_g - row.carbon_g)
            assert row.avoided_g > 0
        assert streamed.first_token_at is not None
        assert streamed.started_at <= streamed.first_token_at <= streamed.ended_at
        assert verify_ledger(kit.sink.ledger).ok


async def test_a_predicted_bill_says_so_on_its_receipt(tmp_path: Path) -> None:
    from router.service.fakes import FakeReplicaClient
    from tests.service_kit import DEMO, chat, service_kit

    fakes = [FakeReplicaClient(n, energy_j=None) for n in
             ("eu-north-0", "eu-central-0", "us-south-0")]  # fmt: skip
    async with service_kit(tmp_path, replicas=fakes) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200 and r.json()["usage"]["energy_source"] == "predicted"
        (row,) = kit.rows()
        assert (row.energy_source, row.meter, row.method) == (
            "predicted",
            "energy-predictor",
            "predicted-work-share/1",
        )
        assert 0 < row.prefill_j < row.energy_j


def test_a_measurement_rebills_the_receipt_at_its_own_rates() -> None:
    """A proxied request's predicted row, billed again when the meter's figure comes: static
    power and embodied carbon at the row's rates per second held, the baseline with the
    energy, the carbon avoided from both."""
    from regions.config import Billing
    from router.billing import rebill, tariff_for

    old = receipt_row("p", energy_j=400.0, prefill_j=100.0, static_j=100.0, held_s=2.0,
                      embodied_g=0.2, baseline_carbon_g=1.0, meter="energy-predictor",
                      method="predicted-work-share/1")  # fmt: skip
    new = rebill(old, 800.0, "measured", tariff_for(Billing(tariff="energy")), prefill_j=300.0,
                 held_s=3.0, meter="nvml", method="work-share/1")  # fmt: skip
    assert (new.energy_j, new.prefill_j, new.held_s) == (800.0, 300.0, 3.0)
    assert new.static_j == pytest.approx(150.0) and new.embodied_g == pytest.approx(0.3)
    assert new.baseline_carbon_g == pytest.approx(2.0)
    assert new.avoided_g == pytest.approx(2.0 - new.carbon_g)
    assert (new.meter, new.method, new.zone, new.policy) == ("nvml", "work-share/1", "SE-SE1",
                                                             "price_carbon")  # fmt: skip


def test_a_rebill_scales_what_the_meter_did_not_give_and_uses_the_ingress_rates() -> None:
    """Without the meter's split, time or labels the row's own are scaled with the energy and
    carried; with the ingress's rates per second held and per kWh, those decide."""
    from regions.config import Billing
    from router.billing import rebill, tariff_for

    tariff = tariff_for(Billing(tariff="energy"))
    old = receipt_row("p", k=3, energy_j=400.0, prefill_j=100.0, static_j=100.0, held_s=2.0,
                      embodied_g=0.2, baseline_carbon_g=1.0, meter="energy-predictor",
                      method="predicted-work-share/1", carbon_stale=True,
                      status="cancelled")  # fmt: skip
    new = rebill(old, 800.0, "measured", tariff)
    assert (new.energy_j, new.prefill_j, new.held_s) == (800.0, 200.0, 4.0)
    assert new.static_j == pytest.approx(200.0) and new.embodied_g == pytest.approx(0.4)
    assert new.baseline_carbon_g == pytest.approx(2.0)
    assert (new.meter, new.method) == ("energy-predictor", "predicted-work-share/1")
    same = ("request_id", "tenant", "region", "replica", "model", "started_at", "ended_at",
            "prompt_tokens", "completion_tokens", "pue", "intensity_g_per_kwh", "signal",
            "carbon_stale", "price_usd_per_kwh", "status", "zone", "policy")  # fmt: skip
    assert [getattr(new, c) for c in same] == [getattr(old, c) for c in same]
    assert new.carbon_g == pytest.approx(800.0 / 3.6e6 * 1.2 * 50.0)

    rates = {"static_w": 50.0, "embodied_g_per_s": 0.25, "baseline_g_per_kwh": 900.0}
    rated = rebill(old, 800.0, "measured", tariff, held_s=3.0, rates=rates)
    assert rated.static_j == pytest.approx(150.0) and rated.embodied_g == pytest.approx(0.75)
    assert rated.baseline_carbon_g == pytest.approx(800.0 / 3.6e6 * 900.0)
    assert rated.avoided_g == pytest.approx(rated.baseline_carbon_g - rated.carbon_g)
    capped = rebill(old, 800.0, "measured", tariff, held_s=100.0, rates={"static_w": 50.0})
    assert capped.static_j == 800.0  # static power cannot exceed the energy measured
    assert capped.embodied_g == 0.0 and capped.baseline_carbon_g == pytest.approx(2.0)
    # no baseline replica: no baseline carbon from the rates either
    lone = receipt_row("q", baseline_replica="", baseline_carbon_g=0.0, avoided_g=0.0)
    alone = rebill(lone, 720.0, "measured", tariff, rates={"baseline_g_per_kwh": 900.0})
    assert alone.baseline_carbon_g == 0.0
    # a prediction of 0 J or 0 s has nothing to scale
    zero = receipt_row("z", energy_j=0.0, kwh_billed=0.0, prefill_j=0.0, static_j=0.0, held_s=0.0,
                       embodied_g=0.3, baseline_carbon_g=0.0, avoided_g=0.0)  # fmt: skip
    z = rebill(zero, 360.0, "measured", tariff)
    assert (z.prefill_j, z.held_s, z.static_j, z.embodied_g) == (0.0, 0.0, 0.0, 0.3)
    untimed = receipt_row("u", energy_j=0.0, kwh_billed=0.0, prefill_j=0.0, static_j=0.0,
                          held_s=1.0, embodied_g=0.3)  # fmt: skip
    assert rebill(untimed, 360.0, "measured", tariff).held_s == 0.0  # 0 J: no scale, not 1
    stopped = receipt_row("s", static_j=50.0, held_s=0.0, embodied_g=0.3)
    s = rebill(stopped, 360.0, "measured", tariff, held_s=3.0)
    assert (s.static_j, s.embodied_g) == (0.0, 0.3)  # 0 s held: no static rate to apply
    # small figures scale like large ones (a 0.5 J, 0.5 s prediction measured at 1 J)
    small = receipt_row("m", energy_j=0.5, kwh_billed=0.5 / 3.6e6 * 1.2, prefill_j=0.1,
                        static_j=0.25, held_s=0.5, embodied_g=0.01)  # fmt: skip
    m = rebill(small, 1.0, "estimated", tariff)
    assert m.held_s == pytest.approx(1.0) and m.static_j == pytest.approx(0.5)
    assert m.embodied_g == pytest.approx(0.02) and m.energy_source == "estimated"
    no_static = rebill(old, 800.0, "measured", tariff, held_s=3.0, rates={"embodied_g_per_s": 0.25})
    assert no_static.static_j == 0.0 and no_static.embodied_g == pytest.approx(0.75)


# ---- the commands an operator and an auditor run ---------------------------------------------


def test_an_auditor_verifies_a_month_exported_by_the_commands(tmp_path: Path) -> None:
    from router.cli import main

    ledger = filled(tmp_path / "l.sqlite")
    ledger.close()
    key, pub = tmp_path / "k.pem", tmp_path / "k.pub"
    assert main(["receipts", "keygen", str(key)]) == 0
    with pytest.raises(SystemExit, match="never overwritten"):
        main(["receipts", "keygen", str(key)])
    pub.write_text(Signer.load(key).public_key)
    led = ["--ledger", str(ledger.path), "--key", str(key)]
    assert main(["receipts", "sign", *led]) == 0
    month = datetime.now(UTC).strftime("%Y-%m")
    out = tmp_path / "acme.jsonl"
    assert main(["receipts", "export", *led, "--tenant", "acme", "--month", month,
                 "-o", str(out)]) == 0  # fmt: skip
    assert len(out.read_bytes().splitlines()) == 8  # header, 6 receipts, trailer
    assert main(["verify", str(out), "--public-key", str(pub)]) == 0
    assert main(["verify", "--ledger", str(ledger.path), "--public-key", str(pub)]) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    rec = orjson.loads(lines[2])
    rec["receipt"][HASHED_NAMES.index("cost_usd")] = 0.0
    lines[2] = orjson.dumps(rec) + b"\n"
    out.write_bytes(b"".join(lines))
    assert main(["verify", str(out), "--public-key", str(pub)]) == 1
    with pytest.raises(SystemExit, match="not YYYY-MM"):
        main(["receipts", "export", *led, "--tenant", "acme", "--month", "11/2026"])
    with pytest.raises(SystemExit, match="has no rows"):
        main(["receipts", "export", *led, "--tenant", "nobody"])


async def test_a_tenant_reads_its_own_receipts_and_chain_head_only(tmp_path: Path) -> None:
    from tests.service_kit import ADMIN, DEMO, chat, service_kit

    async with service_kit(tmp_path) as kit:
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=ADMIN)
        admins = r.json()["id"]
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        rid = r.json()["id"]
        got = await kit.client.get(f"/v1/receipts/{rid}", headers=DEMO)
        assert got.status_code == 200, got.text
        body = got.json()
        assert body["id"] == rid and body["tenant"] == "demo"
        assert body["energy"]["decode_j"] == pytest.approx(
            body["energy"]["it_j"] - body["energy"]["prefill_j"]
        )
        assert body["chain"]["tenant_seq"] == 1
        assert row_hash(body["record"]["prev_hash"], body["record"]) == body["chain"]["row_hash"]
        # another tenant's request reads as unknown; the admin reads anyone's
        assert (await kit.client.get(f"/v1/receipts/{admins}", headers=DEMO)).status_code == 404
        assert (await kit.client.get(f"/v1/receipts/{rid}", headers=ADMIN)).status_code == 200
        assert (await kit.client.get("/v1/receipts/nope", headers=DEMO)).status_code == 404
        assert (await kit.client.get(f"/v1/receipts/{rid}")).status_code == 401
        head = (await kit.client.get("/v1/receipts/head", headers=DEMO)).json()
        assert (head["tenant"], head["tenant_seq"]) == ("demo", 1)
        assert head["row_hash"] == body["chain"]["row_hash"]
        r = await kit.client.get("/v1/receipts/head?tenant=admin", headers=DEMO)
        assert r.status_code == 403


def test_usage_and_invoices_sum_the_carbon_avoided_and_embodied(tmp_path: Path) -> None:
    from router.invoice import invoice

    ledger = Ledger(tmp_path / "l.sqlite")
    day = timedelta(days=1)
    rows = [receipt_row(f"r{k}", "acme", k * 600, avoided_g=0.5 - 0.3 * (k % 3),
                        embodied_g=0.01 * k) for k in range(12)]  # fmt: skip
    ledger.write(rows)
    want_avoided, want_embodied = sum(r.avoided_g for r in rows), sum(r.embodied_g for r in rows)
    # whole days from the daily sums, the partial days at the ends from the rows
    for start, end in [(None, None), (T0 + timedelta(hours=5), T0 + 3 * day + timedelta(hours=1))]:
        page = ledger.usage_page("acme", start=start, end=end)
        inside = [r for r in rows if (start is None or r.started_at >= utc_iso(start))
                  and (end is None or r.started_at < utc_iso(end))]  # fmt: skip
        assert page.totals["carbon_avoided_g"] == pytest.approx(sum(r.avoided_g for r in inside))
        assert page.totals["embodied_g"] == pytest.approx(sum(r.embodied_g for r in inside))
    inv = invoice(ledger, "acme", T0.strftime("%Y-%m"))
    assert inv.carbon_avoided_g == pytest.approx(want_avoided)
    assert inv.embodied_g == pytest.approx(want_embodied)


def _marginal_config(decide_on: str) -> str:
    from tests.service_kit import CONFIG

    text = CONFIG.replace(
        "carbon_sources:\n",
        "carbon_sources:\n  wt: {kind: watttime, username: u, password: p}\n",
    )
    for zone in ("SE", "DE", "US-TEX-ERCO"):
        text = text.replace(f"    zone: {zone}\n", f"    zone: {zone}\n    marginal_source: wt\n")
    policy = f"policy: {{name: price_carbon, weight: 0.5, decision_signal: {decide_on}}}"
    return text.replace("policy: {name: price_carbon, weight: 0.5}", policy)


@pytest.mark.parametrize("decide_on", ["average", "marginal"])
async def test_a_marginal_signal_drives_decisions_only_when_asked_and_bills_stay_average(
    tmp_path: Path, decide_on: str
) -> None:
    from router.service.fakes import StaticCarbonSource
    from tests.service_kit import DEMO, INTENSITY, chat, service_kit

    marginal = {"SE": 900.0, "DE": 100.0, "US-TEX-ERCO": 500.0}
    greenest = {**DEMO, "X-Carbon-Preference": "mode=carbon"}
    async with service_kit(tmp_path, config=_marginal_config(decide_on),
                           more_sources={"wt": StaticCarbonSource(marginal)}) as kit:  # fmt: skip
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=greenest)
        assert r.status_code == 200, r.text
        (row,) = kit.rows()
        zone = "DE" if decide_on == "marginal" else "SE"  # the greenest by the signal asked
        assert row.zone == zone
        assert row.signal == "average" and row.intensity_g_per_kwh == INTENSITY[zone]
        assert row.marginal_g_per_kwh == marginal[zone]  # recorded beside, never billed
        assert row.carbon_g == pytest.approx(row.kwh_billed * INTENSITY[zone])
        # the baseline is in the billed signal too: avoided compares average with average
        per_kwh = 1.2 * sum(INTENSITY.values()) / 3
        assert row.baseline_carbon_g == pytest.approx(row.energy_j / 3.6e6 * per_kwh)


def test_a_clock_stepped_back_is_no_problem_for_the_chain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chained_at is the clock's reading; the chain's order is its seq, so a clock stepped back
    (NTP, a VM restored) between two writes leaves a chain that verifies."""
    import router.ledger as ledger_mod

    real = datetime

    class Behind(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return real.now(tz) - timedelta(hours=2)

    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([receipt_row("first", "acme", 0)])
    monkeypatch.setattr(ledger_mod, "datetime", Behind)
    ledger.write([receipt_row("second", "acme", 1)])
    a, b = ledger.receipt("first"), ledger.receipt("second")
    assert a is not None and b is not None and b["chained_at"] < a["chained_at"]
    assert verify_ledger(ledger).ok


def test_an_edited_chain_head_is_found(tmp_path: Path) -> None:
    # the kept head is what GET /v1/receipts/head serves, what the next row links to and what
    # signing signs: verify compared it with nothing, so an edited head passed until the next
    # write broke the link
    ledger = filled(tmp_path / "l.sqlite")
    bad = _tampered(tmp_path, ledger, "UPDATE chain_heads SET row_hash = ? WHERE tenant = 'acme'",
                    ("f" * 64,))  # fmt: skip
    report = verify_ledger(bad)
    assert not report.ok
    assert [p for p in report.problems if "head" in p and "acme" in p], report.problems
    assert not [p for p in report.problems if "bolt" in p], report.problems
    bad = _tampered(tmp_path, ledger, "DELETE FROM chain_heads WHERE tenant = 'bolt'")
    report = verify_ledger(bad)
    assert [p for p in report.problems if "head" in p and "bolt" in p], report.problems


@pytest.mark.parametrize(
    "trigger", ["requests_append_only_update", "requests_append_only_delete", "requests_head",
                "requests_hourly", "requests_daily"],
)  # fmt: skip
def test_a_dropped_trigger_is_found(tmp_path: Path, trigger: str) -> None:
    # without its triggers the ledger takes edits and deletions without a word, or stops
    # keeping its sums and heads: verify checked the table and its indexes, not its triggers
    ledger = filled(tmp_path / "l.sqlite")
    ledger.close()
    with closing(sqlite3.connect(ledger.path)) as db:
        db.execute(f"DROP TRIGGER {trigger}")
        db.commit()
    report = verify_ledger(Ledger(ledger.path))
    assert not report.ok
    assert [p for p in report.problems if trigger in p], report.problems
