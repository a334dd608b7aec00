"""Deferred work: a request whose preference allows waiting (``defer``) is planned into the
cleanest (hour, replica) of its window when waiting pays, stored as a :class:`router.jobs.Job`,
and run then; batch lines (:mod:`router.service.batches`) are planned the same way."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from router.errors import NotFound, PermissionDenied
from router.jobs import Job, JobError, JobStore
from router.ledger import LedgerRow
from router.policy import AtCapacity, Candidates
from router.preference import Preference
from router.service.completions import Completions
from router.service.live import Live
from router.service.ports import ParsedRequest, Wire
from router.service.tenants import Caller
from router.service.tracing import Tracing

log = logging.getLogger(__name__)

MAX_RUNNING = 32  # due jobs in flight at once per ingress; the replicas shed what they cannot take
LEDGER_RETRY_S = 10.0  # a job that cannot learn whether it was billed waits this long


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
        self._claims: dict[str, str] = {}  # running job id -> its claim, renewed by the loop
        self._renewed_s = time.monotonic()
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
        arrival: float | None = None
        if planned is None:
            if not force:
                return None  # waiting does not pay: run now
            index = router.decide(cands, pref).index
            start_at, best = now, 0.0
        else:
            start_at, index, best, now_g = planned
            arrival = now_g if math.isfinite(now_g) else None
        st = router.states[index]
        log.info("planned a job at %s in %s (forecast score %.3g; %s g/kWh now)", start_at,
                 st.region.name, best, arrival)  # fmt: skip
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
            arrival_g_per_kwh=arrival,
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
            if job.claim is not None:
                self._claims[job.id] = job.claim
            task = asyncio.get_running_loop().create_task(self.run(job))
            self._running.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._room.set()
        if not task.cancelled() and (e := task.exception()) is not None:  # the store failed
            log.error("a job's run failed outside its own handling", exc_info=e)

    def renew(self) -> None:
        """Extend the leases of the jobs this runner is running, so that no other claims them."""
        self.jobs.renew(dict(self._claims), datetime.now(UTC))
        self._renewed_s = time.monotonic()

    async def loop(self, period_s: float = 1.0) -> None:
        """Claim due jobs every ``period_s``, and at once whenever a running one finishes (a
        batch runs as fast as its replicas answer, at most MAX_RUNNING at a time); renew the
        running ones' leases four times a lease."""
        while True:
            try:
                if time.monotonic() - self._renewed_s >= self.jobs.lease_s / 4:
                    self.renew()
                self.run_due()
            except Exception:  # the store failed: say so, try again next period
                log.exception("claiming due jobs failed")
            self._room.clear()
            # asyncio.timeout, not wait_for: Python 3.11's wait_for swallows a cancellation
            # that comes as the room is made, and the loop would outlive its ingress
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(period_s):
                    await self._room.wait()

    async def run(self, job: Job) -> None:
        """Run ``job`` on its planned replica (another if that one is down) and store its
        answer, or why it failed (only while this runner holds its claim)."""
        try:
            await self._run(job)
        finally:
            self._claims.pop(job.id, None)

    async def _billed(self, job_id: str) -> LedgerRow | None:
        """The bill an earlier attempt of the job left (it billed, then its answer was lost:
        a store that failed, an ingress that died), once this ingress's own bills are in the
        ledger (waited for up to 5 s)."""
        settlement = self.completions.settlement
        with contextlib.suppress(TimeoutError):
            await settlement.sink.flush(5.0)
        return await settlement.ledger.bill(job_id)

    def _later(self, job: Job, after_s: float, why: str) -> None:
        """Run ``job`` again in ``after_s``, or fail it if that is past its deadline."""
        later = datetime.now(UTC) + timedelta(seconds=after_s)
        if later > datetime.fromisoformat(job.deadline):
            log.warning("job %s: %s until past its deadline", job.id, why)
            error = f"{why}, until past the job's deadline {job.deadline}"
            self.jobs.finish(job.id, result=None, error=error, claim=job.claim)
            return
        log.info("job %s: %s; retried at %s", job.id, why, later)
        self.jobs.retry_at(job.id, later, job.claim)

    async def _replan(
        self, job: Job, cands: Candidates, pref: Preference, expected: float, index: int
    ) -> int | None:
        """A job whose hour came with its replica's grid dirtier (intensity x PUE, the
        decision's signal) than where it would have run at its arrival (the forecast it waited
        for was wrong) is planned again over what is left of its window (its deadline, and
        ``policy.max_defer_s`` from its arrival), on the forecasts made since: ``None`` when it
        waits again (stored so), else the replica to run it on now (``index``, or, planned
        again to run now, the router's choice now). In its window's last hour it runs whatever
        its grid; so it does when planning again fails (the job must not fail for it)."""
        arrival_g = job.arrival_g_per_kwh
        if arrival_g is None or not math.isfinite(arrival_g):
            return index
        router = self._live().router
        if float(cands.pue[index] * cands.intensity_g_per_kwh[index]) <= arrival_g:
            return index
        now = datetime.now(UTC)
        end = min(
            datetime.fromisoformat(job.deadline),
            datetime.fromisoformat(job.created_at)
            + timedelta(seconds=router.config.policy.max_defer_s),
        )
        left_s = (end - now).total_seconds()
        if left_s < 3600:
            return index
        try:
            planned = await router.plan_deferral(cands, replace(pref, defer_s=left_s), expected)
            if planned is None:  # nothing later pays: now, where the router would put it now
                return router.decide(cands, pref).index
        except Exception as e:  # noqa: BLE001  # it runs as planned rather than fail
            log.warning("job %s: not planned again (%s); it runs now", job.id, e)
            return index
        start_at, r, best, _ = planned
        st = router.states[r]
        if not self.jobs.replan(job.id, start_at, st.replica.name, st.region.name, best,
                                job.claim):  # fmt: skip
            log.warning("job %s: another runner claimed it; not planned again here", job.id)
            return None
        log.info("job %s: its hour came dirtier than its arrival; planned again at %s in %s",
                 job.id, start_at, st.region.name)  # fmt: skip
        return None

    async def _run(self, job: Job) -> None:
        """One attempt. The job is billed once, under its id, for the answer it stores: an
        attempt that finds the job billed already (its answer lost after its bill) bills
        nothing and stores that bill with its answer; one stopped with its ingress bills
        nothing (the job runs again); one whose answer cannot be stored after its bill leaves
        the job to run again."""
        claim = job.claim
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
            cands = await router.candidates(parsed.prompt_estimate(), expected)
            index = next(k for k, s in enumerate(router.states) if s.replica.name == job.replica)
            pref = router.preference(job.preference)  # its regions hold on failover too
            try:
                billed = await self._billed(job.id)
            except Exception as e:  # not knowing, it could bill twice: it waits for the ledger
                self._later(job, LEDGER_RETRY_S, f"the ledger cannot say whether it is billed: {e}")
                return
            if not billed:
                now_index = await self._replan(job, cands, pref, expected, index)
                if now_index is None:
                    return  # planned again: it waits
                index = now_index
            # checked when it runs, not only when it was planned: the budget may be spent now
            # (a job billed already has paid)
            hold = None if billed else await self.completions.settlement.reserve(job.tenant, cands)
            started = await self.completions.start(
                job.id, job.tenant, parsed, cands, pref, only=index, hold=hold, bill_if_cut=False
            )
            if span is not None:
                st = router.states[started.index]
                span.routed(job.id, started.index, started.decision, st, cands,
                            planned=started.index == index)  # fmt: skip
            done = await self.completions.collect(
                started, job.id, job.tenant, parsed, billed=billed
            )
            if span is not None:
                span.answered(done.usage, done.finish_reason)
            body = self.wire.body(
                job.id, parsed, done.text, done.finish_reason, done.usage, int(time.time())
            )
            try:
                stored = self.jobs.finish(job.id, result=body, error=None, claim=claim)
            except JobError:  # billed, and its answer lost: it runs again, not billed again
                log.exception("job %s: billed, but its answer was not stored", job.id)
                with contextlib.suppress(JobError):
                    self.jobs.retry_at(job.id, datetime.now(UTC), claim)
                return
            if not stored:
                log.warning("job %s: another runner claimed it; its answer is not stored", job.id)
        except AtCapacity as e:  # shed: it waits its turn, as a client told Retry-After would
            if span is not None:
                span.failed(e)
            self._later(job, e.retry_after_s, str(e))
        except asyncio.CancelledError:  # this ingress is stopping: the job runs again later
            self.jobs.retry_at(job.id, datetime.now(UTC), claim)
            raise
        except Exception as e:  # the job records why; the loop goes on
            log.exception("job %s failed", job.id)
            if span is not None:
                span.failed(e)
            self.jobs.finish(job.id, result=None, error=str(e), claim=claim)
        finally:
            if span is not None:
                span.end()
