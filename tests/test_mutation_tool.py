"""tools/mutation.py: the scratch copy that mutmut runs in imports only the tree under test."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("mutmut")

ROOT = Path(__file__).resolve().parent.parent


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutation_tool", ROOT / "tools" / "mutation.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


# mutmut's own steps before the first mutant: copy the module and also_copy into mutants/, then
# put mutants/ first on sys.path and drop the working directory from it
PROBE = """
import importlib, sys
from mutmut.utils.file_utils import copy_also_copy_files, copy_src_dir, setup_source_paths
copy_src_dir(); copy_also_copy_files(); setup_source_paths()
for name in sys.argv[1:]:
    print("module", importlib.import_module(name).__file__)
"""


@pytest.mark.slow
def test_the_scratch_copy_is_the_whole_tree_so_a_subpackage_module_finds_its_siblings(
    tmp_path: Path,
) -> None:
    tool = _tool()
    work = tmp_path / "attribution"
    tool.prepare(work, "router/metering/attribution.py", ["tests/test_attribution.py"])
    names = [
        "router.metering.attribution",
        "router.metering.remote",
        "router.errors",
        "forecasting.replica_model",
        "regions",
        "carbonrouter",
    ]
    run = subprocess.run(
        [sys.executable, "-c", PROBE, *names],
        cwd=work,
        env={"PATH": "/usr/bin:/bin"},  # no PYTHONPATH, as tools/mutation.py runs mutmut
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    files = [
        line.split(" ", 1)[1] for line in run.stdout.splitlines() if line.startswith("module ")
    ]
    assert len(files) == len(names)
    # every module, mutated or not, from the scratch copy: not from the tree the editable
    # install points at, which may be another worktree
    for name, file in zip(names, files, strict=True):
        assert Path(file).is_relative_to(work / "mutants"), (name, file)
    # and the tests find the files they read beside the code (ROOT is mutants/ there)
    tree = {p.relative_to(work) for p in work.rglob("*") if p.is_file()}
    mirrored = {p.relative_to(work / "mutants") for p in (work / "mutants").rglob("*")}
    assert Path("configs/multiregion.yaml") in tree
    assert {p for p in tree if p.parts[0] != "mutants"} <= mirrored
