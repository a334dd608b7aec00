"""Router overhead, this tree against a baseline commit, side by side in one run.

    python benchmarks/overhead_ab.py --baseline REF [--rounds 2] [--seconds 8]

Checks REF out into a temporary git worktree, then, ``--rounds`` times, starts the router from
the baseline and from this tree in turn (A B A B: the host's drift hits both alike), each in
front of the same fake backend (regions/fake_openai.py on loopback), and measures through the
direct ingress with wrk: added p50 at concurrency 1, req/s at concurrency 32, the ingress's CPU
per request there, and a stream's time to first byte at concurrency 8 (the same lean client as
``overhead.py``). Prints each figure's median over the rounds for both trees and their ratio.

It stops every Ray process on this machine between runs (``ray stop --force``), as
``overhead.py`` does: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.overhead import (  # noqa: E402
    BODY,
    CONFIG,
    KEY,
    LUA,
    cpu_by_process,
    free_port,
    per_request,
    stop,
    ttfb,
    wait,
    wrk,
)

ROOT = Path(__file__).resolve().parent.parent


def measure(tree: Path, fake_port: int, script: Path, seconds: int, repeat: int,
            tmp: Path) -> dict[str, float]:  # fmt: skip
    """Start the router from ``tree`` and measure it; returns the figures."""
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "CARBON_ROUTER_DATA": os.environ.get("CARBON_ROUTER_DATA")
        or str(ROOT.parent / "shared" / "data"),
    }
    run = tmp / f"run-{free_port()}"
    run.mkdir()
    cfg = run / "bench.yaml"
    cfg.write_text(CONFIG.format(port=fake_port, ledger=run / "ledger.sqlite"))
    port, direct_port = free_port(), free_port()
    router = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--config", str(cfg), "--port", str(port),
         "--direct-port", str(direct_port)],
        cwd=tree, env=env, stdout=(run / "router.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    direct = f"http://127.0.0.1:{fake_port}/v1/chat/completions"
    url = f"http://127.0.0.1:{direct_port}/v1/chat/completions"
    try:
        wait(url, "POST")
        d1 = wrk(direct, 1, seconds, script, repeat)
        r1 = wrk(url, 1, seconds, script, repeat)
        before = cpu_by_process()
        r32 = wrk(url, 32, seconds, script, repeat)
        cpu = per_request(before, cpu_by_process(), r32["requests"])
        first_byte = asyncio.run(ttfb(url, 8, 400))
    finally:
        stop(router)
    return {
        "added p50 at c=1 (ms)": r1["p50"] - d1["p50"],
        "req/s at c=32": r32["rps"],
        "ingress CPU per request at c=32 (us)": cpu["ingress"],
        "stream first byte at c=8 (ms)": first_byte,
        "non-2xx": r1["non2xx"] + r32["non2xx"],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="git ref of the baseline")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="wrk runs per figure (median)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    base = tmp / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=ROOT,
                   check=True, capture_output=True)  # fmt: skip
    fake_port = free_port()
    fake = subprocess.Popen([sys.executable, "-m", "regions.fake_openai", str(fake_port)], cwd=ROOT)
    script = tmp / "post.lua"
    script.write_text(LUA.format(body=json.dumps(BODY), key=KEY))
    runs: dict[str, list[dict[str, float]]] = {"baseline": [], "this tree": []}
    try:
        for _ in range(args.rounds):
            for name, tree in (("baseline", base), ("this tree", ROOT)):
                runs[name].append(measure(tree, fake_port, script, args.seconds, args.repeat, tmp))
    finally:
        fake.terminate()
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                       check=False, capture_output=True)  # fmt: skip
    rev = subprocess.run(["git", "rev-parse", "--short", args.baseline], cwd=ROOT,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    table = Table(
        title=f"Router overhead, direct ingress: baseline {rev} vs this tree (median of "
        f"{args.rounds} rounds, A B A B; wrk -t1, median of {args.repeat} x {args.seconds} s)"
    )
    for col in ("figure", "baseline", "this tree", "ratio", "rounds (baseline | this tree)"):
        table.add_column(col, justify="right")
    for key in runs["baseline"][0]:
        a = statistics.median(r[key] for r in runs["baseline"])
        b = statistics.median(r[key] for r in runs["this tree"])
        each = " ".join(f"{r[key]:.2f}" for r in runs["baseline"]) + " | " + " ".join(
            f"{r[key]:.2f}" for r in runs["this tree"]
        )
        ratio = f"{b / a:.2f}" if a else "-"
        table.add_row(key, f"{a:,.2f}", f"{b:,.2f}", ratio, each)
    Console(width=160).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
