"""The hash chain's canonical form and link, pinned byte for byte: a receipt's hash must come out
the same on every machine and every release of the same chain version, so these tests write the
expected bytes out by hand instead of computing them with the code under test."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import pytest

from router.chain import (
    GENESIS,
    HASHED_NAMES,
    TAG,
    VERSION,
    canonical,
    canonical_values,
    link,
    row_hash,
)

# one receipt with every field, in HASHED order, in the types a caller may hand in: integral
# figures as int, a flag as bool, a negative zero, a marginal intensity not known
FIELDS: dict[str, Any] = {
    "request_id": "r1", "tenant": "acme", "region": "eu-north", "replica": "eu-north-0",
    "model": "m", "started_at": "2026-11-03T12:00:00.000000+00:00",
    "ended_at": "2026-11-03T12:00:02.000000+00:00", "prompt_tokens": 100,
    "completion_tokens": 50.0, "energy_j": 360, "energy_source": "measured", "pue": 1.5,
    "kwh_billed": 0.25, "intensity_g_per_kwh": 50, "signal": "average", "carbon_stale": True,
    "carbon_g": -0.0, "price_usd_per_kwh": 0.5, "tariff": "energy", "cost_usd": 0.125,
    "energy_cost_usd": 0.125, "token_cost_usd": 0, "carbon_cost_usd": 0.0, "status": "ok",
    "zone": "SE-SE1", "first_token_at": None, "prefill_j": 60, "static_j": 100.0,
    "held_s": 0.5, "meter": "nvml-energy", "method": "work-share/1",
    "intensity_at": "2026-11-03T12:00:00.000000+00:00", "intensity_source": "electricitymaps",
    "intensity_kind": "actual", "marginal_g_per_kwh": None, "embodied_g": 2,
    "embodied_basis": 7, "policy": "price_carbon", "binding": "score",
    "baseline_replica": "us-east-0", "baseline_carbon_g": 0.75, "avoided_g": -0.25,
    "tenant_seq": 3, "chained_at": "2026-11-03T12:00:03.000000+00:00",
}  # fmt: skip
# written out by hand: floats as floats (-0.0 as 0.0), the flag as 1, ints as ints, a str field
# given a number as its text, unknowns as null
CANONICAL = (
    b'["r1","acme","eu-north","eu-north-0","m","2026-11-03T12:00:00.000000+00:00",'
    b'"2026-11-03T12:00:02.000000+00:00",100,50,360.0,"measured",1.5,0.25,50.0,"average",1,'
    b'0.0,0.5,"energy",0.125,0.125,0.0,0.0,"ok","SE-SE1",null,60.0,100.0,0.5,"nvml-energy",'
    b'"work-share/1","2026-11-03T12:00:00.000000+00:00","electricitymaps","actual",null,2.0,'
    b'"7","price_carbon","score","us-east-0",0.75,-0.25,3,"2026-11-03T12:00:03.000000+00:00"]'
)


def test_the_constants_of_chain_version_1() -> None:
    assert VERSION == 1
    assert GENESIS == "0" * 64
    assert TAG == b"carbon-router/receipt/v1\n"
    assert tuple(FIELDS) == HASHED_NAMES


def test_a_receipt_has_one_canonical_form_written_out_by_hand() -> None:
    assert canonical(FIELDS) == CANONICAL
    assert canonical_values(list(FIELDS.values())) == CANONICAL


def test_each_field_is_hashed_in_the_type_sqlite_gives_back() -> None:
    """A flag False and 0, a float given as int, -0.0 and 0.0, an id given as a number: each
    pair hashes alike, so a row read back from SQLite hashes as it was written."""
    pairs: list[tuple[str, Any, Any]] = [
        ("carbon_stale", False, 0),
        ("carbon_stale", True, 2),
        ("energy_j", 360, 360.0),
        ("carbon_g", -0.0, 0.0),
        ("prompt_tokens", 100.0, 100),
        ("embodied_basis", 7, "7"),
    ]
    for name, a, b in pairs:
        assert canonical({**FIELDS, name: a}) == canonical({**FIELDS, name: b}), name
    # and a real difference stays one
    assert canonical({**FIELDS, "carbon_g": 0.0}) != canonical({**FIELDS, "carbon_g": 1e-300})
    assert canonical({**FIELDS, "carbon_stale": False}) != canonical(FIELDS)
    # None is kept apart from 0 and from "" (not known is not zero)
    k = HASHED_NAMES.index("first_token_at")
    assert orjson.loads(canonical(FIELDS))[k] is None
    assert canonical({**FIELDS, "first_token_at": ""}) != canonical(FIELDS)
    assert canonical({**FIELDS, "marginal_g_per_kwh": 0.0}) != canonical(FIELDS)


def test_a_missing_or_extra_value_is_refused_not_hashed_short() -> None:
    values = list(FIELDS.values())
    with pytest.raises(ValueError, match="zip"):
        canonical_values(values[:-1])
    with pytest.raises(ValueError, match="zip"):
        canonical_values([*values, "extra"])
    missing = dict(FIELDS)
    del missing["chained_at"]
    with pytest.raises(KeyError, match="chained_at"):
        canonical(missing)


def test_a_link_is_sha256_over_the_tag_the_previous_hash_and_the_body() -> None:
    body = b'["x"]'
    want = hashlib.sha256(b"carbon-router/receipt/v1\n" + b"0" * 64 + b"\n" + b'["x"]').hexdigest()
    assert link(GENESIS, body) == want
    after = hashlib.sha256(b"carbon-router/receipt/v1\n" + want.encode() + b"\n" + body)
    assert link(want, body) == after.hexdigest()
    # the previous hash is ASCII hex; anything else is not a hash and is refused
    with pytest.raises(UnicodeEncodeError):
        link("é" * 64, body)


def test_a_rows_hash_is_the_link_of_its_canonical_form() -> None:
    want = hashlib.sha256(b"carbon-router/receipt/v1\n" + b"0" * 64 + b"\n" + CANONICAL)
    assert row_hash(GENESIS, FIELDS) == want.hexdigest()
    # fields besides the hashed ones (the chain's own hashes) do not enter it
    assert row_hash(GENESIS, {**FIELDS, "row_hash": "x", "prev_hash": "y"}) == want.hexdigest()
