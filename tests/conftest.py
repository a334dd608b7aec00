"""Shared fixtures. Tests read real data from ../shared/data (or ``$CARBON_ROUTER_DATA``) and
never reach the internet.

Without that folder the tests that need no data still run; those that need it (marked
``needs_data``, or using the ``data_dir`` fixture) are skipped and say why, and downloads go to
a throwaway cache from a closed local port, so none reaches the internet. CI sets
``CARBON_ROUTER_REQUIRE_DATA=1``: there a missing folder is an error, not a skip.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CARBON_ROUTER_DATA") or ROOT.parent / "shared" / "data").resolve()
HAVE_DATA = (DATA / "carbon").is_dir()
NO_DATA_REASON = (
    f"needs the shared data folder, not found at {DATA}: set CARBON_ROUTER_DATA to it "
    "(the layout of ../shared/data)"
)
if HAVE_DATA:
    os.environ["CARBON_ROUTER_DATA"] = str(DATA)
else:
    if os.environ.get("CARBON_ROUTER_REQUIRE_DATA") == "1":
        raise pytest.UsageError(f"CARBON_ROUTER_REQUIRE_DATA=1 and the test {NO_DATA_REASON}")
    os.environ.pop("CARBON_ROUTER_DATA", None)
    os.environ["CARBON_ROUTER_CACHE"] = tempfile.mkdtemp(prefix="carbon-router-test-cache-")
    os.environ["CARBON_ROUTER_DATA_URL"] = "http://127.0.0.1:9"  # closed: fail fast, offline


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAVE_DATA:
        return
    skip = pytest.mark.skip(reason=NO_DATA_REASON)
    for item in items:
        if "needs_data" in item.keywords or "data_dir" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    return f"carbon-router data: {DATA if HAVE_DATA else 'none (' + NO_DATA_REASON + ')'}"


class FakeClock:
    """A settable UTC clock; tests advance it instead of sleeping."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture(scope="session")  # module-scoped fixtures (frames, simulations) use it too
def data_dir() -> Path:
    return DATA


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2024, 5, 1, 2, 0, tzinfo=UTC))


@pytest.fixture
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty download cache and no data dir, for tests of the download path."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("CARBON_ROUTER_CACHE", str(cache))
    monkeypatch.delenv("CARBON_ROUTER_DATA", raising=False)
    yield cache


@asynccontextmanager
async def loop_turns(period_s: float = 0.0) -> AsyncIterator[list[int]]:
    """Counts the event loop's turns while the block runs (``turns[0]``), one each
    ``period_s`` at most: a block that holds the loop lets none happen."""
    turns = [0]

    async def tick() -> None:
        while True:
            turns[0] += 1
            await asyncio.sleep(period_s)

    task = asyncio.create_task(tick())
    try:
        yield turns
    finally:
        task.cancel()
