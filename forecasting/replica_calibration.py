"""The replica model's calibration on ML.ENERGY: measured curves, and a fit for the rest.

Data: ML.ENERGY Benchmark v3 (vLLM 0.11, H100 and B200, task ``lm-arena-chat``) and leaderboard
v2 (vLLM, A100-40GB, task ``chat``), from the tables shipped as package data
(:mod:`forecasting.mlenergy`), or from a data folder when one is given. Only the chat tasks: the
router serves chat completions, and the other tasks are other workloads (``gpqa``'s
7,000-token reasoning outputs lengthen the KV cache and the inter-token latency, image and video
chat add vision prefill, fill-in-the-middle is prompt-heavy); an average over them would
describe no real traffic. v2's H100 rows are left out: v3 measures H100 with a newer vLLM.

One row per run of a configuration (model, GPU, count, parallel layout) at one
``max_num_seqs``: batch = the run's average running batch; power = v3's average power of all
GPUs, and for v2, which publishes none, J per output token x output tokens/s (the run's
average power); decode rate = output tokens/s; ITL = v3's median inter-token latency, v2's mean
time per output token; J/token = power / decode rate (exactly v3's
``energy_per_token_joules``). Repeated runs (three in v3) are merged by geometric mean.

A measured configuration is its runs as a :class:`forecasting.replica_model.BatchCurve`; a run
whose running batch stayed under 90 % of its ``max_num_seqs`` was held back by the KV cache, and
caps the replica's batch. A served model finds its runs by :func:`model_key`; several layouts of
one GPU count are several configurations, and plain tensor parallelism is the default.

Everything else, a model, GPU type or GPU count that was not measured, comes from
:class:`ParametricFit`: a ridge regression on logs, one per metric (power, decode rate, ITL;
J/token is their ratio), on all the measured chat runs, with features: log active and total
parameters, log bytes per parameter, log GPU count, offsets of A100-40GB and B200 against H100,
log batch and its square, MoE and hybrid indicators, log batch times log active parameters, log
count, each GPU offset and MoE, and the roofline step times (the bytes of weights a step reads /
(bandwidth x count), 2 x active parameters x batch / (dense FLOP/s x count), and their soft
maximum). It is evaluated on a log-spaced grid of batches from 8 to the batch limit (at most
4,096, the data's largest) and made monotone like a measured curve. A GPU type outside the data
gets its own datasheet roofline (:data:`forecasting.energy.GPUS`) and the offsets of its nearest
measured kind (:data:`GPU_PROXY`). A model outside the data needs its parameter counts: there is
no default size. ``router replica evaluate`` (:mod:`forecasting.replica_eval`) holds each model
family out of the fit and compares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from forecasting.energy import (
    GPUS,
    PRECISION_BYTES,
    V2_FILE,
    V2_PARAMS_B,
    V3_FILE,
    canonical_gpu,
    model_family,
)
from forecasting.mlenergy import table_path
from forecasting.replica_model import (
    BatchCurve,
    GpuReplicaModel,
    ReplicaModelError,
    ReplicaSpec,
)

METRICS = ("power_w", "tokens_per_s", "itl_s")
KV_LIMITED = 0.9  # a run whose running batch stayed under this share of max_num_seqs
FIT_MIN_BATCH, FIT_MAX_BATCH, FIT_GRID = 8.0, 4096.0, 16
RIDGE = 1e-3  # per row, on standardized features
# the measured GPU type whose offsets a GPU type takes in the fit
GPU_PROXY = {
    "H100": "H100",
    "B200": "B200",
    "A100-40GB": "A100-40GB",
    "H200": "H100",
    "A100-80GB": "A100-40GB",
    "L40S": "A100-40GB",
}


def model_key(model: str) -> str:
    """How a served model's name finds its measurements: the last path part, lower case, without
    a ``meta-`` prefix (``meta-llama/Llama-3.1-8B-Instruct`` is v2's ``Meta-Llama-3.1-...``)."""
    return model.split("/")[-1].lower().removeprefix("meta-")


# ---- data ------------------------------------------------------------------------------------


def load_chat_measurements(data_dir: Path | None = None) -> pd.DataFrame:
    """One row per measured chat run, from ``data_dir`` (the data share's layout) when given,
    else from the tables shipped with the package."""

    def path(name: str) -> Path:
        return data_dir / name if data_dir else table_path(name)

    v3 = pd.read_csv(path(V3_FILE))
    v3 = v3[v3["task"] == "lm-arena-chat"]
    a = pd.DataFrame(
        {
            "source": "v3",
            "model": v3["model_id"],
            "gpu": v3["gpu_model"].map(canonical_gpu),
            "num_gpus": v3["num_gpus"],
            "layout": [
                f"tp{t}-ep{e}-dp{d}"
                for t, e, d in zip(
                    v3["tensor_parallel"], v3["expert_parallel"], v3["data_parallel"], strict=True
                )
            ],
            "tensor_parallel": v3["tensor_parallel"],
            "active_params_b": v3["active_params_b"],
            "total_params_b": v3["total_params_b"],
            "precision": v3["weight_precision"],
            "architecture": v3["architecture"]
            .map({"MoE": "moe", "Dense Transformer": "dense"})
            .fillna("hybrid"),
            "max_num_seqs": v3["max_num_seqs"],
            "batch": v3["avg_batch_size"],
            "power_w": v3["avg_power_watts"],
            "tokens_per_s": v3["output_throughput_tok_s"],
            "itl_s": v3["median_itl_ms"] / 1000.0,
        }
    )
    v2 = pd.read_csv(path(V2_FILE))
    v2 = v2[(v2["task"] == "chat") & (v2["gpu"].map(canonical_gpu) == "A100-40GB")]
    params = v2["model"].map(V2_PARAMS_B)
    b = pd.DataFrame(
        {
            "source": "v2",
            "model": v2["model"],
            "gpu": "A100-40GB",
            "num_gpus": v2["tp"] * v2["pp"],
            "layout": [f"tp{t}-pp{p}" for t, p in zip(v2["tp"], v2["pp"], strict=True)],
            "tensor_parallel": v2["tp"],
            "active_params_b": [p[1] for p in params],
            "total_params_b": [p[0] for p in params],
            "precision": "bfloat16",
            "architecture": ["moe" if "Mixtral" in m else "dense" for m in v2["model"]],
            "max_num_seqs": v2["max_batch_size"],
            "batch": v2["avg_batch_size"],
            "power_w": v2["energy_per_output_token_J"] * v2["token_throughput_tok_s"],
            "tokens_per_s": v2["token_throughput_tok_s"],
            "itl_s": v2["avg_tpot_s"],
        }
    )
    out = pd.concat([a, b], ignore_index=True)
    out["key"] = out["model"].map(model_key)
    out["family"] = out["model"].map(model_family)
    return out.reset_index(drop=True)


# ---- the parametric form for what was not measured -------------------------------------------


def features(df: pd.DataFrame) -> np.ndarray:
    """The fit's features for rows with gpu, num_gpus, batch, active/total_params_b,
    precision, architecture (module docstring)."""
    proxy = df["gpu"].map(GPU_PROXY)
    spec = [GPUS[g] for g in df["gpu"]]
    bw = np.array([s.memory_bw_bytes_s for s in spec])
    flops = np.array([s.dense_flops for s in spec])
    g = df["num_gpus"].to_numpy(float)
    b = df["batch"].to_numpy(float)
    active = df["active_params_b"].to_numpy(float) * 1e9
    total = df["total_params_b"].to_numpy(float) * 1e9
    prec = df["precision"].map(PRECISION_BYTES).to_numpy(float)
    weights = np.maximum(active * prec, np.minimum(total * prec, active * prec * b))
    mem = np.log(weights / (bw * g))
    comp = np.log(2 * active * b / (flops * g))
    lb, la, lg = np.log(b), np.log(active / 1e9), np.log(g)
    a100 = (proxy == "A100-40GB").to_numpy(float)
    b200 = (proxy == "B200").to_numpy(float)
    moe = (df["architecture"] == "moe").to_numpy(float)
    hybrid = (df["architecture"] == "hybrid").to_numpy(float)
    cols = [
        la,
        np.log(total / 1e9),
        np.log(prec),
        lg,
        a100,
        b200,
        lb,
        lb**2,
        moe,
        hybrid,
        lb * la,
        lb * lg,
        lb * a100,
        lb * b200,
        lb * moe,
        mem,
        comp,
        np.logaddexp(mem, comp),
    ]
    return np.column_stack(cols)


@dataclass(frozen=True, eq=False)
class ParametricFit:
    """Ridge regression of log power, log decode rate and log ITL on :func:`features`."""

    mean: np.ndarray
    scale: np.ndarray
    coef: dict[str, np.ndarray]
    rows: int

    @classmethod
    def fit(cls, data: pd.DataFrame) -> ParametricFit:
        x = features(data)
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale == 0] = 1.0
        z = np.column_stack([np.ones(len(x)), (x - mean) / scale])
        penalty = np.eye(z.shape[1]) * RIDGE * len(z)
        penalty[0, 0] = 0.0  # not the intercept
        gram = z.T @ z + penalty
        coef = {m: np.linalg.solve(gram, z.T @ np.log(data[m].to_numpy(float))) for m in METRICS}
        return cls(mean, scale, coef, len(data))

    def predict_log(self, df: pd.DataFrame) -> dict[str, np.ndarray]:
        z = np.column_stack([np.ones(len(df)), (features(df) - self.mean) / self.scale])
        return {m: z @ c for m, c in self.coef.items()}


# ---- calibration -----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ReplicaCalibration:
    """The measured runs and the fit, from which :meth:`model` builds replica models."""

    data: pd.DataFrame
    fit: ParametricFit
    _curves: dict[tuple[str, str, int, str], tuple[BatchCurve, float | None]] = field(
        default_factory=dict, repr=False
    )  # built when first asked for

    @classmethod
    def from_mlenergy(cls, data_dir: Path | None = None) -> ReplicaCalibration:
        return cls.from_data(load_chat_measurements(data_dir))

    @classmethod
    def from_data(cls, data: pd.DataFrame) -> ReplicaCalibration:
        return cls(data, ParametricFit.fit(data))

    def knows(self, model: str) -> bool:
        """Whether ``model`` was measured, on any GPU."""
        return bool((self.data["key"] == model_key(model)).any())

    def model(self, spec: ReplicaSpec) -> GpuReplicaModel:
        spec = self._resolve(spec)
        gpu, key = canonical_gpu(spec.gpu), model_key(spec.model)
        d = self.data
        runs = d[(d["key"] == key) & (d["gpu"] == gpu) & (d["num_gpus"] == spec.gpu_count)]
        layouts = sorted(runs["layout"].unique())
        if spec.layout is not None and spec.layout not in layouts:
            raise ReplicaModelError(
                f"replica {spec.name or spec.model}: layout {spec.layout!r} was not measured on "
                f"{spec.gpu_count} x {gpu}; measured: {', '.join(layouts) or 'none'}"
            )
        plain_tp = [x for x in layouts if x.startswith(f"tp{spec.gpu_count}-")]
        layout = spec.layout or (plain_tp or layouts or [None])[0]
        if layout is None:
            return GpuReplicaModel(spec, self.fitted_curve(spec), self._fitted_basis(spec))
        cached = self._curves.get((key, gpu, spec.gpu_count, layout))
        if cached is None:
            cached = measured_curve(runs[runs["layout"] == layout])
            self._curves[(key, gpu, spec.gpu_count, layout)] = cached
        curve, kv = cached
        basis = (
            f"measured: {spec.model} on {spec.gpu_count} x {gpu} ({layout}), "
            f"{len(curve.log_batch)} runs, batch {math.exp(curve.log_batch[0]):.0f}-"
            f"{math.exp(curve.log_batch[-1]):.0f}"
        )
        return GpuReplicaModel(spec, curve, basis, kv)

    def fitted_curve(self, spec: ReplicaSpec) -> BatchCurve:
        """The parametric form on a batch grid, made monotone (module docstring)."""
        top = min(max(float(spec.max_num_seqs), FIT_MIN_BATCH), FIT_MAX_BATCH)
        batch = (
            np.geomspace(FIT_MIN_BATCH, top, FIT_GRID) if top > FIT_MIN_BATCH else np.array([top])
        )
        grid = pd.DataFrame(
            {
                "gpu": canonical_gpu(spec.gpu),
                "num_gpus": spec.gpu_count,
                "batch": batch,
                "active_params_b": spec.active_params_b,
                "total_params_b": spec.total_params_b,
                "precision": spec.precision,
                "architecture": spec.architecture,
            }
        )
        log = self.fit.predict_log(grid)
        return BatchCurve.from_points(batch, *(np.exp(log[m]) for m in METRICS))

    def _fitted_basis(self, spec: ReplicaSpec) -> str:
        gpu = canonical_gpu(spec.gpu)
        proxy = "" if GPU_PROXY[gpu] == gpu else f", {gpu} as {GPU_PROXY[gpu]} with its datasheet"
        return (
            f"fitted: {spec.active_params_b:g}B active / {spec.total_params_b:g}B "
            f"{spec.architecture} {spec.precision} on {spec.gpu_count} x {gpu}{proxy}; "
            f"ridge on {self.fit.rows} measured chat runs"
        )

    def _resolve(self, spec: ReplicaSpec) -> ReplicaSpec:
        """Fill in parameters, precision and architecture: from the data for a measured model
        (a conflicting value in the spec is an error), else from the spec."""
        known = self.data[self.data["key"] == model_key(spec.model)]
        name = spec.name or spec.model
        if known.empty:
            if spec.active_params_b is None and spec.total_params_b is None:
                raise ReplicaModelError(
                    f"replica {name}: model {spec.model!r} is not in the ML.ENERGY chat data; "
                    "give its parameter counts (active_params_b, total_params_b; the config's "
                    "model_params_b) so the fit can place it"
                )
            total = spec.total_params_b or spec.active_params_b
            return replace(
                spec,
                active_params_b=spec.active_params_b or total,
                total_params_b=total,
                precision=spec.precision or "bfloat16",
                architecture=spec.architecture or "dense",
            )
        row = known.iloc[0]
        facts = {
            "active_params_b": float(row["active_params_b"]),
            "total_params_b": float(row["total_params_b"]),
            "precision": str(row["precision"]),
            "architecture": str(row["architecture"]),
        }
        for what, value in facts.items():
            given = getattr(spec, what)
            if given is not None and given != value:
                raise ReplicaModelError(
                    f"replica {name}: {what}={given!r}, but {spec.model} was measured with "
                    f"{value!r}; leave it out, or name the model you serve"
                )
        return replace(spec, **facts)  # type: ignore[arg-type]


def measured_curve(runs: pd.DataFrame) -> tuple[BatchCurve, float | None]:
    """One configuration's curve (repeated runs of one ``max_num_seqs`` merged by geometric
    mean) and the running batch its KV cache allowed, if a run shows it."""
    seqs = runs["max_num_seqs"].to_numpy(float)
    logs = np.log(runs[["batch", *METRICS]].to_numpy(float))
    sizes, which = np.unique(seqs, return_inverse=True)
    merged = np.exp(np.array([logs[which == i].mean(axis=0) for i in range(len(sizes))]))
    curve = BatchCurve.from_points(*merged.T)
    batch = np.exp(logs[:, 0])
    limited = batch[batch < KV_LIMITED * seqs]
    return curve, (float(limited.max()) if len(limited) else None)
