"""NVML meter vs independently sampled power, on a real GPU workload (needs an NVIDIA GPU).

    python benchmarks/nvml_check.py [--gpu 0] [--seconds 10]

Phases: idle, then matrix multiplications (PyTorch, bf16) at three sizes. For each phase the
NvmlMeter's energy (the driver's total-energy counter, or integrated power polling where that
counter is unsupported) is compared with power sampled by a separate `nvidia-smi` process every
50 ms and integrated by trapezoids. Prints one table; exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time

from rich.console import Console
from rich.table import Table

from regions.meters import MeterError, NvmlMeter


class SmiSampler:
    """Power from `nvidia-smi -lms 50` in its own process: independent of our NVML calls."""

    def __init__(self, gpu: int) -> None:
        self.samples: list[tuple[float, float]] = []
        self.proc = subprocess.Popen(
            ["nvidia-smi", f"--id={gpu}", "--query-gpu=power.draw", "--format=csv,noheader,nounits",
             "-lms", "50"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.strip())))
            except ValueError:
                continue

    def energy_j(self, t0: float, t1: float) -> float:
        pts = [(t, p) for t, p in self.samples if t0 <= t <= t1]
        pairs = zip(pts, pts[1:], strict=False)
        return sum(0.5 * (p0 + p1) * (b - a) for (a, p0), (b, p1) in pairs)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=5)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    if shutil.which("nvidia-smi") is None:
        print("no nvidia-smi: this check needs an NVIDIA GPU", file=sys.stderr)
        return 2
    try:
        import torch
    except ImportError:
        print("this check needs PyTorch with CUDA: pip install torch", file=sys.stderr)
        return 2
    try:
        meter = NvmlMeter([args.gpu])
    except MeterError as e:
        print(f"NVML meter unavailable: {e}", file=sys.stderr)
        return 2
    dev = torch.device(f"cuda:{args.gpu}")
    smi = SmiSampler(args.gpu)
    time.sleep(1.0)
    name = torch.cuda.get_device_name(dev)
    table = Table(title=f"NVML meter vs nvidia-smi power sampling, {name}")
    for col in ("phase", "seconds", "NvmlMeter J", "nvidia-smi J", "mean W", "ratio"):
        table.add_column(col, justify="right")

    def phase(name: str, n: int | None) -> None:
        a = meter.read()
        t_end = time.monotonic() + args.seconds
        if n is None:
            time.sleep(args.seconds)
        else:
            x = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
            while time.monotonic() < t_end:
                for _ in range(20):
                    x = (x @ x).clamp_(-1, 1)
                torch.cuda.synchronize(dev)
        b = meter.read()
        time.sleep(0.2)  # let the sampler catch up
        ours = b.energy_j - a.energy_j
        theirs = smi.energy_j(a.t_s, b.t_s)
        secs = b.t_s - a.t_s
        table.add_row(name, f"{secs:.1f}", f"{ours:,.0f}", f"{theirs:,.0f}", f"{ours / secs:,.0f}",
                      f"{ours / theirs:.3f}" if theirs else "-")  # fmt: skip

    phase("idle", None)
    for n in (2048, 8192, 16384):
        phase(f"matmul {n}", n)
    smi.close()
    meter.close()
    Console(width=110).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
