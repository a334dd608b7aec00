"""The ML.ENERGY tables shipped as package data: what the data share derives, and in the wheel."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pandas as pd
import pytest

from forecasting.mlenergy import PACKAGE_DATA, TABLES, derive, table_path
from tests.conftest import ROOT


@pytest.mark.parametrize("shipped", sorted(TABLES))
def test_shipped_tables_equal_their_derivation_from_the_data_share(
    shipped: str, data_dir: Path
) -> None:
    packaged = pd.read_csv(PACKAGE_DATA / shipped)
    pd.testing.assert_frame_equal(packaged, derive(data_dir, shipped), check_exact=True)


def test_the_predictor_reads_the_shipped_tables_by_their_data_share_names() -> None:
    for shipped, (source, _) in TABLES.items():
        assert table_path(source) == PACKAGE_DATA / shipped


def test_package_data_is_declared() -> None:
    """Every file the package reads at run time goes into the wheel, with the attribution."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["forecasting"]
    shipped = [p.relative_to(ROOT / "forecasting").as_posix() for p in PACKAGE_DATA.iterdir()]
    for name in [*shipped, "datasets.json"]:
        assert any(fnmatch(name, g) for g in globs), f"forecasting/{name} is not package data"
    assert "data/NOTICE.mlenergy.md" in shipped
