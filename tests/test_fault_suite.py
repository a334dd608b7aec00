"""The live fault-injection suite (tests/live_faults.py): the router on Ray Serve on this
machine, its upstreams misbehaving on command; one test per fault, each asserting every
guarantee of ``live_faults.check`` (billed exactly once, no cross-tenant effect, no 5xx but
the fault's own, residency, budgets). ``python benchmarks/faults.py`` prints the same run as a
table."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.live_faults import SCENARIOS, Stack, live_stack, run

pytest.importorskip("ray")
pytestmark = [pytest.mark.needs_data, pytest.mark.slow]  # replays the registered carbon files


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with live_stack(tmp_path_factory.mktemp("faults")) as s:
        yield s


@pytest.mark.parametrize("fault", list(SCENARIOS))
def test_fault(stack: Stack, fault: str) -> None:
    out = run(stack, fault)
    assert out.rows_found == out.rows_expected
    assert out.bystander and all(r.label == "200" for r in out.bystander)
    assert not out.problems, f"{fault}: {out.problems} (statuses {dict(out.statuses())})"
