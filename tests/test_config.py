"""The YAML config: shipped files validate; bad files are reported with file, line and field."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from regions.config import ConfigError, load_config, parse_config
from router.cli import main
from tests.conftest import ROOT

ENV = {"ELECTRICITYMAPS_API_KEY": "em", "WATTTIME_USERNAME": "u", "WATTTIME_PASSWORD": "p"}
LOCAL = (ROOT / "configs/local.yaml").read_text()


@pytest.mark.parametrize("name", ["local.yaml", "multiregion.yaml", "simulate.yaml"])
def test_shipped_configs_are_valid(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name, env=ENV)
    assert cfg.regions and all(r.replicas for r in cfg.regions)
    assert {r.carbon_source for r in cfg.regions} <= set(cfg.carbon_sources)


def test_local_config_is_the_embedded_default() -> None:
    cfg = load_config(ROOT / "configs/local.yaml", env={})
    assert len(cfg.regions) == 3
    assert len({r.zone for r in cfg.regions}) == 3
    assert all(p.backend.kind == "llama_cpp" for r in cfg.regions for p in r.replicas)
    assert {s.kind for s in cfg.carbon_sources.values()} == {"replay"}
    demo = next(t for t in cfg.tenants if t.name == "demo")
    assert hashlib.sha256(b"sk-local-demo").hexdigest() in demo.api_key_sha256


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, path="configs/x.yaml", env=env or {})
    return info.value.problems


def test_pue_below_one_names_file_line_and_field() -> None:
    text = LOCAL.replace("pue: 1.25", "pue: 0.9")
    line = text.splitlines().index("    pue: 0.9") + 1
    assert errors_of(text) == [f"configs/x.yaml:{line} regions[1].pue: must be >= 1.0, got 0.9"]


def test_unknown_key_is_rejected_with_its_line() -> None:
    text = LOCAL.replace("rtt_ms: 110", "rtt_msec: 110")
    line = text.splitlines().index("    rtt_msec: 110") + 1
    (problem,) = errors_of(text)
    assert problem.startswith(f"configs/x.yaml:{line} regions[2].rtt_msec: unknown key")


def test_every_problem_is_listed() -> None:
    text = LOCAL.replace("pue: 1.25", "pue: 0.9").replace(
        "flat_usd_per_kwh: 0.07", "flat_usd_per_kwh: -1"
    )
    problems = errors_of(text)
    assert len(problems) == 2
    assert any("regions[0].price.flat_usd_per_kwh: must be >= 0.0, got -1" in p for p in problems)


def test_unknown_source_kind_lists_the_allowed_ones() -> None:
    (problem,) = errors_of(LOCAL.replace("kind: replay", "kind: replayy"))
    assert "carbon_sources.replay: unknown kind 'replayy'" in problem
    assert "'electricitymaps'" in problem


def test_undefined_carbon_source_reference() -> None:
    (problem,) = errors_of(
        LOCAL.replace(
            "carbon_source: replay\n    pue: 1.30", "carbon_source: wattime\n    pue: 1.30"
        )
    )
    assert "carbon_source 'wattime' is not defined; defined: replay" in problem


def test_api_key_in_clear_is_refused() -> None:
    text = LOCAL.replace(
        "4ff444b1a79536cc47732956cf5bc6256abf64bc1b8adff6843fac08bbb6be9f", "sk-local-demo"
    )
    (problem,) = errors_of(text)
    assert "tenants[0].api_key_sha256" in problem and "router hash-key" in problem


def test_price_needs_exactly_one_form() -> None:
    (problem,) = errors_of(
        LOCAL.replace(
            "price: {flat_usd_per_kwh: 0.07}", "price: {flat_usd_per_kwh: 0.07, csv: p.csv}"
        )
    )
    assert "regions[0].price: give exactly one of" in problem


def test_env_substitution_and_defaults() -> None:
    text = (ROOT / "configs/multiregion.yaml").read_text()
    cfg = parse_config(text, env={**ENV, "ELECTRICITYMAPS_API_KEY": "secret-em"})
    assert cfg.carbon_sources["electricitymaps"].api_key == "secret-em"  # type: ignore[union-attr]
    backend = cfg.regions[0].replicas[0].backend
    assert backend.kind == "openai" and backend.api_key == ""


def test_missing_env_var_is_named_with_its_line() -> None:
    text = (ROOT / "configs/multiregion.yaml").read_text()
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "${WATTTIME_USERNAME}" in t)
    (problem,) = errors_of(text, env={"ELECTRICITYMAPS_API_KEY": "x", "WATTTIME_PASSWORD": "p"})
    assert problem.startswith(
        f"configs/x.yaml:{line} environment variable WATTTIME_USERNAME is not set"
    )


def test_yaml_syntax_error_has_a_line() -> None:
    (problem,) = errors_of("regions:\n  - name: a\n   zone: [\n")
    assert problem.startswith("configs/x.yaml:") and "not valid YAML" in problem


def test_regions_matching_globs() -> None:
    cfg = load_config(ROOT / "configs/local.yaml", env={})
    assert [r.name for r in cfg.regions_matching(["eu-*"])] == ["eu-north", "eu-central"]
    assert [r.name for r in cfg.regions_matching(["us"])] == ["us-south"]


def test_cli_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "configs/local.yaml")]) == 0
    out = capsys.readouterr().out
    assert "eu-central" in out and "US-TEX-ERCO" in out and "tariff energy" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(LOCAL.replace("pue: 1.25", "pue: 0.9"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:" in err and "regions[1].pue: must be >= 1.0, got 0.9" in err


def test_config_models_do_not_share_names_with_runtime_classes() -> None:
    # a config model named like the class it configures reads as the class itself at call sites
    import inspect

    import regions.backends
    import regions.config
    import regions.meters
    import regions.openai_backend

    def classes(mod: object) -> set[str]:
        return {n for n, c in inspect.getmembers(mod, inspect.isclass)
                if c.__module__ == mod.__name__}  # type: ignore[attr-defined]  # fmt: skip

    runtime = (classes(regions.backends) | classes(regions.openai_backend)
               | classes(regions.meters))  # fmt: skip
    assert classes(regions.config) & runtime == set()


SCALED = LOCAL.replace(
    "    residency: [eu]\n    replicas:\n      - name: eu-north-0",
    "    residency: [eu]\n    scaling: {min_replicas: 1, startup_s: 20}\n"
    "    replicas:\n      - name: eu-north-0",
)


def test_scaling_block_defaults_and_opt_in() -> None:
    cfg = parse_config(SCALED, env={})
    north, central, _ = cfg.regions
    assert north.scaling is not None and central.scaling is None  # no block: always all on
    assert north.scaling.scalable and north.scaling.min_replicas == 1
    assert north.scaling.startup_s == 20 and north.scaling.standby_w_per_gpu is None
    assert cfg.fleet.target_utilization == 0.8 and cfg.fleet.interval_s == 60


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("{startup_s: -5}", "regions[0].scaling.startup_s: must be >= 0.0, got -5"),
        ("{startup_s: .inf}", "regions[0].scaling.startup_s: Input should be a finite number"),
        ("{min_replicas: -1}", "regions[0].scaling.min_replicas: must be >= 0, got -1"),
        ("{capacity_rps: 0}", "regions[0].scaling.capacity_rps: must be > 0.0, got 0"),
        ("{scalable: maybe}", "regions[0].scaling.scalable: Input should be a valid boolean"),
        ("{min_replica: 1}", "regions[0].scaling.min_replica: unknown key"),
        ("{min_replicas: 2}", "regions[0].scaling: min_replicas 2 is more than the region's 1"),
        ("{standby_w_per_gpu: 40}", "regions[0].scaling: standby_w_per_gpu is for GPU replicas"),
    ],
)
def test_invalid_scaling_names_file_line_and_field(block: str, message: str) -> None:
    text = SCALED.replace("scaling: {min_replicas: 1, startup_s: 20}", f"scaling: {block}")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "scaling:" in t)
    (problem,) = errors_of(text)
    assert problem.startswith(f"configs/x.yaml:{line} {message}")


def test_a_scaling_region_serves_one_model() -> None:
    # its replicas are switched on and off by count: they must be interchangeable
    text = SCALED.replace(
        "      - name: eu-north-0\n",
        "      - {name: eu-north-1, backend: {kind: llama_cpp, model: other.gguf}, meter: cpu}\n"
        "      - name: eu-north-0\n",
    )
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "scaling:" in t)
    (problem,) = errors_of(text)
    assert problem.startswith(
        f"configs/x.yaml:{line} regions[0].scaling: a scaling region's replicas must serve one "
        "model, these serve other.gguf, smollm2-135m"
    )


def test_invalid_fleet_settings_are_named() -> None:
    text = LOCAL.replace("ledger: carbon-router.sqlite", "fleet: {target_utilization: 1.5}")
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("fleet:"))
    (problem,) = errors_of(text)
    assert problem == f"configs/x.yaml:{line} fleet.target_utilization: must be <= 1.0, got 1.5"


WATTTIME = "  wt:\n    kind: watttime\n    username: u\n    password: p\n"


def _with_watttime(text: str) -> str:
    return text.replace("carbon_sources:\n", "carbon_sources:\n" + WATTTIME, 1)


def test_bills_use_average_intensity_and_a_marginal_source_is_for_decisions_only() -> None:
    """GHG Protocol Scope 2 (location-based): a bill's intensity is the grid's average. A
    marginal signal (WattTime) may drive decisions, beside it, never instead of it."""
    text = _with_watttime(LOCAL)
    (problem,) = errors_of(text.replace("carbon_source: replay\n    pue: 1.30",
                                        "carbon_source: wt\n    pue: 1.30"))  # fmt: skip
    assert "'us-south'" in problem and "bills use location-based average intensity" in problem
    assert "marginal_source" in problem
    (problem,) = errors_of(text.replace("    pue: 1.30", "    signal: marginal\n    pue: 1.30"))
    assert "regions[2].signal" in problem and "marginal_source" in problem
    ok = text.replace("    pue: 1.30", "    marginal_source: wt\n    marginal_zone: ERCOT_NORTH\n"
                      "    pue: 1.30")  # fmt: skip
    cfg = parse_config(ok, path="configs/x.yaml", env={})
    assert (cfg.regions[2].marginal_source, cfg.regions[2].marginal_zone) == ("wt", "ERCOT_NORTH")
    # decisions on the marginal signal need it in every region: a mix would compare a
    # marginal figure with an average one
    mixed = ok.replace("policy:\n", "policy:\n  decision_signal: marginal\n", 1)
    (problem,) = errors_of(mixed)
    assert "decision_signal marginal" in problem and "eu-north, eu-central" in problem
    (problem,) = errors_of(ok.replace("marginal_source: wt", "marginal_source: replay"))
    assert "marginal_source 'replay' is not a marginal signal" in problem


def test_telemetry_is_off_without_its_block_and_defaults_within_it() -> None:
    assert parse_config(LOCAL, env={}).telemetry is None
    cfg = parse_config(LOCAL + "telemetry: {otlp_endpoint: 'http://collector:4318'}\n", env={})
    assert cfg.telemetry is not None and cfg.telemetry.sample_ratio == 1.0
    assert cfg.telemetry.service_name == "carbon-router"
    assert cfg.telemetry.traces_url() == "http://collector:4318/v1/traces"  # the path added
    full = parse_config(LOCAL + "telemetry: {otlp_endpoint: 'https://c.example/otlp/v1/traces'}\n",
                        env={}).telemetry  # fmt: skip
    assert full is not None and full.traces_url() == "https://c.example/otlp/v1/traces"


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("{}", "telemetry.otlp_endpoint: required field is missing"),
        ("{otlp_endpoint: 'collector:4318'}",
         "telemetry.otlp_endpoint: must be an http:// or https:// URL with a host"),
        ("{otlp_endpoint: 'http://c:4318', sample_ratio: 1.5}",
         "telemetry.sample_ratio: must be <= 1.0, got 1.5"),
        ("{otlp_endpoint: 'http://c:4318', sample_rate: 0.5}",
         "telemetry.sample_rate: unknown key"),
        ("{otlp_endpoint: 'http://c:4318', export_timeout_s: 0}",
         "telemetry.export_timeout_s: must be > 0.0, got 0"),
        ("{otlp_endpoint: 'http://c:4318', headers: {'a b': x}}",
         "telemetry.headers: 'a b' is not an HTTP header name"),
        ("{otlp_endpoint: 'http://c:4318', headers: {key: \"x\\r\\nInjected: 1\"}}",
         "telemetry.headers: must not contain control characters"),
    ],
)  # fmt: skip
def test_invalid_telemetry_names_file_line_and_field(block: str, message: str) -> None:
    text = LOCAL + f"telemetry: {block}\n"
    line = len(text.splitlines())
    (problem,) = errors_of(text)
    assert problem.startswith(f"configs/x.yaml:{line} {message}")


def test_config_messages_are_exact() -> None:
    """An operator reads these word for word: file, line, field, and how to fix it."""
    text = LOCAL.replace("rtt_ms: 110", "rtt_msec: 110")
    line = text.splitlines().index("    rtt_msec: 110") + 1
    assert errors_of(text) == [
        f"configs/x.yaml:{line} regions[2].rtt_msec: unknown key; check the spelling "
        "(see README 'Config reference')"
    ]
    text = LOCAL.replace("kind: replay", "kind: replayy")
    line = text.splitlines().index("  replay:") + 1  # the source the message names
    assert errors_of(text) == [
        f"configs/x.yaml:{line} carbon_sources.replay: unknown kind 'replayy'; allowed: "
        "'file', 'replay', 'electricitymaps', 'watttime', 'ukci'"
    ]
    text = LOCAL.replace(
        "price: {flat_usd_per_kwh: 0.07}", "price: {flat_usd_per_kwh: 0.07, csv: p.csv}"
    )
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "csv: p.csv" in t)
    assert errors_of(text) == [
        f"configs/x.yaml:{line} regions[0].price: give exactly one of flat_usd_per_kwh, "
        "time_of_use or csv (got flat_usd_per_kwh, csv)"
    ]
    text = LOCAL.replace(
        "4ff444b1a79536cc47732956cf5bc6256abf64bc1b8adff6843fac08bbb6be9f", "sk-local-demo"
    )
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "[sk-local-demo]" in t)
    assert errors_of(text) == [
        f"configs/x.yaml:{line} tenants[0].api_key_sha256: must be sha256 hex digests (64 "
        "lowercase hex chars), never a key in clear; make one with: "
        'printf %s "$KEY" | router hash-key'
    ]


def test_a_bad_reference_is_reported_at_its_own_line() -> None:
    # it was reported at the file's first mapping line as "(top level)"
    text = LOCAL.replace(
        "carbon_source: replay\n    pue: 1.30", "carbon_source: wattime\n    pue: 1.30"
    )
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "carbon_source: wattime" in t)
    assert errors_of(text) == [
        f"configs/x.yaml:{line} regions[2].carbon_source: region 'us-south': carbon_source "
        "'wattime' is not defined; defined: replay"
    ]
