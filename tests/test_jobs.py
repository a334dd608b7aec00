"""The deferred-job store survives restarts and never loses a claimed job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from router.jobs import Job, JobError, JobStore
from router.scheduler import SlotBook, plan, worth_waiting

T0 = datetime(2026, 11, 26, 20, tzinfo=UTC)


def job(jid: str, start: datetime) -> Job:
    return Job(id=jid, tenant="demo", status="scheduled", created_at=T0.isoformat(),
               start_at=start.isoformat(), deadline=(T0 + timedelta(days=1)).isoformat(),
               replica="eu-central-0", region="eu-central", chat=True,
               body={"model": "m", "messages": [{"role": "user", "content": "x"}]},
               forecast_score=0.5)  # fmt: skip


def test_jobs_survive_a_restart(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "j.sqlite")
    store.add(job("a", T0 + timedelta(hours=2)))
    store.add(job("b", T0 + timedelta(hours=5)))
    assert store.due(T0 + timedelta(hours=1)) == []
    (claimed,) = store.due(T0 + timedelta(hours=3))
    assert claimed.id == "a" and store.get("a").status == "running"  # type: ignore[union-attr]
    store.close()  # the process dies while "a" runs
    again = JobStore(tmp_path / "j.sqlite")
    assert again.get("a").status == "running"  # type: ignore[union-attr]  # until its lease ends
    assert again.get("b").body["model"] == "m"  # type: ignore[union-attr]
    assert again.due(T0 + timedelta(hours=3)) == []
    (a,) = again.due(T0 + timedelta(hours=3, seconds=again.lease_s + 1))  # it runs again
    assert a.id == "a" and a.claim != claimed.claim
    again.finish(a.id, result={"usage": {"energy_kwh": 1e-6}}, error=None, claim=a.claim)
    done = again.get("a")
    assert done is not None and done.status == "completed" and done.result
    again.run_now("b", T0)
    assert [j.id for j in again.due(T0)] == ["b"]


def test_waiting_must_pay_and_capacity_is_booked() -> None:
    scores = np.array([[10.0, 12.0], [9.9, 20.0], [8.0, 1.0]])  # hours x replicas
    s = worth_waiting(scores, min_gain=0.05)
    assert np.isinf(s[0, 1])  # now, only the best replica counts
    assert np.isinf(s[1, 0])  # 1 % better is not worth waiting for
    book = SlotBook(np.array([100.0, 100.0]))
    assert plan(s, first_hour=0, work_s=60, book=book)[:2] == (2, 1)
    assert plan(s, first_hour=0, work_s=60, book=book)[:2] == (2, 0)  # (2, 1) is full now


def test_a_store_of_the_first_schema_is_migrated_and_keeps_its_jobs(tmp_path: Path) -> None:
    import sqlite3

    from router.jobs import _V1, SCHEMA_VERSION

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # as the first, unversioned release left it
        db.executescript(_V1)
        db.execute(
            "INSERT INTO jobs VALUES ('j', 'demo', 'scheduled', ?, ?, ?, 'r', 'eu', 1, '{}', 0.5,"
            " NULL, NULL)",
            (T0.isoformat(), T0.isoformat(), T0.isoformat()),
        )
    store = JobStore(path)
    assert store.schema_version == SCHEMA_VERSION
    old = store.get("j")
    assert old is not None and old.preference is None and old.status == "scheduled"
    store.add(job("k", T0))
    assert store.get("k") == job("k", T0)


def test_a_running_job_is_left_alone_until_its_lease_runs_out(tmp_path: Path) -> None:
    # several ingresses share a store: one that starts, or restarts, must not take the jobs
    # another is running (each ran twice, and each was billed by both)
    first = JobStore(tmp_path / "j.sqlite", lease_s=60.0)
    first.add(job("a", T0))
    (mine,) = first.due(T0)
    second = JobStore(tmp_path / "j.sqlite", lease_s=60.0)  # another ingress starts
    assert second.get("a").status == "running"  # type: ignore[union-attr]
    assert second.due(T0 + timedelta(seconds=59)) == []
    first.renew({"a": mine.claim}, T0 + timedelta(seconds=50))  # type: ignore[dict-item]
    assert second.due(T0 + timedelta(seconds=100)) == []  # renewed until T0 + 110 s
    (taken,) = second.due(T0 + timedelta(seconds=111))  # the first runner died
    # the first runner, late, cannot store its answer over the job another runner holds now
    assert not first.finish("a", result={"late": True}, error=None, claim=mine.claim)
    first.renew({"a": mine.claim}, T0 + timedelta(seconds=112))  # type: ignore[dict-item]
    assert second.get("a").lease_until == taken.lease_until  # type: ignore[union-attr]
    assert second.finish("a", result={"ok": True}, error=None, claim=taken.claim)
    done = second.get("a")
    assert done is not None and done.status == "completed" and done.result == {"ok": True}


def test_reading_the_queue_of_a_store_whose_file_is_gone_is_an_error(tmp_path: Path) -> None:
    # the queue is read on a connection of its own: opened read-write, it made a new empty
    # store where the file had gone, and the dashboard showed an empty queue
    store = JobStore(tmp_path / "jobs.sqlite")
    store.close()
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"jobs.sqlite{suffix}").unlink(missing_ok=True)
    with pytest.raises(JobError, match="jobs.sqlite"):
        store.queue(datetime.now(UTC))
    assert not (tmp_path / "jobs.sqlite").exists()
