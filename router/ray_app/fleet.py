"""In-process replicas follow the fleet scaler through Ray Serve's autoscaling.

Each scalable in-process (llama.cpp) replica is a deployment of 0 or 1 Ray Serve replicas
whose ``autoscaling_config`` names :class:`FollowRouter` as its custom autoscaling policy (Ray
Serve's custom autoscaling policies; the project requires Ray >= 2.60). The ingress's fleet
scaler (:mod:`router.service.fleet`) decides which replicas are on; :class:`RayFleetTargets`
writes each deployment's count to Ray's internal key-value store (GCS), and the policy, which
Serve's controller calls every control loop, returns it. Serve applies it within its bounds:
the region's first ``min_replicas`` listed replicas never go below 1. When the router has
written nothing for ``max_age_s`` (an ingress that is down or stuck), or the store cannot be
read, the policy keeps the count Serve has: silence never turns replicas off. A replica is
written 0 only once it has no request in flight (the router stops routing to it first: it
drains).

Serve pickles this module by value into its controller, so it imports only the standard
library and Ray.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "carbon-router-fleet"  # of the internal key-value store
MAX_AGE_S = 900.0  # a count older than this is the router's silence: keep what is on
POLICY = "router.ray_app.fleet:FollowRouter"


def key_of(app_name: str | None, deployment: str) -> str:
    return f"{app_name or ''}/{deployment}"


def autoscaling_config(*, always_on: bool, max_age_s: float = MAX_AGE_S) -> dict[str, Any]:
    """The ``autoscaling_config`` of a scalable in-process replica's deployment: 0..1 Ray
    replicas (1 when it is among its region's ``min_replicas``), 1 at start, and no delay of
    Serve's own (the fleet scaler has already planned the start-up)."""
    return {
        "min_replicas": 1 if always_on else 0,
        "max_replicas": 1,
        "initial_replicas": 1,
        "upscale_delay_s": 0.0,
        "downscale_delay_s": 0.0,
        "policy": {"policy_function": POLICY, "policy_kwargs": {"max_age_s": max_age_s}},
    }


class FollowRouter:
    """Ray Serve custom autoscaling policy: the count the router wrote for this deployment,
    else (nothing written, too old, unreadable) the current target."""

    def __init__(self, max_age_s: float = MAX_AGE_S, poll_s: float = 1.0) -> None:
        self.max_age_s = max_age_s
        self.poll_s = poll_s  # the controller calls every ~0.1 s; the store is read this often
        self._read_at = -float("inf")
        self._count: int | None = None

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = time.time()
        if now - self._read_at >= self.poll_s:
            self._read_at = now
            self._count = self._read(ctx.app_name, ctx.deployment_name, now)
        keep = int(ctx.target_num_replicas)
        return (keep if self._count is None else self._count), {}

    def _read(self, app_name: str | None, deployment: str, now: float) -> int | None:
        from ray.experimental.internal_kv import _internal_kv_get

        key = key_of(app_name, deployment)
        try:
            raw = _internal_kv_get(key, namespace=NAMESPACE)
            if raw is None:
                return None
            value = json.loads(raw)
            count, written_at = int(value["replicas"]), float(value["written_at"])
        except Exception as e:  # unreadable: keep what is on, and say why
            log.warning("fleet count for %s unreadable (%s): keeping the current count", key, e)
            return None
        if now - written_at > self.max_age_s:
            log.warning("fleet count for %s is %.0f s old: keeping the current count", key,
                        now - written_at)  # fmt: skip
            return None
        return max(0, count)


class RayFleetTargets:
    """The fleet scaler's ``targets`` (:data:`router.service.fleet.Targets`) for the
    deployments of scalable in-process replicas (``deployments``: replica name -> deployment
    name in ``app_name``): each count goes where :class:`FollowRouter` reads it."""

    def __init__(self, app_name: str, deployments: dict[str, str]) -> None:
        self.app_name = app_name
        self.deployments = deployments

    async def __call__(self, on: dict[str, int]) -> None:
        now = time.time()
        items = [
            (key_of(self.app_name, dep), json.dumps({"replicas": on[name], "written_at": now}))
            for name, dep in self.deployments.items()
            if name in on
        ]
        if items:
            await asyncio.to_thread(self._write, items)

    @staticmethod
    def _write(items: list[tuple[str, str]]) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        for key, value in items:
            _internal_kv_put(key, value, overwrite=True, namespace=NAMESPACE)
