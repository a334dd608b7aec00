"""The ledger at scale and under a crash: a killed writer, and sums that do not grow with a
tenant's rows. Slow (a subprocess, 40,000 rows), so kept apart from tests/test_ledger.py, which
`make mutation` runs against every mutant of router/ledger.py."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from router.ledger import Ledger
from tests.conftest import ROOT
from tests.test_ledger import row

pytestmark = pytest.mark.slow


def test_killed_writer_leaves_a_consistent_ledger(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ledger_writer", str(path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with closing(sqlite3.connect(path)) as db:
                if db.execute("SELECT COUNT(*) FROM requests").fetchone()[0] >= 1000:
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    proc.stdout.close()
    ledger = Ledger(path)
    assert ledger.integrity_ok()
    n = ledger.count()
    assert n >= 1000 and n % 200 == 0  # whole batches only
    batches = {r.request_id.split("-")[0] for r in ledger.tenant_rows(None)}
    assert len(batches) == n // 200


def _vm_steps(ledger: Ledger, read: Any) -> int:
    """SQLite virtual-machine steps (in thousands) that ``read`` costs on the reader."""
    steps = 0

    def tick() -> int:
        nonlocal steps
        steps += 1
        return 0

    ledger._reader.set_progress_handler(tick, 1000)
    try:
        read()
    finally:
        ledger._reader.set_progress_handler(None, 0)
    return steps


def test_totals_and_spend_do_not_scan_a_tenants_rows(tmp_path: Path) -> None:
    # /v1/usage and every budget check sum a tenant's period: summed row by row, a tenant with
    # a million rows made each call take half a second. Ten times the rows over the same days
    # must not cost ten times the work
    ledger = Ledger(tmp_path / "l.sqlite")
    t0 = datetime(2026, 11, 1, tzinfo=UTC)

    def fill(n: int, first: int) -> None:
        ledger.write(
            [row(f"r{k}", t0 + timedelta(seconds=20 * k)) for k in range(first, first + n)]
        )

    def cost() -> int:
        later = t0 + timedelta(hours=1)
        return _vm_steps(ledger, lambda: (ledger.usage_page("acme"), ledger.spend("acme", later)))

    fill(4_000, 0)  # about a day
    small = cost()
    for first in range(4_000, 40_000, 4_000):  # ten times the rows, ten days
        fill(4_000, first)
    assert ledger.usage_page("acme").totals["requests"] == 40_000
    assert cost() < 3 * small + 20
