"""The request path's Prometheus metrics. Labels stay bounded: region, policy, binding and
status come from the config and the code, never a tenant, a key or a request id.

- ``router_requests_total{region,status}``: billed requests (``ok``, by the region that served
  them) and refused ones (the HTTP status, region ``none``: refused before one was chosen, or
  by the replica's server);
- ``router_decisions_total{region,policy,binding}``: the replicas the policy sent requests to
  (a failover is a decision of its own), by the constraint that decided (``score``, ``batch``,
  ``latency``, ``tpot``; ``planned``: a deferred job on the replica of its plan);
- ``router_energy_kwh_total``, ``router_carbon_g_total``, ``router_cost_usd_total{region}``: the
  bills' figures;
- ``router_carbon_avoided_g_total{region}`` and ``router_carbon_added_g_total{region}``: a
  bill's carbon avoided against its counterfactual (the receipt's ``avoided_g``), the positive
  part in the first, the negative part (more carbon than the counterfactual) as a positive
  number in the second: counters only go up. Net avoided = avoided - added;
- ``router_carbon_intensity_g_per_kwh{region}``, ``router_price_usd_per_kwh{region}``: what the
  router knows now, read when Prometheus scrapes (the carbon view's last value; no fetch), so
  the request path pays nothing for them. A region with no value has no sample, never a 0;
- ``router_forecast_mape_percent{region}``, ``router_forecast_coverage_80_percent{region}``
  and ``router_forecast_age_seconds{region}``: the deferral forecast's recent error (as of its
  last background refit; no sample for a source whose past forecasts are not kept) and age;
- ``router_request_seconds``, ``router_desired_replicas{region}``, and
  ``router_trace_spans_dropped_total`` (spans the tracer could not queue for export).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router.ledger import LedgerRow


class RegionFigures(NamedTuple):
    """A region's intensity and price as the router knows them now (None: unknown)."""

    region: str
    intensity_g_per_kwh: float | None
    price_usd_per_kwh: float | None
    forecast_mape: float | None = None  # percent, over the last days' forecasts
    forecast_coverage_80: float | None = None  # percent of actuals inside q10..q90
    forecast_age_s: float | None = None  # since the forecast deferral uses was made


class Metrics:
    def __init__(
        self,
        regions: Callable[[], Iterable[RegionFigures]] | None = None,
        spans_dropped: Callable[[], int] | None = None,
    ) -> None:
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
        self.cost_total = Counter(
            "router_cost_usd_total", "billed USD", ["region"], registry=self.registry
        )
        self.avoided_total = Counter(
            "router_carbon_avoided_g_total",
            "g CO2e the bills avoided against their counterfactual (positive parts)",
            ["region"],
            registry=self.registry,
        )
        self.added_total = Counter(
            "router_carbon_added_g_total",
            "g CO2e the bills emitted over their counterfactual (negative avoided, as positive)",
            ["region"],
            registry=self.registry,
        )
        self.decisions_total = Counter(
            "router_decisions_total",
            "requests sent to a replica, by the constraint that decided",
            ["region", "policy", "binding"],
            registry=self.registry,
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
        self.registry.register(_ReadAtScrape(regions, spans_dropped))
        # a series' child is looked up once (``labels`` costs a lock and a hash)
        self._region: dict[str, tuple[Counter, ...]] = {}
        self._decided: dict[tuple[str, str, str], Counter] = {}
        self._refused: dict[int, Counter] = {}

    def billed(self, row: LedgerRow) -> None:
        series = self._region.get(row.region)
        if series is None:
            series = self._region[row.region] = (
                self.requests_total.labels(row.region, "ok"),
                self.energy_total.labels(row.region),
                self.carbon_total.labels(row.region),
                self.cost_total.labels(row.region),
                self.avoided_total.labels(row.region),
                self.added_total.labels(row.region),
            )
        series[0].inc()
        series[1].inc(row.kwh_billed)
        series[2].inc(row.carbon_g)
        series[3].inc(row.cost_usd)
        avoided = getattr(row, "avoided_g", None)  # before the receipts: none
        if avoided is None or not math.isfinite(avoided):
            return
        if avoided > 0:
            series[4].inc(avoided)
        elif avoided < 0:
            series[5].inc(-avoided)

    def decided(self, region: str, policy: str, binding: str) -> None:
        key = (region, policy, binding)
        child = self._decided.get(key)
        if child is None:
            child = self._decided[key] = self.decisions_total.labels(*key)
        child.inc()

    def refused(self, status: int) -> None:
        """A request answered with an error (HTTP ``status``)."""
        child = self._refused.get(status)
        if child is None:
            child = self._refused[status] = self.requests_total.labels("none", str(status))
        child.inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _ReadAtScrape(Collector):
    """The figures read when Prometheus scrapes, not kept up to date by the request path."""

    def __init__(
        self,
        regions: Callable[[], Iterable[RegionFigures]] | None,
        spans_dropped: Callable[[], int] | None,
    ) -> None:
        self._regions = regions
        self._spans_dropped = spans_dropped

    def collect(self) -> Iterator[Metric]:
        intensity = GaugeMetricFamily(
            "router_carbon_intensity_g_per_kwh",
            "the grid's carbon intensity in the region as the router knows it now",
            labels=["region"],
        )
        price = GaugeMetricFamily(
            "router_price_usd_per_kwh", "the region's electricity price now", labels=["region"]
        )
        mape = GaugeMetricFamily(
            "router_forecast_mape_percent",
            "mean absolute percentage error of the region's carbon forecasts over the last 7 "
            "days (1-24 h ahead, issued hourly), as of its last refit",
            labels=["region"],
        )
        coverage = GaugeMetricFamily(
            "router_forecast_coverage_80_percent",
            "share of the last 7 days' actuals inside the forecast's 80 % interval (q10..q90); "
            "calibrated near 80",
            labels=["region"],
        )
        age = GaugeMetricFamily(
            "router_forecast_age_seconds",
            "since the forecast deferral plans with was made",
            labels=["region"],
        )
        for f in self._regions() if self._regions is not None else ():
            if f.intensity_g_per_kwh is not None:
                intensity.add_metric([f.region], f.intensity_g_per_kwh)
            if f.price_usd_per_kwh is not None:
                price.add_metric([f.region], f.price_usd_per_kwh)
            if f.forecast_mape is not None:
                mape.add_metric([f.region], f.forecast_mape)
            if f.forecast_coverage_80 is not None:
                coverage.add_metric([f.region], f.forecast_coverage_80)
            if f.forecast_age_s is not None:
                age.add_metric([f.region], f.forecast_age_s)
        dropped = CounterMetricFamily(
            "router_trace_spans_dropped",
            "request spans dropped because the trace export was behind",
            value=self._spans_dropped() if self._spans_dropped is not None else 0,
        )
        return iter((intensity, price, mape, coverage, age, dropped))

    def describe(self) -> Iterator[Metric]:
        return iter(())
