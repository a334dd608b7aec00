"""The durable ledger: one row per billed request, plus the raw meter readings and idle energy
from which any bill line can be recomputed.

SQLite in WAL mode with ``synchronous=FULL``: :meth:`Ledger.write` returns only after its
transaction is on disk, so a write is durable before the caller acknowledges it, and a process
killed mid-write leaves either the whole batch or none of it. Writes are idempotent by request
id: a retried write never bills twice (``INSERT ... ON CONFLICT DO NOTHING``).

The schema version is SQLite's ``user_version``. Opening an older file migrates it in one
transaction; a newer file, or a file that is not a carbon-router ledger, is refused with the
reason.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

import orjson

from router.chain import GENESIS, HASHED, HASHED_NAMES, canonical, canonical_values, link
from router.chain import VERSION as CHAIN_VERSION
from router.errors import RouterError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5


class LedgerError(RouterError):
    """The ledger cannot be opened, migrated or written."""


# no request has more tokens than this; SQLite's integers stop at 2**63 and a figure past
# this is an upstream's nonsense, refused where the row is made
MAX_TOKENS = 10**9
FLOAT_COLUMNS = (
    "energy_j", "pue", "kwh_billed", "intensity_g_per_kwh", "carbon_g", "price_usd_per_kwh",
    "cost_usd", "energy_cost_usd", "token_cost_usd", "carbon_cost_usd",
    "prefill_j", "static_j", "held_s", "embodied_g", "baseline_carbon_g", "avoided_g",
)  # fmt: skip
# figures that cannot be negative (avoided_g can: the carbon-aware choice may emit more)
NON_NEGATIVE = (
    "energy_j", "kwh_billed", "carbon_g", "cost_usd", "prefill_j", "static_j", "held_s",
    "embodied_g", "baseline_carbon_g",
)  # fmt: skip


@dataclass(frozen=True)
class LedgerRow:
    request_id: str
    tenant: str
    region: str
    replica: str
    model: str
    started_at: str  # ISO 8601 UTC
    ended_at: str
    prompt_tokens: int
    completion_tokens: int
    energy_j: float  # IT energy attributed to the request
    # measured: a hardware counter (NVML, RAPL); estimated: a model of the hardware after the
    # fact (the CPU-time model); predicted: the energy predictor's figure from token counts
    energy_source: Literal["measured", "estimated", "predicted"]
    pue: float
    kwh_billed: float  # energy_j / 3.6e6 x pue
    intensity_g_per_kwh: float
    signal: Literal["average", "marginal"]
    carbon_stale: bool
    carbon_g: float
    price_usd_per_kwh: float
    tariff: str
    cost_usd: float
    energy_cost_usd: float
    token_cost_usd: float
    carbon_cost_usd: float
    status: Literal["ok", "error", "cancelled"] = "ok"
    # ---- the receipt (schema v5): where every figure came from -------------------------------
    zone: str = ""  # the grid zone whose intensity was used
    first_token_at: str | None = None  # ISO 8601 UTC; None when no output was produced
    prefill_j: float = 0.0  # of energy_j, the prompt's share; the rest is decode
    static_j: float = 0.0  # of energy_j, the replica's static power over the time it held
    held_s: float = 0.0  # replica (GPU) seconds the request held: its share of busy time
    meter: str = ""  # what measured or estimated energy_j, e.g. nvml-energy, predictor
    method: str = ""  # attribution method and version, e.g. work-share/1
    intensity_at: str = ""  # ISO 8601 UTC time of the intensity value used
    intensity_source: str = ""  # the carbon source (and zone) it came from
    intensity_kind: Literal["actual", "forecast", "stale"] = "actual"
    marginal_g_per_kwh: float | None = None  # a marginal signal that drove the decision
    embodied_g: float = 0.0  # amortized manufacturing carbon, kept apart from carbon_g
    embodied_basis: str = ""  # the hardware figures and lifetime it was amortized from
    policy: str = ""  # the routing policy, and the constraint that decided (binding)
    binding: str = ""
    baseline_replica: str = ""  # what a carbon-agnostic choice (power of two) would pick
    baseline_carbon_g: float = 0.0  # and emit, expected over its random draws
    avoided_g: float = 0.0  # baseline_carbon_g - carbon_g (negative when it emitted more)

    @property
    def decode_j(self) -> float:
        return self.energy_j - self.prefill_j

    @property
    def active_j(self) -> float:
        return self.energy_j - self.static_j

    def __post_init__(self) -> None:
        p, c = self.prompt_tokens, self.completion_tokens
        if not (
            type(p) is int and type(c) is int and 0 <= p <= MAX_TOKENS and 0 <= c <= MAX_TOKENS
        ):
            raise LedgerError(
                f"request {self.request_id}: token counts {p!r}, {c!r} are not 0..{MAX_TOKENS}"
            )
        # one check on the hot path: a sum is finite only if every term is (a NaN or an
        # infinity anywhere makes it NaN or infinite); the field is named when it is not
        total = (
            self.energy_j + self.pue + self.kwh_billed + self.intensity_g_per_kwh
            + self.carbon_g + self.price_usd_per_kwh + self.cost_usd + self.energy_cost_usd
            + self.token_cost_usd + self.carbon_cost_usd + self.prefill_j + self.static_j
            + self.held_s + self.embodied_g + self.baseline_carbon_g + self.avoided_g
            + (self.marginal_g_per_kwh or 0.0)
        )  # fmt: skip
        if not math.isfinite(total):
            bad = next(
                (n for n in FLOAT_COLUMNS if not math.isfinite(getattr(self, n))),
                "the sum of its figures",  # each finite, their sum past float: absurd too
            )
            raise LedgerError(f"request {self.request_id}: {bad} is not a finite number")
        if (
            self.energy_j < 0 or self.kwh_billed < 0 or self.carbon_g < 0 or self.cost_usd < 0
            or self.prefill_j < 0 or self.static_j < 0 or self.held_s < 0
            or self.embodied_g < 0 or self.baseline_carbon_g < 0
        ):  # fmt: skip
            bad = next(n for n in NON_NEGATIVE if getattr(self, n) < 0)
            raise LedgerError(f"request {self.request_id}: negative energy, carbon or cost ({bad})")
        if self.prefill_j > self.energy_j or self.static_j > self.energy_j:
            raise LedgerError(
                f"request {self.request_id}: prefill_j {self.prefill_j} or static_j "
                f"{self.static_j} is more than its energy_j {self.energy_j}"
            )
        for name in ("started_at", "ended_at", "first_token_at", "intensity_at"):
            value = getattr(self, name)
            if not value and name in ("first_token_at", "intensity_at"):
                continue  # not known: None or ""
            try:
                ts = datetime.fromisoformat(value)
            except ValueError as e:
                raise LedgerError(f"request {self.request_id}: {name} {value!r}: {e}") from e
            if ts.utcoffset() != _ZERO:
                raise LedgerError(f"request {self.request_id}: {name} must be UTC, got {value}")
            # stored in utc_iso's one form: periods are compared as strings and the daily sums
            # take the day from the first 10 characters ('Z', a space for 'T', no microseconds
            # or the basic format would be summed in one period and listed in another); the
            # form utc_iso writes is recognized without formatting it again
            if not (
                len(value) == 32
                and value[10] == "T"
                and value[19] == "."
                and value[26:] == "+00:00"
            ):
                object.__setattr__(self, name, ts.isoformat(timespec="microseconds"))


_ZERO = timedelta(0)
COLUMNS = [f.name for f in fields(LedgerRow)]
# a row's hashed fields are its columns and its place in the chain (router.chain)
assert tuple(COLUMNS) == HASHED_NAMES[:-2], "router.chain.HASHED and LedgerRow differ"
_INSERT = "INSERT INTO requests (receipt, prev_hash, row_hash, chain_version) VALUES (?, ?, ?, ?)"


# where a receipt (router.chain.HASHED) holds what the kept sums are keyed by (the hour is the
# first 13 characters of started_at) and the figures they sum
_SUMMED = itemgetter(*(HASHED_NAMES.index(n) for n in (
    "started_at", "tenant", "region", "binding",
    "kwh_billed", "carbon_g", "cost_usd", "avoided_g", "embodied_g",
)))  # fmt: skip

_KEPT_HOURLY = ("SELECT hour, tenant, region, binding, requests, kwh, carbon_g, cost_usd, "
                "avoided_g, embodied_g FROM usage_hourly")  # fmt: skip
_KEPT_DAILY = ("SELECT tenant, day, requests, kwh, carbon_g, cost_usd, avoided_g, embodied_g "
               "FROM usage_daily")  # fmt: skip


class RowSums:
    """The rows' own figures summed per UTC hour, tenant, region and deciding constraint, as
    the kept hourly sums are (:meth:`Ledger.sums_check` compares them), from each row's
    receipt as hashed, parsed once by whoever reads it (``router verify`` sums in the pass
    that checks the chains). Summed in the order the rows were written. A receipt whose key
    or figures are not of the types the chain gives them (text, floats: a row forged with
    other JSON) makes the sums not ``exact``: they are then SQLite's, as its columns read it."""

    def __init__(self) -> None:
        # (hour, tenant, region, binding) -> [count, kWh, g CO2e, USD, g avoided, g embodied]
        self.hourly: dict[tuple[str, str, str, str], list[Any]] = {}
        self.exact = True
        # the kept sums (usage_hourly's rows, usage_daily's) as of the rows summed: read in
        # the scan's own transaction (Ledger.stored_receipts), so that rows written while it
        # reads are in neither; None: not read
        self.kept: tuple[list[Any], list[Any]] | None = None

    def read_kept(self, db: sqlite3.Connection) -> None:
        self.kept = (db.execute(_KEPT_HOURLY).fetchall(), db.execute(_KEPT_DAILY).fetchall())

    def add(self, receipt: Sequence[Any]) -> None:
        """A row's receipt, as parsed from its hashed JSON."""
        try:
            at, tenant, region, binding, kwh, g, usd, avoided, embodied = _SUMMED(receipt)
        except (IndexError, KeyError, TypeError):
            self.exact = False
            return
        if not (
            type(at) is type(tenant) is type(region) is type(binding) is str
            and type(kwh) is type(g) is type(usd) is type(avoided) is type(embodied) is float
        ):
            self.exact = False
            return
        key = (at[:13], tenant, region, binding)
        sums = self.hourly.get(key)
        if sums is None:
            self.hourly[key] = [1, kwh, g, usd, avoided, embodied]
        else:
            sums[0] += 1
            sums[1] += kwh
            sums[2] += g
            sums[3] += usd
            sums[4] += avoided
            sums[5] += embodied


@dataclass(frozen=True)
class UsagePage:
    rows: list[LedgerRow]
    totals: dict[str, float]  # requests, kwh, carbon_g, cost_usd over the whole period
    has_more: bool


def _period(
    tenant: str | None, start: datetime | None, end: datetime | None
) -> tuple[str, list[object]]:
    """The WHERE clause (and its parameters) of a tenant's (None: everyone's) rows started in
    ``[start, end)``."""
    clauses: list[str] = ["1"]
    params: list[object] = []
    if tenant is not None:
        clauses.append("tenant = ?")
        params.append(tenant)
    if start is not None:
        clauses.append("started_at >= ?")
        params.append(utc_iso(start))
    if end is not None:
        clauses.append("started_at < ?")
        params.append(utc_iso(end))
    return " AND ".join(clauses), params


def _row(r: Sequence[object]) -> LedgerRow:
    """A row from its receipt (the first column selected): the hashed JSON, parsed here, which
    is faster than SQLite generating each column and is the figure that was hashed."""
    d = dict(zip(COLUMNS, orjson.loads(r[0])[: len(COLUMNS)], strict=True))  # type: ignore[arg-type]
    d["carbon_stale"] = bool(d["carbon_stale"])
    return LedgerRow(**d)


_V1 = """
CREATE TABLE requests (
    request_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    region TEXT NOT NULL,
    replica TEXT NOT NULL,
    model TEXT NOT NULL,
    started_at TEXT NOT NULL,
    ended_at TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens INTEGER NOT NULL CHECK (completion_tokens >= 0),
    energy_j REAL NOT NULL CHECK (energy_j >= 0),
    energy_source TEXT NOT NULL CHECK (energy_source IN ('measured', 'estimated')),
    pue REAL NOT NULL CHECK (pue >= 1),
    kwh_billed REAL NOT NULL,
    intensity_g_per_kwh REAL NOT NULL,
    signal TEXT NOT NULL,
    carbon_stale INTEGER NOT NULL,
    carbon_g REAL NOT NULL,
    price_usd_per_kwh REAL NOT NULL,
    tariff TEXT NOT NULL,
    cost_usd REAL NOT NULL,
    energy_cost_usd REAL NOT NULL,
    token_cost_usd REAL NOT NULL,
    status TEXT NOT NULL
);
CREATE INDEX requests_tenant_time ON requests (tenant, started_at);
CREATE TABLE meter_readings (
    replica TEXT NOT NULL,
    t_s REAL NOT NULL,
    wall_time TEXT NOT NULL,
    energy_j REAL NOT NULL,
    energy_source TEXT NOT NULL,
    PRIMARY KEY (replica, t_s)
);
CREATE TABLE idle_energy (
    replica TEXT NOT NULL,
    window_start TEXT NOT NULL,
    window_end TEXT NOT NULL,
    energy_j REAL NOT NULL CHECK (energy_j >= 0),
    PRIMARY KEY (replica, window_start)
);
"""
# v2: the carbon price is billed separately, so invoices can show it
_V1_TO_V2 = "ALTER TABLE requests ADD COLUMN carbon_cost_usd REAL NOT NULL DEFAULT 0;"
# v3: all tenants' usage pages in time order (the admin's view) by index, not by a sort
_V2_TO_V3 = "CREATE INDEX IF NOT EXISTS requests_time ON requests (started_at, request_id);"
# v4: each tenant's sums per UTC day, kept by a trigger in the transaction that inserts its rows
# (a duplicate skipped by ON CONFLICT is no insert, so it is not summed), so a period's totals
# read whole days from here and only the partial days at its ends from the rows
_V3_TO_V4 = (
    """CREATE TABLE usage_daily (
        tenant TEXT NOT NULL,
        day TEXT NOT NULL,
        requests INTEGER NOT NULL,
        kwh REAL NOT NULL,
        carbon_g REAL NOT NULL,
        cost_usd REAL NOT NULL,
        PRIMARY KEY (tenant, day)
    )""",
    """INSERT INTO usage_daily
        SELECT tenant, substr(started_at, 1, 10), COUNT(*), SUM(kwh_billed), SUM(carbon_g),
               SUM(cost_usd)
        FROM requests GROUP BY 1, 2""",
    """CREATE TRIGGER requests_daily AFTER INSERT ON requests BEGIN
        INSERT INTO usage_daily VALUES (NEW.tenant, substr(NEW.started_at, 1, 10), 1,
                                        NEW.kwh_billed, NEW.carbon_g, NEW.cost_usd)
        ON CONFLICT (tenant, day) DO UPDATE SET
            requests = requests + 1, kwh = kwh + excluded.kwh,
            carbon_g = carbon_g + excluded.carbon_g, cost_usd = cost_usd + excluded.cost_usd;
    END""",
)


def _chain_existing(db: sqlite3.Connection) -> None:
    """Move the rows billed before v5 into the v5 table, chaining each tenant's in time order,
    as if written now."""
    now = utc_iso(datetime.now(UTC))
    heads: dict[str, tuple[int, str]] = {}
    old = [c.strip() for c in _V4_COLUMNS.split(",")]
    rows = db.execute(  # a cursor, read as it goes: a ledger need not fit in memory
        f"SELECT {_V4_COLUMNS} FROM requests ORDER BY tenant, started_at, request_id"
    )
    defaults = {f.name: f.default for f in fields(LedgerRow) if f.name not in old}
    insert = db.cursor()
    for values in rows:
        fields_ = {**defaults, **dict(zip(old, values, strict=True))}
        if fields_["carbon_stale"]:
            fields_["intensity_kind"] = "stale"
        seq, prev = heads.get(fields_["tenant"], (0, GENESIS))
        fields_["tenant_seq"], fields_["chained_at"] = seq + 1, now
        body = canonical(fields_)
        h = link(prev, body)
        insert.execute(_INSERT.replace("INTO requests", "INTO requests_v5"),
                       (body.decode(), prev, h, CHAIN_VERSION))  # fmt: skip
        heads[fields_["tenant"]] = (seq + 1, h)


def _column(k: int, name: str, conv: Callable[[Any], Any]) -> str:
    """A v5 column: the receipt's field ``k``, generated from the hashed body whenever it is
    read (virtual, never stored: a stored copy could be made to differ from the receipt), so
    that no figure can differ from what was hashed."""
    sql_type = {"_float": "REAL", "_int": "INTEGER", "_bool": "INTEGER"}.get(conv.__name__, "TEXT")
    nullable = name in ("first_token_at", "marginal_g_per_kwh")
    check = _CHECKS.get(name, "")
    return (
        f"{name} {sql_type} GENERATED ALWAYS AS (json_extract(receipt, '$[{k}]')) VIRTUAL"
        + ("" if nullable else " NOT NULL")
        + (f" CHECK ({check})" if check else "")
    )


_CHECKS = {
    "prompt_tokens": "prompt_tokens >= 0",
    "completion_tokens": "completion_tokens >= 0",
    "energy_j": "energy_j >= 0",
    "energy_source": "energy_source IN ('measured', 'estimated', 'predicted')",
    "pue": "pue >= 1",
    "prefill_j": "prefill_j >= 0",
    "static_j": "static_j >= 0",
    "held_s": "held_s >= 0",
    "intensity_kind": "intensity_kind IN ('actual', 'forecast', 'stale')",
    "embodied_g": "embodied_g >= 0",
    "tenant_seq": "tenant_seq >= 1",
}
# v5: the receipt (where each figure came from), the per-tenant hash chain and its signed
# heads, rows made append-only, and sums per hour, region and deciding constraint for the
# operator's view. A row is its receipt: the canonical JSON that is hashed (router.chain),
# stored once; every column is generated from it when read, so a column cannot differ from
# what was hashed, and checking the chain reads a few columns, not fifty. Rows billed before
# v5 are chained on migration, in time order.
_V5_TABLE = (
    "CREATE TABLE requests_v5 (\n    receipt TEXT NOT NULL,\n    prev_hash TEXT NOT NULL,\n"
    "    row_hash TEXT NOT NULL,\n    chain_version INTEGER NOT NULL,\n    "
    + ",\n    ".join(_column(k, n, c) for k, (n, c) in enumerate(HASHED))
    + "\n)"
)
V5_REQUESTS_SQL = _V5_TABLE.replace("requests_v5", "requests")  # what verify expects to find
# the indexes that make a request billed once and a tenant's seq one row (verify checks them)
V5_INDEXES = {
    "requests_id": "CREATE UNIQUE INDEX requests_id ON requests (request_id)",
    "requests_chain": "CREATE UNIQUE INDEX requests_chain ON requests (tenant, tenant_seq)",
}
_V4_COLUMNS = (
    "request_id, tenant, region, replica, model, started_at, ended_at, prompt_tokens, "
    "completion_tokens, energy_j, energy_source, pue, kwh_billed, intensity_g_per_kwh, signal, "
    "carbon_stale, carbon_g, price_usd_per_kwh, tariff, cost_usd, energy_cost_usd, "
    "token_cost_usd, status, carbon_cost_usd"
)
_V4_TO_V5 = (
    # rebuilt: the columns are generated from the hashed receipt now
    _V5_TABLE,
    _chain_existing,
    "DROP TABLE requests",  # with its indexes and the daily sums' trigger, made again below
    "ALTER TABLE requests_v5 RENAME TO requests",
    V5_INDEXES["requests_id"],
    "CREATE INDEX requests_tenant_time ON requests (tenant, started_at)",
    _V2_TO_V3,
    # the daily sums gain carbon avoided and embodied (0 for rows billed before: no baseline)
    "ALTER TABLE usage_daily ADD COLUMN avoided_g REAL NOT NULL DEFAULT 0",
    "ALTER TABLE usage_daily ADD COLUMN embodied_g REAL NOT NULL DEFAULT 0",
    """CREATE TRIGGER requests_daily AFTER INSERT ON requests BEGIN
        INSERT INTO usage_daily VALUES (NEW.tenant, substr(NEW.started_at, 1, 10), 1,
                                        NEW.kwh_billed, NEW.carbon_g, NEW.cost_usd,
                                        NEW.avoided_g, NEW.embodied_g)
        ON CONFLICT (tenant, day) DO UPDATE SET
            requests = requests + 1, kwh = kwh + excluded.kwh,
            carbon_g = carbon_g + excluded.carbon_g, cost_usd = cost_usd + excluded.cost_usd,
            avoided_g = avoided_g + excluded.avoided_g,
            embodied_g = embodied_g + excluded.embodied_g;
    END""",
    V5_INDEXES["requests_chain"],
    # each tenant's chain head, kept by the insert's trigger: the next row's link, and the
    # heads to sign, read without a scan (verify recomputes heads from the rows)
    """CREATE TABLE chain_heads (
        tenant TEXT PRIMARY KEY,
        tenant_seq INTEGER NOT NULL,
        row_hash TEXT NOT NULL,
        chained_at TEXT NOT NULL
    )""",
    """INSERT INTO chain_heads
        SELECT tenant, tenant_seq, row_hash, chained_at FROM requests r
        WHERE tenant_seq = (SELECT MAX(tenant_seq) FROM requests WHERE tenant = r.tenant)""",
    """CREATE TRIGGER requests_head AFTER INSERT ON requests BEGIN
        INSERT INTO chain_heads VALUES (NEW.tenant, NEW.tenant_seq, NEW.row_hash,
                                        NEW.chained_at)
        ON CONFLICT (tenant) DO UPDATE SET tenant_seq = excluded.tenant_seq,
            row_hash = excluded.row_hash, chained_at = excluded.chained_at
        WHERE excluded.tenant_seq > tenant_seq;
    END""",
    """CREATE TABLE chain_signatures (
        tenant TEXT NOT NULL,
        tenant_seq INTEGER NOT NULL,
        row_hash TEXT NOT NULL,
        signed_at TEXT NOT NULL,
        key_id TEXT NOT NULL,
        public_key TEXT NOT NULL,
        signature TEXT NOT NULL,
        PRIMARY KEY (tenant, tenant_seq, key_id)
    )""",
    # a signed head is never changed or removed: the signer also keeps its own record
    # (router.receipts.SignerState), and verify reports a chain whose signature is missing
    """CREATE TRIGGER chain_signatures_kept_update BEFORE UPDATE ON chain_signatures BEGIN
        SELECT RAISE(ABORT, 'signed chain heads are kept as signed');
    END""",
    """CREATE TRIGGER chain_signatures_kept_delete BEFORE DELETE ON chain_signatures BEGIN
        SELECT RAISE(ABORT, 'signed chain heads are kept as signed');
    END""",
    """CREATE TABLE usage_hourly (
        hour TEXT NOT NULL,
        tenant TEXT NOT NULL,
        region TEXT NOT NULL,
        binding TEXT NOT NULL,
        requests INTEGER NOT NULL,
        kwh REAL NOT NULL,
        carbon_g REAL NOT NULL,
        avoided_g REAL NOT NULL,
        embodied_g REAL NOT NULL,
        cost_usd REAL NOT NULL,
        PRIMARY KEY (hour, region, binding, tenant)
    ) WITHOUT ROWID""",
    """INSERT INTO usage_hourly
        SELECT substr(started_at, 1, 13), tenant, region, binding, COUNT(*), SUM(kwh_billed),
               SUM(carbon_g), SUM(avoided_g), SUM(embodied_g), SUM(cost_usd)
        FROM requests GROUP BY 1, 2, 3, 4""",
    """CREATE TRIGGER requests_hourly AFTER INSERT ON requests BEGIN
        INSERT INTO usage_hourly VALUES (substr(NEW.started_at, 1, 13), NEW.tenant, NEW.region,
            NEW.binding, 1, NEW.kwh_billed, NEW.carbon_g, NEW.avoided_g, NEW.embodied_g,
            NEW.cost_usd)
        ON CONFLICT (hour, region, binding, tenant) DO UPDATE SET
            requests = requests + 1, kwh = kwh + excluded.kwh,
            carbon_g = carbon_g + excluded.carbon_g, avoided_g = avoided_g + excluded.avoided_g,
            embodied_g = embodied_g + excluded.embodied_g,
            cost_usd = cost_usd + excluded.cost_usd;
    END""",
    # a billed row is never changed or removed by carbon-router; this stops a slip (a hand-run
    # UPDATE), the chain shows a deliberate one
    """CREATE TRIGGER requests_append_only_update BEFORE UPDATE ON requests BEGIN
        SELECT RAISE(ABORT, 'ledger rows are append-only: bill a correction as a new row');
    END""",
    """CREATE TRIGGER requests_append_only_delete BEFORE DELETE ON requests BEGIN
        SELECT RAISE(ABORT, 'ledger rows are append-only: bill a correction as a new row');
    END""",
)
# the triggers that keep the ledger append-only, its sums and its heads, and its signatures
# as signed: verify checks they are all there as made
V5_TRIGGERS = {
    step.split()[2]: step
    for step in _V4_TO_V5
    if isinstance(step, str) and step.startswith("CREATE TRIGGER")
}
# each a script of statements split at ';', or a tuple of statements (a trigger holds ';') and
# steps in Python
Step = str | Callable[[sqlite3.Connection], None]
MIGRATIONS: dict[int, str | tuple[Step, ...]] = {
    0: _V1, 1: _V1_TO_V2, 2: _V2_TO_V3, 3: _V3_TO_V4, 4: _V4_TO_V5,
}  # fmt: skip


def _day(when: datetime, *, up: bool) -> datetime:
    """The UTC midnight at or after (``up``) or at or before ``when``."""
    when = datetime.fromisoformat(utc_iso(when))
    midnight = when.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight + timedelta(days=1) if up and midnight < when else midnight


def utc_iso(when: datetime) -> str:
    if when.tzinfo is None:
        raise LedgerError(f"naive datetime {when}; ledger times are UTC")
    return when.astimezone(UTC).isoformat(timespec="microseconds")


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as e:
            raise LedgerError(f"{self.path}: cannot open the ledger: {e}") from e
        self._lock = threading.Lock()
        self._migrate()
        try:
            self._reader = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
        except sqlite3.Error as e:
            raise LedgerError(f"{self.path}: cannot open the ledger: {e}") from e
        self._read_lock = threading.Lock()

    # ---- schema -----------------------------------------------------------------------------

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"{self.path}: ledger schema v{version} is newer than this carbon-router "
                f"(v{SCHEMA_VERSION}); upgrade carbon-router to read it. Nothing was changed"
            )
        tables = {
            r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
        if version == 0 and tables:
            raise LedgerError(
                f"{self.path}: not a carbon-router ledger (tables {sorted(tables)} and no schema "
                "version); point --ledger at a new file"
            )
        if version == SCHEMA_VERSION:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for v in range(version, SCHEMA_VERSION):
                    step = MIGRATIONS[v]
                    stmts = step.split(";") if isinstance(step, str) else step
                    for stmt in stmts:
                        if callable(stmt):
                            stmt(self._db)
                        elif stmt.strip():
                            self._db.execute(stmt)
                self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._db.execute("ROLLBACK")
                raise LedgerError(f"{self.path}: migration from v{version} failed: {e}") from e
        if version:
            log.info(
                "migrated ledger %s from schema v%d to v%d", self.path, version, SCHEMA_VERSION
            )

    # ---- writes -----------------------------------------------------------------------------

    def write(self, rows: Sequence[LedgerRow]) -> int:
        """Insert rows in one durable transaction, each chained after its tenant's last;
        returns how many were new (duplicates by request id are skipped, never billed twice,
        and do not move the chain)."""
        if not rows:
            return 0
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                fresh = self._fresh(rows)
                self._db.executemany(_INSERT, self._chained(fresh))
                self._db.execute("COMMIT")
            except BaseException as e:  # nothing of the batch is kept, no transaction left open
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error | OverflowError | ValueError | TypeError):
                    raise LedgerError(f"{self.path}: write of {len(rows)} rows failed: {e}") from e
                raise
            return len(fresh)

    def _fresh(self, rows: Sequence[LedgerRow]) -> list[LedgerRow]:
        """The rows whose request id is neither in the ledger nor earlier in ``rows``."""
        ids = list({r.request_id for r in rows})
        known: set[str] = set()
        for i in range(0, len(ids), 500):  # SQLite's bound parameters, in chunks
            chunk = ids[i : i + 500]
            known.update(
                r[0]
                for r in self._db.execute(
                    f"SELECT request_id FROM requests WHERE request_id IN "
                    f"({', '.join('?' * len(chunk))})",
                    chunk,
                )
            )
        fresh = []
        for r in rows:
            if r.request_id not in known:
                known.add(r.request_id)
                fresh.append(r)
        return fresh

    def _chained(self, rows: Sequence[LedgerRow]) -> Iterator[list[object]]:
        """Each row's values for :data:`_INSERT`: its fields, then its place in its tenant's
        chain, the time it joined (the clock's now: a clock stepped forward must not date every
        later row in the future; the chain's order is its seq) and the hashes."""
        now = utc_iso(datetime.now(UTC))
        heads: dict[str, tuple[int, str, str]] = {}
        for r in rows:
            head = heads.get(r.tenant)
            if head is None:
                last = self._db.execute(
                    "SELECT tenant_seq, row_hash, chained_at FROM chain_heads WHERE tenant = ?",
                    (r.tenant,),
                ).fetchone()
                head = (0, GENESIS, now) if last is None else (int(last[0]), last[1], last[2])
            seq, prev, prev_at = head
            at = now
            values: list[object] = [getattr(r, c) for c in COLUMNS]
            values += [seq + 1, at]
            body = canonical_values(values)
            h = link(prev, body)
            heads[r.tenant] = (seq + 1, h, at)
            yield [body.decode(), prev, h, CHAIN_VERSION]

    def write_readings(
        self, replica: str, readings: Iterable[tuple[float, str, float]], energy_source: str
    ) -> None:
        """Raw meter readings ``(monotonic t_s, wall time ISO UTC, cumulative J)``."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR IGNORE INTO meter_readings VALUES (?, ?, ?, ?, ?)",
                ((replica, t, wall, e, energy_source) for t, wall, e in readings),
            )
            self._db.execute("COMMIT")

    def write_idle(self, replica: str, start: datetime, end: datetime, energy_j: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO idle_energy VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (replica, utc_iso(start), utc_iso(end), energy_j),
            )

    # ---- reads ------------------------------------------------------------------------------

    def get(self, request_id: str) -> LedgerRow | None:
        rows = self.rows(where="request_id = ?", params=(request_id,))
        return rows[0] if rows else None

    def receipt(self, request_id: str, tenant: str | None = None) -> dict[str, Any] | None:
        """The row of ``request_id`` with its place in the chain, or None; with ``tenant``,
        only that tenant's (another tenant's id reads as unknown)."""
        where, params = "request_id = ?", [request_id]
        if tenant is not None:
            where, params = where + " AND tenant = ?", [*params, tenant]
        found = self._query(
            f"SELECT receipt, prev_hash, row_hash, chain_version FROM requests WHERE {where}",
            params,
        )
        if not found:
            return None
        receipt, prev_hash, row_hash_, version = found[0]
        d = dict(zip(HASHED_NAMES, orjson.loads(receipt), strict=True))
        d["carbon_stale"] = bool(d["carbon_stale"])
        d.update(prev_hash=prev_hash, row_hash=row_hash_, chain_version=version)
        return d

    def chain(
        self, tenant: str | None = None, *, first_seq: int = 1, last_seq: int | None = None,
        batch: int = 5000,
    ) -> Iterator[tuple[str, str, int, str, str, str, str]]:  # fmt: skip
        """The rows of ``tenant``'s chain in chain order, each as (request_id, tenant,
        tenant_seq, chained_at, prev_hash, row_hash, receipt): the receipt is the canonical
        JSON its hash covers, and every column of the row is generated from it. Read on a
        connection of its own, a batch at a time."""
        where, params = ["tenant = ?", "tenant_seq >= ?"], [tenant, first_seq]
        if last_seq is not None:
            where.append("tenant_seq <= ?")
            params.append(last_seq)
        yield from self._scan(
            "SELECT request_id, tenant, tenant_seq, chained_at, prev_hash, row_hash, receipt "
            f"FROM requests WHERE {' AND '.join(where)} ORDER BY tenant_seq",
            params,
            batch,
        )

    def stored_receipts(
        self,
        batch: int = 5000,
        sums: RowSums | None = None,
        heads: dict[str, tuple[int, str]] | None = None,
    ) -> Iterator[tuple[int, str, str, Any, str]]:
        """Every row as stored, in the order it was written (a plain scan, the fastest read),
        without the columns generated from the receipt (each would parse it in SQL again; the
        caller parses it once): (rowid, prev_hash, row_hash, chain_version, receipt).
        ``sums``: the kept sums are read into it first, and ``heads``: the kept chain heads
        (tenant: (seq, hash)), both in the scan's transaction (as of the rows scanned)."""

        def first(db: sqlite3.Connection) -> None:
            if sums is not None:
                sums.read_kept(db)
            if heads is not None:
                heads.update((t, (int(q), str(h))) for t, q, h in db.execute(
                    "SELECT tenant, tenant_seq, row_hash FROM chain_heads"))  # fmt: skip

        return self._scan(  # not a generator of its own: one less frame per row
            "SELECT rowid, prev_hash, row_hash, chain_version, receipt FROM requests "
            "ORDER BY rowid",
            (),
            batch,
            None if sums is None and heads is None else first,
        )

    def _scan(
        self, sql: str, params: Sequence[object], batch: int,
        first: Callable[[sqlite3.Connection], None] | None = None,
    ) -> Iterator[Any]:  # fmt: skip
        """``sql``'s rows, read a batch at a time on a connection of its own; ``first``: what
        to read before, in the same read transaction (one state of the ledger for both)."""
        db = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        try:
            if first is not None:
                db.execute("BEGIN")
                first(db)
            cur = db.execute(sql, params)
            while chunk := cur.fetchmany(batch):
                yield from chunk
        finally:
            db.close()

    def request_at(self, rowid: int) -> str:
        found = self._query("SELECT request_id FROM requests WHERE rowid = ?", (rowid,))
        return str(found[0][0]) if found else f"rowid {rowid}"

    def place_at(self, rowid: int) -> tuple[Any, Any]:
        """The row's tenant and tenant_seq as its generated columns read them."""
        found = self._query("SELECT tenant, tenant_seq FROM requests WHERE rowid = ?", (rowid,))
        return (found[0][0], found[0][1]) if found else (None, None)

    def schema_sql(self) -> str:
        """The requests table as SQLite has it (verify checks that its columns are still
        generated from the hashed receipt)."""
        found = self._query(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'requests'"
        )
        return str(found[0][0]) if found else ""

    def seq_range(
        self, tenant: str, start: datetime | None, end: datetime | None
    ) -> tuple[int, int] | None:
        """The first and last ``tenant_seq`` of ``tenant``'s rows chained in ``[start, end)``,
        or None when there are none; an export takes the whole run between them (a row chained
        in it while the clock was stepped is in the run too: the chain's order is its seq)."""
        where, params = ["tenant = ?"], [tenant]
        if start is not None:
            where.append("chained_at >= ?")
            params.append(utc_iso(start))
        if end is not None:
            where.append("chained_at < ?")
            params.append(utc_iso(end))
        lo, hi = self._query(
            f"SELECT MIN(tenant_seq), MAX(tenant_seq) FROM requests WHERE {' AND '.join(where)}",
            params,
        )[0]
        return None if lo is None else (int(lo), int(hi))

    def link_before(self, tenant: str, seq: int) -> str:
        """The hash the row ``seq`` of ``tenant``'s chain follows."""
        found = self._query(
            "SELECT prev_hash FROM requests WHERE tenant = ? AND tenant_seq = ?", (tenant, seq)
        )
        if not found:
            raise LedgerError(f"tenant {tenant} has no row {seq} in its chain")
        return str(found[0][0])

    def heads(self) -> dict[str, tuple[int, str]]:
        """Each tenant's chain head: (its last ``tenant_seq``, that row's hash)."""
        return {
            t: (int(seq), h)
            for t, seq, h in self._query("SELECT tenant, tenant_seq, row_hash FROM chain_heads")
        }

    def head(self, tenant: str) -> tuple[int, str] | None:
        found = self._query(
            "SELECT tenant_seq, row_hash FROM chain_heads WHERE tenant = ?", (tenant,)
        )
        return (int(found[0][0]), str(found[0][1])) if found else None

    def last_signed(self, key_id: str, tenant: str) -> tuple[int, str] | None:
        """``tenant``'s latest head signed by ``key_id``: (seq, hash); read by the primary
        key from its end, whatever the number of signatures."""
        found = self._query(
            "SELECT tenant_seq, row_hash FROM chain_signatures WHERE tenant = ? AND key_id = ? "
            "ORDER BY tenant_seq DESC LIMIT 1",
            (tenant, key_id),
        )
        return (int(found[0][0]), str(found[0][1])) if found else None

    def add_signatures(self, signed: Iterable[tuple[str, int, str, str, str, str, str]]) -> None:
        """Signed chain heads: (tenant, tenant_seq, row_hash, signed_at, key_id, public key,
        signature)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(
                    "INSERT OR IGNORE INTO chain_signatures VALUES (?, ?, ?, ?, ?, ?, ?)", signed
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def signatures(
        self, tenant: str | None = None, first_seq: int = 1, last_seq: int | None = None
    ) -> list[dict[str, Any]]:
        cols = ["tenant", "tenant_seq", "row_hash", "signed_at", "key_id", "public_key",
                "signature"]  # fmt: skip
        where, params = ["tenant_seq >= ?"], [first_seq]
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)  # type: ignore[arg-type]
        if last_seq is not None:
            where.append("tenant_seq <= ?")
            params.append(last_seq)
        found = self._query(
            f"SELECT {', '.join(cols)} FROM chain_signatures WHERE {' AND '.join(where)} "
            "ORDER BY tenant, tenant_seq, signed_at",
            params,
        )
        return [dict(zip(cols, r, strict=True)) for r in found]

    def sums_check(self, rows: RowSums | None = None) -> list[str]:
        """Where the kept sums (hourly and daily, which usage totals and budgets read)
        differ from the rows' own figures: the rows' hashed receipts summed at the hourly grain
        (``rows``: summed already, by a reader of every receipt such as ``router verify``;
        None: read here), the days summed from it. Empty when they agree (to a relative 1e-9)."""
        names = ("requests", "kwh", "carbon_g", "cost_usd", "avoided_g", "embodied_g")
        if rows is None:
            rows = RowSums()
            for (receipt,) in self._scan("SELECT receipt FROM requests ORDER BY rowid", (),
                                         5000, rows.read_kept):  # fmt: skip
                rows.add(orjson.loads(receipt))
        summed: Iterable[Sequence[Any]] = (
            (*key, *figures) for key, figures in sorted(rows.hourly.items())
        )
        kept_rows = rows.kept
        if not rows.exact:  # a receipt SQLite reads otherwise: its columns' sums, as it reads
            group_by = (
                "SELECT substr(started_at, 1, 13), tenant, region, binding, COUNT(*), "
                "SUM(kwh_billed), SUM(carbon_g), SUM(cost_usd), SUM(avoided_g), SUM(embodied_g) "
                "FROM requests GROUP BY 1, 2, 3, 4"
            )
            again = RowSums()  # its kept sums only: read with the GROUP BY, at one time
            summed = list(self._scan(group_by, (), 5000, again.read_kept))
            kept_rows = again.kept
        if kept_rows is None:
            kept_rows = (self._query(_KEPT_HOURLY), self._query(_KEPT_DAILY))
        hourly: dict[tuple[str, ...], tuple[float, ...]] = {}
        daily: dict[tuple[str, ...], list[float]] = {}  # tuple() below
        for hour, tenant, region, binding, *figures in summed:
            hourly[(hour, tenant, region, binding)] = tuple(figures)
            # a count, then sums: a problem names the rows' count as a count
            day = daily.setdefault((tenant, hour[:10]), [0, 0.0, 0.0, 0.0, 0.0, 0.0])
            for i, v in enumerate(figures):
                day[i] += v
        kept_hourly: dict[tuple[str, ...], tuple[float, ...]] = {
            (h, t, r, b): tuple(f) for h, t, r, b, *f in kept_rows[0]
        }
        kept_daily: dict[tuple[str, ...], tuple[float, ...]] = {
            (t, d): tuple(f) for t, d, *f in kept_rows[1]
        }
        problems = []
        days = {k: tuple(v) for k, v in daily.items()}
        for what, want, kept in (("hourly", hourly, kept_hourly), ("daily", days, kept_daily)):
            for key in sorted(set(want) | set(kept)):
                a, b = want.get(key), kept.get(key)
                if (
                    a is None
                    or b is None
                    or any(
                        not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
                        for x, y in zip(a, b, strict=True)
                    )
                ):
                    diff = ("no rows" if a is None else "no sum" if b is None else ", ".join(
                        f"{n} {y} (rows: {x})" for n, x, y in zip(names, a, b, strict=True)
                        if not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)))  # fmt: skip
                    problems.append(f"{what} sums {' '.join(map(str, key))}: {diff}")
        return problems

    def trigger_sql(self) -> dict[str, str]:
        return self._master("trigger")

    def index_sql(self) -> dict[str, str]:
        return self._master("index", "requests")

    def _master(self, kind: str, table: str | None = None) -> dict[str, str]:
        """Name -> SQL of the ledger's objects of ``kind`` (on ``table``), as SQLite has them."""
        return {
            n: str(sql)
            for n, sql in self._query(
                "SELECT name, sql FROM sqlite_master WHERE type = ? AND "
                "(? IS NULL OR tbl_name = ?)",
                (kind, table, table),
            )
        }

    def last_signed_at(self) -> str | None:
        found = self._query("SELECT MAX(signed_at) FROM chain_signatures")
        return found[0][0] if found else None

    def hourly(
        self, start: datetime, end: datetime, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Sums per UTC hour, region and deciding constraint of rows started in the hours from
        the one holding ``start`` up to, not including, the one holding ``end`` (whole hours),
        ``tenant``'s only or everyone's; read from the hourly sums, not the rows."""
        where, params = ["hour >= ?", "hour < ?"], [utc_iso(start)[:13], utc_iso(end)[:13]]
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        cols = ["hour", "region", "binding", "requests", "kwh", "carbon_g", "avoided_g",
                "embodied_g", "cost_usd"]  # fmt: skip
        found = self._query(
            "SELECT hour, region, binding, SUM(requests), SUM(kwh), SUM(carbon_g), "
            "SUM(avoided_g), SUM(embodied_g), SUM(cost_usd) FROM usage_hourly "
            f"WHERE {' AND '.join(where)} GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
            params,
        )
        return [dict(zip(cols, r, strict=True)) for r in found]

    def top_tenants(self, start: datetime, end: datetime, limit: int = 10) -> list[dict[str, Any]]:
        """The tenants that used most kWh in the hours starting in ``[start, end)``."""
        cols = ["tenant", "requests", "kwh", "carbon_g", "avoided_g", "cost_usd"]
        found = self._query(
            "SELECT tenant, SUM(requests), SUM(kwh), SUM(carbon_g), SUM(avoided_g), "
            "SUM(cost_usd) FROM usage_hourly WHERE hour >= ? AND hour < ? "
            "GROUP BY tenant ORDER BY 3 DESC, 1 LIMIT ?",
            (utc_iso(start)[:13], utc_iso(end)[:13], limit),
        )
        return [dict(zip(cols, r, strict=True)) for r in found]

    def rows(self, *, where: str = "1", params: Sequence[object] = ()) -> list[LedgerRow]:
        cur = self._query(
            f"SELECT receipt FROM requests WHERE {where} ORDER BY started_at, request_id",
            params,
        )
        return [_row(r) for r in cur]

    def tenant_rows(
        self, tenant: str | None, start: datetime | None = None, end: datetime | None = None
    ) -> list[LedgerRow]:
        where, params = _period(tenant, start, end)
        return self.rows(where=where, params=params)

    def readings(self, replica: str) -> list[tuple[float, str, float]]:
        return list(
            self._query(
                "SELECT t_s, wall_time, energy_j FROM meter_readings "
                "WHERE replica = ? ORDER BY t_s",
                (replica,),
            )
        )

    def idle_j(self, replica: str | None = None) -> float:
        sql = "SELECT COALESCE(SUM(energy_j), 0) FROM idle_energy"
        cur = self._query(sql + " WHERE replica = ?", (replica,)) if replica else self._query(sql)
        return float(cur[0][0])

    def measured_rows(self, replica: str, limit: int = 5000) -> list[tuple[int, int, float]]:
        """``(prompt_tokens, completion_tokens, energy_j)`` of a replica's latest ok requests,
        the energy predictor's refit data."""
        cur = self._query(
            "SELECT prompt_tokens, completion_tokens, energy_j FROM requests "
            "WHERE replica = ? AND status = 'ok' ORDER BY started_at DESC LIMIT ?",
            (replica, limit),
        )
        return [(int(p), int(c), float(e)) for p, c, e in cur]

    def usage_page(
        self,
        tenant: str | None,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> UsagePage:
        """One page of ``tenant``'s rows (None: everyone's) started in ``[start, end)``, in
        time order from the row after request ``after``, with the period's totals, summed by
        SQL: the cost does not grow with the rows a tenant has, only with the page."""
        where, params = _period(tenant, start, end)
        n, kwh, g, usd, avoided, embodied = self._totals(tenant, start, end)
        page_where, page_params = where, list(params)
        if after is not None:
            # the caller's own rows only: another tenant's id reads as unknown (no oracle)
            found = self._query(
                "SELECT started_at FROM requests WHERE request_id = ?"
                + ("" if tenant is None else " AND tenant = ?"),
                (after,) if tenant is None else (after, tenant),
            )
            if not found:
                raise LedgerError(f"no row {after} to page after")
            page_where += " AND (started_at, request_id) > (?, ?)"
            page_params += [found[0][0], after]
        cur = self._query(
            f"SELECT receipt FROM requests WHERE {page_where} "
            "ORDER BY started_at, request_id LIMIT ?",
            [*page_params, limit + 1],
        )
        rows = [_row(r) for r in cur]
        totals = {"requests": int(n), "kwh": float(kwh), "carbon_g": float(g),
                  "cost_usd": float(usd), "carbon_avoided_g": float(avoided),
                  "embodied_g": float(embodied)}  # fmt: skip
        return UsagePage(rows[:limit], totals, len(rows) > limit)

    def spend(self, tenant: str, since: datetime) -> tuple[float, float, float]:
        """``tenant``'s billed (kWh, g CO2e, USD) since ``since``, summed by SQL."""
        _, kwh, g, usd, _, _ = self._totals(tenant, since, None)
        return kwh, g, usd

    def _totals(
        self, tenant: str | None, start: datetime | None, end: datetime | None
    ) -> tuple[int, float, float, float, float, float]:
        """(requests, kWh, g CO2e, USD, g avoided, g embodied) of ``tenant``'s rows (None:
        everyone's) started in
        ``[start, end)``: the whole UTC days inside it from the daily sums, the partial days
        at its ends from the rows, so the cost is that of two days at most, not of the period."""
        first = None if start is None else _day(start, up=True)  # the first whole day
        stop = None if end is None else _day(end, up=False)  # the day after the last whole one
        if first is not None and stop is not None and first >= stop:
            return self._sum_rows(tenant, start, end)  # not one whole day: the rows it holds
        where, params = ["1"], []
        if tenant is not None:
            where.append("tenant = ?")
            params.append(tenant)
        if first is not None:
            where.append("day >= ?")
            params.append(first.date().isoformat())
        if stop is not None:
            where.append("day < ?")
            params.append(stop.date().isoformat())
        n, *sums = self._query(
            "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(kwh), 0), "
            "COALESCE(SUM(carbon_g), 0), COALESCE(SUM(cost_usd), 0), "
            "COALESCE(SUM(avoided_g), 0), COALESCE(SUM(embodied_g), 0) FROM usage_daily "
            f"WHERE {' AND '.join(where)}",
            params,
        )[0]
        total = [int(n), *map(float, sums)]
        edges = []
        if start is not None and first is not None and start < first:
            edges.append(self._sum_rows(tenant, start, first))
        if end is not None and stop is not None and stop < end:
            edges.append(self._sum_rows(tenant, stop, end))
        for edge in edges:
            total = [a + b for a, b in zip(total, edge, strict=True)]
        return int(total[0]), total[1], total[2], total[3], total[4], total[5]

    def _sum_rows(
        self, tenant: str | None, start: datetime | None, end: datetime | None
    ) -> tuple[int, float, float, float, float, float]:
        where, params = _period(tenant, start, end)
        n, kwh, g, usd, avoided, embodied = self._query(
            "SELECT COUNT(*), COALESCE(SUM(kwh_billed), 0), COALESCE(SUM(carbon_g), 0), "
            "COALESCE(SUM(cost_usd), 0), COALESCE(SUM(avoided_g), 0), "
            f"COALESCE(SUM(embodied_g), 0) FROM requests WHERE {where}",
            params,
        )[0]
        return int(n), float(kwh), float(g), float(usd), float(avoided), float(embodied)

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        """A read on the reader's own connection, fetched whole under its lock: it sees
        committed rows only, never a write in progress (or one rolled back) on the writer's."""
        with self._read_lock:
            return self._reader.execute(sql, params).fetchall()

    def tenants(self) -> list[str]:
        return [r[0] for r in self._query("SELECT DISTINCT tenant FROM requests ORDER BY 1")]

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM requests")[0][0])

    def integrity_ok(self) -> bool:
        return bool(self._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok")

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._db.close()
            self._reader.close()
