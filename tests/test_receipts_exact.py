"""Receipts, word for word: the keys and their errors, the signed-head message, the receipt an
API caller reads, and what signing and verification say about each kind of tampering, each
problem as the auditor reads it. Fast (ledgers of a few rows): `make mutation` runs these with
tests/test_receipts.py against every mutant of router/receipts.py."""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import sqlite3
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from router.chain import CHAIN_FIELDS, GENESIS, HASHED_NAMES
from router.ledger import Ledger
from router.receipts import (
    EXPORT_TAG,
    HEAD_TAG,
    HEADER_KEYS,
    MAX_PROBLEMS,
    TRAILER_KEYS,
    ReceiptError,
    Report,
    Signer,
    export,
    head_message,
    head_view,
    key_id,
    public_key_from,
    receipt_view,
    sign_heads,
    signature_ok,
    verify_export,
    verify_export_file,
    verify_ledger,
)
from tests.test_receipts import _tampered, _write_receipt, filled, receipt_row

NOW = datetime(2026, 11, 4, 9, 30, tzinfo=UTC)
NOW_ISO = "2026-11-04T09:30:00.000000+00:00"
ZERO_KEY = base64.b64encode(bytes(32)).decode()


@pytest.fixture
def signer(tmp_path: Path) -> Signer:
    return Signer.load(tmp_path / "key.pem", create=True)


def raw_public(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


# ---- keys -----------------------------------------------------------------------------------


def test_a_key_is_named_by_the_first_16_hex_digits_of_its_sha256() -> None:
    assert key_id(ZERO_KEY) == hashlib.sha256(bytes(32)).hexdigest()[:16] == "66687aadf862bd77"


def test_a_new_key_is_made_private_and_loads_back_the_same(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "k.pem"
    with pytest.raises(ReceiptError) as e:
        Signer.load(path)
    assert str(e.value) == f"{path}: no signing key; make one with `router receipts keygen {path}`"
    with caplog.at_level(logging.WARNING, logger="router.receipts"):
        made = Signer.load(str(path), create=True)
    assert caplog.messages == [
        f"made a new receipt signing key at {path}: back it up, and publish its public key "
        f"(router receipts public-key {path}) to those who verify receipts"
    ]
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert made.state_path == tmp_path / "k.pem.heads"
    assert made.key_id == key_id(made.public_key)
    assert len(base64.b64decode(made.public_key)) == 32
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="router.receipts"):
        again = Signer.load(path, create=True)  # there already: loaded, not made again
    assert caplog.messages == []
    assert (again.public_key, again.state_path) == (made.public_key, made.state_path)
    message = b"m"
    assert signature_ok(made.public_key, message, again.sign(message))


def test_a_key_readable_by_others_is_loaded_with_a_warning(
    tmp_path: Path, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "key.pem"
    os.chmod(path, 0o640)
    with caplog.at_level(logging.WARNING, logger="router.receipts"):
        loaded = Signer.load(path)
    assert loaded.public_key == signer.public_key
    assert caplog.messages == [
        f"receipt signing key {path} can be read by other users (mode 640): anyone who can "
        "read it can sign heads as this ledger; chmod 600 it"
    ]
    os.chmod(path, 0o604)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="router.receipts"):
        Signer.load(path)
    assert len(caplog.messages) == 1 and "(mode 604)" in caplog.messages[0]


def test_a_key_that_is_not_an_ed25519_pem_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"not a key")
    with pytest.raises(ReceiptError, match=r"bad\.pem: not an unencrypted PEM private key: "):
        Signer.load(bad)
    ec = tmp_path / "ec.pem"
    ec.write_bytes(
        generate_private_key(SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(ec, 0o600)
    with pytest.raises(ReceiptError) as e:
        Signer.load(ec)
    name = type(serialization.load_pem_private_key(ec.read_bytes(), None)).__name__
    assert str(e.value) == f"{ec}: the signing key must be Ed25519, not {name}"


def test_the_signers_record_of_heads_merges_and_survives(tmp_path: Path, signer: Signer) -> None:
    assert signer.signed_heads() == {}
    signer.record({"bolt": (2, "hb"), "acme": (1, "ha")})
    signer.record({"acme": (3, "hc")})
    assert signer.signed_heads() == {"acme": (3, "hc"), "bolt": (2, "hb")}
    assert signer.state_path is not None
    assert signer.state_path.read_bytes() == b'{"acme":[3,"hc"],"bolt":[2,"hb"]}'
    assert not signer.state_path.with_name("key.pem.heads.tmp").exists()
    assert signer.state_path.stat().st_mode & 0o777 == 0o600
    for junk in (b"[1]", b'{"acme": 5}', b'{"acme": ["x", "h"]}', b'{"acme": []}', b"{"):
        signer.state_path.write_bytes(junk)
        with pytest.raises(ReceiptError, match="key.pem.heads: the signer's record is unreadable"):
            signer.signed_heads()
    alone = Signer(Ed25519PrivateKey.generate())
    alone.record({"acme": (1, "h")})  # no record kept: nothing to write, no error
    assert alone.signed_heads() == {} and alone.state_path is None


def test_a_public_key_is_read_as_base64_or_pem() -> None:
    key = Ed25519PrivateKey.generate()
    raw = raw_public(key)
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_key_from(pem.decode()) == raw
    assert public_key_from(f"  {raw}\n") == raw
    with pytest.raises(ReceiptError, match="^not a PEM public key: "):
        public_key_from("-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----")
    ec = generate_private_key(SECP256R1()).public_key()
    ec_pem = ec.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ReceiptError) as e:
        public_key_from(ec_pem.decode())
    assert str(e.value) == f"the public key must be Ed25519, not {type(ec).__name__}"
    with pytest.raises(ReceiptError, match="^not a base64 public key: "):
        public_key_from("not*base64")
    with pytest.raises(ReceiptError, match="^an Ed25519 public key is 32 bytes, this is 31$"):
        public_key_from(base64.b64encode(bytes(31)).decode())


def test_a_signature_verifies_only_as_strict_base64_of_the_right_key() -> None:
    key = Ed25519PrivateKey.generate()
    sig = base64.b64encode(key.sign(b"m")).decode()
    assert signature_ok(raw_public(key), b"m", sig)
    assert not signature_ok(raw_public(key), b"n", sig)
    assert not signature_ok(raw_public(Ed25519PrivateKey.generate()), b"m", sig)
    assert not signature_ok(raw_public(key), b"m", sig[:-2] + "*=")  # not strict base64
    assert not signature_ok(raw_public(key) + "*", b"m", sig)
    assert not signature_ok(base64.b64encode(bytes(5)).decode(), b"m", sig)  # not a key


def test_a_signed_head_message_is_its_tag_and_json() -> None:
    assert HEAD_TAG == b"carbon-router/chain-head/v1\n"
    assert head_message("acme", 3, "ab", "t") == b'carbon-router/chain-head/v1\n["acme",3,"ab","t"]'


# ---- reports ---------------------------------------------------------------------------------


def test_a_report_names_fifty_problems_then_counts_the_rest() -> None:
    r = Report()
    assert r.ok and MAX_PROBLEMS == 50
    for k in range(52):
        r.problem(f"p{k}")
    assert r.problems == [f"p{k}" for k in range(50)] and r.more_problems == 2 and not r.ok
    r = Report(rows=3, tenants=1, signatures=2, notes=["n"])
    r.problem("x")
    assert r.as_dict() == {"ok": False, "rows": 3, "tenants": 1, "signatures": 2,
                           "problems": ["x"], "more_problems": 0, "notes": ["n"]}  # fmt: skip


# ---- what a caller reads ---------------------------------------------------------------------


def test_a_receipt_view_groups_each_figure_beside_where_it_came_from(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.write([receipt_row("r", energy_j=400.0, prefill_j=100.0, static_j=150.0)])
    d = ledger.receipt("r")
    assert d is not None
    v = receipt_view(d)
    assert {k: v[k] for k in ("object", "id", "tenant", "model", "status")} == {
        "object": "receipt", "id": "r", "tenant": "acme", "model": "m", "status": "ok"}  # fmt: skip
    assert v["placement"] == {"region": "eu-north", "replica": "eu-north-0", "zone": "SE-SE1"}
    assert v["times"] == {"started_at": d["started_at"], "first_token_at": d["first_token_at"],
                          "ended_at": d["ended_at"]}  # fmt: skip
    assert v["tokens"] == {"prompt": 100, "completion": 50}
    assert v["energy"] == {
        "it_j": 400.0, "prefill_j": 100.0, "decode_j": 300.0, "active_j": 250.0,
        "static_j": 150.0, "replica_seconds_held": 0.5, "source": "measured",
        "meter": "nvml-energy", "method": "work-share/1", "pue": 1.2,
        "billed_kwh": d["kwh_billed"],
    }  # fmt: skip
    assert v["carbon"] == {
        "operational_g": 0.006, "intensity_g_per_kwh": 50.0, "signal": "average",
        "accounting": "location-based (GHG Protocol Scope 2)",
        "intensity_source": "electricitymaps", "intensity_at": d["intensity_at"],
        "intensity_kind": "actual", "marginal_g_per_kwh": None, "embodied_g": 0.0021,
        "embodied_basis": "",
    }  # fmt: skip
    assert v["avoided"] == {
        "baseline": "power of two choices over the same allowed replicas, expected over its "
        "draws, at the moment of the decision",
        "baseline_replica": "us-east-0", "baseline_carbon_g": 0.05, "carbon_avoided_g": 0.044,
    }  # fmt: skip
    assert v["decision"] == {"policy": "price_carbon", "binding": "score"}
    assert v["price"] == {"usd_per_kwh": 0.1, "tariff": "energy", "cost_usd": 1.2e-5,
                          "energy_cost_usd": 1.2e-5, "token_cost_usd": 0.0,
                          "carbon_cost_usd": 0.0}  # fmt: skip
    assert v["chain"] == {k: d[k] for k in CHAIN_FIELDS} and v["chain"]["tenant_seq"] == 1
    assert v["record"] == {k: d[k] for k in (*HASHED_NAMES, "prev_hash", "row_hash")}
    assert len(v) == 15
    marginal = receipt_view({**d, "signal": "marginal"})
    assert marginal["carbon"]["accounting"] == "marginal signal"


def test_a_chain_head_view_names_the_latest_signed_head(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite", 2)
    assert head_view(ledger, "nobody") == {"object": "receipt_chain_head", "tenant": "nobody",
                                           "tenant_seq": 0, "row_hash": GENESIS,
                                           "signed": None}  # fmt: skip
    head = ledger.head("acme")
    assert head is not None
    view = head_view(ledger, "acme")
    assert (view["tenant_seq"], view["row_hash"], view["signed"]) == (2, head[1], None)
    ledger.add_signatures([("acme", 1, "h1", "2026-11-04T10", "k", "p", "s1"),
                           ("acme", 2, "h2", "2026-11-04T08", "k", "p", "s2"),
                           ("acme", 2, "h2", "2026-11-04T09", "k2", "p", "s3"),
                           ("acme", 1, "h1", "2026-11-04T11", "k2", "p", "s4")])  # fmt: skip
    assert head_view(ledger, "acme")["signed"] == {
        "tenant": "acme", "tenant_seq": 2, "row_hash": "h2", "signed_at": "2026-11-04T09",
        "key_id": "k2", "public_key": "p", "signature": "s3"}  # fmt: skip


# ---- signing heads ---------------------------------------------------------------------------


def signed_rows(ledger: Ledger) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(ledger.path)) as db:
        return db.execute(
            "SELECT tenant, tenant_seq, row_hash, signed_at, key_id, public_key, signature "
            "FROM chain_signatures ORDER BY tenant, tenant_seq"
        ).fetchall()


def test_each_new_head_is_signed_once_at_the_time_given(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite", 2)
    heads = ledger.heads()
    assert sign_heads(ledger, signer, NOW) == 2
    got = signed_rows(ledger)
    assert [g[:6] for g in got] == [
        (t, heads[t][0], heads[t][1], NOW_ISO, signer.key_id, signer.public_key)
        for t in ("acme", "bolt")
    ]
    for t, seq, h, at, _, pub, sig in got:
        assert signature_ok(pub, head_message(t, seq, h, at), sig)
    assert signer.signed_heads() == heads
    assert sign_heads(ledger, signer, NOW) == 0  # nothing new: nothing signed
    ledger.write([receipt_row("a9", "acme", 9)])
    assert sign_heads(ledger, signer) == 1  # only the head that moved, at the clock's now
    assert signed_rows(ledger)[-2][3] > NOW_ISO  # acme's new one, today


def _signing_log(ledger: Ledger, signer: Signer, caplog: pytest.LogCaptureFixture) -> list[str]:
    """What signing logs; it signs bolt's head (or nothing, when signed already), not acme's."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="router.receipts"):
        sign_heads(ledger, signer, NOW)
    assert "acme" not in {r[0] for r in signed_rows(ledger)}
    return caplog.messages


def test_a_head_is_not_signed_over_a_changed_history(
    tmp_path: Path, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = filled(tmp_path / "l.sqlite", 3)
    acme = ledger.head("acme")
    assert acme is not None
    assert signer.state_path is not None
    # the signer's own record says it signed further than the chain now goes
    signer.record({"acme": (9, "h9")})
    ledger.write([receipt_row("x", "acme", 9)])
    assert _signing_log(ledger, signer, caplog)[0] == (
        "not signing the chain head of tenant acme: its chain ends at seq 4, before the head "
        "signed at seq 9"
    )
    signer.state_path.unlink()
    signer.record({"acme": (2, "not-it")})
    assert _signing_log(ledger, signer, caplog)[0] == (
        "not signing the chain head of tenant acme: row 2 is not the row signed there"
    )


def test_signing_checks_every_row_since_the_last_signed_head(
    tmp_path: Path, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = filled(tmp_path / "l.sqlite", 3)
    a2 = ledger.receipt("a2")
    assert a2 is not None
    k = HASHED_NAMES.index("cost_usd")
    edited = _tampered(tmp_path, ledger,
                       f"UPDATE requests SET receipt = json_set(receipt, '$[{k}]', 0.0) "
                       "WHERE request_id = 'a2'")  # fmt: skip
    msg = "not signing the chain head of tenant acme: row 3 does not hash to its row_hash"
    assert _signing_log(edited, signer, caplog) == [msg]
    assert len(signed_rows(edited)) == 1  # bolt's is signed
    # a row whose own hash is right but that follows another row than the one before it
    forged = _tampered(tmp_path, filled(tmp_path / "m.sqlite", 3), "SELECT 1")
    with closing(sqlite3.connect(forged.path)) as db:
        _write_receipt(db, {**a2, "request_id": "f", "tenant_seq": 4}, GENESIS)
        db.commit()
    assert _signing_log(forged, Signer(Ed25519PrivateKey.generate()), caplog) == [
        "not signing the chain head of tenant acme: row 4 does not follow row 3"
    ]


def test_signing_finds_a_head_that_is_not_the_chains_end(
    tmp_path: Path, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = filled(tmp_path / "l.sqlite", 3)
    with closing(sqlite3.connect(ledger.path)) as db:
        db.execute("UPDATE chain_heads SET row_hash = 'elsewhere' WHERE tenant = 'acme'")
        db.commit()
    assert _signing_log(ledger, signer, caplog) == [
        "not signing the chain head of tenant acme: its chain does not end at its head (seq 3)"
    ]
    with closing(sqlite3.connect(ledger.path)) as db:
        db.execute("UPDATE chain_heads SET row_hash = ?, tenant_seq = 2 WHERE tenant = 'acme'",
                   (ledger.receipt("a1")["row_hash"],))  # type: ignore[index]  # fmt: skip
        db.commit()
    # the chain goes on past the head: the head is not its end either
    assert _signing_log(ledger, signer, caplog) == [
        "not signing the chain head of tenant acme: its chain does not end at its head (seq 2)"
    ]


# ---- verifying a ledger ----------------------------------------------------------------------

CHAIN_INDEX = "CREATE UNIQUE INDEX requests_chain ON requests (tenant, tenant_seq)"
NO_CHAIN_INDEX = (f"the index requests_chain ({CHAIN_INDEX}) is missing or changed: without it a "
                  "request could be billed twice")  # fmt: skip


def h(ledger: Ledger, rid: str) -> str:
    r = ledger.receipt(rid)
    assert r is not None
    return str(r["row_hash"])


def test_a_clean_ledger_reports_what_it_checked(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite", 3)
    report = verify_ledger(ledger)
    notes = [f"{t}: rows 1..3 are after its last signed head" for t in ("acme", "bolt")]
    assert report.as_dict() == {"ok": True, "rows": 6, "tenants": 2, "signatures": 0,
                                "problems": [], "more_problems": 0, "notes": notes}  # fmt: skip
    sign_heads(ledger, signer, NOW)
    ledger.write([receipt_row("a9", "acme", 9)])
    other = Signer(Ed25519PrivateKey.generate())
    sign_heads(ledger, other, NOW)
    ids = ", ".join(sorted([signer.key_id, other.key_id]))
    report = verify_ledger(ledger)
    assert report.problems == [] and (report.rows, report.signatures) == (7, 4)
    assert report.notes == [
        f"signed heads checked with the keys they name ({ids}): compare them with the "
        "operator's published key, or pass --public-key"
    ]
    trusted = verify_ledger(ledger, [signer.public_key])
    assert trusted.problems == [
        f"signed head of acme at seq 4 ({NOW_ISO}): signed by key {other.key_id}, not a trusted "
        "key",
        f"signed head of bolt at seq 3 ({NOW_ISO}): signed by key {other.key_id}, not a trusted "
        "key",
    ]
    assert trusted.notes == []  # every head is a signed one


def test_an_edited_row_is_named_and_so_is_the_link_after_it(tmp_path: Path) -> None:
    from router.chain import link

    ledger = filled(tmp_path / "l.sqlite", 4)
    a0, a1 = h(ledger, "a0"), h(ledger, "a1")
    k = HASHED_NAMES.index("model")
    bad = _tampered(tmp_path, ledger,
                    f"UPDATE requests SET receipt = json_set(receipt, '$[{k}]', 'x') "
                    "WHERE request_id = 'a1'")  # fmt: skip
    edited = next(r[6] for r in bad.chain("acme") if r[0] == "a1")
    computed = link(a0, edited.encode())
    report = verify_ledger(bad)
    assert (report.rows, report.tenants) == (8, 2)
    assert report.problems == [
        "ledger (request a1, seq 2): its fields do not hash to its row_hash (edited)",
        f"ledger (request a2, seq 3): follows {a1[:12]}… but the row before it hashes to "
        f"{computed[:12]}… (a row deleted, inserted, reordered or edited before it)",
    ]


def test_a_deleted_row_is_named_by_its_seq_and_its_link(tmp_path: Path) -> None:
    ledger = filled(tmp_path / "l.sqlite", 4)
    a0, a1 = h(ledger, "a0"), h(ledger, "a1")
    bad = _tampered(tmp_path, ledger, "DELETE FROM requests WHERE request_id = 'a1'")
    report = verify_ledger(bad, sums=False)
    assert report.problems == [
        "ledger (request a2, seq 3): seq 3 where 2 was due (a row deleted, inserted or reordered)",
        f"ledger (request a2, seq 3): follows {a1[:12]}… but the row before it hashes to "
        f"{a0[:12]}… (a row deleted, inserted, reordered or edited before it)",
    ]
    assert report.rows == 7
    # the kept sums still count the deleted row, and say so
    sums = bad.sums_check()
    assert len(sums) == 2 and verify_ledger(bad).problems == [*report.problems, *sums]


def _sign_sql(ledger: Ledger, sql: str, params: tuple[Any, ...] = ()) -> None:
    """Change the ledger's signed heads as one who dropped their triggers would, and made
    them again as they were (so that verify finds the change, not a missing trigger)."""
    with closing(sqlite3.connect(ledger.path)) as db:
        triggers = [sql for (sql,) in db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name LIKE "
            "'chain_signatures_kept_%'")]  # fmt: skip
        assert len(triggers) == 2
        db.execute("DROP TRIGGER IF EXISTS chain_signatures_kept_update")
        db.execute("DROP TRIGGER IF EXISTS chain_signatures_kept_delete")
        db.execute(sql, params)
        for trigger in triggers:
            db.execute(trigger)
        db.commit()


def test_each_signed_head_is_checked_against_the_chain(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite", 3)
    sign_heads(ledger, signer, NOW)
    a2 = h(ledger, "a2")
    where = f"signed head of acme at seq 3 ({NOW_ISO})"
    # history rewritten: a2 edited, every hash after it made again
    k = HASHED_NAMES.index("model")
    bad = _tampered(tmp_path, ledger,
                    f"UPDATE requests SET receipt = json_set(receipt, '$[{k}]', 'x'), "
                    "row_hash = 'r' WHERE request_id = 'a2'")  # fmt: skip
    from router.chain import link

    a1 = next(r for r in bad.chain("acme") if r[0] == "a1")[5]
    edited = next(r for r in bad.chain("acme") if r[0] == "a2")[6]
    computed = link(a1, edited.encode())
    got = verify_ledger(bad, [signer.public_key], sums=False)
    assert got.problems[-1] == (
        f"{where}: the chain's row there hashes to {computed[:12]}…, not the signed "
        f"{a2[:12]}… (history rewritten)"
    )
    # the last rows cut: the signed head names a row that is not there
    cut = _tampered(tmp_path, ledger, "DELETE FROM requests WHERE request_id = 'a2'")
    assert verify_ledger(cut, [signer.public_key], sums=False).problems == [
        f"the chain head kept for acme (seq 3, {a2[:12]}…) is not its last row (seq 2, "
        f"{a1[:12]}…): its rows or its head were changed; GET /v1/receipts/head serves it and "
        "the next row would link to it",
        f"{where}: the chain has no row 3 (rows deleted)",
    ]
    # a signature changed, and one that is not base64
    forged = _tampered(tmp_path, ledger, "SELECT 1")
    _sign_sql(forged, "UPDATE chain_signatures SET signed_at = 'then' WHERE tenant = 'acme'")
    _sign_sql(forged, "UPDATE chain_signatures SET signature = '*' WHERE tenant = 'bolt'")
    assert verify_ledger(forged, [signer.public_key], sums=False).problems == [
        "signed head of acme at seq 3 (then): the signature does not verify",
        f"signed head of bolt at seq 3 ({NOW_ISO}): the signature does not verify",
    ]


def test_a_signed_head_without_rows_or_malformed_is_named(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite", 2)
    sign_heads(ledger, signer, NOW)
    bad = _tampered(tmp_path, ledger, "SELECT 1")
    _sign_sql(bad, "INSERT INTO chain_signatures VALUES ('zed', 1, 'h', 't', 'k', ?, 's')",
              (signer.public_key,))  # fmt: skip
    _sign_sql(bad, "UPDATE chain_signatures SET tenant_seq = 'two' WHERE tenant = 'bolt'")
    _sign_sql(bad, "INSERT INTO chain_signatures VALUES ('yak', 'x', 'h', 't', 'k', 'p', 's')")
    report = verify_ledger(bad, sums=False)
    assert report.problems == [
        f"signed head of bolt at seq two ({NOW_ISO}): the signature does not verify",
        "a signed head is malformed: ValueError(\"invalid literal for int() with base 10: 'two'\")",
        "signed head of yak at seq x (t): the signature does not verify",
        "a signed head is malformed: ValueError(\"invalid literal for int() with base 10: 'x'\")",
        "signed head of zed at seq 1 (t): the signature does not verify",
        "signed head of zed at seq 1 (t): the chain has no row 1 (rows deleted)",
    ]
    assert (report.tenants, report.signatures) == (2, 4)
    # the malformed head is no signed head: bolt's rows are all after its last one; yak and
    # zed have no rows to be after anything
    assert report.notes[1:] == ["bolt: rows 1..2 are after its last signed head"]


def test_the_signers_record_finds_a_signature_removed_from_the_ledger(
    tmp_path: Path, signer: Signer
) -> None:
    ledger = filled(tmp_path / "l.sqlite", 2)
    sign_heads(ledger, signer, NOW)
    record = signer.signed_heads()
    assert verify_ledger(ledger, [signer.public_key], record=record).problems == []
    a1, b0 = h(ledger, "a1"), h(ledger, "b0")
    assert record["acme"] == (2, a1)
    gone = _tampered(tmp_path, ledger, "SELECT 1")
    _sign_sql(gone, "DELETE FROM chain_signatures WHERE tenant = 'acme'")
    assert verify_ledger(gone, [signer.public_key], record=record, sums=False).problems == [
        "the head of acme at seq 2 the signer recorded: its signature is missing from the ledger",
    ]
    wrong = {"acme": (2, "other"), "bolt": (1, b0), "zed": (1, "z")}
    assert verify_ledger(Ledger(ledger.path), [signer.public_key], record=wrong).problems == [
        "the head of acme at seq 2 the signer recorded: the chain has another there (history "
        "rewritten or rows deleted)",
        "the head of acme at seq 2 the signer recorded: its signature is missing from the ledger",
        "the head of bolt at seq 1 the signer recorded: its signature is missing from the ledger",
        "the head of zed at seq 1 the signer recorded: the chain has no such row there (history "
        "rewritten or rows deleted)",
        "the head of zed at seq 1 the signer recorded: its signature is missing from the ledger",
    ]


def test_a_table_or_index_changed_is_named(tmp_path: Path) -> None:
    ledger = filled(tmp_path / "l.sqlite", 1)
    bad = _tampered(tmp_path, ledger, "CREATE UNIQUE INDEX requests_chain ON requests (tenant)",
                    chain_index=False)  # fmt: skip
    assert verify_ledger(bad).problems == [NO_CHAIN_INDEX]
    gone = _tampered(tmp_path, ledger, "DROP INDEX requests_id")
    assert verify_ledger(gone).problems == [
        "the index requests_id (CREATE UNIQUE INDEX requests_id ON requests (request_id)) is "
        "missing or changed: without it a request could be billed twice",
    ]
    ledger.close()
    with closing(sqlite3.connect(ledger.path)) as db:
        db.execute("PRAGMA writable_schema = ON")
        db.execute("UPDATE sqlite_master SET sql = replace(sql, '$[19]', '$[20]') "
                   "WHERE name = 'requests'")  # fmt: skip
        db.commit()
    assert verify_ledger(Ledger(ledger.path), sums=False).problems == [
        "the requests table is not the one carbon-router makes: its columns may no longer be "
        "the hashed receipts' (the table was redefined)"
    ]
    fresh = Ledger(tmp_path / "new.sqlite")  # made by this version: the name unquoted
    assert verify_ledger(fresh).as_dict()["problems"] == []


# ---- exports ---------------------------------------------------------------------------------


def exported(ledger: Ledger, signer: Signer, tenant: str = "acme", **kw: Any) -> list[bytes]:
    out = io.BytesIO()
    export(ledger, tenant, kw.get("start"), kw.get("end"), signer, out, now=NOW)
    return out.getvalue().splitlines(keepends=True)


def problems(lines: list[bytes], signer: Signer, resign: bool = False) -> list[str]:
    """What verifying ``lines`` says; ``resign``: the trailer signed again first (a forger
    with the key), so that only the receipts' own checks speak."""
    if resign:
        header, trailer = orjson.loads(lines[0]), orjson.loads(lines[-1])
        from router.receipts import _statement

        trailer["signature"] = signer.sign(_statement(header, trailer))
        lines = [*lines[:-1], orjson.dumps(trailer) + b"\n"]
    return verify_export(io.BytesIO(b"".join(lines)), [signer.public_key]).problems


def test_an_export_is_a_header_its_receipts_as_hashed_and_a_signed_trailer(
    tmp_path: Path, signer: Signer
) -> None:
    ledger = filled(tmp_path / "l.sqlite", 3)
    sign_heads(ledger, signer, NOW)
    rows = list(ledger.chain("acme"))
    lines = exported(ledger, signer)
    header, trailer = orjson.loads(lines[0]), orjson.loads(lines[-1])
    assert header == {
        "format": "carbon-router-receipts/1", "tenant": "acme", "period_start": None,
        "period_end": None, "first_seq": 1, "anchor": GENESIS, "key_id": signer.key_id,
        "public_key": signer.public_key, "fields": list(HASHED_NAMES),
        "signed_heads": ledger.signatures("acme"),
    }  # fmt: skip
    assert list(header) == list(HEADER_KEYS)
    assert lines[1:-1] == [
        b'{"receipt":%s,"prev_hash":"%s","row_hash":"%s"}\n'
        % (r[6].encode(), r[4].encode(), r[5].encode())
        for r in rows
    ]
    assert list(trailer) == list(TRAILER_KEYS)
    assert {k: trailer[k] for k in TRAILER_KEYS[:-1]} == {"end": True, "count": 3, "last_seq": 3,
                                                        "head_hash": rows[2][5],
                                                        "exported_at": NOW_ISO}  # fmt: skip
    statement = EXPORT_TAG + orjson.dumps(
        [header[k] for k in HEADER_KEYS] + [trailer[k] for k in TRAILER_KEYS[:-1]]
    )
    assert EXPORT_TAG == b"carbon-router/export/v1\n"
    assert signature_ok(signer.public_key, statement, trailer["signature"])
    report = verify_export(io.BytesIO(b"".join(lines)), [signer.public_key])
    assert report.as_dict() == {"ok": True, "rows": 3, "tenants": 1, "signatures": 1,
                                "problems": [], "more_problems": 0, "notes": []}  # fmt: skip
    # blank lines are not lines of the export
    assert problems([lines[0], b"\n", *lines[1:], b"  \r\n"], signer) == []
    path = tmp_path / "acme.jsonl"
    path.write_bytes(b"".join(lines))
    assert verify_export_file(path, [signer.public_key]).ok
    assert verify_export_file(str(path)).notes == [
        f"checked with the key in the export ({signer.key_id}): compare it with the "
        "operator's published key, or pass --public-key"
    ]


def test_an_export_of_a_period_starts_after_the_row_before_it(
    tmp_path: Path, signer: Signer
) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    for k in range(3):  # one write each: each chained at its own time
        ledger.write([receipt_row(f"a{k}", "acme", k)])
    rows = list(ledger.chain("acme"))
    assert rows[0][3] < rows[1][3]
    start = datetime.fromisoformat(rows[1][3])
    lines = exported(ledger, signer, start=start, end=NOW.replace(year=2100))
    header = orjson.loads(lines[0])
    assert (header["period_start"], header["period_end"]) == (
        rows[1][3], "2100-11-04T09:30:00.000000+00:00")  # fmt: skip
    assert (header["first_seq"], header["anchor"]) == (2, rows[0][5])
    assert len(lines) == 4 and problems(lines, signer) == []
    assert orjson.loads(lines[-1])["count"] == 2
    # nothing in the period: an empty run, still signed
    empty = exported(ledger, signer, end=datetime(2000, 1, 1, tzinfo=UTC))
    head, trailer = orjson.loads(empty[0]), orjson.loads(empty[-1])
    assert (head["first_seq"], head["anchor"], head["signed_heads"]) == (None, None, [])
    assert (trailer["count"], trailer["last_seq"], trailer["head_hash"]) == (0, None, None)
    assert len(empty) == 2 and problems(empty, signer) == []


def edit(lines: list[bytes], i: int, **kw: Any) -> list[bytes]:
    i %= len(lines)
    rec = orjson.loads(lines[i])
    rec.update(kw)
    return [*lines[:i], orjson.dumps(rec) + b"\n", *lines[i + 1 :]]


def test_each_receipt_line_is_checked_for_its_place_link_and_hash(
    tmp_path: Path, signer: Signer
) -> None:
    from router.chain import link

    ledger = filled(tmp_path / "l.sqlite", 3)
    rows = list(ledger.chain("acme"))
    lines = exported(ledger, signer)
    receipt = orjson.loads(lines[2])["receipt"]
    k = HASHED_NAMES.index("model")
    edited = edit(lines, 2, receipt=[*receipt[:k], "x", *receipt[k + 1 :]])
    computed = link(rows[0][5], orjson.dumps(orjson.loads(edited[2])["receipt"]))
    assert problems(edited, signer) == [
        "line 3 (request a1, seq 2): its fields do not hash to its row_hash (edited)",
        f"line 4 (request a2, seq 3): follows {rows[1][5][:12]}… but the row before it hashes "
        f"to {computed[:12]}… (a row deleted, inserted, reordered or edited before it)",
    ]
    moved = [*receipt]
    moved[HASHED_NAMES.index("tenant")] = "bolt"
    moved[HASHED_NAMES.index("tenant_seq")] = 5
    got = problems(edit(lines, 2, receipt=moved), signer)
    assert got[:2] == [
        "line 3 (request a1, seq 5): tenant 'bolt' in 'acme''s chain",
        "line 3 (request a1, seq 5): seq 5 where 2 was due (a row deleted, inserted or reordered)",
    ]
    assert got[2] == "line 3 (request a1, seq 5): its fields do not hash to its row_hash (edited)"
    assert got[3].startswith("line 4 (request a2, seq 3): seq 3 where 6 was due")
    assert problems([lines[0], lines[2], lines[3], lines[4]], signer, resign=True) == [
        "line 2 (request a1, seq 2): seq 2 where 1 was due (a row deleted, inserted or reordered)",
        f"line 2 (request a1, seq 2): follows {rows[0][5][:12]}… but the row before it hashes "
        f"to {GENESIS[:12]}… (a row deleted, inserted, reordered or edited before it)",
        "the trailer counts 3 receipts, the export has 2",
    ]


def test_a_line_that_is_not_a_receipt_as_written_is_named(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite", 2)
    lines = exported(ledger, signer)
    assert problems([lines[0], b'{"x": 1}\n', *lines[2:]], signer) == [
        "line 2: not a receipt line (receipt, prev_hash, row_hash)",
        "line 2: not written as an export writes it (a duplicate key, an escape or spacing "
        "changed)",
        "line 3 (request a1, seq 2): follows "
        f"{orjson.loads(lines[2])['prev_hash'][:12]}… but the row before it hashes to "
        f"{GENESIS[:12]}… (a row deleted, inserted, reordered or edited before it)",
    ]
    rec = orjson.loads(lines[1])
    for bad in ({**rec, "x": 1}, {**rec, "receipt": "x"}, {**rec, "receipt": rec["receipt"][1:]}):
        assert problems([lines[0], orjson.dumps(bad) + b"\n", *lines[2:]], signer)[0] == (
            "line 2: not a receipt line (receipt, prev_hash, row_hash)"
        )
    spaced = lines[1].replace(b'","', b'", "', 1)
    assert problems([lines[0], spaced, *lines[2:]], signer) == [
        "line 2: not written as an export writes it (a duplicate key, an escape or spacing changed)"
    ]
    twice = lines[1].replace(b'{"receipt"', b'{"prev_hash":"x","receipt"', 1)
    assert problems([lines[0], twice, *lines[2:]], signer) == [
        "line 2: not written as an export writes it (a duplicate key, an escape or spacing changed)"
    ]
    seq = [*rec["receipt"]]
    seq[HASHED_NAMES.index("tenant_seq")] = "one"
    got = problems([lines[0], orjson.dumps({**rec, "receipt": seq}) + b"\n", *lines[2:]], signer)
    assert (
        "line 2: malformed: ValueError(\"invalid literal for int() with base 10: 'one'\")"
    ) in got
    with pytest.raises(ReceiptError, match="^line 2: not a JSON object$"):
        verify_export(io.BytesIO(lines[0] + b"[1]\n"))
    with pytest.raises(ReceiptError, match="^line 2: not JSON: "):
        verify_export(io.BytesIO(lines[0] + b"{\n"))


def test_the_header_and_trailer_are_checked_and_signed(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite", 2)
    sign_heads(ledger, signer, NOW)
    lines = exported(ledger, signer)
    trailer = orjson.loads(lines[-1])
    unsigned = (
        "the export's signature does not verify: its header or trailer was changed, or it was "
        "not signed by the key it names"
    )
    assert problems(lines[:-1], signer) == ["the export has no trailer: it was cut short"]
    assert problems([*lines, lines[1]], signer) == ["line 5: after the export's end"]
    assert problems([*lines, lines[1], lines[-1]], signer) == [
        "line 5: after the export's end",
        "line 6: after the export's end",
    ]
    assert problems(edit(lines, -1, count=3), signer) == [
        "the trailer counts 3 receipts, the export has 2", unsigned]  # fmt: skip
    cut_or_added = "the last receipt is not the head the trailer names (rows cut or added)"
    assert problems(edit(lines, -1, head_hash="h"), signer) == [cut_or_added, unsigned]
    assert problems(edit(lines, -1, last_seq=9), signer) == [
        "the trailer's last seq 9 is not the last receipt's 2", unsigned]  # fmt: skip
    assert problems(edit(lines, -1, exported_at="then"), signer) == [unsigned]
    assert problems(edit(lines, -1, signature="*"), signer) == [unsigned]
    keys = sorted(TRAILER_KEYS)
    assert problems(edit(lines, -1, extra=1), signer) == [
        f"the trailer's keys are {sorted([*keys, 'extra'])}, not {keys}"]  # fmt: skip
    del trailer["exported_at"]
    cut = [*lines[:-1], orjson.dumps(trailer) + b"\n"]
    assert problems(cut, signer) == [
        f"the trailer's keys are {sorted(set(keys) - {'exported_at'})}, not {keys}",
        "the header or trailer lacks 'exported_at'",
    ]
    hkeys = sorted(HEADER_KEYS)
    assert problems(edit(lines, 0, extra=1), signer) == [
        f"the header's keys are {sorted([*hkeys, 'extra'])}, not {hkeys}"]  # fmt: skip
    assert problems(edit(lines, 0, tenant="bolt"), signer)[0] == (
        "line 2 (request a0, seq 1): tenant 'acme' in 'bolt''s chain"
    )
    assert problems(edit(lines, 0, signed_heads="x"), signer) == [
        "the header's signed_heads is not a list of signed heads", unsigned]  # fmt: skip
    assert problems(edit(lines, 0, signed_heads=[1]), signer) == [
        "the header's signed_heads is not a list of signed heads", unsigned]  # fmt: skip


def test_an_export_is_read_only_as_what_this_version_hashes(tmp_path: Path, signer: Signer) -> None:
    lines = exported(filled(tmp_path / "l.sqlite", 1), signer)
    with pytest.raises(ReceiptError) as e:
        verify_export(io.BytesIO(b"".join(edit(lines, 0, format="other/1"))))
    assert str(e.value) == "not a carbon-router-receipts/1 export (format 'other/1')"
    with pytest.raises(ReceiptError) as e:
        verify_export(io.BytesIO(b"".join(edit(lines, 0, fields=["a"]))))
    assert str(e.value) == (
        "the export's receipts have other fields than this carbon-router hashes (['a']); "
        "verify it with the version that made it"
    )
    with pytest.raises(ReceiptError, match="^the export is empty$"):
        verify_export(io.BytesIO(b"\n\n"))


def test_the_exports_signed_heads_and_key_are_checked(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite", 2)
    sign_heads(ledger, signer, NOW)
    lines = exported(ledger, signer)
    other = Signer(Ed25519PrivateKey.generate())
    report = verify_export(io.BytesIO(b"".join(lines)), [other.public_key])
    assert report.problems == [
        f"the export is signed by key {signer.key_id}, not a trusted key",
        f"signed head of acme at seq 2 ({NOW_ISO}): signed by key {signer.key_id}, not a "
        "trusted key",
    ]
    (head,) = orjson.loads(lines[0])["signed_heads"]
    bolts = {**head, "tenant": "bolt"}
    assert problems(edit(lines, 0, signed_heads=[bolts]), signer, resign=True) == [
        f"signed head of bolt at seq 2 ({NOW_ISO}): another tenant's head in acme's chain",
        f"signed head of bolt at seq 2 ({NOW_ISO}): the signature does not verify",
    ]
    assert problems(edit(lines, 0, signed_heads=[{"tenant_seq": 1}]), signer, resign=True) == [
        "a signed head is malformed: KeyError('tenant')"]  # fmt: skip
    empty = exported(ledger, signer, end=datetime(2000, 1, 1, tzinfo=UTC))
    assert problems(edit(empty, 0, signed_heads=[head]), signer, resign=True) == [
        "the export names signed heads but holds no receipt"]  # fmt: skip


def test_base64_keys_are_read_strictly() -> None:
    raw = raw_public(Ed25519PrivateKey.generate())
    for bad in (raw[:4] + "*" + raw[4:], raw[:4] + "\n" + raw[4:]):
        with pytest.raises(ReceiptError, match="^not a base64 public key: "):
            public_key_from(bad)


def test_a_head_view_is_the_tenants_own(tmp_path: Path, signer: Signer) -> None:
    ledger = filled(tmp_path / "l.sqlite", 1)
    ledger.add_signatures([("acme", 1, "h1", "t1", "k", "p", "s1"),
                           ("bolt", 9, "h9", "t9", "k", "p", "s9")])  # fmt: skip
    assert head_view(ledger, "acme")["signed"]["signature"] == "s1"


def test_an_export_carries_the_heads_signed_inside_its_run_only(
    tmp_path: Path, signer: Signer
) -> None:
    ledger = Ledger(tmp_path / "l.sqlite")
    for k in range(4):  # a head signed after each row: at seqs 1 to 4
        ledger.write([receipt_row(f"a{k}", "acme", k)])
        sign_heads(ledger, signer, NOW)
    rows = list(ledger.chain("acme"))
    start, end = datetime.fromisoformat(rows[1][3]), datetime.fromisoformat(rows[3][3])
    lines = exported(ledger, signer, start=start, end=end)
    heads = orjson.loads(lines[0])["signed_heads"]
    assert [h["tenant_seq"] for h in heads] == [2, 3]
    assert problems(lines, signer) == []


def test_a_bad_line_inside_an_export_counts_as_a_row_in_its_place(
    tmp_path: Path, signer: Signer
) -> None:
    lines = exported(filled(tmp_path / "l.sqlite", 3), signer)
    second = orjson.loads(lines[2])
    assert problems([*lines[:2], b'{"x": 1}\n', *lines[3:]], signer) == [
        "line 3: not a receipt line (receipt, prev_hash, row_hash)",
        "line 3: not written as an export writes it (a duplicate key, an escape or spacing "
        "changed)",
        f"line 4 (request a2, seq 3): follows {second['row_hash'][:12]}… but the row before it "
        f"hashes to {second['prev_hash'][:12]}… (a row deleted, inserted, reordered or edited "
        "before it)",
    ]


def test_a_receipt_line_with_trailing_spaces_is_not_as_written(
    tmp_path: Path, signer: Signer
) -> None:
    lines = exported(filled(tmp_path / "l.sqlite", 1), signer)
    assert problems([lines[0], lines[1].replace(b"\n", b"  \r\n"), lines[2]], signer) == [
        "line 2: not written as an export writes it (a duplicate key, an escape or spacing changed)"
    ]


def test_an_export_file_is_checked_with_the_keys_given(tmp_path: Path, signer: Signer) -> None:
    path = tmp_path / "acme.jsonl"
    path.write_bytes(b"".join(exported(filled(tmp_path / "l.sqlite", 1), signer)))
    other = Signer(Ed25519PrivateKey.generate())
    assert verify_export_file(path, [other.public_key]).problems == [
        f"the export is signed by key {signer.key_id}, not a trusted key"
    ]


def test_signing_starts_from_the_later_of_the_ledgers_head_and_the_signers_record(
    tmp_path: Path, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    ledger = filled(tmp_path / "l.sqlite", 2)
    assert sign_heads(ledger, signer, NOW) == 2
    older = signer.signed_heads()
    ledger.write([receipt_row("a9", "acme", 9)])
    assert sign_heads(ledger, signer, NOW) == 1
    assert signer.state_path is not None
    signer.state_path.write_bytes(orjson.dumps({t: list(v) for t, v in older.items()}))
    assert sign_heads(ledger, signer, NOW) == 0  # the ledger's head is the later: signed
    # a head signed at the chain's own seq but another row: not the row signed there
    signer.record({"acme": (3, "other")})
    with caplog.at_level(logging.ERROR, logger="router.receipts"):
        assert sign_heads(ledger, signer, NOW) == 0
    assert caplog.messages == [
        "not signing the chain head of tenant acme: row 3 is not the row signed there"
    ]


def test_a_requests_table_made_without_quotes_is_the_one_expected(tmp_path: Path) -> None:
    from router.ledger import V5_REQUESTS_SQL

    ledger = filled(tmp_path / "l.sqlite", 1)
    ledger.close()
    with closing(sqlite3.connect(ledger.path)) as db:
        db.execute("PRAGMA writable_schema = ON")
        db.execute("UPDATE sqlite_master SET sql = ? WHERE name = 'requests'", (V5_REQUESTS_SQL,))
        db.commit()
    again = Ledger(ledger.path)
    assert again.schema_sql() == V5_REQUESTS_SQL
    assert verify_ledger(again).problems == []


def test_an_export_without_a_first_seq_starts_at_seq_1(tmp_path: Path, signer: Signer) -> None:
    lines = exported(filled(tmp_path / "l.sqlite", 2), signer)
    assert problems(edit(lines, 0, first_seq=None), signer, resign=True) == []
    assert problems(edit(lines, 0, first_seq=2), signer, resign=True)[0] == (
        "line 2 (request a0, seq 1): seq 1 where 2 was due (a row deleted, inserted or reordered)"
    )


def test_without_trusted_keys_the_exports_own_key_is_the_one_trusted(
    tmp_path: Path, signer: Signer
) -> None:
    ledger = filled(tmp_path / "l.sqlite", 1)
    other = Signer(Ed25519PrivateKey.generate())
    sign_heads(ledger, other, NOW)  # the heads by one key, the export by another
    report = verify_export(io.BytesIO(b"".join(exported(ledger, signer))))
    assert report.problems == [
        f"signed head of acme at seq 1 ({NOW_ISO}): signed by key {other.key_id}, not a trusted key"
    ]


def test_a_temporary_record_left_by_a_crash_is_replaced(tmp_path: Path, signer: Signer) -> None:
    assert signer.state_path is not None
    left = signer.state_path.with_name("key.pem.heads.tmp")
    left.write_bytes(b'{"acme":[99,"half-written, longer than the record"]')
    signer.record({"acme": (1, "h")})
    assert signer.state_path.read_bytes() == b'{"acme":[1,"h"]}' and not left.exists()


def test_the_ledgers_own_signatures_stop_a_head_being_signed_twice(
    tmp_path: Path, signer: Signer
) -> None:
    ledger = filled(tmp_path / "l.sqlite", 2)
    assert sign_heads(ledger, signer, NOW) == 2
    forgetful = Signer(signer._key)  # the same key, its record lost
    assert sign_heads(ledger, forgetful, NOW) == 0
    # acme's head is signed already; bolt's new one still is
    ledger.write([receipt_row("b9", "bolt", 9)])
    assert sign_heads(ledger, forgetful, NOW) == 1
    assert [r[:2] for r in signed_rows(ledger)] == [("acme", 2), ("bolt", 2), ("bolt", 3)]


def test_signing_checks_the_rows_since_the_last_signed_head_only(
    tmp_path: Path, signer: Signer
) -> None:
    """Rows before a signed head are verify's to check; signing needs the chain to go on from
    that head."""
    ledger = filled(tmp_path / "l.sqlite", 2)
    sign_heads(ledger, signer, NOW)
    k = HASHED_NAMES.index("model")
    bad = _tampered(tmp_path, ledger,
                    f"UPDATE requests SET receipt = json_set(receipt, '$[{k}]', 'x') "
                    "WHERE request_id = 'a0'")  # fmt: skip
    bad.write([receipt_row("a9", "acme", 9)])
    assert sign_heads(bad, signer, NOW) == 1


@pytest.mark.parametrize("seq", [1, 4, 9])  # two before the one due, one after it, far after
def test_a_row_whose_only_fault_is_its_seq_is_named(
    tmp_path: Path, signer: Signer, seq: int
) -> None:
    """A forger who moves a row and hashes it again, its link kept: only its seq is wrong."""
    ledger = filled(tmp_path / "l.sqlite", 3)
    a1, a2 = h(ledger, "a1"), ledger.receipt("a2")
    assert a2 is not None
    # seq 1: a second row 1 of acme's chain, which its unique index refuses: dropped
    bad = _tampered(tmp_path, ledger, "DELETE FROM requests WHERE request_id = 'a2'",
                    chain_index=seq != 1)  # fmt: skip
    with closing(sqlite3.connect(bad.path)) as db:
        _write_receipt(db, {**a2, "tenant_seq": seq}, a1)
        db.commit()
    moved = h(bad, "a2")
    assert verify_ledger(bad, sums=False).problems == [
        *([NO_CHAIN_INDEX] if seq == 1 else []),
        f"ledger (request a2, seq {seq}): seq {seq} where 3 was due (a row deleted, inserted "
        "or reordered)",
        # a row moved before the head: the kept head still names the row that was deleted
        *([f"the chain head kept for acme (seq 3, {a2['row_hash'][:12]}…) is not its last row "
           f"(seq 1, {moved[:12]}…): its rows or its head were changed; GET /v1/receipts/head "
           "serves it and the next row would link to it"] if seq == 1 else []),
    ]


def test_a_signature_in_loose_base64_does_not_verify() -> None:
    key = Ed25519PrivateKey.generate()
    sig = base64.b64encode(key.sign(b"m")).decode()
    assert not signature_ok(raw_public(key), b"m", sig[:10] + "*" + sig[10:])
    assert not signature_ok(raw_public(key), b"m", sig[:10] + "\n" + sig[10:])
