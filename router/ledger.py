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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from router.errors import RouterError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 4


class LedgerError(RouterError):
    """The ledger cannot be opened, migrated or written."""


# no request has more tokens than this; SQLite's integers stop at 2**63 and a figure past
# this is an upstream's nonsense, refused where the row is made
MAX_TOKENS = 10**9
FLOAT_COLUMNS = (
    "energy_j", "pue", "kwh_billed", "intensity_g_per_kwh", "carbon_g", "price_usd_per_kwh",
    "cost_usd", "energy_cost_usd", "token_cost_usd", "carbon_cost_usd",
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
    energy_source: Literal["measured", "estimated"]
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
            + self.token_cost_usd + self.carbon_cost_usd
        )  # fmt: skip
        if not math.isfinite(total):
            bad = next(
                (n for n in FLOAT_COLUMNS if not math.isfinite(getattr(self, n))),
                "the sum of its figures",  # each finite, their sum past float: absurd too
            )
            raise LedgerError(f"request {self.request_id}: {bad} is not a finite number")
        if self.energy_j < 0 or self.kwh_billed < 0 or self.carbon_g < 0 or self.cost_usd < 0:
            raise LedgerError(f"request {self.request_id}: negative energy, carbon or cost")
        for name in ("started_at", "ended_at"):
            value = getattr(self, name)
            try:
                ts = datetime.fromisoformat(value)
            except ValueError as e:
                raise LedgerError(f"request {self.request_id}: {name} {value!r}: {e}") from e
            if ts.utcoffset() is None or ts.utcoffset().total_seconds() != 0:  # type: ignore[union-attr]
                raise LedgerError(f"request {self.request_id}: {name} must be UTC, got {value}")
            # stored in utc_iso's one form: periods are compared as strings and the daily sums
            # take the day from the first 10 characters ('Z', a space for 'T', no microseconds
            # or the basic format would be summed in one period and listed in another)
            canonical = ts.isoformat(timespec="microseconds")
            if canonical != value:
                object.__setattr__(self, name, canonical)


COLUMNS = [f.name for f in fields(LedgerRow)]


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
    d = dict(zip(COLUMNS, r, strict=True))
    d["carbon_stale"] = bool(d["carbon_stale"])
    return LedgerRow(**d)  # type: ignore[arg-type]


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
# each a script of statements split at ';', or a tuple of statements (a trigger holds ';')
MIGRATIONS: dict[int, str | tuple[str, ...]] = {
    0: _V1, 1: _V1_TO_V2, 2: _V2_TO_V3, 3: _V3_TO_V4,
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
                    for stmt in filter(None, (s.strip() for s in stmts)):
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
        """Insert rows in one durable transaction; returns how many were new (duplicates by
        request id are skipped, never billed twice)."""
        if not rows:
            return 0
        placeholders = ", ".join("?" for _ in COLUMNS)
        sql = (
            f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({placeholders}) "
            "ON CONFLICT (request_id) DO NOTHING"
        )
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                # attribute reads, not dataclasses.astuple: that deep-copies every field; the
                # cursor's count is of rows inserted (not of the daily sums' trigger's changes)
                cur = self._db.executemany(sql, ([getattr(r, c) for c in COLUMNS] for r in rows))
                self._db.execute("COMMIT")
            except BaseException as e:  # nothing of the batch is kept, no transaction left open
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error | OverflowError | ValueError | TypeError):
                    raise LedgerError(f"{self.path}: write of {len(rows)} rows failed: {e}") from e
                raise
            return int(cur.rowcount)

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

    def rows(self, *, where: str = "1", params: Sequence[object] = ()) -> list[LedgerRow]:
        cur = self._query(
            f"SELECT {', '.join(COLUMNS)} FROM requests WHERE {where} "
            "ORDER BY started_at, request_id",
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
        n, kwh, g, usd = self._totals(tenant, start, end)
        page_where, page_params = where, list(params)
        if after is not None:
            found = self._query("SELECT started_at FROM requests WHERE request_id = ?", (after,))
            if not found:
                raise LedgerError(f"no row {after} to page after")
            page_where += " AND (started_at, request_id) > (?, ?)"
            page_params += [found[0][0], after]
        cur = self._query(
            f"SELECT {', '.join(COLUMNS)} FROM requests WHERE {page_where} "
            "ORDER BY started_at, request_id LIMIT ?",
            [*page_params, limit + 1],
        )
        rows = [_row(r) for r in cur]
        totals = {"requests": int(n), "kwh": float(kwh), "carbon_g": float(g),
                  "cost_usd": float(usd)}  # fmt: skip
        return UsagePage(rows[:limit], totals, len(rows) > limit)

    def spend(self, tenant: str, since: datetime) -> tuple[float, float, float]:
        """``tenant``'s billed (kWh, g CO2e, USD) since ``since``, summed by SQL."""
        _, kwh, g, usd = self._totals(tenant, since, None)
        return kwh, g, usd

    def _totals(
        self, tenant: str | None, start: datetime | None, end: datetime | None
    ) -> tuple[int, float, float, float]:
        """(requests, kWh, g CO2e, USD) of ``tenant``'s rows (None: everyone's) started in
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
        n, kwh, g, usd = self._query(
            "SELECT COALESCE(SUM(requests), 0), COALESCE(SUM(kwh), 0), "
            "COALESCE(SUM(carbon_g), 0), COALESCE(SUM(cost_usd), 0) FROM usage_daily "
            f"WHERE {' AND '.join(where)}",
            params,
        )[0]
        total = [int(n), float(kwh), float(g), float(usd)]
        edges = []
        if start is not None and first is not None and start < first:
            edges.append(self._sum_rows(tenant, start, first))
        if end is not None and stop is not None and stop < end:
            edges.append(self._sum_rows(tenant, stop, end))
        for edge in edges:
            total = [a + b for a, b in zip(total, edge, strict=True)]
        return int(total[0]), total[1], total[2], total[3]

    def _sum_rows(
        self, tenant: str | None, start: datetime | None, end: datetime | None
    ) -> tuple[int, float, float, float]:
        where, params = _period(tenant, start, end)
        n, kwh, g, usd = self._query(
            "SELECT COUNT(*), COALESCE(SUM(kwh_billed), 0), COALESCE(SUM(carbon_g), 0), "
            f"COALESCE(SUM(cost_usd), 0) FROM requests WHERE {where}",
            params,
        )[0]
        return int(n), float(kwh), float(g), float(usd)

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
