"""The commands on a user's machine: no data folder (``CARBON_ROUTER_DATA`` unset), an empty
cache, and the pinned files served by a local HTTP mirror (``CARBON_ROUTER_DATA_URL``) that
stands in for the public repositories. Each command runs as its own process, as a user runs it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from forecasting.datasets import registry
from regions.config import parse_config
from router.prefetch import MissingInputError, needs, prefetch
from tests.conftest import DATA, ROOT


class Mirror(BaseHTTPRequestHandler):
    """Serves ``/<repo>/<commit>/<path>`` of every registered file from the data folder."""

    files: dict[str, Path] = {}
    served: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        path = self.files.get(self.path)
        if path is None:
            self.send_response(404)
            self.end_headers()
            return
        body = path.read_bytes()
        self.served.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture(scope="module")
def mirror() -> Iterator[tuple[str, list[str]]]:
    files = {f"/{e.repo}/{e.commit}/{e.path}": DATA / name for name, e in registry().items()}
    served: list[str] = []
    handler = type("M", (Mirror,), {"files": files, "served": served})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served
    httpd.shutdown()
    httpd.server_close()


def fresh_env(tmp_path: Path, base_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARBON_ROUTER_")}
    env.update(
        CARBON_ROUTER_CACHE=str(tmp_path / "cache"),
        CARBON_ROUTER_DATA_URL=base_url,
        HOME=str(tmp_path / "home"),
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        PYTHONPATH=str(ROOT),
    )
    return env


def router(
    tmp_path: Path, base_url: str, *args: str, timeout_s: float = 1200
) -> subprocess.CompletedProcess[str]:
    with subprocess.Popen(
        [sys.executable, "-m", "router.cli", *args],
        cwd=tmp_path,  # not the checkout: nothing relative to it is found by accident
        env=fresh_env(tmp_path, base_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its worker processes are ended with it on a timeout
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# ---- what router serve fetches before it deploys ------------------------------------------------


def test_serve_needs_the_zone_files_of_its_file_sources_and_its_price_files(
    tmp_path: Path,
) -> None:
    cfg = parse_config((ROOT / "configs/local.yaml").read_text(), env={})
    assert sorted(n.dataset for n in needs(cfg, ROOT / "configs")) == [  # type: ignore[type-var]
        "carbon/electricitymaps_hourly/DE.csv",
        "carbon/electricitymaps_hourly/SE.csv",
        "carbon/electricitymaps_hourly/US-TEX-ERCO.csv",
    ]
    own_files = (
        (ROOT / "configs/local.yaml")
        .read_text()
        .replace("dataset: electricitymaps_hourly", "path: zones/{zone}.csv")
        .replace("price: {flat_usd_per_kwh: 0.07}", "price: {csv: prices/se.csv}")
    )
    (tmp_path / "zones").mkdir()
    for zone in ("SE", "DE", "US-TEX-ERCO"):
        (tmp_path / "zones" / f"{zone}.csv").write_text("the zone's own file\n")
    cfg = parse_config(own_files, env={})
    with pytest.raises(MissingInputError, match=r"region 'eu-north' price needs .*prices/se.csv"):
        prefetch(cfg, tmp_path)


def test_serve_offline_exits_with_one_line_before_ray_starts(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on: the network is down
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    start = time.monotonic()
    out = router(tmp_path, dead, "serve", "--config", str(ROOT / "configs/local.yaml"),
                 "--once", timeout_s=60)  # fmt: skip
    assert out.returncode == 1
    assert time.monotonic() - start < 30  # no Ray was started
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    line = lines[0]
    assert "carbon/electricitymaps_hourly/DE.csv" in line  # what
    assert f"{dead}/codecexp/CarbonX/" in line  # from where
    assert "CARBON_ROUTER_DATA " in line and "CARBON_ROUTER_DATA_URL" in line  # how, offline
    assert "Traceback" not in out.stderr and "Ray instance" not in out.stderr


# ---- the commands, end to end -------------------------------------------------------------------


@pytest.mark.needs_data
def test_forecast_show(tmp_path: Path, mirror: tuple[str, list[str]]) -> None:
    base, served = mirror
    out = router(tmp_path, base, "forecast", "show", "--zone", "SE", "--hours", "6", "--json")
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["zone"] == "SE" and len(shown["forecast"]) == 6
    assert 0 < shown["now_g_per_kwh"] < 200  # Sweden: hydro and nuclear
    assert (tmp_path / "cache/carbon/electricitymaps_hourly/SE.csv").is_file()
    assert any(p.endswith("/SE.csv") for p in served)


@pytest.mark.needs_data
def test_energy_evaluate(tmp_path: Path, mirror: tuple[str, list[str]]) -> None:
    out = router(tmp_path, mirror[0], "energy", "evaluate", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    v3, v2 = result["v3_leave_one_model_out"], result["v2_a100_leave_one_model_out"]
    assert v3["models"] > 20 and v2["models"] > 10
    # the README's figures: held-out models' energy per request within about 15 % (median)
    assert 0 < v3["median_ape_pct"] < 25 and 0 < v2["median_ape_pct"] < 25


@pytest.mark.needs_data
@pytest.mark.slow
def test_simulate_a_short_period(tmp_path: Path, mirror: tuple[str, list[str]]) -> None:
    # two zones of test_simulate's config (each zone's forecaster fit costs about a CPU minute;
    # configs/simulate.yaml has five, and ran the same way in 15 min on a loaded 2-core host)
    from tests.test_simulate import SMALL

    (tmp_path / "sim.yaml").write_text(SMALL)
    out = router(tmp_path, mirror[0], "simulate", "--config", str(tmp_path / "sim.yaml"),
                 "--period", "2024-06-01..2024-06-03", "--policies", "power_of_two,greenest",
                 "--out", str(tmp_path / "report"), "--json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    summary = {row["policy"]: row for row in json.loads(out.stdout)["summary"]}
    assert set(summary) == {"power_of_two", "greenest"}
    assert summary["greenest"]["t_co2e"] < summary["power_of_two"]["t_co2e"]
    assert (tmp_path / "cache/traces/azure_llm_2023/AzureLLMInferenceTrace_conv.csv").is_file()


@pytest.mark.needs_data
@pytest.mark.slow
def test_serve_answers_a_request(tmp_path: Path, mirror: tuple[str, list[str]]) -> None:
    pytest.importorskip("llama_cpp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "local.yaml"
    cfg.write_text(
        (ROOT / "configs/local.yaml")
        .read_text()
        .replace("ledger: carbon-router.sqlite", f"ledger: {tmp_path / 'ledger.sqlite'}")
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "router.cli",
            "serve",
            "--config",
            str(cfg),
            "--port",
            str(port),
            "--direct-port",
            "0",
        ],  # fmt: skip
        cwd=tmp_path,
        env=fresh_env(tmp_path, mirror[0]),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # Ray's own chatter
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        printed = []
        for line in proc.stdout:  # ends when the command exits
            printed.append(line)
            if "carbon-router is serving" in line:  # printed once the router answers /readyz
                break
        assert f"carbon-router is serving 3 regions at http://127.0.0.1:{port}/v1" in printed[-1], (
            "".join(printed)
        )
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(
                {
                    "model": "smollm2-135m",
                    "max_tokens": 8,
                    "temperature": 0.0,
                    "messages": [{"role": "user", "content": "Name one fruit."}],
                }
            ).encode(),  # fmt: skip
            headers={"Authorization": "Bearer sk-local-demo", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            body = json.loads(r.read())
        assert body["choices"][0]["message"]["content"]
        assert body["usage"]["energy_kwh"] > 0 and body["usage"]["region"]
    finally:
        proc.send_signal(signal.SIGINT)  # router serve shuts Serve and Ray down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
