"""How well the replica model reproduces ML.ENERGY runs it did not see (``router replica
evaluate``).

- Leave one batch size out: in each measured configuration, each run between its smallest and
  largest batch is removed in turn; the configuration's curve is rebuilt from the other runs
  (:func:`forecasting.replica_calibration.measured_curve`) and read at the removed run's batch.
  The end runs are not held out: a curve beyond its runs is the extrapolation rule of
  :mod:`forecasting.replica_model`, not an interpolation.
- Leave one model out: each model family is removed in turn with every run of it (all
  precisions, GPUs and counts; Llama-3.3-70B goes with Llama-3.1-70B, the same network with other
  weights), the calibration is rebuilt without it, and the family's configurations are asked of
  the fit as unmeasured models with their parameter counts.

Both go through the code that serves the router, and compare power, decode rate, ITL and J/token
with the measured values (absolute percentage error).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from forecasting.replica_calibration import (
    METRICS,
    ReplicaCalibration,
    load_chat_measurements,
    measured_curve,
)
from forecasting.replica_model import ReplicaSpec

NAMES = {"power_w": "power", "tokens_per_s": "throughput", "itl_s": "ITL", "j_per_token": "J/token"}
SAME_NETWORK = {"llama-3.3-70b-instruct": "llama-3.1-70b-instruct"}
TARGETS_PCT = {
    ("leave_one_batch_size_out", "power"): 5.0,
    ("leave_one_batch_size_out", "throughput"): 5.0,
    ("leave_one_model_out", "J/token"): 15.0,
}


def _ape(pred: dict[str, np.ndarray], runs: pd.DataFrame) -> dict[str, np.ndarray]:
    truth = {m: runs[m].to_numpy(float) for m in METRICS}
    pred = {**pred, "j_per_token": pred["power_w"] / pred["tokens_per_s"]}
    truth["j_per_token"] = truth["power_w"] / truth["tokens_per_s"]
    return {NAMES[m]: np.abs(pred[m] / truth[m] - 1) * 100 for m in NAMES}


def leave_one_batch_size_out(data: pd.DataFrame) -> dict[str, np.ndarray]:
    errors: dict[str, list[np.ndarray]] = {n: [] for n in NAMES.values()}
    for _, runs in data.groupby(["key", "gpu", "num_gpus", "layout"]):
        sizes = np.sort(runs["max_num_seqs"].unique())
        for held in sizes[1:-1]:
            test = runs[runs["max_num_seqs"] == held]
            curve, _ = measured_curve(runs[runs["max_num_seqs"] != held])
            pred = dict(zip(METRICS, curve.at(test["batch"].to_numpy(float)), strict=True))
            for name, e in _ape(pred, test).items():
                errors[name].append(e)
    return {n: np.concatenate(e) for n, e in errors.items()}


def leave_one_model_out(data: pd.DataFrame) -> dict[str, np.ndarray]:
    errors: dict[str, list[np.ndarray]] = {n: [] for n in NAMES.values()}
    group = data["family"].replace(SAME_NETWORK)
    for held in sorted(group.unique()):
        calibration = ReplicaCalibration.from_data(data[group != held])
        for (model, gpu, count, _), runs in data[group == held].groupby(
            ["model", "gpu", "num_gpus", "layout"]
        ):
            row = runs.iloc[0]
            spec = ReplicaSpec(
                model=f"held-out/{model}",
                gpu=str(gpu),
                gpu_count=int(count),
                max_num_seqs=int(np.ceil(runs["batch"].max())),
                active_params_b=float(row["active_params_b"]),
                total_params_b=float(row["total_params_b"]),
                precision=str(row["precision"]),
                architecture=row["architecture"],
            )
            curve = calibration.model(spec).curve
            pred = dict(zip(METRICS, curve.at(runs["batch"].to_numpy(float)), strict=True))
            for name, e in _ape(pred, runs).items():
                errors[name].append(e)
    return {n: np.concatenate(e) for n, e in errors.items()}


def summarize(errors: dict[str, np.ndarray]) -> dict[str, dict[str, float | int]]:
    return {
        name: {
            "median_ape_pct": round(float(np.median(e)), 2),
            "p90_ape_pct": round(float(np.percentile(e, 90)), 2),
            "points": len(e),
        }
        for name, e in errors.items()
    }


def evaluate(data: pd.DataFrame | None = None) -> dict[str, Any]:
    """Both evaluations on the chat runs (the shipped tables unless ``data`` is given), with the
    targets the model is held to."""
    data = load_chat_measurements() if data is None else data
    out: dict[str, Any] = {
        "configurations": int(data.groupby(["key", "gpu", "num_gpus", "layout"]).ngroups),
        "runs": len(data),
        "model_families": int(data["family"].replace(SAME_NETWORK).nunique()),
        "leave_one_batch_size_out": summarize(leave_one_batch_size_out(data)),
        "leave_one_model_out": summarize(leave_one_model_out(data)),
    }
    out["targets"] = [
        {
            "evaluation": ev,
            "metric": metric,
            "median_ape_pct_at_most": target,
            "met": out[ev][metric]["median_ape_pct"] <= target,
        }
        for (ev, metric), target in TARGETS_PCT.items()
    ]
    return out
