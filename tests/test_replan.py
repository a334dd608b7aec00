"""A deferred job whose hour comes dirtier than its arrival (the forecast it waited for was
wrong) is planned again over what is left of its window (issue 14, deferral regret)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from router.service.fakes import StaticCarbonSource
from tests.service_kit import DEMO, chat, service_kit

VALUES = {"SE": 30.0, "DE": 400.0, "US-TEX-ERCO": 450.0}
EU_NORTH = {**DEMO, "X-Carbon-Preference": 'defer=7200, regions=("eu-north")'}



def _due_now(kit: Any, job_id: str) -> None:
    """The job's planned hour has come (its start moved to now, as the clock would)."""
    store = kit.service.jobs
    with store._write():
        store._db.execute("UPDATE jobs SET start_at=? WHERE id=?",
                          (datetime.now(UTC).isoformat(), job_id))  # fmt: skip


async def grid(kit: Any, source: StaticCarbonSource, g_per_kwh: float) -> None:
    """Sweden's grid is at ``g_per_kwh`` now, and the router has read it."""
    source.values["SE"] = g_per_kwh
    router = kit.service.live.router
    router.carbon.ttl_s = 0.0  # read again now, in the background...
    for st in router.states:
        await router.carbon.get(st.region)
    await router.carbon.idle()  # ... landed


async def deferred(kit: Any, headers: dict[str, str] | None = None) -> str:
    """A deferrable request to Sweden (cleaner next hour): planned, its job's id."""
    r = await kit.client.post("/v1/chat/completions", json=chat(), headers=headers or EU_NORTH)
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def run_due(kit: Any) -> None:
    kit.service.deferral.run_due()
    await asyncio.gather(*kit.service.deferral._running)


async def test_a_job_whose_hour_comes_dirtier_than_its_arrival_is_planned_again(
    tmp_path: Path,
) -> None:
    source = StaticCarbonSource(dict(VALUES), profile=(1.0, 0.5))
    async with service_kit(tmp_path, source=source) as kit:
        job_id = await deferred(kit)
        # its hour comes with the grid three times as dirty as at its arrival, and the
        # forecast issued then says the next hour is cleaner: it waits again, nothing billed
        await grid(kit, source, 3 * VALUES["SE"])
        _due_now(kit, job_id)
        await run_due(kit)
        again = kit.service.jobs.get(job_id)
        assert again is not None and again.status == "scheduled", again
        assert again.start_at > datetime.now(UTC).isoformat()
        assert kit.rows() == []
        # its new hour comes no dirtier than its arrival: it runs, billed once
        await grid(kit, source, VALUES["SE"])
        _due_now(kit, job_id)
        await run_due(kit)
        done = kit.service.jobs.get(job_id)
        assert done is not None and done.status == "completed", done
        assert [row.request_id for row in kit.rows()] == [job_id]


async def test_a_dirtier_hour_in_the_last_hour_of_its_window_runs_the_job(
    tmp_path: Path,
) -> None:
    source = StaticCarbonSource(dict(VALUES), profile=(1.0, 0.5))
    async with service_kit(tmp_path, source=source) as kit:
        job_id = await deferred(kit)
        store = kit.service.jobs
        with store._write():  # less than an hour of its window left
            store._db.execute("UPDATE jobs SET deadline=? WHERE id=?", (
                (datetime.now(UTC) + timedelta(minutes=30)).isoformat(), job_id))  # fmt: skip
        await grid(kit, source, 3 * VALUES["SE"])
        _due_now(kit, job_id)
        await run_due(kit)
        done = store.get(job_id)
        assert done is not None and done.status == "completed", done
        assert [row.request_id for row in kit.rows()] == [job_id]


async def test_an_admins_run_now_is_not_planned_again(tmp_path: Path) -> None:
    source = StaticCarbonSource(dict(VALUES), profile=(1.0, 0.5))
    async with service_kit(tmp_path, source=source) as kit:
        job_id = await deferred(kit)
        await grid(kit, source, 3 * VALUES["SE"])
        kit.service.jobs.run_now(job_id, datetime.now(UTC))
        await run_due(kit)
        done = kit.service.jobs.get(job_id)
        assert done is not None and done.status == "completed", done
