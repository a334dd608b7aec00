"""The durable record of the forecasts remote providers issued, and of the actuals they reported.

A provider's forecast can be weighed against the other forecasts only by its recent error, and
an API serves only its *current* forecast: so each forecast fetched is kept here, one row per
(source, zone, hour issued, target hour), with its g/kWh. Beside it, the hourly actuals the
provider's history endpoint returned (a cache: those endpoints are rate-limited, and on some
accounts they serve only the last day, so the record is also how a long history builds up).

Conventions
-----------
- Hours are stored as whole hours since the Unix epoch, UTC; a value names the hour starting
  then. Sub-hourly values (UK CI's half hours) are averaged per hour before they are stored.
- The hour *issued* is the hour in which the forecast was fetched from the provider (its fetch
  time, not the time it was served from a cache, floored to the hour).
- :meth:`ForecastRecord.published` gives, for each target hour, the value of the *latest issue
  recorded before that hour* (issued hour < target hour). Fetched every hour, that is the
  provider's forecast made one to two hours ahead, the freshest the router could have acted on.
  :meth:`ForecastRecord.issued_table` gives the issues themselves, for scoring the provider at
  each horizon on the forecasts it had actually issued that far ahead.
- Only finite, non-negative values are stored; a gap stays a gap (never a 0).
- Rows older than ``retention_days`` (by the hour issued, or the actual's hour) are deleted, at
  most once an hour per source.

SQLite in WAL mode: a write is one transaction, so a process killed mid-write leaves the whole
batch or none of it. One connection per record, guarded by a lock, serves every thread of the
process; several records (one per source) may share a file.
"""

from __future__ import annotations

import logging
import math
import random
import sqlite3
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from forecasting.errors import ForecastRecordError
from forecasting.sources.base import Clock, require_utc, utc_now

log = logging.getLogger(__name__)

__all__ = ["ForecastRecord", "ForecastRecordError", "from_hours", "hourly", "to_hour"]

SCHEMA_VERSION = 1
HOUR_NS = 3600 * 10**9

_SCHEMA = """
CREATE TABLE IF NOT EXISTS issued (
    source TEXT NOT NULL,
    zone TEXT NOT NULL,
    target_h INTEGER NOT NULL,
    issued_h INTEGER NOT NULL,
    g_per_kwh REAL NOT NULL CHECK (g_per_kwh >= 0),
    PRIMARY KEY (source, zone, target_h, issued_h)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS issued_by_issue ON issued (source, issued_h);
CREATE TABLE IF NOT EXISTS actual (
    source TEXT NOT NULL,
    zone TEXT NOT NULL,
    hour_h INTEGER NOT NULL,
    g_per_kwh REAL NOT NULL CHECK (g_per_kwh >= 0),
    PRIMARY KEY (source, zone, hour_h)
) WITHOUT ROWID;
"""


def _wal(db: sqlite3.Connection, tries: int = 100) -> None:
    """Put the file in WAL mode (kept in the file: once done, only checked). Switching answers
    "database is locked" at once, without waiting, while another connection is creating the
    file: retried for a few seconds."""
    for attempt in range(tries):
        try:
            if str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower() == "wal":
                return
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == tries - 1:
                raise
            time.sleep(0.01 + 0.04 * random.random())


def to_hour(when: datetime | pd.Timestamp) -> int:
    """Whole hours since the epoch of the hour containing ``when`` (timezone-aware)."""
    ts = pd.Timestamp(when)
    if ts.tzinfo is None:
        require_utc(ts.to_pydatetime(), "hour")  # raises: naive times are refused
    return int(ts.tz_convert("UTC").value // HOUR_NS)


def from_hours(hours: np.ndarray) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(pd.to_datetime(np.asarray(hours, dtype=np.int64) * HOUR_NS, utc=True))


def hourly(values: pd.Series) -> pd.Series:
    """``values`` (UTC index) averaged per hour; non-finite and negative values dropped."""
    s = pd.to_numeric(values, errors="coerce").astype("float64")
    s = s[np.isfinite(s.to_numpy()) & (s.to_numpy() >= 0)]
    if s.empty:
        return s
    return s.groupby(s.index.floor("h")).mean()


class ForecastRecord:
    """Issued forecasts and actuals of one source (``source`` is its config name), in the
    SQLite file ``path`` (created, with its folder, on first use)."""

    def __init__(
        self,
        path: str | Path,
        source: str,
        *,
        retention_days: int = 60,
        clock: Clock = utc_now,
    ) -> None:
        self.path = Path(path)
        self.source = source
        self.retention_days = retention_days
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._pruned_h: int | None = None

    # ---- connection -------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
        except (sqlite3.Error, OSError) as e:
            raise ForecastRecordError(f"{self.path}: cannot open the forecast record: {e}") from e
        try:
            _wal(db)
            db.execute("PRAGMA synchronous=NORMAL")  # a cache: a power cut may lose the last hour
            # IMMEDIATE: a second connection opening the file at the same time waits here (a
            # deferred transaction's upgrade to a write fails at once, "database is locked")
            db.execute("BEGIN IMMEDIATE")
            try:
                self._migrate(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            db.close()
            raise ForecastRecordError(f"{self.path}: cannot open the forecast record: {e}") from e
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version > SCHEMA_VERSION or (version == 0 and tables - {"issued", "actual"}):
            raise ForecastRecordError(
                f"{self.path}: not a carbon-router forecast record of schema "
                f"v{SCHEMA_VERSION} (user_version {version}, tables {sorted(tables)}); "
                "move it away or point the ledger elsewhere"
            )
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _write(self, sql: str, rows: list[tuple[object, ...]]) -> int:
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    db.executemany(sql, rows)
                    self._prune(db)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise ForecastRecordError(f"{self.path}: cannot write: {e}") from e
        return len(rows)

    def _prune(self, db: sqlite3.Connection) -> None:
        now_h = to_hour(self._clock())
        if self._pruned_h == now_h:
            return
        cutoff = now_h - 24 * self.retention_days
        db.execute("DELETE FROM issued WHERE source = ? AND issued_h < ?", (self.source, cutoff))
        db.execute("DELETE FROM actual WHERE source = ? AND hour_h < ?", (self.source, cutoff))
        self._pruned_h = now_h

    def _read(self, sql: str, args: tuple[object, ...]) -> list[tuple[int, float]]:
        with self._lock:
            try:
                return [(int(h), float(v)) for h, v in self._conn().execute(sql, args)]
            except sqlite3.Error as e:
                raise ForecastRecordError(f"{self.path}: cannot read: {e}") from e

    @staticmethod
    def _series(rows: list[tuple[int, float]]) -> pd.Series:
        if not rows:
            return pd.Series([], index=from_hours(np.empty(0)), dtype="float64", name="g_per_kwh")
        hours, values = zip(*rows, strict=True)
        return pd.Series(values, index=from_hours(np.array(hours)), name="g_per_kwh")

    # ---- issued forecasts -------------------------------------------------------------------

    def add_issue(self, zone: str, issued: datetime, values: pd.Series) -> int:
        """Record the forecast fetched at ``issued`` (g/kWh by period start); returns the rows
        written. A second fetch in the same hour replaces the first's values."""
        issued_h = to_hour(issued)
        s = hourly(values)
        rows: list[tuple[object, ...]] = [
            (self.source, zone, to_hour(t), issued_h, float(v))
            for t, v in s.items()
            if math.isfinite(v)
        ]
        if not rows:
            return 0
        return self._write("INSERT OR REPLACE INTO issued VALUES (?, ?, ?, ?, ?)", rows)

    def published(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        """For each target hour in ``[start, end)`` with a forecast recorded before it: the
        value of the latest issue recorded before that hour (issued hour < target hour)."""
        # SQLite: with MAX() the bare column g_per_kwh comes from the row holding the maximum
        rows = self._read(
            "SELECT target_h, g_per_kwh FROM (SELECT target_h, g_per_kwh, MAX(issued_h) "
            "FROM issued WHERE source = ? AND zone = ? AND target_h >= ? AND target_h < ? "
            "AND issued_h < target_h GROUP BY target_h) ORDER BY target_h",
            (self.source, zone, to_hour(start), to_hour(end)),
        )
        return self._series(rows)

    def issued_table(
        self, zone: str, start: datetime, end: datetime
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The issues made in hours ``[start, end)``: ``(issued_h, target_h, g_per_kwh)``,
        hours since the epoch (see :func:`to_hour`), sorted by issue then target."""
        with self._lock:
            try:
                rows = (
                    self._conn()
                    .execute(
                        "SELECT issued_h, target_h, g_per_kwh FROM issued WHERE source = ? AND "
                        "zone = ? AND issued_h >= ? AND issued_h < ? ORDER BY issued_h, target_h",
                        (self.source, zone, to_hour(start), to_hour(end)),
                    )
                    .fetchall()
                )
            except sqlite3.Error as e:
                raise ForecastRecordError(f"{self.path}: cannot read: {e}") from e
        table = np.array(rows, dtype="float64").reshape(-1, 3)
        return table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2]

    def issues(self, zone: str, since: datetime | None = None) -> int:
        """How many hours (since ``since``) have a recorded issue."""
        lo = to_hour(since) if since is not None else -(2**62)
        with self._lock:
            try:
                row = (
                    self._conn()
                    .execute(
                        "SELECT COUNT(DISTINCT issued_h) FROM issued "
                        "WHERE source = ? AND zone = ? AND issued_h >= ?",
                        (self.source, zone, lo),
                    )
                    .fetchone()
                )
            except sqlite3.Error as e:
                raise ForecastRecordError(f"{self.path}: cannot read: {e}") from e
        return int(row[0])

    # ---- actuals ----------------------------------------------------------------------------

    def add_actuals(self, zone: str, values: pd.Series) -> int:
        """Store hourly actuals (a later value for an hour replaces an earlier one: providers
        revise their recent hours)."""
        s = hourly(values)
        rows: list[tuple[object, ...]] = [
            (self.source, zone, to_hour(t), float(v)) for t, v in s.items()
        ]
        if not rows:
            return 0
        return self._write("INSERT OR REPLACE INTO actual VALUES (?, ?, ?, ?)", rows)

    def actuals(self, zone: str, start: datetime, end: datetime) -> pd.Series:
        """Stored actuals for hours in ``[start, end)``."""
        return self._series(
            self._read(
                "SELECT hour_h, g_per_kwh FROM actual WHERE source = ? AND zone = ? "
                "AND hour_h >= ? AND hour_h < ? ORDER BY hour_h",
                (self.source, zone, to_hour(start), to_hour(end)),
            )
        )
