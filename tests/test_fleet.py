"""The live fleet scaler (router/service/fleet.py) on the service's fakes: clean regions stay
up and dirty ones drain to their minimum, residency load keeps its regions on, switched-on
replicas serve after their start-up, a failing carbon source keeps the count, and the count is
published at GET /v1/fleet and as router_desired_replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from forecasting.errors import SourceUnavailable
from forecasting.sources.base import Forecast
from router.service.arrivals import Arrivals
from router.service.fakes import FakeReplicaClient, StaticCarbonSource
from tests.service_kit import ADMIN, DEMO, INTENSITY, TENANTS, Kit, chat, service_kit


def region(name: str, zone: str, replicas: int, residency: str, scaling: str | None,
           model: str = "smollm2-135m") -> str:  # fmt: skip
    reps = "".join(
        f"      - {{name: {name}-{i}, backend: {{kind: llama_cpp, model: {model}}}, meter: cpu}}\n"
        for i in range(replicas)
    )
    block = f"    scaling: {scaling}\n" if scaling else ""
    return (
        f"  - name: {name}\n    zone: {zone}\n    carbon_source: grid\n"
        f"    price: {{flat_usd_per_kwh: 0.10}}\n    residency: [{residency}]\n{block}"
        f"    replicas:\n{reps}"
    )


def config(scaling: str = "{min_replicas: 1, startup_s: 0, capacity_rps: 1}",
           us_scaling: str | None = "{min_replicas: 0, startup_s: 0, capacity_rps: 1}",
           us_zone: str = "US-TEX-ERCO", us_model: str = "smollm2-135m") -> str:  # fmt: skip
    return (
        "carbon_sources:\n  grid: {kind: replay, dataset: electricitymaps_hourly}\n"
        "regions:\n"
        + region("eu-north", "SE", 3, "eu", scaling)
        + region("eu-central", "DE", 3, "eu", scaling)
        + region("us-south", us_zone, 2, "us", us_scaling, us_model)
        + TENANTS
        + "fleet: {target_utilization: 1.0}\nledger: ledger.sqlite\n"
    )


NAMES = [f"eu-north-{i}" for i in range(3)] + [f"eu-central-{i}" for i in range(3)]
NAMES += ["us-south-0", "us-south-1"]


class Clock:
    def __init__(self) -> None:
        self.t = 999_960.0  # a whole minute

    def __call__(self) -> float:
        return self.t


def load(
    kit: Kit, clock: Clock, rps: float, patterns: tuple[str, ...] = (), minutes: int = 16,
    model: str = "smollm2-135m",
) -> None:  # fmt: skip
    """``rps`` requests/s for ``model`` over the last ``minutes`` minutes (the clock ends a
    minute on)."""
    per_minute = round(rps * 60)
    for _ in range(minutes):
        for _ in range(per_minute):
            kit.service.fleet.arrived(model, patterns)
        clock.t += 60


def serving(kit: Kit) -> list[str]:
    return [s.replica.name for s in kit.service.live.router.states if s.healthy]


class Deployments:
    """A fake of the replica deployments the fleet scaler's targets scale (the Ray adapter's
    role): the count each one has."""

    def __init__(self) -> None:
        self.replicas: dict[str, int] = {}

    async def __call__(self, on: dict[str, int]) -> None:
        self.replicas.update(on)


def kit_for(tmp: Path, cfg: str, clock: Clock, **kw: Any) -> Any:
    fakes = [FakeReplicaClient(n) for n in NAMES]
    return service_kit(tmp, replicas=fakes, config=cfg, clock=clock, **kw)


async def test_clean_regions_stay_up_and_dirty_ones_drain_to_their_minimum(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with kit_for(tmp_path, config(), clock) as kit:
        load(kit, clock, 2.5)  # 2.5 rps at 1 rps a replica: 3 replicas
        counts = await kit.service.fleet.step()
        assert counts == {"eu-north": 3, "eu-central": 1, "us-south": 0}
        assert serving(kit) == ["eu-north-0", "eu-north-1", "eu-north-2", "eu-central-0"]
        # drained replicas get no requests; the clean region takes a carbon-minded one
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
        assert r.status_code == 200 and r.headers["x-carbon-region"] == "eu-north"
        # the load doubles: the clean region is full, the next cleanest takes the rest
        load(kit, clock, 5.0)
        counts = await kit.service.fleet.step()
        assert counts == {"eu-north": 3, "eu-central": 2, "us-south": 0}

        metrics = (await kit.client.get("/metrics")).text
        assert 'router_desired_replicas{region="eu-north"} 3.0' in metrics
        assert 'router_desired_replicas{region="us-south"} 0.0' in metrics
        view = (await kit.client.get("/v1/fleet")).json()
        north = next(r for r in view["regions"] if r["region"] == "eu-north")
        want = {"desired": 3, "on": 3, "serving": 3, "owned": 3, "scalable": True,
                "min_replicas": 1, "held": None}  # fmt: skip
        assert {k: north[k] for k in want} == want
        assert north["inputs"]["intensity_g_per_kwh"] == [INTENSITY["SE"]]
        assert view["load"]["rps_last_15min"] == pytest.approx(5.0)
        assert view["age_s"] == 0 and view["error"] is None


async def test_load_that_must_stay_in_a_region_keeps_it_on(tmp_path: Path) -> None:
    clock = Clock()
    async with kit_for(tmp_path, config(), clock) as kit:
        load(kit, clock, 1.5, patterns=("us",))  # dirty, but the only region allowed
        counts = await kit.service.fleet.step()
        assert counts == {"eu-north": 1, "eu-central": 1, "us-south": 2}
        view = (await kit.client.get("/v1/fleet")).json()
        assert view["load"]["sets"] == [
            {"model": "smollm2-135m", "regions": ["us-south"], "rps": [1.5]}
        ]


async def test_load_goes_only_to_regions_that_serve_its_model(tmp_path: Path) -> None:
    clock = Clock()
    async with kit_for(tmp_path, config(us_model="qwen-0.5b"), clock) as kit:
        for _ in range(16):  # 1.5 rps for the model only dirty Texas serves, 2.5 for the other
            for _ in range(90):
                kit.service.fleet.arrived("qwen-0.5b", ())
            load(kit, clock, 2.5, minutes=1)
        counts = await kit.service.fleet.step()
        assert counts == {"eu-north": 3, "eu-central": 1, "us-south": 2}
        view = (await kit.client.get("/v1/fleet")).json()
        assert {s["model"] for s in view["load"]["sets"]} == {"qwen-0.5b", "smollm2-135m"}


async def test_a_region_without_a_scaling_block_keeps_all_its_replicas_on(tmp_path: Path) -> None:
    clock = Clock()
    async with kit_for(tmp_path, config(us_scaling=None), clock) as kit:
        load(kit, clock, 0.5)
        assert (await kit.service.fleet.step())["us-south"] == 2


async def test_a_replica_switched_on_serves_once_its_start_up_is_over(tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(scaling="{min_replicas: 1, startup_s: 120, capacity_rps: 1}")
    async with kit_for(tmp_path, cfg, clock) as kit:
        load(kit, clock, 0.5)
        await kit.service.fleet.step()
        assert serving(kit) == ["eu-north-0", "eu-central-0"]
        load(kit, clock, 2.5)
        counts = await kit.service.fleet.step()
        assert counts["eu-north"] == 3
        assert serving(kit) == ["eu-north-0", "eu-central-0"]  # starting: not yet routed to
        view = (await kit.client.get("/v1/fleet")).json()
        north = next(r for r in view["regions"] if r["region"] == "eu-north")
        assert (north["desired"], north["on"], north["serving"]) == (3, 3, 1)
        assert [d["in_s"] for d in north["decided"]] == [0.0, 120.0]
        clock.t += 120
        await kit.service.fleet.step()
        assert serving(kit)[:3] == ["eu-north-0", "eu-north-1", "eu-north-2"]


class ZoneProfiles(StaticCarbonSource):
    """Static intensities whose forecast from the next hour on is ``ahead[zone]``, and whose
    forecast fails for the zones in ``no_forecast``."""

    def __init__(self, ahead: dict[str, float], no_forecast: Sequence[str] = ()) -> None:
        super().__init__(INTENSITY)
        self.ahead = ahead
        self.no_forecast = set(no_forecast)

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        if zone in self.no_forecast:
            raise SourceUnavailable("forecast endpoint down", source=self.name, zone=zone)
        hour0 = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        times = pd.DatetimeIndex([hour0 + timedelta(hours=k) for k in range(horizon_h)])
        values = [self._value(zone)] + [self.ahead.get(zone, self._value(zone))] * (horizon_h - 1)
        return Forecast(zone, hour0, pd.Series(values, index=times), "average", self.name)


async def test_replicas_are_started_ahead_where_the_grid_will_be_clean(tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(scaling="{min_replicas: 1, startup_s: 3600, capacity_rps: 1}")
    source = ZoneProfiles({"SE": 900.0, "DE": 5.0})  # in an hour Germany is the clean one
    async with kit_for(tmp_path, cfg, clock, source=source) as kit:
        load(kit, clock, 2.5)
        counts = await kit.service.fleet.step()
        # Sweden serves now; Germany's replicas start now to serve in an hour
        assert counts == {"eu-north": 3, "eu-central": 3, "us-south": 0}
        view = (await kit.client.get("/v1/fleet")).json()
        central = next(r for r in view["regions"] if r["region"] == "eu-central")
        assert central["decided"] == [{"in_s": 0.0, "replicas": 1}, {"in_s": 3600.0, "replicas": 3}]
        assert central["inputs"]["intensity_g_per_kwh"] == [400.0, 5.0]


async def test_a_failed_forecast_uses_the_intensity_now_and_says_so(tmp_path: Path) -> None:
    clock = Clock()
    cfg = config(scaling="{min_replicas: 1, startup_s: 3600, capacity_rps: 1}")
    source = ZoneProfiles({"SE": 900.0, "DE": 5.0}, no_forecast=["SE", "DE"])
    async with kit_for(tmp_path, cfg, clock, source=source) as kit:
        load(kit, clock, 2.5)
        counts = await kit.service.fleet.step()
        assert counts == {"eu-north": 3, "eu-central": 1, "us-south": 0}
        view = (await kit.client.get("/v1/fleet")).json()
        north = next(r for r in view["regions"] if r["region"] == "eu-north")
        assert north["inputs"]["intensity_g_per_kwh"] == [30.0, 30.0]
        assert north["inputs"]["carbon"]["forecast"] == (
            "unavailable: the intensity now is used ahead"
        )


SECRET_URL = "http://ops:hunter2@10.1.2.3:8443/v3/carbon-intensity/latest"


class LeakySource(ZoneProfiles):
    """Fails as a real source behind a credentialed URL does: SE's intensity and forecast,
    DE's forecast."""

    async def latest(self, zone: str) -> Any:
        if zone == "SE":
            raise SourceUnavailable(f"ClientConnectorError calling {SECRET_URL}", source="em",
                                    zone=zone)  # fmt: skip
        return await super().latest(zone)

    async def forecast(self, zone: str, horizon_h: int = 24) -> Forecast:
        if zone in ("SE", "DE"):
            raise SourceUnavailable(f"HTTP 503 from {SECRET_URL}", source="em", zone=zone)
        return await super().forecast(zone, horizon_h)


async def test_the_fleet_view_publishes_fixed_reasons_never_a_sources_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # GET /v1/fleet needs no credentials: a source's error text (its URL, with a password and
    # an internal address) stays in the log
    from router.billing import PriceError

    clock = Clock()
    cfg = config(scaling="{min_replicas: 1, startup_s: 3600, capacity_rps: 1}")
    async with kit_for(tmp_path, cfg, clock, source=LeakySource({})) as kit:
        load(kit, clock, 2.5)
        us = next(s for s in kit.service.live.router.states if s.region.name == "us-south")

        def no_price(when: Any) -> float:
            raise PriceError(f"{SECRET_URL}: cannot read the price series")

        monkeypatch.setattr(us.prices, "at", no_price)
        await kit.service.fleet.step()
        view = (await kit.client.get("/v1/fleet")).json()
        held = {r["region"]: r["held"] for r in view["regions"]}
        assert held["eu-north"] == "carbon intensity unavailable: the count is kept"
        assert held["us-south"] == "price unavailable: the count is kept"
        central = next(r for r in view["regions"] if r["region"] == "eu-central")
        assert central["inputs"]["carbon"]["forecast"] == (
            "unavailable: the intensity now is used ahead"
        )
        # a step that fails says so, not what failed
        async def broken(*a: Any, **kw: Any) -> None:
            raise RuntimeError(f"boom at {SECRET_URL}")

        monkeypatch.setattr(kit.service.fleet, "step", broken)
        task = asyncio.create_task(kit.service.fleet.loop())  # steps at once, then sleeps
        for _ in range(5):
            await asyncio.sleep(0)
        task.cancel()
        text = (await kit.client.get("/v1/fleet")).text
        assert (await kit.client.get("/v1/fleet")).json()["error"] == (
            "fleet scaling failed: every count is kept"
        )
        for needle in ("hunter2", "10.1.2.3", "8443", "ops:", "boom"):
            assert needle not in text
        assert "hunter2" in caplog.text  # the detail is in the log


async def test_a_region_whose_carbon_data_fails_keeps_its_count(tmp_path: Path) -> None:
    clock = Clock()
    source = StaticCarbonSource(INTENSITY)
    async with kit_for(tmp_path, config(), clock, source=source) as kit:
        load(kit, clock, 0.5, patterns=("us",))
        assert (await kit.service.fleet.step())["us-south"] == 1
        # Texas's intensity is gone, and its last value is too old to use (never 0 g/kWh)
        del source.values["US-TEX-ERCO"]
        carbon = kit.service.live.router.carbon
        carbon.ttl_s = carbon.max_stale_s = 0.0
        await kit.service.fleet.step()
        await carbon.idle()
        load(kit, clock, 0.0, minutes=1)  # no load there any more: it would drain to 0
        counts = await kit.service.fleet.step()
        assert counts["us-south"] == 1 and serving(kit)[-1] == "us-south-0"
        view = (await kit.client.get("/v1/fleet")).json()
        us = next(r for r in view["regions"] if r["region"] == "us-south")
        assert us["held"].startswith("carbon intensity unavailable") and us["desired"] == 1
        metrics = (await kit.client.get("/metrics")).text
        assert 'router_desired_replicas{region="us-south"} 1.0' in metrics


async def test_a_held_region_carries_only_what_its_replicas_carry(tmp_path: Path) -> None:
    # Texas has no carbon data: its 2 replicas stay on and carry 2 x 0.5 rps of the 2.5 rps;
    # the clean region provisions the other 1.5
    clock = Clock()
    us = "{min_replicas: 0, startup_s: 0, capacity_rps: 0.5}"
    async with kit_for(tmp_path, config(us_scaling=us, us_zone="XX"), clock) as kit:
        load(kit, clock, 2.5)
        counts = await kit.service.fleet.step()
        assert counts == {"eu-north": 2, "eu-central": 1, "us-south": 2}


async def test_a_region_never_decided_publishes_no_count(tmp_path: Path) -> None:
    # us-south's zone is unknown to the source from the start: it keeps all its replicas
    # on, and publishes no count an external autoscaler would follow (it keeps what runs)
    clock = Clock()
    async with kit_for(tmp_path, config(us_zone="XX"), clock) as kit:
        load(kit, clock, 0.5)
        counts = await kit.service.fleet.step()
        assert counts == {"eu-north": 1, "eu-central": 1, "us-south": 2}
        assert serving(kit)[-2:] == ["us-south-0", "us-south-1"]
        view = (await kit.client.get("/v1/fleet")).json()
        us = next(r for r in view["regions"] if r["region"] == "us-south")
        assert us["held"].startswith("carbon intensity unavailable") and us["desired"] is None
        metrics = (await kit.client.get("/metrics")).text
        assert 'router_desired_replicas{region="eu-north"} 1.0' in metrics
        assert 'router_desired_replicas{region="us-south"}' not in metrics
        # nor an intensity: a region without one has no sample, never a 0
        assert 'router_carbon_intensity_g_per_kwh{region="us-south"}' not in metrics
        assert 'router_carbon_intensity_g_per_kwh{region="eu-north"}' in metrics


async def test_until_a_minute_is_counted_every_count_is_kept(tmp_path: Path) -> None:
    clock = Clock()
    async with kit_for(tmp_path, config(), clock) as kit:
        counts = await kit.service.fleet.step()
        assert counts == {"eu-north": 3, "eu-central": 3, "us-south": 2}
        view = (await kit.client.get("/v1/fleet")).json()
        assert all(r["held"].startswith("load unknown (warming up") for r in view["regions"])
        assert all(r["desired"] is None for r in view["regions"])
        assert "router_desired_replicas{" not in (await kit.client.get("/metrics")).text


async def test_requests_are_counted_and_a_reload_keeps_drained_replicas_off(
    tmp_path: Path,
) -> None:
    clock = Clock()
    async with kit_for(tmp_path, config(), clock) as kit:
        clock.t += 60
        for _ in range(3):
            r = await kit.client.post("/v1/chat/completions", json=chat(), headers=DEMO)
            assert r.status_code == 200
        clock.t += 60
        assert kit.service.fleet.arrivals.rates(clock.t - 900, clock.t) == {
            ("smollm2-135m", ()): 3 / 60
        }
        await kit.service.fleet.step()
        before = serving(kit)
        assert before == ["eu-north-0", "eu-central-0"]
        assert (await kit.client.post("/v1/admin/reload", headers=ADMIN)).status_code == 200
        assert serving(kit) == before


async def test_a_replica_switched_off_keeps_its_deployment_until_it_has_drained(
    tmp_path: Path,
) -> None:
    clock = Clock()
    deployments = Deployments()
    async with kit_for(tmp_path, config(), clock, fleet_targets=deployments) as kit:
        load(kit, clock, 2.5)
        await kit.service.fleet.step()
        assert deployments.replicas["eu-north-2"] == 1
        states = {s.replica.name: s for s in kit.service.live.router.states}
        states["eu-north-2"].active = 1  # a request in flight there
        load(kit, clock, 0.5)
        await kit.service.fleet.step()
        assert not states["eu-north-2"].healthy  # no new requests: it drains
        assert deployments.replicas["eu-north-2"] == 1  # but keeps running until it has
        assert deployments.replicas["eu-north-1"] == 0
        states["eu-north-2"].active = 0
        load(kit, clock, 0.5, minutes=1)
        await kit.service.fleet.step()
        assert deployments.replicas["eu-north-2"] == 0


async def test_while_held_the_deployments_keep_what_runs(tmp_path: Path) -> None:
    # just started (or restarted), the router knows no load: it writes no count, so the
    # deployments keep what they have rather than what a fresh router believes is on
    clock = Clock()
    deployments = Deployments()
    async with kit_for(tmp_path, config(), clock, fleet_targets=deployments) as kit:
        await kit.service.fleet.step()
        assert deployments.replicas == {}


def test_the_load_forecast_is_the_larger_of_now_and_the_same_hour_yesterday() -> None:
    clock = Clock()
    arrivals = Arrivals(clock)
    end = clock.t + 25 * 3600  # "now": 25 h of counts, 1 request a minute, and 10 a minute
    busy = (end + 3600 - 86400 - 1800, end + 3600 - 86400 + 1800)  # in the hour around
    while clock.t < end:  # the same time yesterday as "now + 1 h"
        for _ in range(10 if busy[0] <= clock.t < busy[1] else 1):
            arrivals.add(("m", ()))
        clock.t += 60
    now, how = arrivals.forecast(0.0)
    assert now[("m", ())] == pytest.approx(1 / 60) and how["rps_same_hour_yesterday"] is not None
    ahead, how = arrivals.forecast(3600.0)
    assert ahead[("m", ())] == pytest.approx(10 / 60)  # yesterday's busy hour comes back
    assert how["rps_last_15min"] == pytest.approx(1 / 60)


def test_a_regions_standby_power_is_its_own_or_its_gpus_default_and_0_is_a_value() -> None:
    from regions.config import parse_config
    from router.billing import PriceSchedule
    from router.service.fleet import region_fleet
    from router.service.routing import ReplicaState, profile_of

    def standby_w(block: str) -> float:
        cfg = parse_config(
            "carbon_sources:\n  grid: {kind: replay, dataset: electricitymaps_hourly}\n"
            "regions:\n  - name: gpu\n    zone: SE\n    carbon_source: grid\n"
            "    price: {flat_usd_per_kwh: 0.1}\n"
            f"    scaling: {block}\n"
            "    replicas:\n      - name: gpu-0\n"
            "        backend: {kind: openai, url: 'http://h:8000/v1', model: m}\n"
            "        gpu: {type: H100, count: 4}\n",
            env={},
        )
        region = cfg.regions[0]
        rep = region.replicas[0]
        states = [ReplicaState(rep, region, profile_of(rep), PriceSchedule(region.price))]
        return region_fleet(region, states, 129.0).standby_w

    assert standby_w("{capacity_rps: 2}") == 4 * 72.0  # H100's default, per GPU
    assert standby_w("{capacity_rps: 2, standby_w_per_gpu: 40}") == 4 * 40.0
    assert standby_w("{capacity_rps: 2, standby_w_per_gpu: 0}") == 0.0  # node powered down


def test_a_replicas_default_capacity_counts_its_prefill_not_only_its_decode_rate() -> None:
    # a 70B replica on 4 x H100 decodes 4,900 tokens/s at its batch limit: 38 requests/s of
    # 129 tokens; but each request's 512-token prompt also takes 36 ms of the replica's compute
    from regions.config import parse_config
    from router.billing import PriceSchedule
    from router.service.fleet import REF_PROMPT_TOKENS, region_fleet
    from router.service.routing import ReplicaState, model_of, profile_of

    cfg = parse_config(
        "carbon_sources:\n  grid: {kind: replay, dataset: electricitymaps_hourly}\n"
        "regions:\n  - name: gpu\n    zone: SE\n    carbon_source: grid\n"
        "    price: {flat_usd_per_kwh: 0.1}\n    scaling: {min_replicas: 1}\n"
        "    replicas:\n      - name: gpu-0\n"
        "        backend: {kind: openai, url: 'http://h:8000/v1',"
        " model: meta-llama/Llama-3.1-70B-Instruct}\n"
        "        gpu: {type: H100, count: 4}\n        max_concurrency: 256\n",
        env={},
    )
    region = cfg.regions[0]
    rep = region.replicas[0]
    model = model_of(rep)
    assert model is not None
    states = [ReplicaState(rep, region, profile_of(rep), PriceSchedule(region.price), model=model)]
    cap = region_fleet(region, states, 129.0).capacity_rps
    per_request_s = model.prefill_s(REF_PROMPT_TOKENS) + 129.0 / model.decode_tokens_per_s(256)
    assert cap == pytest.approx(1.0 / per_request_s, rel=1e-6)


async def test_many_distinct_patterns_never_erase_another_tenants_residency(
    tmp_path: Path,
) -> None:
    # one tenant sends 64+ distinct patterns a minute that all match the US region; EU-only
    # load must still count as EU-only (arrivals are keyed by the regions allowed, not by the
    # patterns), so the EU regions are not drained and an EU-only request is served
    clock = Clock()
    fast = "{min_replicas: 0, startup_s: 0, capacity_rps: 1}"
    cfg = ("carbon_sources:\n  grid: {kind: replay, dataset: electricitymaps_hourly}\nregions:\n"
           + region("eu-north", "DE", 3, "eu", fast) + region("eu-central", "DE", 3, "eu", fast)
           + region("us-south", "SE", 2, "us", "{min_replicas: 0, startup_s: 0, capacity_rps: 2}")
           + TENANTS + "fleet: {target_utilization: 1.0}\nledger: ledger.sqlite\n")  # fmt: skip
    async with kit_for(tmp_path, cfg, clock) as kit:
        fleet = kit.service.fleet
        for _ in range(16):
            for k in range(80):
                fleet.arrived("smollm2-135m", ("us-" + "*" * (k + 1),))
            for _ in range(150):  # 2.5 rps of EU-only load
                fleet.arrived("smollm2-135m", ("eu",))
            clock.t += 60
        counts = await fleet.step()
        assert counts["eu-north"] + counts["eu-central"] >= 3
        view = (await kit.client.get("/v1/fleet")).json()
        sets = {tuple(s["regions"]) for s in view["load"]["sets"]}
        assert sets == {("eu-central", "eu-north"), ("us-south",)}
        pref = {**DEMO, "X-Carbon-Preference": 'regions=("eu")'}
        r = await kit.client.post("/v1/chat/completions", json=chat(), headers=pref)
        assert r.status_code == 200, r.text


def test_arrivals_past_the_bound_keep_their_residency() -> None:
    # past MAX_SETS keys a minute a new set counts under a key it contains (requests it may
    # serve), never as "anywhere"
    from router.service.arrivals import MAX_SETS

    clock = Clock()
    arrivals = Arrivals(clock)
    clock.t += 60  # the first minute is not counted whole
    for k in range(MAX_SETS):
        arrivals.add(("m", (f"r{k:03d}",)))
    arrivals.add(("m", ("eu-a", "eu-b")))  # over the bound, no key inside it: its own smallest
    arrivals.add(("m", ("eu-a", "eu-b", "r000")))  # over the bound: under one it contains
    arrivals.add(("m", ()))  # anywhere, over the bound: under an existing key
    clock.t += 60
    rates = arrivals.rates(clock.t - 60, clock.t)
    assert rates is not None
    assert ("m", ()) not in rates
    assert sum(rates.values()) == pytest.approx((MAX_SETS + 3) / 60)
    assert all(set(regions) <= {"eu-a", "eu-b", "r000"} or len(regions) == 1
               for _, regions in rates)  # fmt: skip


@pytest.mark.parametrize("bad", [float("nan"), -1.0, float("inf")])
async def test_a_forecast_that_is_not_an_intensity_is_a_failed_forecast(
    tmp_path: Path, bad: float
) -> None:
    # like a failed forecast: the intensity now is used ahead, and the view says so
    clock = Clock()
    cfg = config(scaling="{min_replicas: 1, startup_s: 3600, capacity_rps: 1}")
    source = ZoneProfiles({"SE": bad, "DE": bad})
    async with kit_for(tmp_path, cfg, clock, source=source) as kit:
        load(kit, clock, 2.5)
        counts = await kit.service.fleet.step()
        assert counts == {"eu-north": 3, "eu-central": 1, "us-south": 0}
        view = (await kit.client.get("/v1/fleet")).json()
        north = next(r for r in view["regions"] if r["region"] == "eu-north")
        assert north["held"] is None
        assert north["inputs"]["intensity_g_per_kwh"] == [30.0, 30.0]
        assert north["inputs"]["carbon"]["forecast"] == (
            "unavailable: the intensity now is used ahead"
        )
