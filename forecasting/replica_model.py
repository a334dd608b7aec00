"""A replica's physics by running batch: decode rate, inter-token latency, power and J/token;
prefill time by prompt length; static power; batch limit. Plain Python and NumPy, no Ray.

A replica is a model served by an engine on some GPUs (:class:`ReplicaSpec`: model, GPU type,
GPU count, the engine's ``max_num_seqs``) or llama.cpp on CPU cores (:class:`CpuReplicaSpec`);
both answer through :class:`ReplicaModel`. ``batch`` is the number of sequences decoding together
(the running batch, averaged over time: 0.5 is one sequence half of the time). Power is the whole
replica's: all its GPUs, static power included.

GPU replicas: :class:`GpuReplicaModel`, built by
:meth:`forecasting.replica_calibration.ReplicaCalibration.model` from ML.ENERGY measurements
(that module says which, and how an unmeasured model, GPU or count is fitted). Each is a
:class:`BatchCurve`: power, decode rate and ITL at increasing batches, made monotone, because the
physics is and the measurements are noisy (a B200 run of Llama-3.1-8B at batch 128 drew 449 W
between runs of 616 and 540 W): least squares on the logs under the constraints that power does
not fall with the batch and the decode rate rises at least as fast as power (so J/token =
power / decode rate does not rise); ITL does not fall (isotonic regression). Between the
batches, each metric is piecewise-linear in log(batch) on log(metric). Beyond them:

- below the smallest batch, power and ITL are held and the decode rate is proportional to the
  batch (a decode step reads the weights once whatever the batch);
- from 0 to 1 sequence, power goes linearly from the static power to its batch-1 value and the
  decode rate from 0 (a time share of one sequence); ITL is a lone sequence's;
- above the largest batch, power and decode rate are held (saturated) and ITL grows with the
  batch; the batch limit is ``max_num_seqs``, or less where a measured run shows the KV cache
  holding fewer sequences at chat lengths.

Prefill draws :attr:`ReplicaModel.prefill_power_w`: compute-bound, taken as the largest measured
draw of the replica (an estimate; ML.ENERGY measured steady serving, prefills included, not a
prefill alone).

Static power: :data:`forecasting.energy.GPUS` ``static_w`` per GPU, a default (the sources are
there); a replica's ``static_power_w_per_gpu`` in YAML overrides it. A decoding replica draws at
least its static power. Prefill: an estimate,
compute-bound at :data:`PREFILL_MFU` of the GPUs' dense BF16 peak with 2 x active parameters
FLOPs per prompt token, and never faster than one read of the weights; attention's FLOPs, which
grow with the prompt, are left out (they matter for prompts of many thousands of tokens).

CPU replicas (llama.cpp): :class:`CpuReplicaModel`, not a fit but the replica's measured profile
as its config gives it: the decode rate ``tokens_per_s`` shared by the running sequences, the
CPU-time meter's watts (:class:`regions.meters.CpuModelMeter`: busy cores x watts per core, plus
its idle share), and prefill at ``prefill_weight`` of a decode token's CPU time
(:mod:`regions.calibration`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy.optimize import lsq_linear

from forecasting.energy import GPUS, PRECISION_BYTES, EnergyModelError, canonical_gpu
from regions.calibration import PREFILL_WEIGHT

if TYPE_CHECKING:
    from forecasting.replica_calibration import ReplicaCalibration
    from regions.config import Replica

Architecture = Literal["dense", "moe", "hybrid"]

PREFILL_MFU = 0.5
"""Share of the dense BF16 peak a prefill reaches: an assumption, not a measurement (large
GEMMs run at 60-70 % of peak; attention and the rest of the step lower it)."""
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's --max-num-seqs default on most setups
CPU_IDLE_SHARE = 0.1  # of one core's watts: CpuModelMeter's default idle_share


class ReplicaModelError(EnergyModelError):
    """The replica model cannot answer: unknown model or GPU, bad spec, batch out of range."""


# ---- a curve by batch ------------------------------------------------------------------------


def _monotone_power_rate(log_p: np.ndarray, log_t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (log power, log rate) with power non-decreasing and rate rising at least
    as fast: log p_k = p0 + sum(u_i), log t_k = t0 + sum(u_i + v_i), u, v >= 0, i < k."""
    n = len(log_p)
    if n == 1:
        return log_p.copy(), log_t.copy()
    steps = np.tril(np.ones((n, n - 1)), -1)  # row k sums the steps before it
    design = np.zeros((2 * n, 2 + 2 * (n - 1)))
    design[:n, 0] = design[n:, 1] = 1.0
    design[:n, 2 : n + 1] = design[n:, 2 : n + 1] = steps
    design[n:, n + 1 :] = steps
    lower = np.r_[-np.inf, -np.inf, np.zeros(2 * (n - 1))]
    fit = lsq_linear(design, np.r_[log_p, log_t], bounds=(lower, np.inf), method="bvls")
    both = design @ fit.x
    return both[:n], both[n:]


def _non_decreasing(y: np.ndarray) -> np.ndarray:
    """Isotonic least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in y:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            m2, c2 = blocks.pop()
            m1, c1 = blocks.pop()
            blocks.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return np.concatenate([np.full(int(c), m) for m, c in blocks])


@dataclass(frozen=True, eq=False)
class BatchCurve:
    """Monotone power, decode rate and ITL at increasing batches (natural logs), and the rules
    beyond them (module docstring)."""

    log_batch: np.ndarray
    log_power_w: np.ndarray
    log_tokens_per_s: np.ndarray
    log_itl_s: np.ndarray

    @classmethod
    def from_points(
        cls, batch: np.ndarray, power_w: np.ndarray, tokens_per_s: np.ndarray, itl_s: np.ndarray
    ) -> BatchCurve:
        order = np.argsort(batch)
        lb = np.log(np.asarray(batch, float)[order])
        lp, lt = _monotone_power_rate(
            np.log(np.asarray(power_w, float)[order]),
            np.log(np.asarray(tokens_per_s, float)[order]),
        )
        li = _non_decreasing(np.log(np.asarray(itl_s, float)[order]))
        return cls(lb, lp, lt, li)

    def at(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(power W, tokens/s, ITL s) at batches >= 1."""
        lb = np.log(batch)
        xs = self.log_batch
        below = np.minimum(lb - xs[0], 0.0)  # decode rate proportional to the batch
        above = np.maximum(lb - xs[-1], 0.0)  # ITL proportional to the batch
        return (
            np.exp(np.interp(lb, xs, self.log_power_w)),
            np.exp(np.interp(lb, xs, self.log_tokens_per_s) + below),
            np.exp(np.interp(lb, xs, self.log_itl_s) + above),
        )


# ---- specs and models ------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicaSpec:
    """A GPU replica. For a model in the data, leave its parameters and precision out (they
    come from the data); for another, give ``active_params_b`` and ``total_params_b``."""

    model: str  # as served, e.g. meta-llama/Llama-3.1-8B-Instruct
    gpu: str  # a forecasting.energy.GPUS type or alias
    gpu_count: int = 1
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # the engine's batch limit
    active_params_b: float | None = None
    total_params_b: float | None = None
    precision: str | None = None  # bfloat16, fp8, ... (default bfloat16)
    architecture: Architecture | None = None  # default dense
    layout: str | None = None  # a measured parallel layout, e.g. tp2-ep1-dp1; default: plain TP
    static_power_w_per_gpu: float | None = None  # default: GPUS[gpu].static_w
    name: str = ""

    def __post_init__(self) -> None:
        canonical_gpu(self.gpu)
        for what, value in (
            ("gpu_count", self.gpu_count),
            ("max_num_seqs", self.max_num_seqs),
            ("active_params_b", self.active_params_b),
            ("total_params_b", self.total_params_b),
            ("static_power_w_per_gpu", self.static_power_w_per_gpu),
        ):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ReplicaModelError(
                    f"replica {self.name or self.model}: {what} must be > 0, got {value}"
                )
        if self.precision is not None and self.precision not in PRECISION_BYTES:
            raise ReplicaModelError(
                f"replica {self.name or self.model}: precision {self.precision!r} is not one of "
                f"{', '.join(PRECISION_BYTES)}"
            )


@dataclass(frozen=True)
class CpuReplicaSpec:
    """A llama.cpp replica on CPU cores, described by its measured profile."""

    model: str
    tokens_per_s: float  # decode rate, shared by the running sequences
    watts_per_core: float
    cores: int = 2  # busy cores while decoding (the energy predictor's figure)
    max_batch: int = 8  # slots
    prefill_weight: float = PREFILL_WEIGHT
    name: str = ""

    def __post_init__(self) -> None:
        for what, value in (
            ("tokens_per_s", self.tokens_per_s),
            ("watts_per_core", self.watts_per_core),
            ("cores", self.cores),
            ("max_batch", self.max_batch),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ReplicaModelError(
                    f"replica {self.name or self.model}: {what} must be > 0, got {value}"
                )


class ReplicaModel(ABC):
    """Decode rate, ITL, power and J/token by running batch (0 <= batch <= ``max_batch``);
    prefill time by prompt tokens; static power. ``basis`` says where the figures come from."""

    basis: str

    @property
    @abstractmethod
    def max_batch(self) -> int: ...

    @property
    @abstractmethod
    def static_power_w(self) -> float: ...

    @abstractmethod
    def prefill_s(self, prompt_tokens: float) -> float: ...

    @property
    def prefill_power_w(self) -> float:
        """Watts while prefilling: compute-bound work, taken as the busiest measured draw."""
        return self.power_w(self.max_batch)

    @abstractmethod
    def _busy(self, batch: float) -> tuple[float, float, float]:
        """(power W, tokens/s, ITL s) at a batch >= 1."""

    def _state(self, batch: float) -> tuple[float, float, float]:
        if not 0 <= batch <= self.max_batch:
            raise ReplicaModelError(
                f"batch must be in [0, {self.max_batch}] (the replica's batch limit), got {batch}"
            )
        if batch >= 1:
            return self._busy(batch)
        power, rate, itl = self._busy(1.0)
        static = self.static_power_w
        return static + batch * (power - static), batch * rate, itl

    def decode_tokens_per_s(self, batch: float) -> float:
        return self._state(batch)[1]

    def itl_s(self, batch: float) -> float:
        """Time between two tokens of one sequence; at batch < 1, a lone sequence's."""
        return self._state(batch)[2]

    def power_w(self, batch: float) -> float:
        return self._state(batch)[0]

    def j_per_token(self, batch: float) -> float:
        if batch <= 0:
            raise ReplicaModelError("J per token needs a batch > 0: an idle replica makes none")
        power, rate, _ = self._state(batch)
        return power / rate

    # ---- marginal energy: what the live policy scores ----------------------------------------

    def marginal_j(self, batch: int, prompt_tokens: float, output_tokens: float) -> float:
        """What this replica's energy grows by (J) when a request of ``prompt_tokens`` and
        ``output_tokens`` joins its ``batch`` running sequences. Static power is drawn whether
        the request comes or not: it is never charged (an idle replica's first request pays
        the step from static power up, not the static power).

        - Decode, per output token: the power it adds over the rate it adds,
          (P(B+1) - P(B)) / (T(B+1) - T(B)). At B = 0 that is (P(1) - static) / T(1); where
          the power is flat and the rate grows (a decode step reads the weights once whatever
          the batch) it is near 0. Where the rate no longer grows with the batch (llama.cpp
          sharing one rate among its slots; a GPU past its measured batches) the request's
          tokens keep the replica busy that much longer at the batch it joins:
          (P(B+1) - static) / T(B+1).
        - Queued (``batch >= max_batch``): the request waits for a slot, then lengthens the
          time the replica runs a full batch: (P(max) - static) / T(max) a token, the
          saturated figure, however long the queue.
        - Prefill: ``prefill_s`` at the replica's top draw above static, P(max_batch) -
          static (a prefill is compute-bound, like the largest decode batch), on an idle or a
          busy replica alike: a prefill holds up the running batch's decode for about as long,
          so the busy replica saves nothing on it.

        Summed over the sequences that filled a batch, each at the rate it added, the decode
        marginals are that batch's dynamic power, P(B) - static."""
        if batch < 0:
            raise ReplicaModelError(f"batch must be >= 0, got {batch}")
        if output_tokens < 0:
            raise ReplicaModelError(f"output_tokens must be >= 0, got {output_tokens}")
        per_token, prefill_w = self._marginal_table
        decode = per_token[min(int(batch), len(per_token) - 1)] * output_tokens
        return decode + (self.prefill_s(prompt_tokens) * prefill_w if prompt_tokens else 0.0)

    @cached_property
    def _marginal_table(self) -> tuple[list[float], float]:
        """Decode J per output token for a request joining batch 0 .. max_batch - 1, then the
        saturated figure (queued); and the prefill's watts above static. Built once."""
        static, top = self.static_power_w, self.max_batch
        states = [self._state(b) for b in range(top + 1)]
        power = np.array([s[0] for s in states])
        rate = np.array([s[1] for s in states])
        step_w = np.maximum(np.diff(power), 0.0)
        step_rate = np.diff(rate)
        longer = np.maximum(power[1:] - static, 0.0) / rate[1:]  # busy longer at B + 1
        grows = step_rate > 1e-9 * rate[1:]
        per_token = np.where(grows, step_w / np.where(grows, step_rate, 1.0), longer)
        saturated = max(power[top] - static, 0.0) / rate[top]
        table = [float(j) for j in per_token] + [float(saturated)]  # list: fast to index
        return table, max(float(power[top] - static), 0.0)


@dataclass(frozen=True)
class GpuReplicaModel(ReplicaModel):
    spec: ReplicaSpec  # resolved: parameters, precision and architecture filled in
    curve: BatchCurve
    basis: str
    kv_batch_limit: float | None = None  # measured only

    @property
    def max_batch(self) -> int:
        limit = self.spec.max_num_seqs
        if self.kv_batch_limit is not None:
            limit = min(limit, max(1, math.floor(self.kv_batch_limit)))
        return limit

    @property
    def static_power_w(self) -> float:
        per_gpu = self.spec.static_power_w_per_gpu or GPUS[canonical_gpu(self.spec.gpu)].static_w
        return per_gpu * self.spec.gpu_count

    def _busy(self, batch: float) -> tuple[float, float, float]:
        power, rate, itl = self.curve.at(np.array([batch]))
        # decoding draws no less than idling (a static override above a fit's power can ask it)
        return max(float(power[0]), self.static_power_w), float(rate[0]), float(itl[0])

    @property
    def prefill_power_w(self) -> float:
        """The largest measured draw (the busiest batch, beyond ``max_num_seqs`` if measured)."""
        return max(float(np.exp(self.curve.log_power_w.max())), self.static_power_w)

    def prefill_s(self, prompt_tokens: float) -> float:
        if prompt_tokens < 0:
            raise ReplicaModelError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
        if prompt_tokens == 0:
            return 0.0
        s, gpu = self.spec, GPUS[canonical_gpu(self.spec.gpu)]
        assert s.active_params_b and s.total_params_b and s.precision  # resolved
        flops = 2 * s.active_params_b * 1e9 * prompt_tokens
        compute = flops / (gpu.dense_flops * s.gpu_count * PREFILL_MFU)
        weights = s.total_params_b * 1e9 * PRECISION_BYTES[s.precision]
        return max(compute, weights / (gpu.memory_bw_bytes_s * s.gpu_count))


@dataclass(frozen=True)
class CpuReplicaModel(ReplicaModel):
    spec: CpuReplicaSpec
    basis: str = "measured profile (config tokens_per_s and CPU-time meter watts), not a fit"

    @property
    def max_batch(self) -> int:
        return self.spec.max_batch

    @property
    def static_power_w(self) -> float:
        return CPU_IDLE_SHARE * self.spec.watts_per_core

    def _busy(self, batch: float) -> tuple[float, float, float]:
        s = self.spec
        return (
            s.cores * s.watts_per_core + self.static_power_w,
            s.tokens_per_s,
            batch / s.tokens_per_s,
        )

    def prefill_s(self, prompt_tokens: float) -> float:
        if prompt_tokens < 0:
            raise ReplicaModelError(f"prompt_tokens must be >= 0, got {prompt_tokens}")
        return prompt_tokens * self.spec.prefill_weight / self.spec.tokens_per_s


def replica_model(replica: Replica, calibration: ReplicaCalibration | None) -> ReplicaModel:
    """The model of a configured replica (``regions.config.Replica``). A GPU replica's
    ``max_num_seqs`` is its ``max_concurrency``; a model that was not measured needs
    ``model_params_b`` (taken as dense: active = total parameters); a measured one's parameters
    come from the data."""
    if replica.gpu.type == "cpu":
        return CpuReplicaModel(
            CpuReplicaSpec(
                model=replica.backend.model,
                tokens_per_s=replica.tokens_per_s,
                watts_per_core=replica.cpu_watts_per_core,
                max_batch=replica.max_concurrency,
                prefill_weight=replica.prefill_weight,
                name=replica.name,
            )
        )
    if calibration is None:
        raise ReplicaModelError(
            f"replica {replica.name} runs on {replica.gpu.type}: build the GPU calibration "
            "(ReplicaCalibration.from_mlenergy())"
        )
    model = replica.backend.model
    return calibration.model(
        ReplicaSpec(
            model=model,
            gpu=replica.gpu.type,
            gpu_count=replica.gpu.count,
            max_num_seqs=replica.max_concurrency,
            total_params_b=None if calibration.knows(model) else replica.model_params_b,
            static_power_w_per_gpu=replica.static_power_w_per_gpu,
            name=replica.name,
        )
    )
