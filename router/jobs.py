"""Deferred jobs: requests that may wait (``defer`` in the preference) and run later in the
planned region. The store is SQLite (WAL, durable on write), so planned jobs survive restarts.

Statuses: ``scheduled`` -> ``running`` -> ``completed`` | ``failed``. A job found ``running``
after a restart is scheduled again (it was never billed: billing happens on completion, once,
by request id).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from router.errors import RouterError


class JobError(RouterError):
    """A job cannot be stored or found."""


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

    def public(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("body",)}
        out["object"] = "job"
        return out


_SCHEMA = """
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


class JobStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()
        with self._lock:  # jobs interrupted by a restart run again (they were not billed)
            self._db.execute("UPDATE jobs SET status='scheduled' WHERE status='running'")

    def add(self, job: Job) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    job.id,
                    job.tenant,
                    job.status,
                    job.created_at,
                    job.start_at,
                    job.deadline,
                    job.replica,
                    job.region,
                    int(job.chat),
                    json.dumps(job.body),
                    job.forecast_score,
                    None,
                    None,
                ),
            )

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def due(self, now: datetime, limit: int = 16) -> list[Job]:
        """Claim up to ``limit`` scheduled jobs whose start time has come (marks them running)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status='scheduled' AND start_at <= ? ORDER BY start_at "
                "LIMIT ?",
                (now.astimezone(UTC).isoformat(), limit),
            ).fetchall()
            for r in rows:
                self._db.execute("UPDATE jobs SET status='running' WHERE id=?", (r[0],))
        return [_job(r) for r in rows]

    def finish(self, job_id: str, *, result: dict[str, Any] | None, error: str | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status=?, result=?, error=? WHERE id=?",
                (
                    "failed" if error else "completed",
                    json.dumps(result) if result else None,
                    error,
                    job_id,
                ),
            )

    def run_now(self, job_id: str, now: datetime) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET start_at=? WHERE id=? AND status='scheduled'",
                (now.astimezone(UTC).isoformat(), job_id),
            )

    # ---- files and batches (the OpenAI Batch API's storage) ----------------------------------

    def add_file(
        self,
        file_id: str,
        tenant: str,
        purpose: str,
        filename: str,
        content: bytes,
        created_at: int,
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO files VALUES (?,?,?,?,?,?)",
                (file_id, tenant, purpose, filename, created_at, content),
            )

    def file(self, file_id: str) -> tuple[str, str, str, int, bytes] | None:
        row = self._db.execute(
            "SELECT tenant, purpose, filename, created_at, content FROM files WHERE id=?",
            (file_id,),
        ).fetchone()
        return (row[0], row[1], row[2], row[3], bytes(row[4])) if row else None

    def add_batch(
        self,
        batch_id: str,
        tenant: str,
        input_file_id: str,
        endpoint: str,
        window: str,
        created_at: int,
        jobs: list[str],
        custom_ids: list[str],
    ) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO batches VALUES (?,?,?,?,?,?,?,?,NULL)",
                (
                    batch_id,
                    tenant,
                    input_file_id,
                    endpoint,
                    window,
                    created_at,
                    json.dumps(jobs),
                    json.dumps(custom_ids),
                ),
            )

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
        if not row:
            return None
        keys = (
            "id",
            "tenant",
            "input_file_id",
            "endpoint",
            "completion_window",
            "created_at",
            "jobs",
            "custom_ids",
            "output_file_id",
        )
        out = dict(zip(keys, row, strict=True))
        out["jobs"], out["custom_ids"] = json.loads(out["jobs"]), json.loads(out["custom_ids"])
        return out

    def set_batch_output(self, batch_id: str, file_id: str) -> None:
        with self._lock:
            self._db.execute("UPDATE batches SET output_file_id=? WHERE id=?", (file_id, batch_id))

    def close(self) -> None:
        self._db.close()


def _job(row: tuple[Any, ...]) -> Job:
    return Job(
        id=row[0],
        tenant=row[1],
        status=row[2],
        created_at=row[3],
        start_at=row[4],
        deadline=row[5],
        replica=row[6],
        region=row[7],
        chat=bool(row[8]),
        body=json.loads(row[9]),
        forecast_score=row[10],
        result=json.loads(row[11]) if row[11] else None,
        error=row[12],
    )
