"""A request's bill: priced when it ends, handed to the ledger, counted against its budget.

Three billing paths end here (see ARCHITECTURE.md):

- in process (llama.cpp on a replica deployment): the replica's metered energy comes back with
  the answer; the row goes to the outbox (the sink) at once;
- proxied (a remote OpenAI-compatible server): the answer comes before the meter settles; the
  predicted row goes to the replica (:class:`router.service.proxied.ProxiedMetering`), which
  bills the measurement, or it is billed as predicted if none comes back in time;
- cut (a client that hung up mid-stream): the tokens sent until then, by prediction.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from router.accounting import Routed
from router.errors import LedgerBehind
from router.ledger import LedgerRow
from router.policy import Candidates
from router.service.live import Live
from router.service.metrics import Metrics
from router.service.ports import BillSink, Final, LedgerReader, ParsedRequest, ReplicaClient
from router.service.proxied import ProxiedMetering
from router.service.tenants import Hold, period_start
from router.service.tracing import Tracing

log = logging.getLogger(__name__)

REMEMBERED_BILLS = 10_000  # request ids billed lately, whose second bill is not charged again


def usage_fields(row: LedgerRow) -> dict[str, Any]:
    """What ``usage`` gains beyond the OpenAI token counts."""
    return {
        "energy_kwh": row.kwh_billed,
        "carbon_g": row.carbon_g,
        "cost_usd": row.cost_usd,
        "region": row.region,
        "replica": row.replica,
        "energy_source": row.energy_source,
        "carbon_avoided_g": row.avoided_g,
        "embodied_carbon_g": row.embodied_g,
    }


class Settlement:
    def __init__(
        self,
        live: Callable[[], Live],
        replicas: Sequence[ReplicaClient],
        sink: BillSink,
        ledger: LedgerReader,
        proxied: ProxiedMetering | None,
        metrics: Metrics,
        tracing: Tracing | None = None,
    ) -> None:
        self._live = live
        self.replicas = replicas
        self.sink = sink
        self.ledger = ledger
        self.proxied = proxied
        self.metrics = metrics
        self.tracing = tracing  # the bill's figures go on its request's span
        self._billed: OrderedDict[str, dict[str, Any]] = OrderedDict()  # request id -> usage

    async def reserve(self, tenant: str, cands: Candidates) -> Hold | None:
        """Hold the request's predicted spend on its cheapest candidate, or refuse
        (:class:`router.errors.BudgetExceeded`) when it would cross the budget."""
        budgets = self._live().budgets
        if tenant not in budgets.limits:
            return None
        kwh, co2_g, usd = await self._predicted(tenant, cands)
        return budgets.reserve(tenant, kwh, co2_g, usd, datetime.now(UTC))

    async def check(self, tenant: str, requests: Sequence[Candidates]) -> None:
        """Refuse these requests together if they would cross the budget; holds nothing."""
        budgets = self._live().budgets
        if tenant in budgets.limits:
            kwh = co2_g = usd = 0.0
            for cands in requests:
                one = await self._predicted(tenant, cands)
                kwh, co2_g, usd = kwh + one[0], co2_g + one[1], usd + one[2]
            budgets.check(tenant, kwh, co2_g, usd, datetime.now(UTC))

    def release(self, hold: Hold | None) -> None:
        self._live().budgets.release(hold)

    async def _predicted(self, tenant: str, cands: Candidates) -> tuple[float, float, float]:
        """(kWh, g, $) of the request on its cheapest candidate, the tenant's spend loaded."""
        budgets = self._live().budgets
        now = datetime.now(UTC)
        if tenant not in budgets.spend:  # first request since start: sum the ledger
            since = period_start(now, budgets.limits[tenant].period)
            await self.sink.flush()
            budgets.load(tenant, *await self.ledger.spend(tenant, since), now)
        billed = cands.billed_kwh  # the bill's figure, not the marginal energy the score uses
        i = int(np.argmin(billed))
        kwh = float(billed[i] * cands.pue[i])
        return (
            kwh,
            kwh * float(cands.billing_intensity[i]),
            kwh * float(cands.price_usd_per_kwh[i]),
        )

    async def settle(
        self,
        request_id: str,
        tenant: str,
        index: int,
        final: Final | None,
        parsed: ParsedRequest,
        hold: Hold | None = None,
        routed: Routed | None = None,
    ) -> dict[str, Any]:
        """Bill what the request used, release what it held of its budget, and return its
        ``usage``: token counts and the bill. A request id settled again (among the last
        ``REMEMBERED_BILLS`` in this process) is not billed again: it gets the first usage."""
        live = self._live()
        router = live.router
        st = router.states[index]
        now = datetime.now(UTC)
        if final is None:  # the replica ended without its figures
            final = Final(0, 0, now, now)
        energy_j, source = final.energy_j, final.energy_source
        prefill_j, held_s = final.prefill_j, final.held_s
        if energy_j is not None and not (math.isfinite(energy_j) and energy_j >= 0):
            log.warning("replica %s metered %r J for %s: billed by prediction instead",
                        st.replica.name, energy_j, request_id)  # fmt: skip
            energy_j = None  # a meter's nonsense never stops a bill, nor is billed
        if energy_j is None:  # not metered in time: bill the prediction, say so
            energy_j = router.predictor.predict_j(
                st.profile, final.prompt_tokens, final.completion_tokens
            )
            source, prefill_j, held_s = "predicted", None, None
        try:
            row = await router.bill(
                request_id=request_id,
                tenant=tenant,
                index=index,
                started_at=final.started_at,
                ended_at=final.ended_at,
                prompt_tokens=final.prompt_tokens,
                completion_tokens=final.completion_tokens,
                energy_j=energy_j,
                energy_source=source,
                first_token_at=final.first_token_at,
                prefill_j=prefill_j,
                held_s=held_s,
                routed=routed,
            )
        finally:  # billed or not, the request holds nothing any more
            live.budgets.release(hold)
        # a request settled again (a flood of one id): the ledger keeps its first row, so the
        # budget and /metrics count only that one and every caller gets its usage. No await
        # from here to the end: settles of one id cannot interleave between check and charge
        if (first := self._billed.get(request_id)) is not None:
            return first
        extra = usage_fields(row)
        if self.replicas[index].bills_remotely and self.proxied is not None:
            extra["energy_source"] = "predicted"  # the replica bills the measurement
            rates = router.receipt_rates(index, routed)
            self.proxied.expect(index, row.__dict__, live.billing_json, rates)
        else:
            self.sink.add(row.__dict__)  # in the ledger within milliseconds; see Outbox
        live.budgets.add(row, now)
        router.lengths.observe(tenant, parsed.model, final.completion_tokens)
        self.metrics.billed(row)
        if self.tracing is not None:
            self.tracing.billed(row)
        prompt, completion = final.prompt_tokens, final.completion_tokens
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            **extra,
        }
        self._billed[request_id] = usage
        if len(self._billed) > REMEMBERED_BILLS:
            self._billed.popitem(last=False)
        return usage

    async def wait_settled(self, tenant: str | None, timeout_s: float = 5.0) -> None:
        """Wait (up to ``timeout_s``) until the requests of ``tenant`` (None: everyone) that
        were answered before this call are in the ledger: their measured bills still being
        attributed, then the outbox. Requests answered later are not waited for: under steady
        traffic there always are some. Raises :class:`LedgerBehind` when the outbox has not
        delivered them in time."""
        deadline = time.monotonic() + timeout_s
        pending = self.proxied.waiting(tenant) if self.proxied is not None else set()
        while (
            pending
            and self.proxied is not None
            and time.monotonic() < deadline
            and self.proxied.still_waiting(pending)
        ):
            await asyncio.sleep(0.02)
        try:  # the outbox in what is left of the time (the proxied bills may have used it)
            await self.sink.flush(max(deadline - time.monotonic(), 0.5))
        except TimeoutError as e:
            raise LedgerBehind(
                f"the ledger has not taken the bills answered so far within {timeout_s:.0f} s; "
                "try again"
            ) from e
