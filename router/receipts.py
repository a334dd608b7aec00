"""Receipts an auditor can check: signed chain heads, a tenant's export, and its verification.

The ledger chains each tenant's rows (:mod:`router.chain`). A :class:`Signer` (Ed25519) signs
each tenant's chain head at least every ``audit.sign_every_s`` (the metering actor does it as
it writes) and at every export. A signed head pins the history before it: a row edited,
inserted, reordered or deleted before a signed head breaks either a row's hash, a link, or the
head's signature.

``router receipts export`` writes a tenant's rows chained in a period as JSON lines: a header
(the tenant, the period, the hash the first row follows, the public key, the names of a
receipt's fields), one line per receipt (its values as hashed, in that order, and both
hashes), and a trailer (count, last hash, the signed heads
inside the run, and the export's own signature over all of that). ``router verify`` checks an
export, or a whole ledger, and names every row that does not hold.

What a signature cannot show: rows removed from the end of a chain after its last signed head
(at most ``sign_every_s`` of them) when the auditor has no later head. Tenants who keep the
heads they are given (``GET /v1/receipts/head``) close that gap.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from router.chain import (
    CHAIN_FIELDS,
    GENESIS,
    HASHED,
    HASHED_NAMES,
    link,
)
from router.chain import VERSION as CHAIN_VERSION
from router.errors import RouterError
from router.ledger import V5_INDEXES, V5_REQUESTS_SQL, V5_TRIGGERS, Ledger, RowSums, utc_iso

log = logging.getLogger(__name__)

EXPORT_FORMAT = "carbon-router-receipts/1"
HEAD_TAG = b"carbon-router/chain-head/v1\n"
EXPORT_TAG = b"carbon-router/export/v1\n"
MAX_PROBLEMS = 50  # a report names this many problems, then counts the rest


class ReceiptError(RouterError):
    """A signing key or an export that cannot be read."""


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def key_id(public_key_b64: str) -> str:
    """A short name of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    return hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()[:16]


class Signer:
    """An Ed25519 private key that signs chain heads and exports."""

    def __init__(self, key: Ed25519PrivateKey, state_path: Path | None = None) -> None:
        self._key = key
        raw = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_key = _b64(raw)
        self.key_id = key_id(self.public_key)
        # the heads this key signed, kept beside it (key path + .heads): signing refuses a
        # head that does not extend them, whatever the ledger's own signatures table says
        self.state_path = state_path

    def signed_heads(self) -> dict[str, tuple[int, str]]:
        if self.state_path is None or not self.state_path.exists():
            return {}
        try:
            raw = orjson.loads(self.state_path.read_bytes())
            return {str(t): (int(v[0]), str(v[1])) for t, v in raw.items()}
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError, IndexError) as e:
            raise ReceiptError(f"{self.state_path}: the signer's record is unreadable: {e}") from e

    def record(self, heads: dict[str, tuple[int, str]]) -> None:
        """Add ``heads`` to the record of heads this key signed (written whole, then renamed:
        a crash leaves the old record or the new one)."""
        if self.state_path is None:
            return
        merged = {**self.signed_heads(), **heads}
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(orjson.dumps({t: list(v) for t, v in sorted(merged.items())}))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)

    @classmethod
    def load(cls, path: str | Path, *, create: bool = False) -> Signer:
        """The PEM (PKCS#8, unencrypted) key at ``path``; with ``create``, a new key is made
        there (mode 0600) when there is none."""
        path = Path(path)
        if not path.exists():
            if not create:
                raise ReceiptError(
                    f"{path}: no signing key; make one with `router receipts keygen {path}`"
                )
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
            log.warning(
                "made a new receipt signing key at %s: back it up, and publish its public key "
                "(router receipts public-key %s) to those who verify receipts",
                path,
                path,
            )
            return cls(key, Path(str(path) + ".heads"))
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as e:
            raise ReceiptError(f"{path}: not an unencrypted PEM private key: {e}") from e
        if not isinstance(loaded, Ed25519PrivateKey):
            raise ReceiptError(
                f"{path}: the signing key must be Ed25519, not {type(loaded).__name__}"
            )
        if path.stat().st_mode & 0o077:
            log.warning(
                "receipt signing key %s can be read by other users (mode %o): anyone who can "
                "read it can sign heads as this ledger; chmod 600 it",
                path,
                path.stat().st_mode & 0o777,
            )
        return cls(loaded, Path(str(path) + ".heads"))

    def sign(self, message: bytes) -> str:
        return _b64(self._key.sign(message))


def public_key_from(text: str) -> str:
    """A public key given as base64 of its 32 raw bytes or as PEM, as base64 raw."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as e:
            raise ReceiptError(f"not a PEM public key: {e}") from e
        if not isinstance(key, Ed25519PublicKey):
            raise ReceiptError(f"the public key must be Ed25519, not {type(key).__name__}")
        return _b64(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as e:
        raise ReceiptError(f"not a base64 public key: {e}") from e
    if len(raw) != 32:
        raise ReceiptError(f"an Ed25519 public key is 32 bytes, this is {len(raw)}")
    return text


def signature_ok(public_key_b64: str, message: bytes, signature_b64: str) -> bool:
    """Whether ``signature_b64`` (strict base64: no other characters) is the key's
    signature of ``message``."""
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        key.verify(base64.b64decode(signature_b64, validate=True), message)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def head_message(tenant: str, seq: int, row_hash: str, signed_at: str) -> bytes:
    return HEAD_TAG + orjson.dumps([tenant, seq, row_hash, signed_at])


def sign_heads(ledger: Ledger, signer: Signer, now: datetime | None = None) -> int:
    """Sign every tenant's chain head not yet signed by this key; returns how many. A head is
    signed only if the tenant's chain still holds the last head this key signed (in the
    ledger or in the signer's own record, whichever is later) and every row since links to
    it: a history changed under a signed head is reported, never signed over."""
    signed_at = utc_iso(now or datetime.now(UTC))
    own = signer.signed_heads()
    new, heads = [], {}
    for t, (seq, h) in ledger.heads().items():
        stored = ledger.last_signed(signer.key_id, t)
        prior = max((x for x in (stored, own.get(t)) if x), default=None)
        if prior == (seq, h):
            continue
        problem = _extends(ledger, t, prior, seq, h)
        if problem is not None:
            log.error("not signing the chain head of tenant %s: %s", t, problem)
            continue
        message = head_message(t, seq, h, signed_at)
        new.append((t, seq, h, signed_at, signer.key_id, signer.public_key, signer.sign(message)))
        heads[t] = (seq, h)
    if new:
        signer.record(heads)  # first: a head recorded but not stored is signed again next time
        ledger.add_signatures(new)
    return len(new)


def _extends(
    ledger: Ledger, tenant: str, prior: tuple[int, str] | None, seq: int, head: str
) -> str | None:
    """Why ``tenant``'s chain up to ``(seq, head)`` does not extend the head signed before,
    ``prior`` (None: from its first row), or None when it does."""
    if prior is not None and prior[0] > seq:
        return f"its chain ends at seq {seq}, before the head signed at seq {prior[0]}"
    expected_seq, expected = (1, GENESIS) if prior is None else prior
    start = expected_seq
    for _, _, s, _, prev_hash, stored, receipt in ledger.chain(tenant, first_seq=start):
        if link(prev_hash, receipt.encode()) != stored:
            return f"row {s} does not hash to its row_hash"
        if prior is not None and s == prior[0]:
            if stored != prior[1]:
                return f"row {s} is not the row signed there"
            expected_seq, expected = s + 1, stored
            continue
        if s != expected_seq or prev_hash != expected:
            return f"row {s} does not follow row {expected_seq - 1}"
        expected_seq, expected = s + 1, stored
    if (expected_seq - 1, expected) != (seq, head):
        return f"its chain does not end at its head (seq {seq})"
    return None


def receipt_view(d: dict[str, Any]) -> dict[str, Any]:
    """A receipt as ``GET /v1/receipts/{id}`` answers it: its figures grouped, each beside
    what it came from, and ``record``, the hashed fields as stored (what an auditor hashes)."""
    operational = d["carbon_g"]
    return {
        "object": "receipt",
        "id": d["request_id"],
        "tenant": d["tenant"],
        "model": d["model"],
        "status": d["status"],
        "placement": {"region": d["region"], "replica": d["replica"], "zone": d["zone"]},
        "times": {
            "started_at": d["started_at"],
            "first_token_at": d["first_token_at"],
            "ended_at": d["ended_at"],
        },  # fmt: skip
        "tokens": {"prompt": d["prompt_tokens"], "completion": d["completion_tokens"]},
        "energy": {
            "it_j": d["energy_j"],
            "prefill_j": d["prefill_j"],
            "decode_j": d["energy_j"] - d["prefill_j"],
            "active_j": d["energy_j"] - d["static_j"],
            "static_j": d["static_j"],
            "replica_seconds_held": d["held_s"],
            "source": d["energy_source"],
            "meter": d["meter"],
            "method": d["method"],
            "pue": d["pue"],
            "billed_kwh": d["kwh_billed"],
        },
        "carbon": {
            "operational_g": operational,
            "intensity_g_per_kwh": d["intensity_g_per_kwh"],
            "signal": d["signal"],
            "accounting": "location-based (GHG Protocol Scope 2)"
            if d["signal"] == "average"
            else "marginal signal",
            "intensity_source": d["intensity_source"],
            "intensity_at": d["intensity_at"],
            "intensity_kind": d["intensity_kind"],
            "marginal_g_per_kwh": d["marginal_g_per_kwh"],
            "embodied_g": d["embodied_g"],
            "embodied_basis": d["embodied_basis"],
        },
        "avoided": {
            "baseline": "power of two choices over the same allowed replicas, expected over "
            "its draws, at the moment of the decision",
            "baseline_replica": d["baseline_replica"],
            "baseline_carbon_g": d["baseline_carbon_g"],
            "carbon_avoided_g": d["avoided_g"],
        },
        "decision": {"policy": d["policy"], "binding": d["binding"]},
        "price": {
            "usd_per_kwh": d["price_usd_per_kwh"],
            "tariff": d["tariff"],
            "cost_usd": d["cost_usd"],
            "energy_cost_usd": d["energy_cost_usd"],
            "token_cost_usd": d["token_cost_usd"],
            "carbon_cost_usd": d["carbon_cost_usd"],
        },
        "chain": {k: d[k] for k in CHAIN_FIELDS},
        "record": {k: d[k] for k in (*HASHED_NAMES, "prev_hash", "row_hash")},
    }


def head_view(ledger: Ledger, tenant: str) -> dict[str, Any]:
    """``tenant``'s chain head now and the latest signed one (``GET /v1/receipts/head``): a
    tenant that keeps its signed heads can show later that no row before them changed."""
    seq, h = ledger.heads().get(tenant, (0, GENESIS))
    signed = ledger.signatures(tenant)
    return {
        "object": "receipt_chain_head",
        "tenant": tenant,
        "tenant_seq": seq,
        "row_hash": h,
        "signed": max(signed, key=lambda s: (s["tenant_seq"], s["signed_at"])) if signed else None,
    }


# ---- export ---------------------------------------------------------------------------------


HEADER_KEYS = ("format", "tenant", "period_start", "period_end", "first_seq", "anchor",
               "key_id", "public_key", "fields", "signed_heads")  # fmt: skip
TRAILER_KEYS = ("end", "count", "last_seq", "head_hash", "exported_at", "signature")


def _statement(header: dict[str, Any], trailer: dict[str, Any]) -> bytes:
    """What an export's signature covers: every key of its header (the signed heads it
    carries included) and of its trailer but the signature."""
    return EXPORT_TAG + orjson.dumps(
        [header[k] for k in HEADER_KEYS] + [trailer[k] for k in TRAILER_KEYS[:-1]]
    )


def export(
    ledger: Ledger,
    tenant: str,
    start: datetime | None,
    end: datetime | None,
    signer: Signer,
    out: IO[bytes],
    now: datetime | None = None,
) -> dict[str, Any]:
    """Write ``tenant``'s receipts chained in ``[start, end)`` to ``out`` as JSON lines,
    signed; returns the trailer."""
    span = ledger.seq_range(tenant, start, end)
    header: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "tenant": tenant,
        "period_start": None if start is None else utc_iso(start),
        "period_end": None if end is None else utc_iso(end),
        "first_seq": span[0] if span else None,
        "anchor": ledger.link_before(tenant, span[0]) if span else None,
        "key_id": signer.key_id,
        "public_key": signer.public_key,
        "fields": list(HASHED_NAMES),  # each receipt's values, in this order
        # the heads signed inside the run, each with its own signature (not the export's)
        "signed_heads": ledger.signatures(tenant, span[0], span[1]) if span is not None else [],
    }
    out.write(orjson.dumps(header) + b"\n")
    count, last_seq, head = 0, None, None
    if span is not None:
        for *_, seq, _at, prev_hash, row_hash_, receipt in ledger.chain(
            tenant, first_seq=span[0], last_seq=span[1]
        ):  # the receipt as hashed, verbatim
            out.write(b'{"receipt":%s,"prev_hash":"%s","row_hash":"%s"}\n'
                      % (receipt.encode(), prev_hash.encode(), row_hash_.encode()))  # fmt: skip
            count, last_seq, head = count + 1, seq, row_hash_
    trailer: dict[str, Any] = {
        "end": True,
        "count": count,
        "last_seq": last_seq,
        "head_hash": head,
        "exported_at": utc_iso(now or datetime.now(UTC)),
    }
    trailer["signature"] = signer.sign(_statement(header, trailer))
    out.write(orjson.dumps(trailer) + b"\n")
    return trailer


# ---- verification ---------------------------------------------------------------------------


@dataclass
class Report:
    """What a verification found: rows checked, and each problem with where it is."""

    rows: int = 0
    tenants: int = 0
    signatures: int = 0
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.more_problems += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "rows": self.rows, "tenants": self.tenants,
            "signatures": self.signatures, "problems": self.problems,
            "more_problems": self.more_problems, "notes": self.notes,
        }  # fmt: skip


_TENANT, _SEQ = HASHED_NAMES.index("tenant"), HASHED_NAMES.index("tenant_seq")


class _Chain:
    """One tenant's chain as it is read: checks each row's place, link and hash."""

    def __init__(self, report: Report, tenant: str, first_seq: int, anchor: str) -> None:
        self.report, self.tenant = report, tenant
        self.seq, self.prev = first_seq - 1, anchor
        self.hashes: dict[int, str] = {}  # seq -> hash, kept for the seqs that are signed
        self.keep: set[int] = set()

    def add_line(self, where: str, line: dict[str, Any]) -> None:
        """An export's line: ``receipt`` (the hashed values, in the header's ``fields``
        order), ``prev_hash`` and ``row_hash``. The receipt's bytes are its JSON as written:
        what the ledger hashed (orjson writes a value back as it read it)."""
        receipt = line.get("receipt")
        if (
            set(line) != {"receipt", "prev_hash", "row_hash"}
            or not isinstance(receipt, list)
            or len(receipt) != len(HASHED_NAMES)
        ):
            self.report.rows += 1
            self.report.problem(f"{where}: not a receipt line (receipt, prev_hash, row_hash)")
            self.seq += 1
            return
        self.check(
            where, receipt[0], receipt[_TENANT], receipt[_SEQ], line["prev_hash"],
            line["row_hash"], orjson.dumps(receipt),
        )  # fmt: skip

    def fast(self, seq: int, prev_hash: str, stored: str, receipt: str) -> bool:
        """The common case, checked with the least work: the row is the next one, follows
        the last, and its receipt hashes to its hash. False: :meth:`check` it, with reasons
        (and the request id, looked up only then)."""
        if seq != self.seq + 1 or prev_hash != self.prev:
            return False
        if link(prev_hash, receipt.encode()) != stored:
            return False
        self.report.rows += 1
        self.seq, self.prev = seq, stored
        if seq in self.keep:
            self.hashes[seq] = stored
        return True

    def check(
        self, where: str, rid: Any, tenant: Any, seq: Any, prev_hash: Any, stored: Any,
        body: bytes,
    ) -> None:  # fmt: skip
        """A row: its request id, tenant, place, the hash it follows, its own hash as stored,
        and the canonical bytes that hash must cover (its time joined is among them, and is
        not checked apart: the chain's order is its seq)."""
        self.report.rows += 1
        computed = link(str(prev_hash), body)
        if (
            seq != self.seq + 1
            or prev_hash != self.prev
            or computed != stored
            or tenant != self.tenant
        ):
            self._problems(f"{where} (request {rid}, seq {seq})", tenant, seq, prev_hash,
                           stored, computed)  # fmt: skip
        self.seq, self.prev = int(seq), computed
        if self.seq in self.keep:
            self.hashes[self.seq] = computed

    def _problems(
        self, where: str, tenant: Any, seq: Any, prev_hash: Any, stored: Any, computed: str,
    ) -> None:  # fmt: skip
        r = self.report
        if tenant != self.tenant:
            r.problem(f"{where}: tenant {tenant!r} in {self.tenant!r}'s chain")
        if seq != self.seq + 1:
            r.problem(
                f"{where}: seq {seq} where {self.seq + 1} was due (a row deleted, inserted or "
                "reordered)"
            )
        if prev_hash != self.prev:
            r.problem(
                f"{where}: follows {str(prev_hash)[:12]}… but the row before it hashes to "
                f"{self.prev[:12]}… (a row deleted, inserted, reordered or edited before it)"
            )
        if computed != stored:
            r.problem(f"{where}: its fields do not hash to its row_hash (edited)")


def _check_heads(
    report: Report, chain: _Chain, heads: Iterable[dict[str, Any]], trusted: set[str] | None
) -> None:
    for s in heads:
        report.signatures += 1
        try:
            _check_head(report, chain, s, trusted)
        except (KeyError, TypeError, ValueError) as e:
            report.problem(f"a signed head is malformed: {e!r}")


def _check_head(report: Report, chain: _Chain, s: dict[str, Any], trusted: set[str] | None) -> None:
    if True:  # one signed head
        where = f"signed head of {s['tenant']} at seq {s['tenant_seq']} ({s['signed_at']})"
        if s["tenant"] != chain.tenant:
            report.problem(f"{where}: another tenant's head in {chain.tenant}'s chain")
        if trusted is not None and s["public_key"] not in trusted:
            report.problem(f"{where}: signed by key {s['key_id']}, not a trusted key")
        message = head_message(s["tenant"], s["tenant_seq"], s["row_hash"], s["signed_at"])
        if not signature_ok(s["public_key"], message, s["signature"]):
            report.problem(f"{where}: the signature does not verify")
        got = chain.hashes.get(int(s["tenant_seq"]))
        if got is None:
            report.problem(f"{where}: the chain has no row {s['tenant_seq']} (rows deleted)")
        elif got != s["row_hash"]:
            report.problem(f"{where}: the chain's row there hashes to {got[:12]}…, not the "
                           f"signed {str(s['row_hash'])[:12]}… (history rewritten)")  # fmt: skip


def _seq_of(head: dict[str, Any]) -> int | None:
    """A signed head's seq, or None when it has none that is a number (the head is reported
    as malformed by :func:`_check_heads`; the rest of the ledger is still checked)."""
    try:
        return int(head["tenant_seq"])
    except (KeyError, TypeError, ValueError):
        return None


def verify_ledger(
    ledger: Ledger,
    trusted: Iterable[str] | None = None,
    *,
    sums: bool = True,
    record: dict[str, tuple[int, str]] | None = None,
) -> Report:
    """Check every tenant's chain in the ledger from its first row (each row's chain_version
    among it: the one column not hashed), every signed head, and that the table's columns are
    still generated from the hashed receipts. Rows are read in the order they were written (one
    plain scan of the stored columns, each receipt parsed once); each tenant's must come in its
    chain's order. ``sums``: also check the kept hourly and daily sums (usage totals, budgets,
    the operator's view, read as of the same scan) against the rows' figures, summed from the
    receipts in that scan. ``record``: the heads the signer recorded it signed
    (:meth:`Signer.signed_heads`, kept beside its key): each must still be in the chain and
    among the ledger's signatures (signatures removed from the ledger are found by it)."""
    trusted_keys = None if trusted is None else set(trusted)
    report = Report()
    expected = V5_REQUESTS_SQL.replace("CREATE TABLE requests", 'CREATE TABLE "requests"')
    if ledger.schema_sql() not in (expected, V5_REQUESTS_SQL):
        report.problem(
            "the requests table is not the one carbon-router makes: its columns may no longer "
            "be the hashed receipts' (the table was redefined)"
        )
    indexes = ledger.index_sql()
    for name, sql in V5_INDEXES.items():
        if indexes.get(name) != sql:
            report.problem(f"the index {name} ({sql}) is missing or changed: without it a "
                           "request could be billed twice")  # fmt: skip
    triggers = ledger.trigger_sql()
    for name, sql in V5_TRIGGERS.items():
        if triggers.get(name) != sql:
            report.problem(f"the trigger {name} is missing or changed: without it the ledger "
                           "takes edits and deletions, or stops keeping its sums, heads or "
                           "signatures")  # fmt: skip
    signatures: dict[str, list[dict[str, Any]]] = {}
    for s in ledger.signatures():
        signatures.setdefault(s["tenant"], []).append(s)
    if trusted_keys is None and signatures:
        ids = sorted({s["key_id"] for ss in signatures.values() for s in ss})
        report.notes.append(
            f"signed heads checked with the keys they name ({', '.join(ids)}): compare them "
            "with the operator's published key, or pass --public-key"
        )
    chains: dict[str, _Chain] = {}
    rows = RowSums()  # the rows' figures for the sums check, read in the same pass
    loads, add = orjson.loads, rows.add  # a million rows: each lookup saved counts
    kept_heads: dict[str, tuple[int, str]] = {}  # and the kept heads, as of the same rows
    scan = ledger.stored_receipts(sums=rows if sums else None, heads=kept_heads)
    for rowid, prev_hash, stored, version, receipt in scan:
        try:  # the receipt as hashed, parsed once: its place in the chain and its figures
            values = loads(receipt)
            tenant, seq = values[_TENANT], values[_SEQ]
        except (orjson.JSONDecodeError, IndexError, KeyError, TypeError):
            values, tenant, seq = None, None, None
        if type(tenant) is not str or type(seq) is not int:  # as SQLite's columns read it
            tenant, seq = ledger.place_at(rowid)
        if sums:
            if values is None:
                rows.exact = False
            else:
                add(values)
        if version != CHAIN_VERSION:  # not hashed itself: how the rest was hashed
            report.problem(
                f"ledger (request {ledger.request_at(rowid)}, seq {seq}): its chain_version is "
                f"{version!r}, a version this carbon-router does not know (it hashes version "
                f"{CHAIN_VERSION}): edited, or written by a newer carbon-router"
            )
        chain = chains.get(tenant)
        if chain is None:
            chain = chains[tenant] = _Chain(report, tenant, 1, GENESIS)
            chain.keep = {q for s in signatures.get(tenant, []) if (q := _seq_of(s)) is not None}
            if record and tenant in record:
                chain.keep.add(record[tenant][0])
        if not chain.fast(seq, prev_hash, stored, receipt):
            rid = ledger.request_at(rowid)
            chain.check("ledger", rid, tenant, seq, prev_hash, stored, receipt.encode())
    report.tenants = len(chains)
    for tenant in sorted(set(chains) | set(kept_heads)):
        # the kept head: what the next row links to, what is signed and served to tenants
        chain, kept = chains.get(tenant), kept_heads.get(tenant)
        last_row = None if chain is None else (chain.seq, chain.prev)
        if kept != last_row:
            was = "none" if kept is None else f"seq {kept[0]}, {kept[1][:12]}…"
            is_ = "none" if last_row is None else f"seq {last_row[0]}, {last_row[1][:12]}…"
            report.problem(
                f"the chain head kept for {tenant} ({was}) is not its last row ({is_}): its rows "
                "or its head were changed; GET /v1/receipts/head serves it and the next row "
                "would link to it"
            )
    for tenant in sorted(set(chains) | set(signatures)):
        chain = chains.get(tenant) or _Chain(report, tenant, 1, GENESIS)
        heads = signatures.get(tenant, [])
        _check_heads(report, chain, heads, trusted_keys)
        last = max((q for s in heads if (q := _seq_of(s)) is not None), default=0)
        if chain.seq > last:
            report.notes.append(f"{tenant}: rows {last + 1}..{chain.seq} are after its last "
                                "signed head")  # fmt: skip
    for tenant, (seq, h) in sorted((record or {}).items()):
        where = f"the head of {tenant} at seq {seq} the signer recorded"
        found = chains[tenant].hashes.get(seq) if tenant in chains else None
        if found != h:
            report.problem(f"{where}: the chain has {'no such row' if found is None else 'another'}"
                           " there (history rewritten or rows deleted)")  # fmt: skip
        if not any(_seq_of(s) == seq and s["row_hash"] == h
                   for s in signatures.get(tenant, [])):  # fmt: skip
            report.problem(f"{where}: its signature is missing from the ledger")
    if sums:  # the sums usage totals and budgets read, against the rows
        for problem in ledger.sums_check(rows):
            report.problem(problem)
    return report


def _lines(source: IO[bytes]) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    for n, line in enumerate(source, 1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            raise ReceiptError(f"line {n}: not JSON: {e}") from e
        if not isinstance(value, dict):
            raise ReceiptError(f"line {n}: not a JSON object")
        yield n, line.rstrip(b"\r\n"), value


def _receipt_line(receipt: Any, prev_hash: Any, row_hash_: Any) -> bytes:
    """A receipt's line exactly as an export writes it: the only form that verifies, so that
    no other reading of the line (a duplicate key, an escape) can show other figures."""
    return b'{"receipt":%s,"prev_hash":%s,"row_hash":%s}' % (
        orjson.dumps(receipt), orjson.dumps(prev_hash), orjson.dumps(row_hash_),
    )  # fmt: skip


def verify_export(source: IO[bytes], trusted: Iterable[str] | None = None) -> Report:
    """Check an export: its header, every receipt's place, link and hash (each line in the one
    form an export writes), its signed heads, and its own signature over all of its header
    and trailer; ``trusted``: the public keys (base64) the auditor accepts (else the export's
    own key is used, and the report says so)."""
    report = Report(tenants=1)
    lines = _lines(source)
    try:
        _, _, header = next(lines)
    except StopIteration:
        raise ReceiptError("the export is empty") from None
    if header.get("format") != EXPORT_FORMAT:
        raise ReceiptError(f"not a {EXPORT_FORMAT} export (format {header.get('format')!r})")
    if header.get("fields") != list(HASHED_NAMES):
        raise ReceiptError(
            "the export's receipts have other fields than this carbon-router hashes "
            f"({header.get('fields')!r}); verify it with the version that made it"
        )
    if set(header) != set(HEADER_KEYS):
        report.problem(f"the header's keys are {sorted(header)}, not {sorted(HEADER_KEYS)}")
    trusted_keys = None if trusted is None else set(trusted)
    if trusted_keys is None:
        report.notes.append(
            f"checked with the key in the export ({header.get('key_id')}): compare it with the "
            "operator's published key, or pass --public-key"
        )
        trusted_keys = {str(header.get("public_key"))}
    elif header.get("public_key") not in trusted_keys:
        report.problem(f"the export is signed by key {header.get('key_id')}, not a trusted key")
    heads = header.get("signed_heads")
    if not isinstance(heads, list) or not all(isinstance(h, dict) for h in heads):
        report.problem("the header's signed_heads is not a list of signed heads")
        heads = []
    chain: _Chain | None = None
    trailer: dict[str, Any] | None = None
    for n, raw, record in lines:
        if trailer is not None:
            report.problem(f"line {n}: after the export's end")
            continue
        if record.get("end") is True:
            trailer = record
            continue
        try:
            if chain is None:
                first = int(header.get("first_seq") or 1)
                chain = _Chain(report, str(header.get("tenant")), first, str(header.get("anchor")))
                chain.keep = {int(h["tenant_seq"]) for h in heads if "tenant_seq" in h}
            chain.add_line(f"line {n}", record)
            if raw != _receipt_line(record.get("receipt"), record.get("prev_hash"),
                                    record.get("row_hash")):  # fmt: skip
                report.problem(f"line {n}: not written as an export writes it (a duplicate "
                               "key, an escape or spacing changed)")  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            report.problem(f"line {n}: malformed: {e!r}")
    if trailer is None:
        report.problem("the export has no trailer: it was cut short")
        return report
    if set(trailer) != set(TRAILER_KEYS):
        report.problem(f"the trailer's keys are {sorted(trailer)}, not {sorted(TRAILER_KEYS)}")
    count = report.rows
    if trailer.get("count") != count:
        report.problem(
            f"the trailer counts {trailer.get('count')} receipts, the export has {count}"
        )
    head = chain.prev if chain is not None else None
    if trailer.get("head_hash") != head:
        report.problem("the last receipt is not the head the trailer names (rows cut or added)")
    last = chain.seq if chain is not None else None
    if trailer.get("last_seq") != last:
        report.problem(f"the trailer's last seq {trailer.get('last_seq')} is not the last "
                       f"receipt's {last}")  # fmt: skip
    try:
        statement = _statement(header, trailer)
    except KeyError as e:
        report.problem(f"the header or trailer lacks {e}")
        return report
    if not signature_ok(str(header.get("public_key")), statement, str(trailer.get("signature"))):
        report.problem("the export's signature does not verify: its header or trailer was "
                       "changed, or it was not signed by the key it names")  # fmt: skip
    if chain is not None:
        _check_heads(report, chain, heads, trusted_keys)
    elif heads:
        report.problem("the export names signed heads but holds no receipt")
    return report


def verify_export_file(path: str | Path, trusted: Iterable[str] | None = None) -> Report:
    with open(path, "rb") as f:
        return verify_export(f, trusted)


assert len(HASHED) == len(HASHED_NAMES)
