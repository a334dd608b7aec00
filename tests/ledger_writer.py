"""Subprocess for the crash test: writes batches of 200 rows to a ledger until killed."""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta

from router.ledger import Ledger
from tests.test_ledger import row

path = sys.argv[1]
ledger = Ledger(path)
t0 = datetime(2026, 11, 1, tzinfo=UTC)
batch = 0
print("ready", flush=True)
while True:
    rows = [row(f"b{batch}-{i}", t0 + timedelta(seconds=batch)) for i in range(200)]
    ledger.write(rows)
    batch += 1
