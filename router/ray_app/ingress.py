"""The ingress deployment and the application builder: the Ray side of the request path.

The ingress is a thin adapter: it builds a :class:`RouterService` with Ray's parts (a
:class:`RayReplicaClient` and a :class:`RayLoadSource` per in-process replica, a server's
``/metrics`` as the load of a proxied one, the outbox to the metering actor, the actor as the
ledger reader), serves the FastAPI app of :func:`router.http.app.make_api` around it
(built on the replica by Serve's late-bound ``__serve_build_asgi_app__``, so the app's state is
the one the requests see), and runs the service's background loops. Everything it serves
is decided in :mod:`router.service`.

``build_app({"config": PATH})`` is an application builder, so the same app runs with
``router serve`` and with ``serve run router.serve_app:build_app config=configs/local.yaml``.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve

from forecasting.energy import EnergyPredictor
from forecasting.sources import build_sources
from regions.config import Config, load_config
from router.http.app import make_api
from router.http.wire import OpenAIWire
from router.jobs import JobStore
from router.ledger import LedgerRow
from router.metering.outbox import Outbox
from router.ray_app.fleet import RayFleetTargets, autoscaling_config
from router.ray_app.metering import METERING_ACTOR, NAMESPACE, MeteringActor
from router.ray_app.replica import (
    RayLoadSource,
    RayReplicaClient,
    RegionReplica,
    remote_backend,
)
from router.service.app import RouterService
from router.service.load import ServerMetricsLoad, metrics_url
from router.service.ports import LoadSource, ReplicaClient, UsageQuery
from router.service.proxied import ProxiedMetering, ProxiedReplica, TimelineBatch


class ActorLedger:
    """The metering actor as the service's :class:`router.service.ports.LedgerReader`."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    async def usage(self, tenant: str | None, query: UsageQuery) -> dict[str, Any]:
        page: dict[str, Any] = await self.actor.usage.remote(tenant, query)
        return page

    async def spend(self, tenant: str, since: datetime) -> tuple[float, float, float]:
        kwh, g, usd = await self.actor.spend.remote(tenant, since)
        return float(kwh), float(g), float(usd)

    async def refit_rows(self, replica: str) -> list[tuple[int, int, float]]:
        rows: list[tuple[int, int, float]] = await self.actor.refit_rows.remote(replica)
        return rows

    async def receipt(self, tenant: str | None, request_id: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = await self.actor.receipt.remote(tenant, request_id)
        return found

    async def receipt_head(self, tenant: str) -> dict[str, Any]:
        head: dict[str, Any] = await self.actor.receipt_head.remote(tenant)
        return head

    async def hourly(
        self, start: datetime, end: datetime, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.actor.hourly.remote(start, end, tenant)
        return rows

    async def top_tenants(self, start: datetime, end: datetime, limit: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = await self.actor.top_tenants.remote(start, end, limit)
        return rows

    async def bill(self, request_id: str) -> LedgerRow | None:
        row: LedgerRow | None = await self.actor.bill.remote(request_id)
        return row


def _sources(cfg: Config, base: Path) -> dict[str, Any]:
    return build_sources(cfg, base_dir=base)


@serve.deployment(
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0},
    # a log line per request costs ~3 % of the ingress's CPU, and building the record Serve
    # then filters out another ~4 %: Serve's own logger here says warnings and errors only.
    # /metrics counts requests and the ledger records each one; our loggers are not affected
    logging_config={"enable_access_log": False, "log_level": "WARNING"},
)
@serve.ingress()  # the app is built on the replica, around its service: __serve_build_asgi_app__
class Ingress:
    def __init__(self, config_path: str, replicas: dict[str, Any]) -> None:
        cfg = load_config(config_path)
        base = Path(config_path).parent
        ledger = str((base / cfg.ledger) if not Path(cfg.ledger).is_absolute() else cfg.ledger)
        key = cfg.audit.signing_key
        key_path = None if key is None else str(key if Path(key).is_absolute() else base / key)
        self.metering = MeteringActor.options(  # type: ignore[attr-defined]
            name=METERING_ACTOR, get_if_exists=True, lifetime="detached", namespace=NAMESPACE
        ).remote(ledger, key_path, cfg.audit.sign_every_s)
        # billed rows reach the ledger off the response path, spooled so a crash loses none
        self.outbox = Outbox(self._record, spool_dir=Path(ledger).with_suffix(".spool"))
        reps = [r for region in cfg.regions for r in region.replicas]
        proxied_at = [i for i, r in enumerate(reps) if r.backend.kind != "llama_cpp"]
        self.proxied = ProxiedMetering(proxied_at, self.outbox) if proxied_at else None
        self.handles = [replicas[r.name] for r in reps]
        clients: list[ReplicaClient] = []
        loads: list[LoadSource] = []  # each replica's load, read in the background
        for i, rep in enumerate(reps):
            if self.proxied is not None and i in proxied_at:
                # called from here, not through its deployment (one actor hop less); the
                # deployment still meters it from the timelines we send
                clients.append(ProxiedReplica(i, rep.name, remote_backend(rep), self.proxied))
                assert rep.backend.kind == "openai"
                url = metrics_url(rep.backend.url, rep.backend.metrics_url)
                loads.append(ServerMetricsLoad(rep.name, url))
            else:
                clients.append(RayReplicaClient(rep.name, self.handles[i]))
                loads.append(RayLoadSource(rep.name, self.handles[i]))
        gpu = any(r.gpu.type != "cpu" for r in reps)
        scaled = {  # in-process replicas Serve scales by the fleet scaler's counts
            r.name: self.handles[i].deployment_name
            for i, r in enumerate(reps)
            if r.name in scalable_in_process(cfg)
        }
        app_name = serve.get_replica_context().app_name
        self.service = RouterService(
            config_path,
            replicas=clients,
            sink=self.outbox,
            ledger=ActorLedger(self.metering),
            jobs=JobStore(Path(ledger).with_suffix(".jobs.sqlite")),
            wire=OpenAIWire(),
            sources=_sources,
            predictor=EnergyPredictor.from_mlenergy() if gpu else EnergyPredictor(),
            proxied=self.proxied,
            fleet_targets=RayFleetTargets(app_name, scaled) if scaled else None,
            loads=loads,
        )
        loop = asyncio.get_event_loop()
        loop.call_soon(self.outbox.orphans)
        self._loops = [loop.create_task(c) for c in self.service.background(self._send)]

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The ASGI app this replica serves, around its service (Serve calls it once the
        replica is constructed)."""
        api = make_api()
        api.state.service = self.service
        return api

    async def _record(self, rows: list[dict[str, Any]]) -> None:
        await self.metering.record.remote(rows)

    async def _send(self, i: int, batch: TimelineBatch) -> list[str]:
        billed: list[str] = await self.handles[i].meter_events.remote(batch)
        return billed


def wait_ready(url: str, timeout_s: float = 300.0) -> bool:
    """Poll ``{url}/readyz`` until it answers 200 (True) or ``timeout_s`` passes (False)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


def scalable_in_process(cfg: Config) -> dict[str, bool]:
    """The in-process replicas of regions that scale, and whether each is among its region's
    first ``min_replicas`` (always on)."""
    out = {}
    for region in cfg.regions:
        sc = region.scaling
        if sc is None or not sc.scalable:
            continue
        for i, rep in enumerate(region.replicas):
            if rep.backend.kind == "llama_cpp":
                out[rep.name] = i < sc.min_replicas
    return out


def build_app(args: dict[str, str]) -> serve.Application:
    """Application builder: one RegionReplica per config replica, each carrying the Ray custom
    resource ``region:<name>`` (a sliver, so many fit), and the ingress bound to them. An
    in-process replica of a region that scales gets 0..1 Ray replicas by the fleet scaler's
    count (:mod:`router.ray_app.fleet`), and up to 2 minutes to finish its requests when it
    is switched off."""
    config_path = str(Path(args.get("config", "configs/local.yaml")).resolve())
    cfg = load_config(config_path)
    scaled = scalable_in_process(cfg)
    replicas = {}
    for region in cfg.regions:
        for rep in region.replicas:
            cpus = rep.backend.n_threads if rep.backend.kind == "llama_cpp" else 0.1
            scaling: dict[str, Any] = {}
            if rep.name in scaled:
                scaling = {
                    "autoscaling_config": autoscaling_config(always_on=scaled[rep.name]),
                    "graceful_shutdown_timeout_s": 120,
                }
            replicas[rep.name] = RegionReplica.options(  # type: ignore[attr-defined]
                name=f"replica-{rep.name}",
                ray_actor_options={
                    "num_cpus": min(cpus, 0.5),
                    "resources": {f"region:{region.name}": 0.01},
                },
                **scaling,
            ).bind(rep.model_dump_json())
    return Ingress.bind(config_path, replicas)  # type: ignore[attr-defined,no-any-return]
