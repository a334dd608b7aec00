"""The YAML region / pricing / tenant config, validated with pydantic v2 when it is loaded.

``load_config(path)`` reads YAML, substitutes ``${ENV_VAR}`` (and ``${ENV_VAR:-default}``) in
strings, validates, and on failure raises :class:`ConfigError` whose message lists every problem
as ``file:line field: message`` with a hint, e.g.
``configs/x.yaml:14 regions[1].pue: must be >= 1.0, got 0.9``.

Unknown keys are rejected everywhere. API keys are stored as sha256 hex digests, never in clear.
"""

from __future__ import annotations

import fnmatch
import os
import re
from datetime import time as dtime
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from carbonrouter.errors import CarbonRouterError
from regions.calibration import PREFILL_WEIGHT


class RegionsError(CarbonRouterError):
    """Root of the errors raised by :mod:`regions`."""


class ConfigError(RegionsError):
    """The config file is missing, not YAML, or invalid. ``problems`` holds one line per error."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__("invalid config:\n  " + "\n  ".join(problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _header_safe(value: str | None) -> str | None:
    """A secret that goes into an HTTP header: control characters (CR/LF above all, from an
    ``${ENV}`` value) would let it add headers of its own."""
    if value is not None and any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters (CR, LF, ...): check its value")
    return value


# ---- carbon sources -------------------------------------------------------------------------


class FileCarbon(_Strict):
    """Historical files answered as of the clock (the simulator's source)."""

    kind: Literal["file"]
    path: str | None = Field(None, description="file with {zone} placeholder, or a dataset")
    dataset: str | None = None
    emission_factor: Literal["lifecycle", "direct"] = "lifecycle"
    unit: Literal["g_per_kwh", "lbs_per_mwh"] = "g_per_kwh"

    @model_validator(mode="after")
    def _one_of(self) -> FileCarbon:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' (a file with {zone}) or 'dataset'")
        return self


class ReplayCarbon(FileCarbon):
    """A historical file played back at the current time (same time of year)."""

    kind: Literal["replay"]  # type: ignore[assignment]


class ProviderForecast(_Strict):
    """How a remote source's forecasts are served (README 'Provider forecasts')."""

    ensemble: bool = Field(
        False,
        description="forecast with the ensemble of the learned model, seasonal naive (24 h, "
        "168 h) and the provider's forecast, weighted by recent error; false: the provider's "
        "forecast as it comes",
    )
    record: bool = Field(
        True, description="keep each forecast fetched (beside the ledger) to score it later"
    )
    history_days: int = Field(
        60, ge=7, le=365, description="days of actuals the ensemble is fitted on"
    )
    window_days: int = Field(
        28, ge=7, le=56, description="trailing days each member's error is measured on"
    )
    retention_days: int = Field(
        60, ge=7, le=730, description="days of recorded forecasts and actuals kept"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ProviderForecast:
        if not self.ensemble:
            return self
        if not self.record:
            raise ValueError(
                "ensemble: true weighs the provider by its recorded forecasts; set record: true"
            )
        need = self.window_days + 17  # the learned member's 15 days of training + a 48 h horizon
        if self.history_days < need:
            raise ValueError(
                f"history_days {self.history_days} is too short for window_days "
                f"{self.window_days}: give at least window_days + 17 = {need}"
            )
        if self.retention_days < self.history_days:
            raise ValueError(
                f"retention_days {self.retention_days} < history_days {self.history_days}: the "
                "stored actuals would not cover the history; raise retention_days"
            )
        return self


class ElectricityMapsCarbon(_Strict):
    kind: Literal["electricitymaps"]
    api_key: str = Field(min_length=1)
    base_url: str = "https://api.electricitymap.org/v3"

    _safe_key = field_validator("api_key")(_header_safe)
    emission_factor: Literal["lifecycle", "direct"] = "lifecycle"
    timeout_s: float = Field(10.0, gt=0)
    cache_ttl_s: float = Field(300.0, ge=0)
    forecast: ProviderForecast = ProviderForecast()


class WattTimeCarbon(_Strict):
    kind: Literal["watttime"]
    username: str = Field(min_length=1)
    password: str = Field(min_length=1)
    base_url: str = "https://api.watttime.org"

    _safe_login = field_validator("username", "password")(_header_safe)
    timeout_s: float = Field(10.0, gt=0)
    cache_ttl_s: float = Field(300.0, ge=0)
    forecast: ProviderForecast = ProviderForecast()


class UKCarbon(_Strict):
    kind: Literal["ukci"]
    base_url: str = "https://api.carbonintensity.org.uk"
    timeout_s: float = Field(10.0, gt=0)
    cache_ttl_s: float = Field(300.0, ge=0)
    forecast: ProviderForecast = ProviderForecast()


CarbonSourceConfig = Annotated[
    FileCarbon | ReplayCarbon | ElectricityMapsCarbon | WattTimeCarbon | UKCarbon,
    Field(discriminator="kind"),
]


# ---- prices -----------------------------------------------------------------------------------


class TouPeriod(_Strict):
    start: dtime = Field(description="local start time, HH:MM")
    usd_per_kwh: float = Field(ge=0)
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] | None = None


class Price(_Strict):
    """Electricity price: a flat rate, a time-of-use schedule, or a CSV (time,usd_per_kwh)."""

    flat_usd_per_kwh: float | None = Field(None, ge=0)
    time_of_use: list[TouPeriod] | None = None
    timezone: str = "UTC"
    csv: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Price:
        given = [
            n
            for n, v in (
                ("flat_usd_per_kwh", self.flat_usd_per_kwh),
                ("time_of_use", self.time_of_use),
                ("csv", self.csv),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of flat_usd_per_kwh, time_of_use or csv"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.time_of_use is not None and not self.time_of_use:
            raise ValueError("time_of_use needs at least one period")
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(self.timezone)
        except Exception as e:
            raise ValueError(f"unknown timezone {self.timezone!r} (use an IANA name)") from e
        return self


# ---- replicas and regions --------------------------------------------------------------------


class LlamaCppBackendConfig(_Strict):
    kind: Literal["llama_cpp"]
    model: str = Field("smollm2-135m", description="'smollm2-135m' or a path to a GGUF file")
    n_threads: int = Field(2, ge=1)
    n_ctx: int = Field(2048, ge=128)


class OpenAIBackendConfig(_Strict):
    kind: Literal["openai"]
    url: str = Field(pattern=r"^https?://")
    model: str
    api_key: str | None = None
    timeout_s: float = Field(60.0, gt=0)
    stream_usage: bool = Field(
        True,
        description="ask streams for the server's token counts (stream_options.include_usage, "
        "which OpenAI, vLLM and llama.cpp server support) and bill those; false for a server "
        "that refuses stream_options: its streams are billed by estimate (4 chars a prompt "
        "token, one token a chunk)",
    )
    metrics_url: str | None = Field(
        None,
        pattern=r"^https?://",
        description="the server's Prometheus metrics, read for its load (running batch and "
        "queue: vLLM, llama.cpp server, TGI, SGLang); default: /metrics at the root of url",
    )

    _safe_key = field_validator("api_key")(_header_safe)


BackendConfig = Annotated[LlamaCppBackendConfig | OpenAIBackendConfig, Field(discriminator="kind")]


class Gpu(_Strict):
    type: str = Field(description="e.g. H100, A100-40GB, cpu")
    count: int = Field(1, ge=1)


class Replica(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    backend: BackendConfig
    gpu: Gpu = Gpu(type="cpu", count=1)
    embodied_kg: float | None = Field(
        None, ge=0, allow_inf_nan=False,
        description="kg CO2e to make the hardware this replica holds; default from the "
        "audit.embodied figures: its GPUs and their share of a server (a CPU replica: one "
        "GPU's share of a server)",
    )  # fmt: skip
    meter: Literal["nvml", "rapl", "cpu"] = "cpu"
    gpu_indices: list[int] | None = None
    cpu_watts_per_core: float = Field(15.0, gt=0)
    max_concurrency: int = Field(8, ge=1, le=65_536)
    tokens_per_s: float = Field(100.0, gt=0, description="decode capacity, for the simulator")
    model_params_b: float | None = Field(
        None, gt=0, description="model size in billions, for the energy predictor's GPU prior"
    )
    prefill_weight: float = Field(
        PREFILL_WEIGHT, ge=0, description="energy of a prompt token relative to an output token"
    )
    static_power_w_per_gpu: float | None = Field(
        None,
        gt=0,
        description="watts one GPU draws while the replica is up and serves nothing, for the "
        "replica model; default per GPU type (forecasting.energy.GPUS)",
    )
    count: int = Field(
        1, ge=1, le=10_000, description="identical replicas this entry stands for (simulator)"
    )
    max_num_batched_tokens: int = Field(
        8192, ge=64, description="the engine's tokens per step (chunked prefill), simulator"
    )

    @model_validator(mode="after")
    def _static_power_is_for_gpus(self) -> Replica:
        if self.static_power_w_per_gpu is not None and self.gpu.type == "cpu":
            raise ValueError(
                "static_power_w_per_gpu is for GPU replicas and this one has gpu.type cpu: "
                "remove it (a CPU replica's idle power is its meter's, from cpu_watts_per_core)"
            )
        return self


class Scaling(_Strict):
    """Carbon-aware fleet scaling of a region's replicas (README 'Fleet scaling'). A region
    without this block keeps all its replicas on. Its listed replicas are switched off from the
    last one down and on from the first one up."""

    scalable: bool = Field(
        True, description="false: the replicas stay on (their count is still published)"
    )
    min_replicas: int = Field(1, ge=0, description="never fewer on (residency, warm capacity)")
    startup_s: float = Field(
        300.0,
        ge=0,
        le=86400,
        allow_inf_nan=False,
        description="switch-on to serving (engine start and model load); a stated default, "
        "measure yours (a 70B model from local NVMe takes minutes, SmolLM2 seconds)",
    )
    standby_w_per_gpu: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="watts one GPU of a switched-off replica still draws; default per GPU type "
        "(forecasting.energy.GPUS standby_w); 0 where the node is powered down",
    )
    capacity_rps: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="requests/s one replica serves within its SLO at 100 % of the target "
        "utilization; default from the replica model: a 512-token prefill and 129 output "
        "tokens (the Azure conversation trace's median) decoded at its batch limit, an upper "
        "bound; router simulate's fleet.csv gives the capacity at the SLOs",
    )


class Region(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    zone: str = Field(min_length=1, description="grid zone id, e.g. DE, US-CAL-CISO")
    carbon_source: str = Field(
        description="the source bills use: an average signal (GHG Protocol Scope 2, location-based)"
    )
    signal: Literal["average", "marginal"] = Field(
        "average",
        description="the billing source's signal: average only; a marginal signal is a "
        "marginal_source",
    )
    marginal_source: str | None = Field(
        None,
        description="a marginal signal (WattTime) for routing decisions when "
        "policy.decision_signal is marginal; recorded on receipts beside the billed average",
    )
    marginal_zone: str | None = Field(
        None, min_length=1, description="the marginal source's zone id (default: zone)"
    )
    pue: float = Field(1.2, ge=1.0, le=3.0)
    price: Price
    rtt_ms: float = Field(0.0, ge=0)
    residency: list[str] = Field(default_factory=list)
    replicas: list[Replica] = Field(default_factory=list)
    scaling: Scaling | None = None

    @field_validator("signal")
    @classmethod
    def _bills_are_average(cls, v: str) -> str:
        if v != "average":
            raise ValueError(
                "bills use location-based average intensity (GHG Protocol Scope 2); give a "
                "marginal signal as marginal_source (it may drive decisions, never bills)"
            )
        return v

    @field_validator("scaling")
    @classmethod
    def _scaling_fits(cls, v: Scaling | None, info: ValidationInfo) -> Scaling | None:
        replicas = info.data.get("replicas")
        if v is None or replicas is None:
            return v
        if v.min_replicas > len(replicas):
            raise ValueError(
                f"min_replicas {v.min_replicas} is more than the region's {len(replicas)} "
                "replicas: lower it or list more replicas"
            )
        models = sorted({r.backend.model for r in replicas})
        if len(models) > 1:
            raise ValueError(
                f"a scaling region's replicas must serve one model, these serve "
                f"{', '.join(models)}: they are switched on and off by count, so split the "
                "region or remove its scaling block"
            )
        if v.standby_w_per_gpu is not None and all(r.gpu.type == "cpu" for r in replicas):
            raise ValueError(
                "standby_w_per_gpu is for GPU replicas and this region's are gpu.type cpu: "
                "remove it (a stopped CPU replica draws nothing of its own)"
            )
        return v


# ---- tenants, billing, policy ----------------------------------------------------------------


class Budget(_Strict):
    period: Literal["day", "month"] = "month"
    kwh: float | None = Field(None, gt=0)
    co2_g: float | None = Field(None, gt=0)
    usd: float | None = Field(None, gt=0)


SHA256_HEX = r"^[0-9a-f]{64}$"


class Tenant(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    api_key_sha256: list[str] = Field(min_length=1)
    budget: Budget | None = None
    admin: bool = False

    @field_validator("api_key_sha256")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        for h in v:
            if not re.fullmatch(SHA256_HEX, h):
                raise ValueError(
                    "must be sha256 hex digests (64 lowercase hex chars), never a key in clear; "
                    'make one with: printf %s "$KEY" | router hash-key'
                )
        return v


class Billing(_Strict):
    tariff: Literal["energy", "hybrid", "token"] = "energy"
    markup: float = Field(0.0, ge=0)
    min_charge_usd: float = Field(0.0, ge=0)
    token_price_usd_per_1k: float = Field(0.002, ge=0, description="token tariff, for comparison")
    hybrid_token_fee_usd_per_1k: float = Field(0.0005, ge=0)
    carbon_price_usd_per_tco2e: float = Field(0.0, ge=0)
    currency: Literal["USD"] = "USD"


class PolicyDefaults(_Strict):
    name: Literal["price_carbon", "cheapest", "greenest", "round_robin", "nearest"] = "price_carbon"
    weight: float = Field(0.5, ge=0.0, le=1.0)
    max_latency_ms: float | None = Field(
        None, gt=0, description="first-token budget (ms) for requests whose header sets none"
    )
    tie_tolerance: float = Field(0.05, ge=0, le=1)
    decision_signal: Literal["average", "marginal"] = Field(
        "average",
        description="the intensity routing and deferral compare: the grid's average, or a "
        "marginal signal (every region then needs a marginal_source); bills use the average "
        "either way",
    )
    max_defer_s: float = Field(86400.0, ge=0)
    defer_min_gain: float = Field(0.05, ge=0, lt=1)
    defer_quantile: float = Field(
        0.9,
        ge=0.5,
        lt=1,
        description="a deferrable request waits only when the gain holds at this quantile of "
        "the forecast (0.9: its 90 % bound; 0.5: the point forecast, as if it were certain)",
    )
    forecast_refit_s: float = Field(
        600.0,
        ge=10,
        allow_inf_nan=False,
        description="how often each region's carbon forecast (and its recent error) is "
        "refreshed in the background; a forecast is refitted at most once per hour",
    )
    cooldown_s: float = Field(
        30.0, ge=0, description="how long a replica that failed (5xx, timeout, dead) is skipped"
    )
    load_report_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="how often replicas' load (running batch, queue) is read (twice per "
        "interval); a report older than this is not used: routing falls back to the "
        "ingress's own count, marked estimated",
    )


class Simulation(_Strict):
    """``router simulate`` settings (see README 'Simulator')."""

    trace: str | list[str] = Field(
        "azure_conv",
        description="azure_conv | azure_code | synthetic | a .jsonl, or a list of the Azure "
        "traces (their hours pooled, each at its own rate)",
    )
    start: str = "2024-01-01"
    end: str = "2025-01-01"
    requests_per_hour: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="mean arrivals per hour; or set mean_utilization",
    )
    mean_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="mean arrivals as this share of the fleet's capacity at its SLOs (instead "
        "of requests_per_hour)",
    )
    diurnal_amplitude: float = Field(0.35, ge=0, lt=1)
    deferrable_share: float = Field(0.3, ge=0, le=1)
    defer_window_h: int = Field(12, ge=1, le=48)
    defer_min_gain: float = Field(
        0.02, ge=0, lt=1, description="defer only when a later slot scores this much better"
    )
    defer_quantile: float = Field(
        0.9,
        ge=0.5,
        lt=1,
        description="defer only when the gain holds at this quantile of the forecast (0.5: "
        "the point forecast)",
    )
    defer_replan: bool = Field(
        True,
        description="requests whose hour comes dirtier than their arrival are planned again "
        "on the forecast issued then (the live job runner's rule); false: planned once",
    )
    slo_ttft_ms: float = Field(
        10_000.0,
        gt=0,
        allow_inf_nan=False,
        validation_alias=AliasChoices("slo_ttft_ms", "slo_ms"),
        description="time to first token at the client (RTT + queue + prefill)",
    )
    slo_tpot_ms: float = Field(
        1_000.0, gt=0, allow_inf_nan=False, description="time per output token after the first"
    )
    slo_attainment: float = Field(
        0.99, gt=0, lt=1, description="share of requests that must meet both SLOs at capacity"
    )
    target_utilization: float = Field(0.8, gt=0, le=1)
    policies: list[str] = Field(
        min_length=1,
        default_factory=lambda: [
            "power_of_two",
            "nearest",
            "cheapest",
            "greenest",
            "price_carbon",
            "price_carbon+defer",
            "greenest+defer",
            "cleanest_hour",
            "oracle",
        ],
    )
    seed: int = 0

    @field_validator("start", "end")
    @classmethod
    def _a_date(cls, v: str) -> str:
        import pandas as pd

        try:
            t = pd.Timestamp(v)
        except (ValueError, TypeError) as e:
            raise ValueError(f"not a date ({e}); write it as 2024-01-01") from None
        if pd.isna(t):
            raise ValueError("not a date; write it as 2024-01-01")
        return v

    @model_validator(mode="after")
    def _one_rate(self) -> Simulation:
        if self.requests_per_hour is not None and self.mean_utilization is not None:
            raise ValueError("set requests_per_hour or mean_utilization, not both")
        return self


class FleetScaling(_Strict):
    """The fleet scaler (README 'Fleet scaling'); regions opt in with a ``scaling`` block."""

    target_utilization: float = Field(
        0.8, gt=0, le=1, description="share of a replica's capacity_rps the scaler plans to use"
    )
    interval_s: float = Field(60.0, ge=5, le=3600, description="how often it decides")


# Embodied (manufacturing) carbon defaults, from Luccioni, Viguier and Ligozat, "Estimating the
# Carbon Footprint of BLOOM, a 176B Parameter Language Model", JMLR 24 (2023): 150 kg CO2e per
# A100 GPU, 2,500 kg per 8-GPU server (an HPE Apollo 6500 LCA), six years of use at 85 %
# utilization. Newer figures differ (Chien et al., HotCarbon 2023, put a whole A100 instance at
# 318 kg per GPU); set your hardware's own.
class Embodied(_Strict):
    """Manufacturing carbon, amortized over a replica's useful life and charged to each request
    by the replica time it held; shown apart from operational carbon, never added to it."""

    gpu_kg: float = Field(150.0, ge=0, allow_inf_nan=False, description="kg CO2e per GPU")
    server_kg: float = Field(
        2500.0, ge=0, allow_inf_nan=False,
        description="kg CO2e per server (chassis, CPUs, memory, storage) without its GPUs",
    )  # fmt: skip
    gpus_per_server: int = Field(8, ge=1, le=64)
    lifetime_years: float = Field(6.0, gt=0, le=30, allow_inf_nan=False)
    utilization: float = Field(
        0.85, gt=0, le=1,
        description="share of its life the hardware is busy: the time requests pay for",
    )  # fmt: skip


class Audit(_Strict):
    """Receipts: the signing key of the ledger's chain heads, and how often they are signed."""

    signing_key: str | None = Field(
        None,
        description="Ed25519 private key (PEM, PKCS#8), relative to the config's folder; "
        "default: the ledger's path + '.key', made on first start",
    )
    sign_every_s: float = Field(3600.0, ge=60, le=86_400, allow_inf_nan=False)
    embodied: Embodied = Embodied()


MARGINAL_KINDS = ("watttime",)  # carbon sources whose signal is marginal


class Telemetry(_Strict):
    """OpenTelemetry traces of the completion requests (README 'Traces and metrics'); off
    without this block. Read when the router starts: a reload does not change it."""

    otlp_endpoint: str = Field(
        description="the collector's OTLP/HTTP URL, e.g. http://collector:4318 (the traces path "
        "/v1/traces is added when the URL has no path) or a full .../v1/traces URL",
    )
    service_name: str = Field("carbon-router", min_length=1)
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="share of requests traced; a client's flag never forces it"
    )
    export_timeout_s: float = Field(
        5.0, gt=0, le=60, allow_inf_nan=False, description="each export to the collector"
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description="sent with each export, e.g. the collector's API key"
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _an_http_url(cls, v: str) -> str:
        parts = urlsplit(v)
        try:
            parts.port  # noqa: B018  # a port that is no number raises
        except ValueError:
            parts = urlsplit("")
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ValueError(
                f"must be an http:// or https:// URL with a host, e.g. http://collector:4318, "
                f"got {v!r}"
            )
        return v

    @field_validator("headers")
    @classmethod
    def _safe_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", name):
                raise ValueError(f"{name!r} is not an HTTP header name")
            _header_safe(value)
        return v

    def traces_url(self) -> str:
        """The endpoint with the traces path added when it has none."""
        url = self.otlp_endpoint.rstrip("/")
        return url if urlsplit(url).path else url + "/v1/traces"


class _At(ValueError):
    """A problem found across fields, reported at the line of the field it is about."""

    def __init__(self, loc: tuple[int | str, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


class Config(_Strict):
    carbon_sources: dict[str, CarbonSourceConfig]
    regions: list[Region] = Field(min_length=1)
    tenants: list[Tenant] = Field(default_factory=list)
    billing: Billing = Billing()
    policy: PolicyDefaults = PolicyDefaults()
    ledger: str = "carbon-router.sqlite"
    simulation: Simulation = Simulation()
    fleet: FleetScaling = FleetScaling()
    audit: Audit = Audit()
    telemetry: Telemetry | None = None

    @model_validator(mode="after")
    def _cross_refs(self) -> Config:
        names = [r.name for r in self.regions]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate region names: {', '.join(sorted(dup))}")
        replicas = [p.name for r in self.regions for p in r.replicas]
        dup = {n for n in replicas if replicas.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate replica names: {', '.join(sorted(dup))}")
        for i, r in enumerate(self.regions):
            for field_name in ("carbon_source", "marginal_source"):
                name = getattr(r, field_name)
                if name is not None and name not in self.carbon_sources:
                    raise _At(
                        ("regions", i, field_name),
                        f"region {r.name!r}: {field_name} {name!r} is not defined; "
                        f"defined: {', '.join(sorted(self.carbon_sources)) or 'none'}",
                    )
            if self.carbon_sources[r.carbon_source].kind in MARGINAL_KINDS:
                raise _At(
                    ("regions", i, "carbon_source"),
                    f"region {r.name!r}: carbon_source {r.carbon_source!r} is a marginal "
                    "signal, and bills use location-based average intensity (GHG Protocol "
                    "Scope 2): bill on an average source (Electricity Maps, UK CI, a file) and "
                    f"give {r.carbon_source!r} as marginal_source for decisions",
                )
            if r.marginal_source is not None and (
                self.carbon_sources[r.marginal_source].kind not in MARGINAL_KINDS
            ):
                raise _At(
                    ("regions", i, "marginal_source"),
                    f"region {r.name!r}: marginal_source {r.marginal_source!r} is not a marginal "
                    f"signal (those are: {', '.join(MARGINAL_KINDS)}); bills already use "
                    "carbon_source's average",
                )
        if self.policy.decision_signal == "marginal":
            lacking = [r.name for r in self.regions if r.marginal_source is None]
            if lacking:
                raise ValueError(
                    f"policy.decision_signal marginal needs a marginal_source in every region, "
                    f"these have none: {', '.join(lacking)} (comparing a marginal figure with "
                    "an average one would mix the two signals)"
                )
        hashes = [h for t in self.tenants for h in t.api_key_sha256]
        if len(hashes) != len(set(hashes)):
            raise ValueError("the same API key hash is given to two tenants")
        return self

    def regions_matching(self, patterns: list[str]) -> list[Region]:
        """Regions whose name or residency tag matches any glob pattern."""
        return [
            r
            for r in self.regions
            if any(fnmatch.fnmatchcase(n, p) for p in patterns for n in (r.name, *r.residency))
        ]


# ---- loading ----------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _EnvError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _Loader(yaml.SafeLoader):
    """SafeLoader that substitutes ``${VAR}`` / ``${VAR:-default}`` inside string scalars."""

    def __init__(self, stream: Any, env: dict[str, str]) -> None:
        super().__init__(stream)
        self.env = env


def _construct_str(loader: _Loader, node: yaml.ScalarNode) -> str:
    value = str(loader.construct_scalar(node))

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in loader.env:
            return loader.env[name]
        if default is not None:
            return default
        raise _EnvError(
            node.start_mark.line + 1,
            f"environment variable {name} is not set; export it or write ${{{name}:-default}}",
        )

    return _ENV.sub(sub, value)


_Loader.add_constructor("tag:yaml.org,2002:str", _construct_str)


def _resolve(
    root: yaml.Node | None, loc: tuple[int | str, ...]
) -> tuple[int | None, tuple[int | str, ...]]:
    """Walk the YAML tree along a pydantic location.

    Returns the 1-based line of the deepest node found and the location without the parts
    pydantic adds for tagged unions (the ``kind`` value) and validators (``function-...``).
    """
    node = root
    line = root.start_mark.line + 1 if root is not None else None
    clean: list[int | str] = []
    for part in loc:
        if isinstance(part, str) and part.startswith("function-"):
            continue
        if isinstance(node, yaml.MappingNode):
            children = {k.value: (k, v) for k, v in node.value}
            if part in children:
                key, node = children[part]
                line = key.start_mark.line + 1
            elif "kind" in children and children["kind"][1].value == part:
                continue  # the discriminator pydantic inserted
            else:
                node = None
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                node = None
        else:
            node = None
        clean.append(part)
    return line, tuple(clean)


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_MESSAGES = {
    "extra_forbidden": "unknown key; check the spelling (see README 'Config reference')",
    "missing": "required field is missing",
}


def _describe(err: Any) -> str:
    kind, msg = err["type"], err["msg"]
    if kind in _MESSAGES:
        return _MESSAGES[kind]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        op = {
            "greater_than_equal": ">=",
            "less_than_equal": "<=",
            "greater_than": ">",
            "less_than": "<",
        }[kind]
        bound = next(iter(ctx.values()))
        return f"must be {op} {bound}, got {got}"
    if kind == "union_tag_invalid":
        return f"unknown kind {ctx.get('tag')!r}; allowed: {ctx.get('expected_tags')}"
    if kind == "literal_error":
        return f"{msg}, got {got!r}"
    return str(msg).removeprefix("Value error, ")


def parse_config(text: str, *, path: str = "<string>", env: dict[str, str] | None = None) -> Config:
    """Parse and validate config text; ``path`` is used only in error messages."""
    env = dict(os.environ) if env is None else env
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        loader = _Loader(text, env)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except _EnvError as e:
        raise ConfigError(path, [f"{path}:{e.line} {e}"]) from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(path, [f"{path}{at} not valid YAML: {e}"]) from e
    if not isinstance(data, dict):
        raise ConfigError(path, [f"{path}:1 the config must be a mapping with 'regions' etc."])
    # top-level keys starting x- hold YAML anchors to reuse (as in Compose files)
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            cause = (err.get("ctx") or {}).get("error")
            line, loc = _resolve(
                root, tuple(err["loc"]) + (cause.loc if isinstance(cause, _At) else ())
            )
            where = f"{path}:{line}" if line is not None else path
            problems.append(f"{where} {_field(loc)}: {_describe(err)}")
        raise ConfigError(path, problems) from e


def load_config(path: str | Path, *, env: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(p), [f"{p}: cannot read the config: {e.strerror}"]) from e
    return parse_config(text, path=str(p), env=env)
