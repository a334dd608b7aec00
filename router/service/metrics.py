"""The request path's Prometheus metrics. Labels stay bounded: region and status, never a
tenant or a request id."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.ledger import LedgerRow


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests_total = Counter(
            "router_requests_total", "requests", ["region", "status"], registry=self.registry
        )
        self.energy_total = Counter(
            "router_energy_kwh_total", "billed kWh", ["region"], registry=self.registry
        )
        self.carbon_total = Counter(
            "router_carbon_g_total", "g CO2e", ["region"], registry=self.registry
        )
        self.latency = Histogram(
            "router_request_seconds",
            "answered requests: seconds to the whole answer, or to the first chunk of a stream",
            registry=self.registry,
        )
        self.desired_replicas = Gauge(
            "router_desired_replicas",
            "replicas the fleet scaler wants on in the region now (those starting included), "
            "for an external autoscaler to follow",
            ["region"],
            registry=self.registry,
        )
        self._region: dict[str, tuple[Counter, Counter, Counter]] = {}

    def billed(self, row: LedgerRow) -> None:
        # a region's children are looked up once (``labels`` costs a lock and a hash)
        series = self._region.get(row.region)
        if series is None:
            series = self._region[row.region] = (
                self.requests_total.labels(row.region, "ok"),
                self.energy_total.labels(row.region),
                self.carbon_total.labels(row.region),
            )
        series[0].inc()
        series[1].inc(row.kwh_billed)
        series[2].inc(row.carbon_g)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
