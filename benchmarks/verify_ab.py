"""``router verify --ledger`` of one big ledger, this tree against a baseline, side by side.

    python benchmarks/verify_ab.py --baseline REF|TREE [--rows 1000000] [--rounds 3]
                                   [--ledger DIR]

Writes one ledger of ``--rows`` rows over 20 tenants (``benchmarks/receipts.py``'s rows, in
batches of 5,000 as the metering actor writes them, every head signed) into ``--ledger``, or
reuses the one there (``l.sqlite`` and its key ``k.pem``). The baseline is a folder holding a
tree, or a git ref checked out into a temporary worktree. Then, ``--rounds`` times, the
baseline and this tree in turn (A B A B: the host's drift hits both alike) each verify the
ledger in a fresh process, without and with the kept sums' check (``verify_ledger(...,
sums=False)``, then the default). Prints each step's median wall and CPU seconds over the
rounds for both trees, and the 1-minute load average around the runs: on a shared machine the
CPU seconds and the ratio matter more than the wall seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("chains and signatures (--no-sums)", "and the kept sums (the default)")


def measure(folder: Path) -> dict[str, Any]:
    """Run in the tree on PYTHONPATH: each step's wall and CPU seconds, and the load."""
    from router.ledger import Ledger
    from router.receipts import Signer, verify_ledger

    ledger = Ledger(folder / "l.sqlite")
    key = Signer.load(folder / "k.pem").public_key
    rows = ledger.count()
    out: dict[str, Any] = {"load_1m": os.getloadavg()[0]}
    for step, sums in zip(STEPS, (False, True), strict=True):
        wall_s, cpu_s = time.perf_counter(), time.process_time()
        report = verify_ledger(ledger, [key], sums=sums)
        out[step] = (time.perf_counter() - wall_s, time.process_time() - cpu_s)
        if not (report.ok and report.rows == rows):
            raise SystemExit(f"the ledger does not verify: {report.problems[:3]}")
    ledger.close()
    return out


def build(folder: Path, rows: int) -> None:
    from benchmarks.receipts import rows as make_rows
    from router.ledger import Ledger
    from router.receipts import Signer, sign_heads

    ledger = Ledger(folder / "l.sqlite")
    data = make_rows(rows, 20)
    for i in range(0, len(data), 5000):
        ledger.write(data[i : i + 5000])
    sign_heads(ledger, Signer.load(folder / "k.pem", create=True))
    ledger.close()


def run_tree(tree: Path, folder: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", str(folder)]
    p = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if p.returncode:
        sys.stderr.write(p.stderr[-4000:])
        raise SystemExit(f"verifying with {tree} failed")
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="a tree's folder, or a git ref (needed)")
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ledger", type=Path, help="a folder to keep the ledger in, and reuse")
    ap.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        sys.path.insert(0, os.getcwd())  # the tree on PYTHONPATH, not this script's
        print(json.dumps(measure(args.measure)))
        return 0
    if not args.baseline:
        ap.error("--baseline REF|TREE is needed: the tree to measure this one against")
    sys.path.insert(0, str(ROOT))
    folder = args.ledger or Path(tempfile.mkdtemp(prefix="verify-ab-"))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "l.sqlite").exists():
        print(f"writing a ledger of {args.rows:,} rows into {folder}", flush=True)
        build(folder, args.rows)
    base = Path(args.baseline)
    made = None
    if not base.is_dir():
        made = base = Path(tempfile.mkdtemp(prefix="verify-baseline-"))
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline],
                       cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    trees = {f"baseline {args.baseline}": base, "this tree": ROOT}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    try:
        for r in range(args.rounds):
            for name, tree in trees.items():
                runs[name].append(run_tree(tree, folder))
                print(f"round {r + 1}, {name}: {runs[name][-1]}", flush=True)
    finally:
        if made is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(made)], cwd=ROOT,
                           check=False, capture_output=True)  # fmt: skip
    names = list(trees)
    print(f"\nrouter verify --ledger, medians of {args.rounds} rounds (wall s / CPU s)")
    print(f"{'step':40s}" + "".join(f"{n:>28s}" for n in names) + f"{'ratio (CPU)':>14s}")
    for step in STEPS:
        med = [(statistics.median(x[step][0] for x in runs[n]),
                statistics.median(x[step][1] for x in runs[n])) for n in names]  # fmt: skip
        cells = "".join(f"{f'{w:.2f} / {c:.2f}':>28s}" for w, c in med)
        print(f"{step:40s}{cells}{med[0][1] / med[-1][1]:>13.2f}x")
    loads = [x["load_1m"] for n in names for x in runs[n]]
    print(f"1-minute load average at the runs' starts: {min(loads):.2f} .. {max(loads):.2f} "
          f"({os.cpu_count()} CPUs)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
