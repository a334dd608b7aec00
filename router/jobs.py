"""Deferred jobs: requests that may wait (``defer`` in the preference) and run later in the
planned region. The store is SQLite (WAL, durable on write), so planned jobs survive restarts.

Statuses: ``scheduled`` -> ``running`` -> ``completed`` | ``failed``. A runner claims a due
job for a lease (:attr:`JobStore.lease_s`, 60 s) that it renews while the job runs: several
ingresses share one store, and one that starts, or restarts, leaves the jobs another is running
alone. A job whose runner died (its lease ran out) is claimed again, under the same id: its
bill is the ledger's row of that id, once (see :meth:`router.service.deferral.Deferral.run`).
Only the runner holding a job's claim stores its result.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from router.errors import RouterError


class JobError(RouterError):
    """The job store cannot be opened, migrated or written."""


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    status: str
    created_at: str
    start_at: str
    deadline: str
    replica: str
    region: str
    chat: bool
    body: dict[str, Any]
    forecast_score: float
    result: dict[str, Any] | None = None
    error: str | None = None
    preference: str | None = None  # the X-Carbon-Preference it came with, applied when it runs
    claim: str | None = None  # the running attempt's token: only it may store the result
    lease_until: str | None = None  # when a running job's claim runs out unless renewed
    # g CO2e per kWh (its grid's intensity x PUE, the decision's signal) where it would have
    # run at arrival: a job whose hour comes with its replica's grid dirtier than that is
    # planned again; None: not planned (a batch line to run now, an admin's run now)
    arrival_g_per_kwh: float | None = None

    def public(self) -> dict[str, Any]:
        hidden = ("body", "preference", "claim", "lease_until", "arrival_g_per_kwh")
        out = {k: v for k, v in self.__dict__.items() if k not in hidden}
        out["object"] = "job"
        return out


# v1 is the schema as first shipped, unversioned (user_version 0): IF NOT EXISTS adopts a store
# that an earlier version created
_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, status TEXT NOT NULL, created_at TEXT NOT NULL,
    start_at TEXT NOT NULL, deadline TEXT NOT NULL, replica TEXT NOT NULL, region TEXT NOT NULL,
    chat INTEGER NOT NULL, body TEXT NOT NULL, forecast_score REAL NOT NULL,
    result TEXT, error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (status, start_at);
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, purpose TEXT NOT NULL, filename TEXT NOT NULL,
    created_at INTEGER NOT NULL, content BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, input_file_id TEXT NOT NULL, endpoint TEXT NOT NULL,
    completion_window TEXT NOT NULL, created_at INTEGER NOT NULL, jobs TEXT NOT NULL,
    custom_ids TEXT NOT NULL, output_file_id TEXT
);
"""
# v2: a job keeps the preference it came with (its regions above all) for when it runs
_V1_TO_V2 = "ALTER TABLE jobs ADD COLUMN preference TEXT"
# v3: a running job is claimed for a lease (a job running when v3 first opens the store has
# none: it is claimed again at once, as every running job was on a restart before)
_V2_TO_V3 = "ALTER TABLE jobs ADD COLUMN claim TEXT; ALTER TABLE jobs ADD COLUMN lease_until TEXT"
# v4: a planned job keeps the grid it would have run on at arrival (a job stored before has
# none: never planned again, as before)
_V3_TO_V4 = "ALTER TABLE jobs ADD COLUMN arrival_g_per_kwh REAL"
# from version k to k + 1
MIGRATIONS: dict[int, str] = {0: _V1, 1: _V1_TO_V2, 2: _V2_TO_V3, 3: _V3_TO_V4}
SCHEMA_VERSION = len(MIGRATIONS)

JOB_COLUMNS = [f.name for f in fields(Job)]


@dataclass(frozen=True)
class StoredFile:
    id: str
    tenant: str
    purpose: str
    filename: str
    created_at: int
    content: bytes


@dataclass(frozen=True)
class Batch:
    id: str
    tenant: str
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: int
    jobs: list[str]
    custom_ids: list[str]
    output_file_id: str | None = None


LEASE_S = 60.0  # a claimed job's lease; its runner renews it well before it runs out


class JobStore:
    """Jobs, files and batches in one SQLite file. Writes are durable when they return
    (``synchronous=FULL``); a store that cannot be opened, migrated or written raises
    :class:`JobError` naming its file. ``lease_s``: how long a claim on a due job holds
    unless renewed (:meth:`renew`)."""

    def __init__(self, path: str | Path, *, lease_s: float = LEASE_S) -> None:
        self.path = Path(path)
        self.lease_s = lease_s
        try:
            self._db = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=30.0
            )
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error as e:
            raise JobError(f"{self.path}: cannot open the job store: {e}") from e
        self._lock = threading.Lock()
        self._migrate()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > SCHEMA_VERSION:
            raise JobError(
                f"{self.path}: job store schema v{version} is newer than this carbon-router "
                f"(v{SCHEMA_VERSION}); upgrade carbon-router"
            )
        with self._write():
            for v in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[v].split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {v + 1}")

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        """One transaction under the lock; rolled back whole on any error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield
                self._db.execute("COMMIT")
            except BaseException as e:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(e, sqlite3.Error):
                    raise JobError(f"{self.path}: {e}") from e
                raise

    def add(self, job: Job) -> None:
        self.add_many([job])

    def add_many(self, jobs: list[Job]) -> None:
        """Store ``jobs`` in one transaction: all of them or none."""
        cols = ", ".join(JOB_COLUMNS)
        marks = ", ".join(f":{c}" for c in JOB_COLUMNS)
        with self._write():
            self._db.executemany(
                f"INSERT INTO jobs ({cols}) VALUES ({marks})",
                [_job_params(j) for j in jobs],
            )

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def due(self, now: datetime, limit: int = 16) -> list[Job]:
        """Claim up to ``limit`` jobs, marked running, each under a claim of its own leased
        until ``now`` + :attr:`lease_s`: the scheduled ones whose start time has come, and the
        running ones whose lease ran out (their runner died)."""
        at = now.astimezone(UTC).isoformat()
        until = (now + timedelta(seconds=self.lease_s)).astimezone(UTC).isoformat()
        claimed: list[Job] = []
        with self._write():
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE (status='scheduled' AND start_at <= ?) OR "
                "(status='running' AND (lease_until IS NULL OR lease_until < ?)) "
                "ORDER BY start_at LIMIT ?",
                (at, at, limit),
            ).fetchall()
            for r in rows:
                claim = uuid.uuid4().hex
                self._db.execute(
                    "UPDATE jobs SET status='running', claim=?, lease_until=? WHERE id=?",
                    (claim, until, r["id"]),
                )
                claimed.append(replace(_job(r), status="running", claim=claim, lease_until=until))
        return claimed

    def renew(self, claims: dict[str, str], now: datetime) -> None:
        """Extend the leases of the running jobs ``claims`` names (job id -> claim) to
        ``now`` + :attr:`lease_s`; a job claimed by another runner meanwhile is left alone."""
        if not claims:
            return
        until = (now + timedelta(seconds=self.lease_s)).astimezone(UTC).isoformat()
        with self._write():
            self._db.executemany(
                "UPDATE jobs SET lease_until=? WHERE id=? AND claim=? AND status='running'",
                [(until, job_id, claim) for job_id, claim in claims.items()],
            )

    def finish(
        self,
        job_id: str,
        *,
        result: dict[str, Any] | None,
        error: str | None,
        claim: str | None = None,
    ) -> bool:
        """``completed`` with its result, or ``failed`` with why (never completed without
        a result: an error with an empty message still fails the job). With ``claim``, only
        while the job is running under that claim; returns whether the job was stored."""
        failed = result is None or error is not None
        if failed and not error:
            error = "failed without a message"
        with self._write():
            cur = self._db.execute(
                "UPDATE jobs SET status=?, result=?, error=?, lease_until=NULL WHERE id=? AND "
                "(? IS NULL OR (claim=? AND status='running'))",
                (
                    "failed" if failed else "completed",
                    None if failed else json.dumps(result),
                    error if failed else None,
                    job_id,
                    claim,
                    claim,
                ),
            )
        return cur.rowcount > 0

    def retry_at(self, job_id: str, at: datetime, claim: str | None = None) -> None:
        """A running job that could not start (every replica full), or whose runner stops, is
        scheduled again (with ``claim``: only while that claim holds it)."""
        with self._write():
            self._db.execute(
                "UPDATE jobs SET status='scheduled', start_at=?, lease_until=NULL WHERE id=? AND "
                "status='running' AND (? IS NULL OR claim=?)",
                (at.astimezone(UTC).isoformat(), job_id, claim, claim),
            )

    def replan(
        self,
        job_id: str,
        at: datetime,
        replica: str,
        region: str,
        forecast_score: float,
        claim: str | None = None,
    ) -> bool:
        """A running job planned again (its hour came dirtier than its arrival): scheduled at
        ``at`` on ``replica`` (with ``claim``: only while that claim holds it). False: it was
        not this claim's to change."""
        with self._write():
            cur = self._db.execute(
                "UPDATE jobs SET status='scheduled', start_at=?, replica=?, region=?, "
                "forecast_score=?, lease_until=NULL WHERE id=? AND status='running' AND "
                "(? IS NULL OR claim=?)",
                (at.astimezone(UTC).isoformat(), replica, region, forecast_score, job_id, claim,
                 claim),  # fmt: skip
            )
        return cur.rowcount == 1

    def run_now(self, job_id: str, now: datetime) -> None:
        """The admin's "run it now": due at once, and not planned again when it runs."""
        with self._write():
            self._db.execute(
                "UPDATE jobs SET start_at=?, arrival_g_per_kwh=NULL WHERE id=? AND "
                "status='scheduled'",
                (now.astimezone(UTC).isoformat(), job_id),
            )

    def queue(self, now: datetime, *, tenant: str | None = None, limit: int = 20) -> dict[str, Any]:
        """The jobs waiting or running (``tenant``'s, or everyone's), for the operator's view:
        ``counts`` per status and region (with how many are ``overdue``: scheduled, their start
        time passed, not yet claimed) and ``next``, the running ones then the next scheduled to
        start, ``limit`` in all, without their bodies or results. Read by the
        ``(status, start_at)`` index: the cost is that of the queue, not of finished jobs. On a
        connection of its own, so that it may be read from a worker thread beside the writes."""
        try:
            # read-only: a store whose file is gone is an error, not a new empty store
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=30.0)) as db:
                db.execute("BEGIN")  # one read transaction: one snapshot beside the writes
                return self._queue(db, now, tenant, limit)
        except sqlite3.Error as e:
            raise JobError(f"{self.path}: {e}") from e

    @staticmethod
    def _queue(
        db: sqlite3.Connection, now: datetime, tenant: str | None, limit: int
    ) -> dict[str, Any]:
        at = now.astimezone(UTC).isoformat()
        where, params = "status = ?", []
        if tenant is not None:
            where, params = where + " AND tenant = ?", [tenant]
        counts = [
            {
                "status": s,
                "region": r,
                "jobs": int(n),
                "next_start_at": f,
                "overdue": int(o or 0) if s == "scheduled" else 0,
            }
            for status in ("running", "scheduled")
            for s, r, n, o, f in db.execute(
                "SELECT status, region, COUNT(*), SUM(start_at <= ?), MIN(start_at) FROM jobs "
                f"WHERE {where} GROUP BY region ORDER BY region",
                [at, status, *params],
            )
        ]
        cols = ("id", "tenant", "status", "region", "replica", "created_at", "start_at",
                "deadline", "forecast_score")  # fmt: skip
        upcoming: list[dict[str, Any]] = []
        for status in ("running", "scheduled"):
            if len(upcoming) >= limit:
                break
            upcoming += [
                dict(zip(cols, r, strict=True))
                for r in db.execute(
                    f"SELECT {', '.join(cols)} FROM jobs WHERE {where} ORDER BY start_at LIMIT ?",
                    [status, *params, limit - len(upcoming)],
                )
            ]
        return {"counts": counts, "next": upcoming}

    # ---- files and batches (the OpenAI Batch API's storage) ----------------------------------

    def add_file(self, f: StoredFile) -> None:
        with self._write():
            self._db.execute(
                "INSERT INTO files (id, tenant, purpose, filename, created_at, content) "
                "VALUES (:id, :tenant, :purpose, :filename, :created_at, :content)",
                f.__dict__,
            )

    def file(self, file_id: str) -> StoredFile | None:
        row = self._db.execute("SELECT * FROM files WHERE id=?", (file_id,)).fetchone()
        if row is None:
            return None
        return StoredFile(**{**dict(row), "content": bytes(row["content"])})

    def delete_file(self, file_id: str) -> None:
        with self._write():
            self._db.execute("DELETE FROM files WHERE id=?", (file_id,))

    def add_batch(self, batch: Batch, jobs: list[Job]) -> None:
        """Store ``batch`` and its ``jobs`` in one transaction: all of them or none."""
        params = {
            **batch.__dict__,
            "jobs": json.dumps(batch.jobs),
            "custom_ids": json.dumps(batch.custom_ids),
        }
        cols = ", ".join(JOB_COLUMNS)
        marks = ", ".join(f":{c}" for c in JOB_COLUMNS)
        with self._write():
            self._db.executemany(
                f"INSERT INTO jobs ({cols}) VALUES ({marks})", [_job_params(j) for j in jobs]
            )
            self._db.execute(
                "INSERT INTO batches (id, tenant, input_file_id, endpoint, completion_window, "
                "created_at, jobs, custom_ids, output_file_id) VALUES (:id, :tenant, "
                ":input_file_id, :endpoint, :completion_window, :created_at, :jobs, "
                ":custom_ids, :output_file_id)",
                params,
            )

    def batch(self, batch_id: str) -> Batch | None:
        row = self._db.execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
        if not row:
            return None
        out = dict(row)
        out["jobs"], out["custom_ids"] = json.loads(out["jobs"]), json.loads(out["custom_ids"])
        return Batch(**out)

    def set_batch_output(self, batch_id: str, f: StoredFile) -> None:
        """Store the batch's output file and point the batch at it, in one transaction."""
        with self._write():
            self._db.execute(
                "INSERT INTO files (id, tenant, purpose, filename, created_at, content) "
                "VALUES (:id, :tenant, :purpose, :filename, :created_at, :content)",
                f.__dict__,
            )
            self._db.execute("UPDATE batches SET output_file_id=? WHERE id=?", (f.id, batch_id))

    def close(self) -> None:
        self._db.close()


def _job_params(job: Job) -> dict[str, Any]:
    return {
        **job.__dict__,
        "chat": int(job.chat),
        "body": json.dumps(job.body),
        "result": json.dumps(job.result) if job.result else None,
    }


def _job(row: sqlite3.Row) -> Job:
    out = dict(row)
    out["chat"] = bool(out["chat"])
    out["body"] = json.loads(out["body"])
    out["result"] = json.loads(out["result"]) if out["result"] else None
    return Job(**out)
