"""The named, restartable metering actor: the one writer of the ledger."""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime
from typing import Any

import ray

from router.ledger import Ledger, LedgerRow
from router.receipts import Signer, head_view, sign_heads
from router.service.ports import UsageQuery, receipt_answer, usage_answer

log = logging.getLogger(__name__)

METERING_ACTOR = "carbon-router-metering"
NAMESPACE = "carbon-router"


@ray.remote(max_restarts=-1, max_task_retries=-1, num_cpus=0)
class MeteringActor:
    """Writes billed rows to the ledger. ``record`` returns only once its rows are durable
    (group commit: rows arriving together share one transaction), and a retried call after a
    restart cannot bill twice: the ledger is idempotent by request id."""

    def __init__(
        self, ledger_path: str, signing_key: str | None = None, sign_every_s: float = 3600.0
    ) -> None:
        self.ledger = Ledger(ledger_path)
        self._pending: list[tuple[list[LedgerRow], asyncio.Future[int]]] = []
        self._flusher: asyncio.Task[None] | None = None
        # receipts: each tenant's chain head is signed at least every sign_every_s
        self.signer = Signer.load(signing_key or ledger_path + ".key", create=True)
        self.sign_every_s = sign_every_s
        self._signing: asyncio.Task[int] | None = None
        last = self.ledger.last_signed_at()
        self._signed_at = (
            datetime.fromisoformat(last).timestamp() if last else 0.0
        )  # when heads were last signed (wall clock)

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
        if time.time() - self._signed_at >= self.sign_every_s and (
            self._signing is None or self._signing.done()
        ):  # beside the writes: a first signing checks whole chains and must hold up no bill
            self._signing = asyncio.get_running_loop().create_task(self.sign())

    async def sign(self) -> int:
        """Sign every tenant's chain head not yet signed; returns how many."""
        self._signed_at = time.time()
        try:
            return await asyncio.to_thread(sign_heads, self.ledger, self.signer)
        except Exception:  # a failed signing is retried at the next interval; bills go on
            log.exception("signing the ledger's chain heads failed")
            return 0

    def public_key(self) -> str:
        return self.signer.public_key

    async def usage(self, tenant: str | None, query: UsageQuery) -> dict[str, Any]:
        """A page of usage with its totals, read in a worker thread: the loop keeps taking
        rows to write meanwhile."""
        return await asyncio.to_thread(usage_answer, self.ledger, tenant, query)

    async def spend(self, tenant: str, since: datetime) -> tuple[float, float, float]:
        return await asyncio.to_thread(self.ledger.spend, tenant, since)

    async def refit_rows(self, replica: str) -> list[tuple[int, int, float]]:
        return self.ledger.measured_rows(replica)

    async def receipt(self, tenant: str | None, request_id: str) -> dict[str, Any] | None:
        return await asyncio.to_thread(receipt_answer, self.ledger, tenant, request_id)

    async def receipt_head(self, tenant: str) -> dict[str, Any]:
        return await asyncio.to_thread(head_view, self.ledger, tenant)

    async def hourly(
        self, start: datetime, end: datetime, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """The operator's view's sums per hour, read in a worker thread like :meth:`usage`."""
        return await asyncio.to_thread(self.ledger.hourly, start, end, tenant)

    async def top_tenants(self, start: datetime, end: datetime, limit: int) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.ledger.top_tenants, start, end, limit)

    async def bill(self, request_id: str) -> LedgerRow | None:
        return await asyncio.to_thread(self.ledger.get, request_id)
