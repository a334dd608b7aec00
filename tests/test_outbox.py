"""The ingress's outbox: rows leave the response path, reach the sink in batches and in order,
are retried while the sink fails, and survive the process being killed (spool)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from router.metering.outbox import Outbox, SpoolError

ROOT = Path(__file__).resolve().parent.parent


class Sink:
    """Records what it acknowledges; fails the first ``fail`` calls."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls: list[list[dict[str, Any]]] = []

    async def __call__(self, rows: list[dict[str, Any]]) -> None:
        if self.fail:
            self.fail -= 1
            raise ConnectionError("metering actor restarting")
        self.calls.append(list(rows))

    @property
    def ids(self) -> list[int]:
        return [r["n"] for call in self.calls for r in call]


async def test_rows_arrive_in_batches_in_order() -> None:
    sink = Sink()
    acked: list[int] = []
    box = Outbox(sink, interval_s=0.01, on_sent=lambda rows: acked.extend(r["n"] for r in rows))
    for n in range(100):
        box.add({"n": n})
    assert box.pending == 100 and sink.calls == []  # add never waits on the sink
    await box.flush()
    assert sink.ids == list(range(100)) and acked == list(range(100))
    assert len(sink.calls) < 10 and box.sent == 100


async def test_a_failing_sink_is_retried_and_loses_nothing() -> None:
    sink = Sink(fail=3)
    box = Outbox(sink, interval_s=0.001)
    for n in range(20):
        box.add({"n": n})
    await box.flush(timeout_s=10)
    assert sink.ids == list(range(20)) and box.failures == 3


async def test_max_rows_sends_without_waiting_for_the_interval() -> None:
    sink = Sink()
    box = Outbox(sink, interval_s=60.0, max_rows=10)
    for n in range(10):
        box.add({"n": n})
    await asyncio.wait_for(box.flush(), 5)  # sent at once, not after 60 s
    assert sink.ids == list(range(10))


async def test_closed_outbox_leaves_no_spool(tmp_path: Path) -> None:
    sink = Sink()
    box = Outbox(sink, spool_dir=tmp_path, interval_s=0.001)
    box.add({"n": 1})
    await box.aclose()
    assert sink.ids == [1] and list(tmp_path.iterdir()) == []


async def test_rows_of_a_killed_process_are_taken_over(tmp_path: Path) -> None:
    # a process spools 50 rows, its sink never answers, and it is SIGKILLed
    script = textwrap.dedent(f"""
        import asyncio, os, signal
        from router.metering.outbox import Outbox, SpoolError

        async def never(rows):
            await asyncio.sleep(3600)

        async def main():
            box = Outbox(never, spool_dir={str(tmp_path)!r}, interval_s=0.001)
            for n in range(50):
                box.add({{"n": n}})
            await asyncio.sleep(0.05)  # a batch is in flight, unacknowledged
            box.add({{"n": 50}})
            os.kill(os.getpid(), signal.SIGKILL)

        asyncio.run(main())
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=False)
    assert proc.returncode == -9
    (spool,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    seg = next(spool.glob("*.jsonl"))
    with seg.open("a") as f:
        f.write('{"n": 99')  # a line torn by the crash is skipped
    sink = Sink()
    box = Outbox(sink, spool_dir=tmp_path, interval_s=0.001)
    taken = box.orphans()
    assert sorted(r["n"] for r in taken) == list(range(51))
    await box.flush()
    assert sorted(sink.ids) == list(range(51))
    assert not spool.exists()  # the dead process's spool is gone once its rows are acked
    await box.aclose()


async def test_a_live_outbox_spool_is_not_taken(tmp_path: Path) -> None:
    hold = asyncio.Event()

    async def slow(rows: list[dict[str, Any]]) -> None:
        await hold.wait()

    alive = Outbox(slow, spool_dir=tmp_path, interval_s=0.001)
    alive.add({"n": 1})
    other = Outbox(Sink(), spool_dir=tmp_path)
    assert other.orphans() == []  # its owner holds the lock
    hold.set()
    await alive.aclose()
    await other.aclose()


def test_spooled_rows_are_json_lines(tmp_path: Path) -> None:
    async def run() -> Path:
        hold = asyncio.Event()

        async def slow(rows: list[dict[str, Any]]) -> None:
            await hold.wait()

        box = Outbox(slow, spool_dir=tmp_path, interval_s=60.0)
        box.add({"n": 7, "tenant": "demo"})
        (seg,) = [p for d in tmp_path.iterdir() for p in d.glob("*.jsonl")]
        assert [json.loads(x) for x in seg.read_text().splitlines()] == [{"n": 7, "tenant": "demo"}]
        hold.set()
        await box.aclose()
        return seg

    assert not asyncio.run(run()).exists()


@pytest.mark.parametrize("n", [0, 1])
async def test_flush_with_nothing_pending_returns(n: int) -> None:
    sink = Sink()
    box = Outbox(sink, interval_s=0.001)
    for k in range(n):
        box.add({"n": k})
    await asyncio.wait_for(box.flush(), 2)
    assert sink.ids == list(range(n))


class PickySink(Sink):
    """Refuses, for good, any call holding a row marked ``bad`` (as the ledger refuses a row
    it cannot store): the outbox must set that row aside and keep the rest flowing."""

    async def __call__(self, rows: list[dict[str, Any]]) -> None:
        if any(r.get("bad") for r in rows):
            from router.ledger import LedgerError

            raise LedgerError("row refused: integer overflow")
        self.calls.append(list(rows))


async def test_a_row_the_sink_refuses_is_set_aside_and_the_rest_flow(tmp_path: Path) -> None:
    sink = PickySink()
    box = Outbox(sink, interval_s=0.005, spool_dir=tmp_path / "spool")
    for n in range(5):
        box.add({"n": n, "bad": n == 2})
    await asyncio.wait_for(box.flush(), 5)
    for n in range(5, 10):
        box.add({"n": n})
    await asyncio.wait_for(box.flush(), 5)
    assert sink.ids == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    assert [r["n"] for r in box.dead_letters()] == [2]
    await box.aclose()


async def test_flush_returns_under_steady_traffic() -> None:
    sink = Sink()
    box = Outbox(sink, interval_s=0.005)
    stop = asyncio.Event()

    async def traffic() -> None:
        n = 0
        while not stop.is_set():
            box.add({"n": n})
            n += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(traffic())
    await asyncio.sleep(0.05)
    marker = box.added
    await asyncio.wait_for(box.flush(timeout_s=2.0), 3)  # never idle, still returns
    assert box.sent >= marker
    stop.set()
    await task
    await box.flush()


def planted_rows(spool: Path, owner: int | None = None) -> Path:
    """A folder of rows as a dead outbox would leave it, planted by someone else."""
    d = spool / "0planted"
    d.mkdir(parents=True)
    (d / "seg.jsonl").write_text(json.dumps({"request_id": "forged", "tenant": "victim"}) + "\n")
    if owner is not None:
        for p in (d / "seg.jsonl", d):
            os.chown(p, owner, owner)
    return d


@pytest.mark.skipif(os.geteuid() != 0, reason="planting files as another user needs root")
async def test_rows_planted_by_another_user_are_not_replayed(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    planted = planted_rows(spool, owner=65534)
    sink = Sink()
    box = Outbox(sink, interval_s=0.005, spool_dir=spool)
    assert box.orphans() == []
    await box.flush()
    assert sink.ids == [] and planted.exists()
    await box.aclose()


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_spool_others_can_write_to_is_refused(tmp_path: Path, mode: int) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chmod(spool, mode)
    with pytest.raises(SpoolError, match="others can write"):
        Outbox(Sink(), spool_dir=spool)


async def test_a_new_spool_is_private(tmp_path: Path) -> None:
    box = Outbox(Sink(), spool_dir=tmp_path / "a" / "spool")
    assert (tmp_path / "a" / "spool").stat().st_mode & 0o777 == 0o700
    await box.aclose()
