"""Attribution accuracy and prefill-weight calibration on the real local model.

    python benchmarks/attribution_local.py [--n 8] [--out measured.jsonl]

1. Calibration: requests with prompts of 30 to ~1,500 tokens run one at a time on SmolLM2-135M
   (llama.cpp, 2 threads); each one's energy is the meter's delta over its life. A least-squares
   fit E = a x prompt_tokens + b x output_tokens + c gives the prefill weight a / b: the energy
   of one prompt token relative to one output token (the shipped default,
   ``regions.calibration.PREFILL_WEIGHT``, is printed beside it).
2. Accuracy: N requests run alone (ground truth: the meter delta of each), then the same
   requests (same seed, same outputs) all at once on a replica with 2 slots; the attributed
   energies of the concurrent run are compared with the isolated ones in proportion.

The meter is the CPU-time model (this machine has no readable energy counter): its readings
are estimates, so this measures the attribution, not the meter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import numpy as np

from regions.backends import CompletionRequest, LlamaCppBackend
from regions.calibration import PREFILL_WEIGHT
from regions.meters import CpuModelMeter
from router.metering.replica import MeteredReplica

WATTS_PER_CORE = 15.0
TOPICS = ["the ocean", "volcanoes", "bread", "chess", "the moon", "bicycles", "rain", "music"]


def prompt_of(words: int, topic: str) -> str:
    filler = " ".join(f"{topic} fact {i}." for i in range(words // 3))
    return f"Here are some notes: {filler}\nWrite a short paragraph about {topic}."


async def run_alone(
    replica: MeteredReplica, reqs: list[CompletionRequest]
) -> list[dict[str, float]]:
    rows = []
    for i, req in enumerate(reqs):
        t0 = replica.meter.read()
        rec = await replica.complete(f"alone-{i}-{time.monotonic_ns()}", req)
        t1 = replica.meter.read()
        rows.append(
            {
                "prompt_tokens": rec.prompt_tokens,
                "completion_tokens": rec.completion_tokens,
                "energy_j": t1.energy_j - t0.energy_j,
                "seconds": t1.t_s - t0.t_s,
                "text": "".join(rec.text),
            }
        )
    return rows


async def main_async(args: argparse.Namespace) -> dict[str, object]:
    backend = LlamaCppBackend(slots=1, n_threads=2)
    alone = MeteredReplica("calib", backend, CpuModelMeter(WATTS_PER_CORE, idle_share=0.0))
    # 1. calibration
    calib_reqs = [
        CompletionRequest(
            messages=[{"role": "user", "content": prompt_of(w, TOPICS[i % len(TOPICS)])}],
            max_tokens=m,
            temperature=0.0,
            seed=1,
        )
        for i, (w, m) in enumerate([(w, m) for w in (10, 60, 150, 250, 350) for m in (16, 64, 128)])
    ]
    await run_alone(alone, calib_reqs[:2])  # warm-up
    calib = await run_alone(alone, calib_reqs)
    x = np.array([[r["prompt_tokens"], r["completion_tokens"], 1.0] for r in calib])
    y = np.array([r["energy_j"] for r in calib])
    (a, b, c), *_ = np.linalg.lstsq(x, y, rcond=None)
    prefill_weight = float(a / b)
    # 2. accuracy: the same requests alone, then concurrently
    reqs = [
        CompletionRequest(
            messages=[{"role": "user", "content": prompt_of(20 + 25 * i, TOPICS[i % 8])}],
            max_tokens=24 + 16 * (i % 5),
            temperature=0.0,
            seed=7,
        )
        for i in range(args.n)
    ]
    isolated = await run_alone(alone, reqs)
    await alone.aclose()
    backend2 = LlamaCppBackend(slots=2, n_threads=1)
    shared = MeteredReplica(
        "shared",
        backend2,
        CpuModelMeter(WATTS_PER_CORE, idle_share=0.0),
        prefill_weight=prefill_weight,
    )

    async def one(i: int) -> tuple[int, float, int, str]:
        rid = f"conc-{i}"
        rec = await shared.complete(rid, reqs[i])
        att = await shared.energy(rid)
        return i, att.energy_j, rec.completion_tokens, "".join(rec.text)

    conc = sorted(await asyncio.gather(*(one(i) for i in range(args.n))))
    await shared.aclose()
    same_output = [isolated[i]["text"] == conc[i][3] for i in range(args.n)]
    e_iso = np.array([r["energy_j"] for r in isolated])
    e_con = np.array([c[1] for c in conc])
    s_iso, s_con = e_iso / e_iso.sum(), e_con / e_con.sum()
    ape = np.abs(s_con - s_iso) / s_iso * 100
    result = {
        "model": "SmolLM2-135M-Instruct Q4_1 (llama.cpp)",
        "calibration": {
            "requests": len(calib),
            "j_per_prompt_token": round(float(a), 5),
            "j_per_output_token": round(float(b), 5),
            "j_fixed": round(float(c), 4),
            "prefill_weight": round(prefill_weight, 4),
            "shipped_default": PREFILL_WEIGHT,  # regions/calibration.py
        },
        "accuracy": {
            "requests": args.n,
            "identical_outputs": int(sum(same_output)),
            "share_ape_median_pct": round(float(statistics.median(ape)), 2),
            "share_ape_max_pct": round(float(ape.max()), 2),
            "total_isolated_j": round(float(e_iso.sum()), 3),
            "total_concurrent_attributed_j": round(float(e_con.sum()), 3),
        },
    }
    if args.out:
        with open(args.out, "w") as fh:
            for r in calib + isolated:
                fh.write(json.dumps({k: v for k, v in r.items() if k != "text"}) + "\n")
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument(
        "--out", help="write the measured requests (JSONL) for `router energy evaluate`"
    )
    args = ap.parse_args()
    result = asyncio.run(main_async(args))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
