"""The figures of a receipt beyond the price: how a request's energy splits (prefill and
decode, active and static), the replica time it held, its embodied carbon, and the carbon a
carbon-agnostic choice would have emitted.

Units: J, s, g CO2e. Every figure has a label saying where it came from (``meter``,
``method``, ``embodied_basis``), because an auditor asks that first.
"""

from __future__ import annotations

from dataclasses import dataclass

from regions.calibration import PREFILL_WEIGHT
from regions.config import Embodied, Replica
from router.policy import Decision

ATTRIBUTION_METHOD = "work-share/1"  # router.metering.attribution, by decode and prefill work
PREDICTION_METHOD = "predicted-work-share/1"  # the predictor's J, split by the same rule
SECONDS_PER_YEAR = 365.25 * 86_400


@dataclass(frozen=True, slots=True)
class Routed:
    """What the routing decision knew about a request, for its receipt: the policy, the
    constraint that decided, and the carbon-agnostic baseline
    (:func:`router.policy.carbon_agnostic_baseline`)."""

    policy: str
    binding: str
    baseline_replica: str
    baseline_g_per_kwh: float  # per kWh of IT energy the request used where it ran

    @classmethod
    def of(
        cls, decision: Decision, baseline: tuple[str, float], binding: str | None = None
    ) -> Routed:
        """``binding``: what decided where the request ran, when not the decision (a planned
        job on its plan's replica: ``planned``)."""
        return cls(decision.policy, binding or decision.binding, baseline[0], baseline[1])


def embodied_rate(replica: Replica, e: Embodied) -> tuple[float, str]:
    """g CO2e per second of the replica's time a request holds, and the basis of the figure:
    the manufacturing carbon of the hardware the replica holds over the seconds of its life it
    is busy (``lifetime_years`` x ``utilization``), so that the requests of its life pay for
    it once."""
    life = f"over {e.lifetime_years:g} years at {e.utilization:.0%} busy"
    if replica.embodied_kg is not None:
        kg, what = replica.embodied_kg, f"{replica.embodied_kg:g} kg (replica config)"
    elif replica.gpu.type != "cpu":
        n = replica.gpu.count
        kg = n * e.gpu_kg + n / e.gpus_per_server * e.server_kg
        what = f"{n} x {e.gpu_kg:g} kg GPU + {n}/{e.gpus_per_server} of a {e.server_kg:g} kg server"
    else:  # a CPU replica: one accelerator slot's share of a server stands in
        kg = e.server_kg / e.gpus_per_server
        what = f"1/{e.gpus_per_server} of a {e.server_kg:g} kg server (CPU replica)"
    return kg * 1000.0 / (e.lifetime_years * SECONDS_PER_YEAR * e.utilization), f"{what} {life}"


def prefill_share_j(energy_j: float, prompt_tokens: int, completion_tokens: int) -> float:
    """Of a predicted ``energy_j``, the prompt's part by the attribution's rule: prefill work
    (``PREFILL_WEIGHT`` x prompt tokens) over all its work."""
    work = PREFILL_WEIGHT * prompt_tokens + completion_tokens
    return energy_j * PREFILL_WEIGHT * prompt_tokens / work if work > 0 else 0.0
