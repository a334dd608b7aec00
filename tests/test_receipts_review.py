"""Hostile review of receipts (chain, signing, export, verify, receipt figures): each test
here demonstrates a defect found in review, and FAILS on the code as reviewed. Fast: tmp
ledgers of a handful of rows (the scaling tests write a few thousand), loopback ASGI only."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sqlite3
from collections.abc import Callable
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from router.chain import HASHED_NAMES
from router.ledger import Ledger, LedgerRow
from router.receipts import Signer, export, head_view, sign_heads, verify_export, verify_ledger
from tests.test_receipts import (
    T0,
    _tampered,
    _write_receipt,
    filled,
    receipt_row,
    rewrite_acme,
    v4_ledger,
)


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.load(tmp_path / "key.pem", create=True)


def _sql(path: Path, *stmts: str) -> None:
    with closing(sqlite3.connect(path)) as db:
        for s in stmts:
            db.execute(s)
        db.commit()


# ---- 1. verify --ledger passes while what is billed differs from what was hashed -------------


def test_review_stored_generated_column_edited_apart_from_receipt_verifies(
    tmp_path: Path, signer: Signer
) -> None:
    """Were the columns GENERATED ... STORED, SQLite would keep their values in the record and
    never recompute them on read: with writable_schema an attacker makes cost_usd's expression
    something else for one UPDATE (which recomputes it), then puts the exact original SQL
    back, and invoices read $999 more while every hash and the table's SQL are untouched.
    The columns are VIRTUAL and rows are read from their receipts: the trick changes
    nothing."""
    from router.invoice import invoice

    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    honest = invoice(ledger, "acme", T0.strftime("%Y-%m")).billed_usd
    ledger.close()
    path = ledger.path
    with closing(sqlite3.connect(path)) as db:
        sql = db.execute("SELECT sql FROM sqlite_master WHERE name = 'requests'").fetchone()[0]
        triggers = db.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'requests'"
        ).fetchall()
    k = HASHED_NAMES.index("cost_usd")
    expr = f"json_extract(receipt, '$[{k}]')"
    assert expr in sql
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA writable_schema = ON")
        db.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'requests'",
                   (sql.replace(expr, expr + " * 0 + 999.0"),))  # fmt: skip
        db.commit()
    with closing(sqlite3.connect(path)) as db:
        for name, _ in triggers:
            db.execute(f"DROP TRIGGER {name}")
        db.execute("UPDATE requests SET receipt = receipt WHERE request_id = 'a2'")
        for _, t in triggers:
            db.execute(t)
        db.execute("PRAGMA writable_schema = ON")
        db.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'requests'", (sql,))
        db.commit()
    bad = Ledger(path)
    assert bad.integrity_ok()
    billed = invoice(bad, "acme", T0.strftime("%Y-%m")).billed_usd
    assert billed == honest  # nothing stored apart from the receipt: nothing to change
    assert bad.usage_page("acme").totals["cost_usd"] == pytest.approx(honest)
    assert verify_ledger(bad, [signer.public_key]).ok


def test_review_usage_sums_edited_verify_passes(tmp_path: Path, signer: Signer) -> None:
    """/v1/usage totals and budget spend read usage_daily (whole days), which no trigger
    guards and verify never compares with the chained rows."""
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    ledger.close()
    _sql(ledger.path, "UPDATE usage_daily SET cost_usd = cost_usd + 500 WHERE tenant = 'acme'")
    bad = Ledger(ledger.path)
    day = T0.replace(hour=0)
    totals = bad.usage_page("acme", start=day, end=day + timedelta(days=1)).totals
    rows = bad.tenant_rows("acme")
    assert totals["cost_usd"] == pytest.approx(sum(r.cost_usd for r in rows) + 500)
    assert not verify_ledger(bad, [signer.public_key]).ok, (
        "the totals a tenant is shown and budgeted by differ from its receipts; verify is OK"
    )


# ---- 2. signed heads do not pin history against anyone who can write the ledger ---------------


def test_review_history_rewritten_and_its_signatures_deleted_is_resigned_and_verifies(
    tmp_path: Path, signer: Signer
) -> None:
    """Were chain_signatures editable and signing blind, the next sign_heads (the metering
    actor's hourly run) would sign a rewritten head with the operator's own key. Signed heads
    are kept by a trigger, and with it dropped and the signatures deleted, the signer still
    refuses to sign a head that does not extend the one it recorded signing, and verify with
    that record finds the rewrite."""
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    bad = rewrite_acme(tmp_path, ledger)
    assert not verify_ledger(bad, [signer.public_key]).ok  # caught while the signature is there
    bad.close()
    with pytest.raises(sqlite3.IntegrityError, match="kept as signed"):
        _sql(bad.path, "DELETE FROM chain_signatures WHERE tenant = 'acme'")
    _sql(bad.path, "DROP TRIGGER chain_signatures_kept_delete",
         "DELETE FROM chain_signatures WHERE tenant = 'acme'")  # fmt: skip
    bad = Ledger(bad.path)
    bad.write([receipt_row("later", "bolt", 9)])  # another tenant's head moves: that is signed
    assert sign_heads(bad, signer) == 1  # acme's rewritten head is refused, bolt's signed
    assert bad.receipt("a2")["cost_usd"] == 0.0  # type: ignore[index]
    report = verify_ledger(bad, [signer.public_key], record=signer.signed_heads())
    assert not report.ok, f"rewritten history verifies with the operator's key: {report.notes}"
    assert any("signature is missing" in p for p in report.problems)


def test_review_verify_ledger_without_a_key_accepts_a_forgers_signatures_silently(
    tmp_path: Path, signer: Signer
) -> None:
    """`router verify --ledger` without --public-key: heads re-signed by any key in the
    ledger pass, with no note that the keys were not checked (an export says so)."""
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    bad = rewrite_acme(tmp_path, ledger)
    bad.close()
    _sql(bad.path, "DROP TRIGGER chain_signatures_kept_delete", "DELETE FROM chain_signatures")
    bad = Ledger(bad.path)
    forger = Signer.load(tmp_path / "forger.pem", create=True)
    sign_heads(bad, forger)
    report = verify_ledger(bad)
    assert not report.ok or any(forger.key_id in n for n in report.notes), report.as_dict()


# ---- 3. exports: edits that still verify ------------------------------------------------------


def _lines(tmp_path: Path, signer: Signer) -> list[bytes]:
    ledger = filled(tmp_path / "l.sqlite")
    sign_heads(ledger, signer)
    out = io.BytesIO()
    export(ledger, "acme", None, None, signer, out)
    return out.getvalue().splitlines(keepends=True)


def _json_edit(i: int, f: Callable[[dict[str, Any]], None]) -> Callable[[list[bytes]], None]:
    def edit(lines: list[bytes]) -> None:
        d = orjson.loads(lines[i])
        f(d)
        lines[i] = orjson.dumps(d) + b"\n"

    return edit


def _set(lines: list[bytes], i: int, text: bytes) -> None:
    lines[i] = text


def _junk_signature(lines: list[bytes]) -> None:
    t = orjson.loads(lines[-1])
    t["signature"] = "!" + t["signature"][:10] + " \n" + t["signature"][10:]
    lines[-1] = orjson.dumps(t) + b"\n"


def _twin_receipt(lines: list[bytes]) -> None:
    """A first "receipt" key (what a first-wins JSON reader shows) billing $0, then the real
    one (what orjson keeps and hashes)."""
    real = lines[3]
    fake = orjson.loads(real)["receipt"]
    fake[HASHED_NAMES.index("cost_usd")] = 0.0
    lines[3] = b'{"receipt":' + orjson.dumps(fake) + b"," + real[1:]


@pytest.mark.parametrize(
    "edit",
    [
        _json_edit(0, lambda h: h.update(note="audited and approved by ACME")),
        _json_edit(0, lambda h: h.update(signed_heads=[])),  # the heads it carried, dropped
        _json_edit(-1, lambda t: t.update(total_usd=0.0)),
        _junk_signature,
        _twin_receipt,
        lambda ls: _set(ls, 2, ls[2].replace(b'"acme"', b'"\\u0061cme"')),
    ],
    ids=[
        "header-key-added",
        "signed-heads-dropped",
        "trailer-key-added",
        "signature-junk",
        "duplicate-receipt-key",
        "escaped-receipt",
    ],  # fmt: skip
)
def test_review_export_edits_that_still_verify(
    tmp_path: Path, signer: Signer, edit: Callable[[list[bytes]], None]
) -> None:
    """Claim: an export fails on any edit of any line, header or trailer. Only the statement
    (eight header fields, four trailer fields) is signed and a receipt line is hashed as
    orjson re-serializes it, not as written: keys outside the statement, signed_heads,
    duplicate keys, escapes and a signature's base64 (non-alphabet characters are skipped)
    can all be changed."""
    lines = _lines(tmp_path, signer)
    assert verify_export(io.BytesIO(b"".join(lines)), [signer.public_key]).ok
    before = b"".join(lines)
    edit(lines)
    assert b"".join(lines) != before
    report = verify_export(io.BytesIO(b"".join(lines)), [signer.public_key])
    assert not report.ok, "an edited export verifies"


@pytest.mark.parametrize(
    "edit",
    [
        _json_edit(0, lambda h: h.update(signed_heads=[{}])),
        _json_edit(0, lambda h: h.update(signed_heads="x")),
        _json_edit(2, lambda r: r["receipt"].__setitem__(HASHED_NAMES.index("tenant_seq"), "x")),
    ],
    ids=["head-without-keys", "heads-not-a-list", "seq-not-a-number"],
)
def test_review_a_malformed_export_is_reported_not_a_traceback(
    tmp_path: Path, signer: Signer, edit: Callable[[list[bytes]], None]
) -> None:
    """`router verify` catches ReceiptError only; these raise KeyError/TypeError/ValueError out
    of verify_export (a traceback, not a report naming the line)."""
    from router.receipts import ReceiptError

    lines = _lines(tmp_path, signer)
    edit(lines)
    try:
        report = verify_export(io.BytesIO(b"".join(lines)), [signer.public_key])
    except ReceiptError:
        return
    assert not report.ok


def test_review_a_request_billed_twice_verifies(tmp_path: Path, signer: Signer) -> None:
    """Idempotency by request id rests on a unique index verify never checks: a second row for
    a request already billed, appended with a right link, passes (export and ledger)."""
    ledger = filled(tmp_path / "l.sqlite")
    a2 = ledger.receipt("a2")
    head = ledger.receipt("a5")
    assert a2 is not None and head is not None
    bad = _tampered(tmp_path, ledger, "DROP INDEX requests_id")
    with closing(sqlite3.connect(bad.path)) as db:
        _write_receipt(db, {**a2, "tenant_seq": 7, "chained_at": head["chained_at"]},
                       head["row_hash"])  # fmt: skip
        db.commit()
    sign_heads(bad, signer)
    assert [r.request_id for r in bad.tenant_rows("acme")].count("a2") == 2
    assert not verify_ledger(bad, [signer.public_key]).ok, "request a2 billed twice verifies"


# ---- 4. receipt figures ---------------------------------------------------------------------


def test_review_rebill_of_a_row_held_zero_keeps_no_embodied_or_static(tmp_path: Path) -> None:
    """rebill scales static and embodied by the old row's per-second rate; a predicted row that
    held 0 s (a zero-length or zero-energy prediction) has none, so the measured receipt says
    held_s 3 s with embodied 0 g and static 0 J (embodied != rate x held_s)."""
    from regions.config import Billing
    from router.billing import rebill, tariff_for

    old = receipt_row("p", energy_j=0.0, prefill_j=0.0, static_j=0.0, held_s=0.0, embodied_g=0.0,
                      baseline_carbon_g=0.0, kwh_billed=0.0)  # fmt: skip
    rates = {"static_w": 100.0, "embodied_g_per_s": 0.002}  # what the ingress sends along
    new = rebill(old, 800.0, "measured", tariff_for(Billing(tariff="energy")), prefill_j=300.0,
                 held_s=3.0, rates=rates)  # fmt: skip
    assert new.held_s == 3.0
    assert new.embodied_g == pytest.approx(0.006), "embodied_g is not rate x held_s"
    assert new.static_j == pytest.approx(300.0)


def test_review_rebill_of_a_zero_energy_prediction_loses_the_baseline(tmp_path: Path) -> None:
    """The predictor says 0 J for a request with no tokens (settle of a Final(0, 0, ...));
    the row stores the baseline in grams (0), not per kWh, so the measured rebill keeps 0 and
    the receipt claims the carbon-aware choice emitted more than the baseline."""
    from regions.config import Billing
    from router.billing import rebill, tariff_for

    old = receipt_row("p", energy_j=0.0, prefill_j=0.0, static_j=0.0, held_s=0.0,
                      baseline_carbon_g=0.0, kwh_billed=0.0, carbon_g=0.0)  # fmt: skip
    new = rebill(old, 800.0, "measured", tariff_for(Billing(tariff="energy")), held_s=1.0,
                 rates={"baseline_g_per_kwh": 352.0})  # fmt: skip
    assert new.carbon_g > 0
    assert new.baseline_carbon_g == pytest.approx(800.0 / 3.6e6 * 352.0)
    assert new.baseline_carbon_g > 0, (
        f"baseline 0 g, avoided {new.avoided_g} g: a made-up loss on the receipt"
    )


def test_review_a_migrated_stale_row_is_labelled_actual(tmp_path: Path) -> None:
    """v4 rows billed on a stale intensity (carbon_stale = 1) get intensity_kind 'actual' from
    the v5 default on migration: the receipt asserts a fresh measurement nobody knows of."""
    path = v4_ledger(tmp_path / "v4.sqlite", [receipt_row("old", "acme", 0, carbon_stale=True)])
    row = Ledger(path).get("old")
    assert row is not None and row.carbon_stale
    assert row.intensity_kind != "actual", "a stale v4 intensity is labelled actual"


def test_review_one_forward_clock_jump_pins_a_tenants_chain_times_for_good(
    tmp_path: Path, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chained_at = max(now, the previous row's): after one write with the clock a year ahead
    (NTP step, VM restore), every later row of the tenant is 'chained' a year ahead, so a
    --month export of the real month holds none of them."""
    import router.ledger as ledger_mod

    real = datetime

    class Ahead(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return real.now(tz) + timedelta(days=365)

    ledger = Ledger(tmp_path / "l.sqlite")
    monkeypatch.setattr(ledger_mod, "datetime", Ahead)
    ledger.write([receipt_row("jump", "acme", 0)])
    monkeypatch.setattr(ledger_mod, "datetime", real)
    ledger.write([receipt_row(f"r{k}", "acme", k + 1) for k in range(3)])  # clock fixed
    now = real.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    out = io.BytesIO()
    trailer = export(ledger, "acme", start, start + timedelta(days=32), signer, out)
    assert trailer["count"] == 3, "rows billed this month are chained a year from now"


def test_review_deferred_job_receipt_names_a_decision_that_picked_another_replica(
    tmp_path: Path,
) -> None:
    """A planned job runs on its planned replica (only=); its receipt's binding came from
    router.decide, which (prices having moved since planning) picked another: it says
    'planned' now."""
    import asyncio

    from tests.service_kit import ADMIN, DEMO, chat, service_kit

    async def go() -> None:
        async with service_kit(tmp_path, profile=(1.0, 0.2)) as kit:
            later = {**DEMO, "X-Carbon-Preference": "defer=7200"}
            r = await kit.client.post("/v1/chat/completions", json=chat(), headers=later)
            assert r.status_code == 202, r.text
            job = r.json()
            router = kit.service.live.router
            planned = next(s for s in router.states if s.region.name == job["region"])
            planned.prices.flat = 1000.0  # its price rose since planning: still usable
            seen: list[Any] = []
            decide = router.decide

            def spy(*a: Any, **kw: Any) -> Any:
                d = decide(*a, **kw)
                seen.append(d)
                return d

            router.decide = spy  # type: ignore[method-assign]
            await kit.client.post(f"/v1/jobs/{job['id']}/run", headers=ADMIN)
            kit.service.deferral.run_due()
            await asyncio.gather(*kit.service.deferral._running)
            (row,) = kit.rows()
            assert row.replica == planned.replica.name
            assert seen and seen[-1].replica != row.replica  # the decision picked another
            assert row.binding == "planned", (  # the receipt says the plan put it there
                f"receipt says policy {row.policy!r} binding {row.binding!r} decided "
                f"{row.replica}, but that decision picked {seen[-1].replica}"
            )

    asyncio.run(go())


# ---- 5. tenant isolation --------------------------------------------------------------------


async def test_review_usage_after_is_an_oracle_for_another_tenants_request_ids(
    tmp_path: Path,
) -> None:
    """GET /v1/usage?after=<id> looks the id up in every tenant's rows: 200 for another
    tenant's request, 400 for an unknown one (and the page starts at that request's time)."""
    from tests.service_kit import ADMIN, DEMO, chat, service_kit

    async with service_kit(tmp_path) as kit:
        admins = (await kit.client.post("/v1/chat/completions", json=chat(), headers=ADMIN)).json()
        other = await kit.client.get(f"/v1/usage?after={admins['id']}", headers=DEMO)
        unknown = await kit.client.get("/v1/usage?after=chatcmpl-nope", headers=DEMO)
        assert (
            await kit.client.get(f"/v1/receipts/{admins['id']}", headers=DEMO)
        ).status_code == 404
        assert other.status_code == unknown.status_code, (
            f"another tenant's id: {other.status_code}, an unknown id: {unknown.status_code}"
        )


# ---- 6. robustness --------------------------------------------------------------------------


def test_review_a_world_readable_signing_key_is_used_without_a_word(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "key.pem"
    Signer.load(path, create=True)
    os.chmod(path, 0o644)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        try:
            Signer.load(path)
        except Exception:
            return  # refused: fine
    said = [r.getMessage() for r in caplog.records]
    assert any("readable" in m or "permission" in m for m in said), (
        "a 0644 private signing key is loaded silently"
    )


async def test_review_bill_refuses_a_negative_held_s_it_means_to_clamp(tmp_path: Path) -> None:
    """Router.bill clamps held_s (max(held_s, 0)) for held_s and embodied_g, but not for
    static_j = static_w x held_s: a meter's negative held_s makes the row refuse and the
    request goes unbilled (settle raises after the answer was served)."""
    from tests.service_kit import service_kit

    async with service_kit(tmp_path) as kit:
        router = kit.service.live.router
        i = next(k for k, s in enumerate(router.states) if s.model is not None)
        now = datetime.now(UTC)
        row = await router.bill(
            request_id="r", tenant="demo", index=i, started_at=now - timedelta(seconds=1),
            ended_at=now, prompt_tokens=10, completion_tokens=10, energy_j=40.0,
            energy_source="measured", prefill_j=10.0, held_s=-0.5,
        )  # fmt: skip
        # billed: the meter's nonsense held_s is estimated like a prediction's, not kept
        assert isinstance(row, LedgerRow) and row.held_s > 0 and 0 <= row.static_j <= 40.0


async def test_review_a_streamed_answer_metered_nan_is_never_billed(tmp_path: Path) -> None:
    """A replica whose meter gives NaN (or inf, or negative) J: the client is sent the whole
    stream, then Router.bill raises LedgerError in settle; no row, no receipt, no dead letter,
    where the prediction (labelled predicted) was at hand. Non-streamed: HTTP 500 after the
    replica did the work, likewise unbilled."""
    from router.service.fakes import FakeReplicaClient
    from tests.service_kit import DEMO, chat, service_kit

    fakes = [FakeReplicaClient(n, energy_j=float("nan")) for n in
             ("eu-north-0", "eu-central-0", "us-south-0")]  # fmt: skip
    async with service_kit(tmp_path, replicas=fakes) as kit:
        # the stream's chunks went out; the app raised at its bill
        with contextlib.suppress(Exception):
            await kit.client.post("/v1/chat/completions", json=chat(stream=True), headers=DEMO)
        assert sum(len(f.calls) for f in fakes) == 1  # a replica ran it (and sent its words)
        assert len(kit.rows()) == 1, "an answered request has no bill and no receipt"


def test_review_v4_migration_holds_the_whole_ledger_in_memory(tmp_path: Path) -> None:
    """_chain_existing fetchall()s every v4 row into Python (about 1 KB a row here): a
    10-million-row ledger needs ~10 GB to migrate."""
    import tracemalloc

    def v4(path: Path, n: int) -> None:
        v4_ledger(path, (receipt_row(f"r{k}", f"t{k % 5}", 0) for k in range(n)))

    peaks = []
    for n in (1000, 8000):
        path = tmp_path / f"v4-{n}.sqlite"
        v4(path, n)
        tracemalloc.start()
        try:
            Ledger(path).close()
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    assert peaks[1] <= 2 * peaks[0], (
        f"peak {peaks[0] // 1024} KB at 1k rows, {peaks[1] // 1024} KB at 8k"
    )


# ---- 7. performance -------------------------------------------------------------------------


def _steps(ledger: Ledger, f: Callable[[], Any]) -> int:
    """SQLite VM steps (in thousands) of ``f``'s reads on the ledger's reader."""
    n = [0]

    def tick() -> int:
        n[0] += 1
        return 0

    ledger._reader.set_progress_handler(tick, 1000)
    try:
        f()
    finally:
        ledger._reader.set_progress_handler(None, 0)
    return n[0]


def _bulk(ledger: Ledger, tenant: str, n: int, prefix: str) -> None:
    rows = [receipt_row(f"{prefix}{k}", tenant, 0) for k in range(n)]
    for i in range(0, n, 2000):
        ledger.write(rows[i : i + 2000])


def test_review_one_tenants_chain_head_costs_a_scan_of_every_tenants_rows(
    tmp_path: Path,
) -> None:
    """GET /v1/receipts/head (head_view) calls Ledger.heads(): every tenant's head, by a
    correlated subquery per row of the whole table (SCAN r). One tenant's head costs
    O(all rows), on the metering actor, on every call."""
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([receipt_row("mine", "acme", 0)])
    _bulk(ledger, "bolt", 1000, "b")
    small = _steps(ledger, lambda: head_view(ledger, "acme"))
    _bulk(ledger, "bolt", 9000, "c")
    big = _steps(ledger, lambda: head_view(ledger, "acme"))
    assert big <= 2 * max(small, 1), f"{small}k VM steps at 1k rows, {big}k at 10k"


def test_review_signing_reads_every_signature_ever_made(tmp_path: Path, signer: Signer) -> None:
    """sign_heads loads ledger.signatures() (all tenants, all time) to find what it signed, and
    ledger.heads() scans every row: each hourly run costs O(rows + tenants x runs so far),
    growing without bound (here 50 tenants, one row each per run)."""
    ledger = Ledger(tmp_path / "l.sqlite")
    tenants = [f"t{k}" for k in range(50)]

    def one_round(r: int) -> None:
        ledger.write([receipt_row(f"{t}-{r}", t, r) for t in tenants])
        sign_heads(ledger, signer)

    for r in range(2):
        one_round(r)
    early = _steps(ledger, lambda: one_round(2))
    for r in range(3, 40):
        one_round(r)
    late = _steps(ledger, lambda: one_round(40))
    assert late <= 2 * max(early, 1), f"a signing run: {early}k VM steps, 38 runs later {late}k"
