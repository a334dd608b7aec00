"""One request id, one bill, under a concurrent flood of it (issue 13 §1.3): the ledger keeps one
row and sums it once into the tenant's totals (which budget checks read), whichever writers race
to insert it; the request path charges the tenant's budget and ``/metrics`` once, and every
caller of the flood gets the same ``usage``, the ledger row's."""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.http.wire import parse_body
from router.ledger import Ledger
from router.service.ports import Final
from tests.service_kit import BUDGETED, DEMO, chat, service_kit
from tests.test_ledger import row

T0 = datetime(2026, 11, 3, 12, tzinfo=UTC)


@settings(max_examples=25, deadline=None)
@given(
    writers=st.integers(2, 6),
    copies=st.integers(1, 12),
    others=st.integers(0, 6),
    kwh=st.lists(st.floats(1e-9, 1e-3), min_size=1, max_size=6),
)
def test_property_a_flood_of_one_request_id_is_one_row_summed_once(
    writers: int, copies: int, others: int, kwh: list[float]
) -> None:
    """``writers`` threads, each on its own connection to one ledger file, start together and
    each writes the flood's request id ``copies`` times (figures differing from copy to copy,
    as a retry priced again would), between rows of their own."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ledger.sqlite"
        Ledger(path).close()  # created and migrated once, before the race
        ledgers = [Ledger(path) for _ in range(writers)]
        start = threading.Barrier(writers)
        inserted = [0] * writers

        def write(w: int) -> None:
            start.wait()
            for c in range(copies):
                flood = row("flood", T0, kwh_billed=kwh[(w + c) % len(kwh)])
                mine = [row(f"w{w}-{c}-{k}", T0) for k in range(others)]
                inserted[w] += ledgers[w].write([*mine[: others // 2], flood, *mine[others // 2 :]])

        threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ledger = ledgers[0]
        rows = ledger.rows()
        assert [r.request_id for r in rows].count("flood") == 1
        assert len(rows) == 1 + writers * copies * others
        assert sum(inserted) == len(rows)  # one write said it inserted the flood's row
        (kept,) = (r for r in rows if r.request_id == "flood")
        assert kept.kwh_billed in kwh  # one of the copies, whole, not a mix
        total = sum(r.kwh_billed for r in rows)
        day = T0.replace(hour=0)
        assert ledger.spend("acme", day)[0] == pytest.approx(total, rel=1e-12)
        totals = ledger.usage_page("acme", start=day, end=day + timedelta(days=1)).totals
        assert totals["requests"] == len(rows)
        assert totals["kwh"] == pytest.approx(total, rel=1e-12)
        for each in ledgers:
            each.close()


@pytest.mark.parametrize("flood", [2, 50])
async def test_a_flood_of_settles_of_one_request_is_billed_and_charged_once(
    tmp_path: Path, flood: int
) -> None:
    """The request path settles one request id ``flood`` times at once (a cut and its end, a
    settle cancelled and settled again, a job's attempts), each holding its own prediction."""
    async with service_kit(tmp_path, config=BUDGETED) as kit:
        svc = kit.service
        parsed = parse_body(json.dumps(chat()).encode(), chat=True)
        caller = svc.authenticate(DEMO["Authorization"])
        admitted = [await svc.completions.admit(caller, parsed) for _ in range(flood)]
        now = datetime.now(UTC)
        finals = [Final(12, 5 + k % 3, now, now, 40.0 + k, "measured") for k in range(flood)]
        usages = await asyncio.gather(*(
            svc.settlement.settle("chatcmpl-flood", "demo", 0, f, parsed, a.hold)
            for f, a in zip(finals, admitted, strict=True)
        ))  # fmt: skip
        (stored,) = kit.rows()
        assert stored.request_id == "chatcmpl-flood"
        kit.assert_billed_once([stored])  # the budget and /metrics counted it once
        spend = svc.live.budgets.spend["demo"]
        assert spend.held_kwh == pytest.approx(0.0, abs=1e-15)  # every hold released
        for usage in usages:  # each caller is told the one bill there is
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
                stored.prompt_tokens, stored.completion_tokens,
            )  # fmt: skip
            assert usage["energy_kwh"] == stored.kwh_billed
            assert usage["cost_usd"] == stored.cost_usd
