"""The analysis notebook executes top to bottom (outputs are not committed)."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT


@pytest.mark.slow
@pytest.mark.needs_data
def test_what_if_notebook_runs(tmp_path: object) -> None:
    path = ROOT / "notebooks/what_if.ipynb"
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # not committed
    os.environ["CARBON_ROUTER_ROOT"] = str(ROOT)
    os.environ["WHAT_IF_PERIOD"] = "2024-06-01..2024-06-15"
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})  # fmt: skip
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for o in outputs)  # fmt: skip
    assert "forecast-driven deferral captured" in text
    assert "power_of_two" in text and "token / energy" in text and "TTFT p99 ms" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
