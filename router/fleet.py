"""Fleet scaling in ``router simulate``: which replicas are on, hour by hour, by the live
scaling rule (:mod:`router.scaling`), and what being off or starting costs.

- Load forecast: the same hour yesterday (the first day: the hour itself), all of the traffic
  (deferrable included), in requests/s.
- Score forecast: the policy's score (:func:`router.policy.score`, its weight) of a request on
  each region, with the intensity forecast issued when the decision is taken: one start-up
  before the hour (:func:`router.scaling.lead_intervals`), the actual intensity when that is
  the hour itself.
- Each region's replicas are alike to the rule (their mean capacity); in a region, the first
  ``on`` replicas are up. Start-ups and standby draw :func:`router.scaling.schedule_energy`;
  up replicas' static power is already in the serving tables.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from router.billing import J_PER_KWH
from router.policy import score
from router.scaling import RegionFleet, desired_on, lead_intervals, schedule_energy, with_startup
from router.service.fleet import standby_w

if TYPE_CHECKING:
    from regions.config import Config
    from router.simulate import World



def region_fleets(world: World, cfg: Config) -> tuple[list[RegionFleet], np.ndarray]:
    """The rule's view of each region, and each region's static watts per replica. As live
    (:func:`router.service.fleet.region_fleet`), a region without a ``scaling`` block, or
    with ``scalable: false``, keeps all its replicas on; standby power is the block's
    ``standby_w_per_gpu`` or the GPU type's default. Capacity is the simulator's own: the
    replica's rate at the SLOs (``scaling.capacity_rps`` is the live router's estimate)."""
    fleets, static = [], []
    for g, region in enumerate(cfg.regions):
        sel = world.replica_region == g
        sc = region.scaling
        owned = int(sel.sum())
        static_w = float(world.static_w[sel].mean()) if owned else 0.0
        standby = [standby_w(rep, sc) for rep in region.replicas for _ in range(rep.count)]
        scalable = sc is not None and sc.scalable
        fleets.append(
            RegionFleet(
                name=region.name,
                replicas=owned,
                min_on=min(owned, sc.min_replicas) if scalable and sc is not None else owned,
                capacity_rps=float(world.capacity_rps[sel].mean()) if owned else 1.0,
                startup_s=sc.startup_s if sc is not None else 0.0,
                standby_w=float(np.mean(standby)) if standby else 0.0,
            )
        )
        static.append(static_w)
    return fleets, np.array(static)


def fleet_schedule(spec: str, world: World, cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    """([H, R] replicas up, [H, R] joules of standby and start-up) for a ``+scale`` policy."""
    from router.simulate import WEIGHTS, parse_policy

    base, _, _ = parse_policy(spec)
    h_n, r_n = len(world.hours), len(world.replica_names)
    g_n = len(world.region_names)
    fleets, static = region_fleets(world, cfg)
    demand = world.demand.per_hour / 3600.0
    # the live forecast: the larger of the same hour yesterday and the rate just before (here
    # the hour before; the first day has only that)
    yesterday = np.concatenate([demand[:24], demand[:-24]]) if h_n > 24 else demand.copy()
    before = np.concatenate([demand[:1], demand[:-1]])
    load = np.maximum(yesterday, before)
    lead = lead_intervals(fleets, 3600.0)
    w = world.forecast.shape[1]
    seen = world.intensity.copy()
    if 0 < lead < w:
        seen[lead:] = world.forecast[np.arange(h_n - lead), lead]
    elif lead >= w:
        seen[lead:] = world.forecast[np.arange(h_n - lead), w - 1]
    weight = WEIGHTS.get(base, cfg.policy.weight)
    jpr = np.array([
        world.j_per_request[world.replica_region == g].mean() if f.replicas else np.inf
        for g, f in enumerate(fleets)
    ])  # fmt: skip
    s = score(jpr[None, :] / J_PER_KWH, world.pue[None, :], world.price, seen, weight)
    s = np.where(np.isnan(s), np.inf, s)
    desired = desired_on(load, s, fleets, target_utilization=cfg.simulation.target_utilization)
    # requests came while the forecast had every replica off: the router starts one where
    # it is cleanest (it would refuse them otherwise; the simulator does not lose them)
    dark = (demand > 0) & (desired.sum(axis=1) == 0)
    if dark.any():
        owned = np.array([f.replicas for f in fleets]) > 0
        best = np.argmin(np.where(owned[None, :], s, np.inf), axis=1)
        desired[dark, best[dark]] = 1
    sched = with_startup(desired, fleets, step_s=3600.0, static_w=static.tolist())
    extra = schedule_energy(sched, fleets, static_w=static.tolist())
    on = np.zeros((h_n, r_n), bool)
    extra_j = np.zeros((h_n, r_n))
    for g in range(g_n):
        cols = np.flatnonzero(world.replica_region == g)
        if not len(cols):
            continue
        on[:, cols] = np.arange(len(cols))[None, :] < sched.on[:, g : g + 1]
        off = ~on[:, cols]
        # standby on the replicas that are off, start-ups on those that are on
        n_off = np.maximum(off.sum(axis=1, keepdims=True), 1)
        n_on = np.maximum((~off).sum(axis=1, keepdims=True), 1)
        standby = np.where(off, extra.standby_j[:, g : g + 1] / n_off, 0.0)
        extra_j[:, cols] = standby + np.where(~off, extra.startup_j[:, g : g + 1] / n_on, 0.0)
    return on, extra_j
