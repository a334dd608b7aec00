"""The named, restartable metering actor: the one writer of the ledger."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import ray

from router.ledger import Ledger, LedgerRow
from router.service.ports import UsageQuery, usage_answer

METERING_ACTOR = "carbon-router-metering"
NAMESPACE = "carbon-router"


@ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)
class MeteringActor:
    """Writes billed rows to the ledger. ``record`` returns only once its rows are durable
    (group commit: rows arriving together share one transaction), and a retried call after a
    restart cannot bill twice: the ledger is idempotent by request id."""

    def __init__(self, ledger_path: str) -> None:
        self.ledger = Ledger(ledger_path)
        self._pending: list[tuple[list[LedgerRow], asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, rows: list[dict[str, Any]]) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(([LedgerRow(**r) for r in rows], fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        await asyncio.sleep(0.002)  # let concurrent calls join the batch
        while self._pending:
            batch, self._pending = self._pending, []
            rows = [r for rs, _ in batch for r in rs]
            try:
                written = await asyncio.to_thread(self.ledger.write, rows)
            except Exception as e:  # every waiting caller gets the error; nothing is acked
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(written)

    async def usage(self, tenant: str | None, query: UsageQuery) -> dict[str, Any]:
        """A page of usage with its totals, read in a worker thread: the loop keeps taking
        rows to write meanwhile."""
        return await asyncio.to_thread(usage_answer, self.ledger, tenant, query)

    async def spend(self, tenant: str, since: datetime) -> tuple[float, float, float]:
        return await asyncio.to_thread(self.ledger.spend, tenant, since)

    async def refit_rows(self, replica: str) -> list[tuple[int, int, float]]:
        return self.ledger.measured_rows(replica)

    async def hourly(
        self, start: datetime, end: datetime, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """The operator's view's sums per hour, read in a worker thread like :meth:`usage`."""
        return await asyncio.to_thread(self.ledger.hourly, start, end, tenant)

    async def top_tenants(self, start: datetime, end: datetime, limit: int) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.ledger.top_tenants, start, end, limit)
