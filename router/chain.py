"""The hash chain over a tenant's receipts: each ledger row is bound to the one billed before
it for the same tenant, so that no row can be edited, inserted, reordered or deleted without
breaking every hash after it.

A row's hash is SHA-256 over a domain tag, the previous row's hash and the row's canonical form:
the JSON array (orjson) of its receipt fields in :data:`HASHED` order, each in one type, the
one SQLite gives back (an integral REAL comes back as a float, -0.0 as 0.0, a boolean as 0 or
1), so that rows read from the ledger hash as they are, with no conversion. The first
row of a tenant follows :data:`GENESIS`. The chain runs per tenant (``tenant_seq`` from 1) so
that a tenant's receipts can be handed to an auditor and checked without anyone else's.

Changing the canonical form is a new :data:`VERSION`; rows name the version they were hashed
with (``chain_version``), so old rows stay checkable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson

VERSION = 1
GENESIS = "0" * 64
TAG = b"carbon-router/receipt/v1\n"


def _float(v: Any) -> float | None:
    return None if v is None else float(v) + 0.0  # + 0.0: -0.0 is stored and read as 0.0


def _int(v: Any) -> int:
    return int(v)


def _bool(v: Any) -> int:
    return int(bool(v))  # 0 or 1, as SQLite stores it


def _str(v: Any) -> str | None:
    return None if v is None else str(v)


# every field of a receipt the chain covers, in hashing order, with its one type; the ledger
# row's fields, then the chain's own (its place in the tenant's chain and when it joined)
HASHED: tuple[tuple[str, Callable[[Any], Any]], ...] = (
    ("request_id", _str), ("tenant", _str), ("region", _str), ("replica", _str),
    ("model", _str), ("started_at", _str), ("ended_at", _str), ("prompt_tokens", _int),
    ("completion_tokens", _int), ("energy_j", _float), ("energy_source", _str), ("pue", _float),
    ("kwh_billed", _float), ("intensity_g_per_kwh", _float), ("signal", _str),
    ("carbon_stale", _bool), ("carbon_g", _float), ("price_usd_per_kwh", _float),
    ("tariff", _str), ("cost_usd", _float), ("energy_cost_usd", _float),
    ("token_cost_usd", _float), ("carbon_cost_usd", _float), ("status", _str), ("zone", _str),
    ("first_token_at", _str), ("prefill_j", _float), ("static_j", _float), ("held_s", _float),
    ("meter", _str), ("method", _str), ("intensity_at", _str), ("intensity_source", _str),
    ("intensity_kind", _str), ("marginal_g_per_kwh", _float), ("embodied_g", _float),
    ("embodied_basis", _str), ("policy", _str), ("binding", _str), ("baseline_replica", _str),
    ("baseline_carbon_g", _float), ("avoided_g", _float),
    ("tenant_seq", _int), ("chained_at", _str),
)  # fmt: skip
HASHED_NAMES = tuple(n for n, _ in HASHED)
# what a receipt carries besides: the link and its own hash (checked, not hashed into itself)
CHAIN_FIELDS = ("tenant_seq", "chained_at", "prev_hash", "row_hash", "chain_version")


def canonical(fields: Mapping[str, Any]) -> bytes:
    """The row's canonical bytes: its hashed fields, each in its one type, as a JSON array."""
    return orjson.dumps([conv(fields[name]) for name, conv in HASHED])


def canonical_values(values: Sequence[Any]) -> bytes:
    """:func:`canonical` of the values in :data:`HASHED` order (the ledger's fast path)."""
    return orjson.dumps([conv(v) for (_, conv), v in zip(HASHED, values, strict=True)])


def link(prev_hash: str, body: bytes) -> str:
    """The hash of a row whose canonical bytes are ``body``, after ``prev_hash``."""
    return hashlib.sha256(TAG + prev_hash.encode("ascii") + b"\n" + body).hexdigest()


def row_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    return link(prev_hash, canonical(fields))
