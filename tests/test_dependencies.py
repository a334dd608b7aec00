"""Every third-party module the project imports is declared in pyproject.toml."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions

from tests.conftest import ROOT

OURS = {"carbonrouter", "router", "regions", "forecasting", "tests", "benchmarks"}
# imported only where their absence is handled and explained
OPTIONAL = {
    "torch": "benchmarks/nvml_check.py, a GPU check that says to install it",
    "uvloop": "tests/test_http1.py, importorskip",
}


def imported_modules() -> dict[str, str]:
    found: dict[str, str] = {}
    for folder in sorted(OURS):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], str(path.relative_to(ROOT)))
    return {
        m: where
        for m, where in found.items()
        if m not in OURS and m not in sys.stdlib_module_names and m != "__future__"
    }


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_third_party_import_is_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = [*project["dependencies"]]
    for extra in project["optional-dependencies"].values():
        specs.extend(extra)
    declared = {norm(re.split(r"[\[<>=!~; ]", s, maxsplit=1)[0]) for s in specs}
    dists = packages_distributions()
    undeclared = {}
    for module, where in imported_modules().items():
        if module in OPTIONAL:
            continue
        names = {norm(d) for d in dists.get(module, [])}
        assert names, f"{module} (imported in {where}) is not installed: declare it, or list it"
        if not names & declared:
            undeclared[module] = (where, sorted(names))
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
