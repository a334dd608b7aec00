"""Shared fixtures. Tests read real data from ../shared/data through the data cache variable
and never reach the internet."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("CARBON_ROUTER_DATA") or ROOT.parent / "shared" / "data").resolve()
if not (DATA / "carbon").is_dir():
    raise RuntimeError(
        f"test data not found at {DATA}; set CARBON_ROUTER_DATA to the shared data folder"
    )
os.environ["CARBON_ROUTER_DATA"] = str(DATA)


class FakeClock:
    """A settable UTC clock; tests advance it instead of sleeping."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
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
