"""Deferred work: a request whose preference allows waiting (``defer``) is planned into the
cleanest (hour, replica) of its window when waiting pays, stored as a :class:`router.jobs.Job`,
and run then; batch lines (:mod:`router.service.batches`) are planned the same way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from router.errors import NotFound, PermissionDenied
from router.jobs import Job, JobStore
from router.policy import AtCapacity, Candidates
from router.preference import Preference
from router.service.completions import Completions
from router.service.live import Live
from router.service.ports import ParsedRequest, Wire
from router.service.tenants import Caller
from router.service.tracing import Tracing

log = logging.getLogger(__name__)

MAX_RUNNING = 32  # due jobs in flight at once per ingress; the replicas shed what they cannot take


class Deferral:
    def __init__(
        self,
        live: Callable[[], Live],
        jobs: JobStore,
        completions: Completions,
        wire: Wire,
        tracing: Tracing | None = None,
    ) -> None:
        self._live = live
        self.jobs = jobs
        self.completions = completions
        self.wire = wire
        self.tracing = tracing or Tracing()  # each job's run is a span of its own
        self._running: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()  # a running job finished: there may be room to claim more

    async def plan(
        self,
        raw: bytes,
        tenant: str,
        parsed: ParsedRequest,
        pref: Preference,
        cands: Candidates,
        expected: float,
        *,
        force: bool = False,
        header: str | None = None,
    ) -> Job | None:
        """The job, planned, when waiting pays; with ``force`` (batch lines) also when it does
        not, to run now. ``None``: run it now, inline. The job is not stored yet."""
        router = self._live().router
        planned = await router.plan_deferral(cands, pref, expected)
        now = datetime.now(UTC)
        if planned is None:
            if not force:
                return None  # waiting does not pay: run now
            index = router.decide(cands, pref).index
            start_at, best, now_score = now, 0.0, 0.0
        else:
            start_at, index, best, now_score = planned
        st = router.states[index]
        log.info(
            "planned a job at %s in %s (score %.3g vs %.3g now)",
            start_at,
            st.region.name,
            best,
            now_score,
        )
        return Job(
            id=f"job-{uuid.uuid4().hex}",
            tenant=tenant,
            status="scheduled",
            created_at=now.isoformat(),
            start_at=start_at.isoformat(),
            deadline=(now + timedelta(seconds=pref.defer_s)).isoformat(),
            replica=st.replica.name,
            region=st.region.name,
            chat=parsed.chat,
            body=json.loads(raw),
            forecast_score=best,
            preference=header,
        )

    async def maybe_defer(
        self,
        raw: bytes,
        tenant: str,
        parsed: ParsedRequest,
        pref: Preference,
        cands: Candidates,
        expected: float,
        header: str | None = None,
    ) -> Job | None:
        """Plan and store the job when waiting pays; ``None``: run it now. ``header``, the
        request's ``X-Carbon-Preference``, is kept and applied when the job runs."""
        job = await self.plan(raw, tenant, parsed, pref, cands, expected, header=header)
        if job is not None:
            self.jobs.add(job)
        return job

    def get(self, caller: Caller, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None or (job.tenant != caller.tenant and not caller.admin):
            raise NotFound(f"no job {job_id}")
        return job

    def run_now(self, caller: Caller, job_id: str) -> None:
        if not caller.admin:
            raise PermissionDenied("admin key required")
        self.jobs.run_now(job_id, datetime.now(UTC))

    def run_due(self) -> None:
        """Start the jobs whose time has come, as many as there is room for."""
        room = MAX_RUNNING - len(self._running)
        if room <= 0:
            return
        for job in self.jobs.due(datetime.now(UTC), limit=room):
            task = asyncio.get_running_loop().create_task(self.run(job))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._room.set()
        if not task.cancelled() and (e := task.exception()) is not None:  # the store failed
            log.error("a job's run failed outside its own handling", exc_info=e)

    async def loop(self, period_s: float = 1.0) -> None:
        """Claim due jobs every ``period_s``, and at once whenever a running one finishes (a
        batch runs as fast as its replicas answer, at most MAX_RUNNING at a time)."""
        while True:
            try:
                self.run_due()
            except Exception:  # the store failed: say so, try again next period
                log.exception("claiming due jobs failed")
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), period_s)

    async def run(self, job: Job) -> None:
        """Run ``job`` on its planned replica (another if that one is down) and store its
        answer, or why it failed."""
        span = self.tracing.job(job.id, chat=job.chat)  # None: tracing is off
        try:
            router = self._live().router
            trace = span.context() if span is not None else None
            parsed = self.wire.parse(json.dumps(job.body).encode(), chat=job.chat, trace=trace)
            if span is not None:
                span.parsed(parsed)
            expected = router.lengths.expected(
                job.tenant, parsed.model, parsed.completion.max_tokens
            )
            cands = await router.candidates(0, expected)
            index = next(k for k, s in enumerate(router.states) if s.replica.name == job.replica)
            pref = router.preference(job.preference)  # its regions hold on failover too
            # checked when it runs, not only when it was planned: the budget may be spent now
            hold = await self.completions.settlement.reserve(job.tenant, cands)
            started = await self.completions.start(
                job.id, job.tenant, parsed, cands, pref, only=index, hold=hold
            )
            if span is not None:
                st = router.states[started.index]
                span.routed(job.id, started.index, started.decision, st, cands,
                            planned=started.index == index)  # fmt: skip
            done = await self.completions.collect(started, job.id, job.tenant, parsed)
            if span is not None:
                span.answered(done.usage, done.finish_reason)
            body = self.wire.body(
                job.id, parsed, done.text, done.finish_reason, done.usage, int(time.time())
            )
            self.jobs.finish(job.id, result=body, error=None)
        except AtCapacity as e:  # shed: it waits its turn, as a client told Retry-After would
            if span is not None:
                span.failed(e)
            later = datetime.now(UTC) + timedelta(seconds=e.retry_after_s)
            if later > datetime.fromisoformat(job.deadline):  # but not past its deadline
                log.warning("job %s: replicas full until past its deadline", job.id)
                self.jobs.finish(
                    job.id, result=None, error=f"{e}, until past the job's deadline {job.deadline}"
                )
                return
            log.info("job %s: replicas full, retried at %s", job.id, later)
            self.jobs.retry_at(job.id, later)
        except asyncio.CancelledError:  # this ingress is stopping: the job runs again later
            self.jobs.retry_at(job.id, datetime.now(UTC))
            raise
        except Exception as e:  # the job records why; the loop goes on
            log.exception("job %s failed", job.id)
            if span is not None:
                span.failed(e)
            self.jobs.finish(job.id, result=None, error=str(e))
        finally:
            if span is not None:
                span.end()
