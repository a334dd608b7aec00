"""Mutation testing of the modules that decide money and carbon (issue 15): `make mutation`.

The tool is mutmut 3 (pip: mutmut). Each module is mutated in a scratch copy of the working tree
(build/mutation/<module>/, never the tree itself) and only its own fast tests run against each
mutant, one per CPU at a time (``--jobs``). mutmut forks a warmed-up pytest per mutant and runs
only the tests that reached the mutated function: 1-2 minutes each for preference.py (232
mutants) and billing.py (373) here. cosmic-ray 8.7 also installs and initialises on Python 3.11,
but starts a fresh pytest for every mutant (3-7 s each with these test files) and makes 224 and
674 mutants for the same two modules: about 26 and 40 minutes (estimated from one test run per
mutant).

    python tools/mutation.py                           # every module in MODULES below
    python tools/mutation.py router/preference.py      # one or more modules

Per module it prints mutants, killed, survived, no tests (survivors in a function that none of
the module's tests reach), timeouts, other (suspicious, not run), reviewed equivalents and the
score, then lists each survivor as file:line and the change.

Score = (killed + timeouts) / (mutants - equivalents). A survivor that a reviewer has shown
cannot change behaviour goes into mutation/equivalents.txt (format in that file's header); it
is left out of the score and listed apart. An entry that no longer matches a mutant is reported
as stale, so the file does not rot.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
EQUIVALENTS = ROOT / "mutation" / "equivalents.txt"

# Each module and the fast tests that own it; nothing that starts Ray, a browser or a server.
# Tests marked slow in these files do not run (see prepare).
MODULES: dict[str, list[str]] = {
    "router/preference.py": ["tests/test_preference_policy.py"],
    "router/policy.py": ["tests/test_policy.py", "tests/test_preference_policy.py"],
    "router/scheduler.py": [
        "tests/test_scheduler.py",
        "tests/test_jobs.py",
        "tests/test_deferral_distribution.py",
    ],
    # rebill (a bill settled again on metered energy) is tested with the receipts it rewrites
    "router/billing.py": [
        "tests/test_billing.py",
        "tests/test_golden_bills.py",
        "tests/test_receipts.py",
    ],
    "router/metering/attribution.py": [
        "tests/test_attribution_rules.py",
        "tests/test_attribution.py",
    ],
    # the crash and the 40,000-row cases are in tests/test_ledger_scale.py, not run per mutant
    "router/ledger.py": ["tests/test_ledger.py"],
    "forecasting/replica_model.py": [
        "tests/test_replica_model_rules.py",
        "tests/test_replica_model.py",
    ],
    # every message and check word for word in test_receipts_exact (the request path's
    # receipts, in test_receipts, end in verify too)
    "router/receipts.py": ["tests/test_receipts.py", "tests/test_receipts_exact.py"],
    # the canonical form and the link, pinned byte for byte (the chain as a whole: test_receipts)
    "router/chain.py": ["tests/test_chain.py"],
    # each figure against one worked out by hand (test_receipts checks them on a served request)
    "router/accounting.py": ["tests/test_accounting.py"],
}

KILLED_LIKE = {"killed", "timeout", "caught by type check", "segfault"}


class MutationError(Exception):
    """The run could not be set up or read back; the message says what to fix."""


@dataclass
class Survivor:
    name: str
    status: str
    function: str
    line: int
    before: str
    after: str


@dataclass
class Report:
    module: str
    wall_s: float
    counts: dict[str, int] = field(default_factory=dict)
    survivors: list[Survivor] = field(default_factory=list)
    equivalents: list[tuple[Survivor, str]] = field(default_factory=list)


def load_equivalents(path: Path = EQUIVALENTS) -> dict[tuple[str, str, str], str]:
    """(module, function, mutated line) -> reason, from the reviewed equivalents file."""
    out: dict[tuple[str, str, str], str] = {}
    if not path.exists():
        return out
    for n, raw in enumerate(path.read_text("utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where, sep, rest = line.partition(" | ")
        change, sep2, reason = rest.rpartition(" | ")
        module, _, function = where.partition("::")
        if not (sep and sep2 and function and change.strip() and reason.strip()):
            raise MutationError(
                f"{path}:{n}: expected 'module::function | mutated line | reason', got {raw!r}"
            )
        out[(module.strip(), function.strip(), change.strip())] = reason.strip()
    return out


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked and new, unignored files) into dest."""
    files = (
        subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        .stdout.decode()
        .split("\0")
    )
    if dest.exists():
        shutil.rmtree(dest)
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file() and not rel.startswith(("notebooks/", "dashboards/", "docs/")):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def prepare(work: Path, module: str, tests: list[str]) -> None:
    """The scratch copy in work and its mutmut configuration, mutating module against tests.

    mutmut copies only source_paths (the one module) and also_copy into work/mutants/, puts that
    first on sys.path and takes the working directory off it; the tests run from there too
    (their ROOT is work/mutants/). Without the rest of the tree there, `router` is a namespace
    package holding the one module: a module in a subpackage cannot import its siblings
    (router.metering.remote), the editable install answers for the other modules from the tree
    it was installed from (another worktree's code), and tests miss the files they read
    (configs/). So every top-level entry of the copy goes into also_copy: work/mutants/ is the
    whole tree with the one module mutated.
    """
    copy_tree(work)
    entries = sorted(p.name for p in work.iterdir())
    (work / "setup.cfg").write_text(
        "[mutmut]\n"
        f"source_paths={module}\n"
        "also_copy=\n  " + "\n  ".join(entries) + "\n"
        "pytest_add_cli_args_test_selection=\n  " + "\n  ".join(tests) + "\n"
        # tests marked slow (a CLI in a subprocess, a whole evaluation) would run again for
        # every mutant of the functions they reach: left to `make test`
        "pytest_add_cli_args=\n  -p\n  no:cacheprovider\n  -m\n  not slow\n",
        "utf-8",
    )


def function_spans(source: str) -> dict[str, tuple[int, int]]:
    """'func' or 'Class.method' -> (first line incl. decorators, last line)."""
    spans: dict[str, tuple[int, int]] = {}

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                spans[prefix + node.name] = (first, node.end_lineno or node.lineno)
            elif isinstance(node, ast.ClassDef):
                visit(node.body, prefix + node.name + ".")

    visit(ast.parse(source).body, "")
    return spans


def function_of(mutant: str) -> str:
    """router.preference.xǁPreferenceErrorǁ__init____mutmut_2 -> PreferenceError.__init__."""
    generated = mutant.rpartition(".")[2].rpartition("__mutmut_")[0]
    if generated.startswith("xǁ"):
        cls, _, meth = generated[2:].partition("ǁ")
        return f"{cls}.{meth}"
    return generated.removeprefix("x_")


def locate(diff: str, source_lines: list[str], span: tuple[int, int]) -> tuple[int, str, str]:
    """The file line of a function-relative mutmut diff, its text before and after."""
    hunk_start, offset, before, after = 1, 0, [], []
    for line in diff.splitlines():
        if line.startswith("@@"):
            hunk_start = int(line.split()[1].lstrip("-").split(",")[0])
        elif line.startswith(("---", "+++")):
            continue
        elif line.startswith("-"):
            before.append(line[1:].strip())
        elif line.startswith("+"):
            after.append(line[1:].strip())
        elif not before and not after:
            offset += 1
    guess = span[0] + hunk_start - 1 + offset
    first = before[0] if before else ""
    if not (0 < guess <= len(source_lines) and source_lines[guess - 1].strip() == first):
        hits = [i for i in range(span[0], span[1] + 1) if source_lines[i - 1].strip() == first]
        guess = min(hits, key=lambda i: abs(i - guess)) if hits else guess
    return guess, " ⏎ ".join(before), " ⏎ ".join(after) or "(line removed)"


def run_module(module: str, tests: list[str], timeout_s: float, jobs: int = 1) -> Report:
    if not (ROOT / module).is_file():
        raise MutationError(
            f"{module}: no such file under {ROOT}; give a path like router/billing.py"
        )
    tests = [t for t in tests if (ROOT / t).is_file()]
    if not tests:
        raise MutationError(f"{module}: none of its test files exist; fix MODULES in {__file__}")
    work = WORK / module.replace("/", "__").removesuffix(".py")
    prepare(work, module, tests)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # mutmut puts its mutated copy first; the tree must not shadow it
    mutmut = Path(sys.executable).with_name("mutmut")
    t0 = time.monotonic()
    with open(work / "mutmut.log", "w") as log:
        try:
            subprocess.run(
                [str(mutmut), "run", "--max-children", str(jobs)],
                cwd=work,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                check=True,
            )
        except FileNotFoundError as e:
            raise MutationError(
                "mutmut is not installed: .venv/bin/pip install 'mutmut>=3.3'"
            ) from e
        except subprocess.CalledProcessError as e:
            raise MutationError(
                f"{module}: mutmut failed ({e.returncode}); see {work}/mutmut.log"
            ) from e
    report = Report(module, time.monotonic() - t0)
    read_results(report, work)
    return report


def read_results(report: Report, work: Path) -> None:
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    module = report.module
    meta = json.loads((work / "mutants" / (module + ".meta")).read_text("utf-8"))
    source = (work / module).read_text("utf-8")
    spans = function_spans(source)
    lines = source.splitlines()
    equivalents = load_equivalents()
    for name, code in sorted(meta["exit_code_by_key"].items()):
        status = status_by_exit_code[code]
        report.counts[status] = report.counts.get(status, 0) + 1
        if status in KILLED_LIKE:
            continue
        with contextlib.chdir(work):  # mutmut reads mutants/<module> relative to the cwd
            diff = get_diff_for_mutant(name, path=module)
        function = function_of(name)
        line, before, after = locate(diff, lines, spans.get(function, (1, len(lines))))
        s = Survivor(name, status, function, line, before, after)
        reason = equivalents.get((module, function, after))
        if reason is not None:
            report.equivalents.append((s, reason))
        else:
            report.survivors.append(s)


def print_report(r: Report) -> None:
    c = r.counts
    total = sum(c.values())
    killed = c.get("killed", 0) + c.get("caught by type check", 0) + c.get("segfault", 0)
    timeouts = c.get("timeout", 0)
    survived = sum(1 for s in r.survivors if s.status == "survived")
    untested = sum(1 for s in r.survivors if s.status == "no tests")
    other = total - killed - timeouts - survived - untested - len(r.equivalents)
    scored = total - len(r.equivalents)
    score = 100.0 * (killed + timeouts) / scored if scored else 0.0
    print(f"\n## {r.module}  ({r.wall_s:.0f} s)")
    heads = ("mutants", "killed", "survived", "no tests", "timeouts", "other", "equiv")
    row = (total, killed, survived, untested, timeouts, other, len(r.equivalents))
    print(" ".join(f"{h:>9}" for h in heads) + f" {'score':>7}")
    print(" ".join(f"{n:>9}" for n in row) + f" {score:>6.1f}%")
    for s in sorted(r.survivors, key=lambda s: (s.line, s.name)):
        tag = "" if s.status == "survived" else f" [{s.status}]"
        mutant = s.name.rpartition(".")[2]
        print(f"  {r.module}:{s.line}{tag}  {s.before}  ->  {s.after}    ({mutant})")
    for s, reason in sorted(r.equivalents, key=lambda e: (e[0].line, e[0].name)):
        print(f"  equivalent {r.module}:{s.line}  {s.before}  ->  {s.after}: {reason}")
    seen = {(r.module, s.function, s.after) for s, _ in r.equivalents}
    for key in load_equivalents():
        if key[0] == r.module and key not in seen:
            print(f"  stale entry in {EQUIVALENTS.relative_to(ROOT)}: {' | '.join(key)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "modules", nargs="*", help="paths under the repository (default: all in MODULES)"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=3600.0, help="wall-clock limit per module"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="mutants tested at once (default: the CPUs; each is one forked pytest)",
    )
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be 1 or more")
    modules = args.modules or list(MODULES)
    try:
        for module in modules:
            tests = MODULES.get(module)
            if tests is None:
                raise MutationError(f"{module}: no tests mapped; add it to MODULES in {__file__}")
            print_report(run_module(module, tests, args.timeout_s, args.jobs))
            sys.stdout.flush()
    except MutationError as e:
        print(f"mutation: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
