"""Per-request energy prediction: joules for a request on a replica, before it runs.

Prior (GPUs): a model of energy per output token fitted on the measured configurations of the
ML.ENERGY leaderboard (v3: vLLM on H100/B200; v2: vLLM on A100-40GB/H100). Features: total and
active parameters, weight precision, architecture, GPU type and count, batch size, output
length and task, plus a roofline estimate of the step time. A robust linear model (Huber) on
logs is stacked with gradient-boosted trees on its residuals. A request's energy is

    J = J_per_token(features) x (output_tokens + prefill_weight x prompt_tokens)

``prefill_weight`` defaults to :data:`regions.calibration.PREFILL_WEIGHT`, measured on the local
CPU model. ML.ENERGY's J/token already carries the prefill of each task's typical prompt, so on
a GPU replica the prefill term should be small: set the replica's ``prefill_weight`` in YAML.
Prior (CPU replicas, which ML.ENERGY does not cover): power x time, from
the replica's watts and decode rate. Online: :meth:`EnergyPredictor.refit` fits each replica's
measured ledger rows (J = a x prompt + b x completion + c, non-negative least squares) and uses
that once it has enough rows.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict, deque
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy.optimize import nnls
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.linear_model import HuberRegressor
from threadpoolctl import threadpool_limits

from forecasting.errors import ForecastingError
from forecasting.mlenergy import table_path
from regions.calibration import PREFILL_WEIGHT

log = logging.getLogger(__name__)


class EnergyModelError(ForecastingError):
    """The energy predictor cannot answer: unknown GPU, no data, bad features."""


@dataclass(frozen=True)
class GpuSpec:
    memory_bw_bytes_s: float
    dense_flops: float  # bf16 dense
    tdp_w: float
    static_w: float  # default: one GPU of a replica that is up with no request (see GPUS)
    standby_w: float  # default: one GPU of a replica that is switched off (see GPUS)


# The one table of GPU figures. Datasheet (NVIDIA): memory bandwidth, dense BF16 tensor FLOP/s
# (without sparsity), TDP of the SXM parts: A100 datasheet (1,555 / 2,039 GB/s, 312 TFLOPS,
# 400 W), H100 SXM datasheet (3.35 TB/s, 989 TFLOPS, 700 W), H200 datasheet (4.8 TB/s, 989,
# 700 W), HGX B200 (8 TB/s, 2.25 PFLOPS dense, 1,000 W), L40S datasheet (864 GB/s, 362, 350 W).
# ``static_w`` is a default, overridable per replica in YAML (``static_power_w_per_gpu``): the
# power of one GPU while its engine is up and serves nothing. A serving engine holds a CUDA
# context, which keeps the GPU in its P0 clocks: 26-50 W over bare idle on HBM GPUs (Vadari,
# "The Model Parking Tax", arXiv:2605.23918, measured on H100 and A100), 66 W on the L40S.
# Public ``nvidia-smi`` readings at 0 % utilisation, bare / with a process holding memory:
# H100 SXM 69-75 / 126 W; H200 73-77 / 119-122 W; B200 136-195 / 187 W; A100 SXM4 52-68 /
# 58-87 W; L40S 22-36 (P8) / 83 W. The defaults sit in the "process holding memory" range.
# ``standby_w`` is a default, overridable per region in YAML (``scaling.standby_w_per_gpu``):
# one GPU of a replica the fleet scaler switched off, its engine stopped and the GPU left
# powered in its node, i.e. the "bare" readings above (mid-range); a node powered down draws
# less, so set 0 there. The node's own idle power is not the replica's and is not counted.
GPUS: dict[str, GpuSpec] = {
    "A100-40GB": GpuSpec(1.555e12, 312e12, 400, static_w=75, standby_w=60),
    "A100-80GB": GpuSpec(2.039e12, 312e12, 400, static_w=75, standby_w=60),
    "H100": GpuSpec(3.35e12, 989e12, 700, static_w=110, standby_w=72),
    "H200": GpuSpec(4.8e12, 989e12, 700, static_w=120, standby_w=75),
    "B200": GpuSpec(8.0e12, 2250e12, 1000, static_w=190, standby_w=160),
    "L40S": GpuSpec(0.864e12, 362e12, 350, static_w=85, standby_w=30),
}
GPU_ALIASES = {
    "NVIDIA A100-SXM4-40GB": "A100-40GB",
    "A100": "A100-40GB",
    "NVIDIA H100 80GB HBM3": "H100",
    "H100-80GB": "H100",
}
PRECISION_BYTES = {"bfloat16": 2.0, "float16": 2.0, "fp8": 1.0, "mxfp4": 0.5, "int4": 0.5}
TASKS = {
    "lm-arena-chat": "chat",
    "chat": "chat",
    "gpqa": "reasoning",
    "image-chat": "multimodal",
    "video-chat": "multimodal",
    "sourcegraph-fim": "code",
    "code": "code",
}
TASK_NAMES = ("chat", "reasoning", "multimodal", "code")

# Parameter counts (billions, total and active) of the ML.ENERGY v2 models, which the v2 table
# does not list; from the models' cards.
V2_PARAMS_B: dict[str, tuple[float, float]] = {
    "google/gemma-2-27b-it": (27.2, 27.2),
    "google/gemma-2-2b-it": (2.6, 2.6),
    "google/gemma-2-9b-it": (9.2, 9.2),
    "meta-llama/Meta-Llama-3.1-405B-Instruct": (405.0, 405.0),
    "meta-llama/Meta-Llama-3.1-70B-Instruct": (70.6, 70.6),
    "meta-llama/Meta-Llama-3.1-8B-Instruct": (8.0, 8.0),
    "microsoft/Phi-3-medium-4k-instruct": (14.0, 14.0),
    "microsoft/Phi-3-mini-4k-instruct": (3.8, 3.8),
    "microsoft/Phi-3-small-8k-instruct": (7.4, 7.4),
    "mistralai/Mistral-7B-Instruct-v0.3": (7.2, 7.2),
    "mistralai/Mistral-Large-Instruct-2407": (123.0, 123.0),
    "mistralai/Mistral-Nemo-Instruct-2407": (12.2, 12.2),
    "mistralai/Mixtral-8x22B-Instruct-v0.1": (141.0, 39.0),
    "mistralai/Mixtral-8x7B-Instruct-v0.1": (46.7, 12.9),
    "bigcode/starcoder2-15b": (16.0, 16.0),
    "bigcode/starcoder2-3b": (3.0, 3.0),
    "bigcode/starcoder2-7b": (7.2, 7.2),
    "codellama/CodeLlama-13b-hf": (13.0, 13.0),
    "codellama/CodeLlama-34b-hf": (34.0, 34.0),
    "codellama/CodeLlama-70b-hf": (69.0, 69.0),
    "codellama/CodeLlama-7b-hf": (6.7, 6.7),
    "google/codegemma-1.1-2b": (2.5, 2.5),
    "google/codegemma-7b": (8.5, 8.5),
}
V3_FILE = "energy/mlenergy_v3/mlenergy_v3_llm_configurations.csv"
V2_FILE = "energy/mlenergy_v2/mlenergy_v2_llm_configurations.csv"

Architecture = Literal["dense", "moe", "hybrid"]


def canonical_gpu(name: str) -> str:
    gpu = GPU_ALIASES.get(name, name)
    if gpu not in GPUS:
        raise EnergyModelError(
            f"unknown GPU type {name!r}; known: {', '.join(sorted(GPUS))} (or 'cpu' replicas)"
        )
    return gpu


def model_family(model_id: str) -> str:
    """A model's identity across precisions and leaderboard versions (for leave-one-out)."""
    name = model_id.split("/")[-1].lower().removesuffix("-fp8").removesuffix("-bf16")
    return name.replace("meta-llama-", "llama-")


def load_mlenergy(data_dir: Path | None = None) -> pd.DataFrame:
    """The ML.ENERGY v2 and v3 configurations in one frame with the predictor's columns: from
    ``data_dir`` (the data share's layout) when given, else the tables shipped with the package."""

    def path(name: str) -> Path:
        return data_dir / name if data_dir else table_path(name)

    v3 = pd.read_csv(path(V3_FILE))
    arch = v3["architecture"].map(
        lambda a: "moe" if a == "MoE" else ("dense" if a == "Dense Transformer" else "hybrid")
    )
    a = pd.DataFrame(
        {
            "source": "v3",
            "model": v3["model_id"],
            "task": v3["task"].map(TASKS),
            "total_params_b": v3["total_params_b"],
            "active_params_b": v3["active_params_b"],
            "precision_bytes": v3["weight_precision"].map(PRECISION_BYTES),
            "architecture": arch,
            "gpu": v3["gpu_model"].map(canonical_gpu),
            "num_gpus": v3["num_gpus"],
            "batch": v3["avg_batch_size"],
            "output_tokens": v3["avg_output_len"],
            "energy_per_request_j": v3["energy_per_request_joules"],
        }
    )
    v2 = pd.read_csv(path(V2_FILE))
    params = v2["model"].map(V2_PARAMS_B)
    if params.isna().any():
        missing = sorted(set(v2["model"][params.isna()]))
        raise EnergyModelError(f"no parameter count for ML.ENERGY v2 models {missing}")
    b = pd.DataFrame(
        {
            "source": "v2",
            "model": v2["model"],
            "task": v2["task"].map(TASKS),
            "total_params_b": [p[0] for p in params],
            "active_params_b": [p[1] for p in params],
            "precision_bytes": 2.0,
            "architecture": ["moe" if "Mixtral" in m else "dense" for m in v2["model"]],
            "gpu": v2["gpu"].map(canonical_gpu),
            "num_gpus": v2["tp"] * v2["pp"],
            "batch": v2["avg_batch_size"],
            "output_tokens": v2["avg_output_tokens"],
            "energy_per_request_j": v2["energy_per_request_J"],
        }
    )
    out = pd.concat([a, b], ignore_index=True)
    out["family"] = out["model"].map(model_family)
    return out.dropna().reset_index(drop=True)


def features(df: pd.DataFrame) -> np.ndarray:
    """Feature matrix for rows with the predictor's columns (vectorized)."""
    spec = [GPUS[g] for g in df["gpu"]]
    bw = np.array([s.memory_bw_bytes_s for s in spec])
    flops = np.array([s.dense_flops for s in spec])
    tdp = np.array([s.tdp_w for s in spec])
    g = df["num_gpus"].to_numpy(float)
    batch = np.maximum(df["batch"].to_numpy(float), 1.0)
    total = df["total_params_b"].to_numpy(float) * 1e9
    active = df["active_params_b"].to_numpy(float) * 1e9
    prec = df["precision_bytes"].to_numpy(float)
    mem_s = total * prec / (bw * g)
    comp_s = 2 * active * batch / (flops * g)
    roof_j = tdp * g * np.maximum(mem_s, comp_s) / batch  # J/token if the step ran at TDP
    out_len = np.maximum(df["output_tokens"].to_numpy(float), 1.0)
    lb = np.log(batch)
    cols = [
        np.log(roof_j),
        np.log(mem_s),
        np.log(comp_s),
        lb,
        lb**2,
        np.log(g),
        np.log(out_len),
        np.log(out_len) * lb,
        np.log(active),
        np.log(total),
        np.log(prec),
        *((df["gpu"] == name).to_numpy(float) for name in ("A100-40GB", "B200")),
        *((df["architecture"] == a).to_numpy(float) for a in ("moe", "hybrid")),
        *((df["task"] == t).to_numpy(float) for t in TASK_NAMES[1:]),
    ]
    return np.column_stack(cols)


@dataclass
class JoulesPerTokenModel:
    """log(J per output token): the mean of (a) a Huber linear model plus trees fitted on its
    residuals and (b) trees on the features alone. (a) extrapolates along the roofline to
    model sizes it has not seen; (b) captures interactions; the blend was better than either
    in leave-one-model-out (see ``router energy evaluate``)."""

    _linear: HuberRegressor | None = None
    _trees: HistGradientBoostingRegressor | None = None
    _plain: HistGradientBoostingRegressor | None = None

    def fit(self, df: pd.DataFrame) -> JoulesPerTokenModel:
        # one native thread: on ~1,000 rows threads gain little, and an OpenMP team on a busy
        # machine waits at every barrier for its descheduled member (a 2 s fit took minutes
        # on a loaded 2-core host); parallelism, where wanted, is across fits (processes)
        with threadpool_limits(1):
            return self._fit(df)

    def _fit(self, df: pd.DataFrame) -> JoulesPerTokenModel:
        x = features(df)
        y = np.log(df["energy_per_request_j"].to_numpy(float) / df["output_tokens"].to_numpy(float))
        mu, sd = x.mean(axis=0), x.std(axis=0)
        sd[sd == 0] = 1.0
        self._mu, self._sd = mu, sd
        self._linear = HuberRegressor(max_iter=5000, alpha=0.01).fit((x - mu) / sd, y)
        resid = y - self._linear.predict((x - mu) / sd)
        self._trees = HistGradientBoostingRegressor(
            max_iter=300,
            learning_rate=0.05,
            min_samples_leaf=8,
            loss="absolute_error",
            random_state=0,
        ).fit(x, resid)
        self._plain = HistGradientBoostingRegressor(
            max_iter=600, learning_rate=0.03, min_samples_leaf=10, random_state=0
        ).fit(x, y)
        return self

    def j_per_token(self, df: pd.DataFrame) -> np.ndarray:
        if self._linear is None or self._trees is None or self._plain is None:
            raise EnergyModelError("the J/token model is not fitted")
        x = features(df)
        stacked = self._linear.predict((x - self._mu) / self._sd) + self._trees.predict(x)
        return np.asarray(np.exp(0.5 * stacked + 0.5 * self._plain.predict(x)))


def leave_one_model_out(
    data: pd.DataFrame,
    *,
    source: str,
    gpu: str | None = None,
    families: Iterable[str] | None = None,
    pool: Executor | None = None,
) -> dict[str, Any]:
    """Absolute percentage error of energy per request, each model family held out in turn
    (a family is a model in every precision and leaderboard version: nothing of it is seen).

    One fit per family; ``pool`` (e.g. a process pool) runs them side by side."""
    rows = data[data["source"] == source]
    if gpu:
        rows = rows[rows["gpu"] == gpu]
    held = sorted(families) if families is not None else sorted(rows["family"].unique())
    fold = partial(_held_out_ape, data, rows)
    per_family = pool.map(fold, held) if pool is not None else map(fold, held)
    e = np.array([x for ape in per_family for x in ape])
    return {
        "models": len(held),
        "configs": len(e),
        "median_ape_pct": round(float(np.median(e)), 2),
        "p90_ape_pct": round(float(np.percentile(e, 90)), 2),
    }


def _held_out_ape(data: pd.DataFrame, rows: pd.DataFrame, family: str) -> list[float]:
    """APE (%) on ``rows`` of ``family`` of a model fitted on ``data`` without that family."""
    test = rows[rows["family"] == family]
    model = JoulesPerTokenModel().fit(data[data["family"] != family])
    pred = model.j_per_token(test) * test["output_tokens"].to_numpy(float)
    truth = test["energy_per_request_j"].to_numpy(float)
    return list((np.abs(pred - truth) / truth * 100).tolist())


# ---- requests and replicas -------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaProfile:
    """What the predictor needs to know about a replica."""

    name: str
    model: str
    gpu: str  # a GPUS key, or "cpu"
    gpu_count: int = 1
    total_params_b: float = 8.0
    active_params_b: float | None = None
    precision: str = "bfloat16"
    architecture: Architecture = "dense"
    cpu_watts: float = 30.0  # cpu replicas: watts drawn while decoding
    tokens_per_s: float = 100.0  # cpu replicas: decode rate at batch 1
    prefill_weight: float = PREFILL_WEIGHT


@dataclass
class OutputLengths:
    """Output-length history per (tenant, model): expected completion tokens for a request.

    The expectation is the mean of ``min(observed, max_tokens)`` over the last ``window``
    completions; without history, ``min(max_tokens, prior_tokens)``.
    """

    prior_tokens: float = 129.0  # median GeneratedTokens of the Azure 2023 conversation trace
    window: int = 500
    _seen: dict[tuple[str, str], deque[int]] = field(default_factory=lambda: defaultdict(deque))
    _sum: dict[tuple[str, str], int] = field(default_factory=dict)  # of the window, kept
    _max: dict[tuple[str, str], int] = field(default_factory=dict)  # running, for the plain mean

    def observe(self, tenant: str, model: str, completion_tokens: int) -> None:
        key = (tenant, model)
        q = self._seen[key]
        q.append(completion_tokens)
        self._sum[key] = self._sum.get(key, 0) + completion_tokens
        top = self._max[key] = max(self._max.get(key, 0), completion_tokens)
        if len(q) > self.window:
            old = q.popleft()
            self._sum[key] -= old
            if old >= top > completion_tokens:  # the maximum left the window
                self._max[key] = max(q)

    def expected(self, tenant: str, model: str, max_tokens: int | None) -> float:
        cap = float(max_tokens) if max_tokens else math.inf
        q = self._seen.get((tenant, model))
        if not q:
            return min(cap, self.prior_tokens)
        if cap >= self._max.get((tenant, model), 0):  # no observation is capped: plain mean
            return self._sum[(tenant, model)] / len(q)
        return float(np.mean(np.minimum(np.array(q, dtype=float), cap)))


@dataclass
class EnergyPredictor:
    """Joules for a request on a replica; see the module docstring."""

    gpu_model: JoulesPerTokenModel | None = None
    min_rows_for_fit: int = 20
    _fits: dict[str, np.ndarray] = field(default_factory=dict)
    _prior_cache: dict[tuple[ReplicaProfile, float, int], float] = field(default_factory=dict)

    @classmethod
    def from_mlenergy(cls, data_dir: Path | None = None) -> EnergyPredictor:
        return cls(gpu_model=JoulesPerTokenModel().fit(load_mlenergy(data_dir)))

    def predict_j(
        self,
        replica: ReplicaProfile,
        prompt_tokens: float,
        output_tokens: float,
        batch: float = 1.0,
    ) -> float:
        if prompt_tokens < 0 or output_tokens < 0:
            raise EnergyModelError("token counts must be >= 0")
        fit = self._fits.get(replica.name)
        if fit is not None:
            return float(fit[0] * prompt_tokens + fit[1] * output_tokens + fit[2])
        j_tok = self._j_per_token(replica, batch, float(output_tokens))
        return j_tok * (output_tokens + replica.prefill_weight * prompt_tokens)

    def predict_many(
        self,
        replica: ReplicaProfile,
        prompt_tokens: np.ndarray,
        output_tokens: np.ndarray,
        batch: float = 1.0,
    ) -> np.ndarray:
        if np.any(prompt_tokens < 0) or np.any(output_tokens < 0):
            raise EnergyModelError("token counts must be >= 0")
        fit = self._fits.get(replica.name)
        if fit is not None:
            a, b, c = fit
            return np.asarray(a * prompt_tokens + b * output_tokens + c)
        mean_out = float(np.mean(output_tokens)) if len(output_tokens) else 1.0
        j_tok = self._j_per_token(replica, batch, mean_out)
        return np.asarray(j_tok * (output_tokens + replica.prefill_weight * prompt_tokens))

    def _j_per_token(self, replica: ReplicaProfile, batch: float, mean_out: float) -> float:
        """J per output token; the GPU prior is cached per replica, batch and output length
        (to 1/8 of a doubling: well inside the model's error) so routing never waits on it."""
        if replica.gpu == "cpu":
            return replica.cpu_watts / replica.tokens_per_s
        if self.gpu_model is None:
            raise EnergyModelError("no GPU prior: build with EnergyPredictor.from_mlenergy()")
        key = (replica, round(max(batch, 1.0), 1), round(math.log2(max(mean_out, 1.0)) * 8))
        j_tok = self._prior_cache.get(key)
        if j_tok is None:
            row = pd.DataFrame(
                {
                    "total_params_b": [replica.total_params_b],
                    "active_params_b": [replica.active_params_b or replica.total_params_b],
                    "precision_bytes": [PRECISION_BYTES.get(replica.precision, 2.0)],
                    "architecture": [replica.architecture],
                    "gpu": [canonical_gpu(replica.gpu)],
                    "num_gpus": [replica.gpu_count],
                    "batch": [key[1]],
                    "output_tokens": [2.0 ** (key[2] / 8)],
                    "task": ["chat"],
                }
            )
            j_tok = float(self.gpu_model.j_per_token(row)[0])
            if len(self._prior_cache) > 10_000:
                self._prior_cache.clear()
            self._prior_cache[key] = j_tok
        return j_tok

    def refit(self, replica: str, rows: Iterable[tuple[int, int, float]]) -> bool:
        """Fit ``J = a*prompt + b*completion + c`` (a, b, c >= 0) on a replica's measured rows
        ``(prompt_tokens, completion_tokens, joules)``; used once there are enough rows."""
        data = np.array(list(rows), dtype=float).reshape(-1, 3)
        if len(data) < self.min_rows_for_fit:
            return False
        design = np.column_stack([data[:, 0], data[:, 1], np.ones(len(data))])
        coef, _ = nnls(design, data[:, 2])
        self._fits[replica] = coef
        log.info("energy fit for %s: %.4g J/prompt tok, %.4g J/output tok, %.4g J", replica, *coef)
        return True
