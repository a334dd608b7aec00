"""In-process (llama.cpp) replicas of a scaling region follow the fleet scaler's count through
Ray Serve's autoscaling (router/ray_app/fleet.py): the app gives their deployments the router's
autoscaling policy, and on a local Ray cluster the count written switches one off and on again,
while a count the router stopped refreshing is not followed."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import ROOT

ray = pytest.importorskip("ray")

APP = "fleet-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def running(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications[APP]
    return int(app.deployments[deployment].replica_states.get("RUNNING", 0))


def wait_for(what: Callable[[], bool], timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if what():
            return True
        time.sleep(0.25)
    return False


def test_the_app_scales_only_the_in_process_replicas_of_scaling_regions(tmp_path: Path) -> None:
    from router.ray_app.fleet import POLICY
    from router.serve_app import build_app

    text = (ROOT / "configs/local.yaml").read_text()
    text = text.replace(  # eu-north scales, with a second replica; the others do not
        "    residency: [eu]\n    replicas:\n      - name: eu-north-0",
        "    residency: [eu]\n    scaling: {min_replicas: 1, startup_s: 20}\n    replicas:\n"
        "      - {name: eu-north-1, backend: {kind: llama_cpp}, meter: cpu}\n"
        "      - name: eu-north-0",
    )
    path = tmp_path / "local.yaml"
    path.write_text(text)
    replicas = build_app({"config": str(path)})._bound_deployment.init_args[1]
    scaling = {
        name: app._bound_deployment._deployment_config.autoscaling_config
        for name, app in replicas.items()
    }
    assert scaling["eu-central-0"] is None and scaling["us-south-0"] is None
    first, second = scaling["eu-north-1"], scaling["eu-north-0"]
    assert first.policy.policy_function == POLICY and second.policy.policy_function == POLICY
    assert (first.min_replicas, first.max_replicas) == (1, 1)  # within min_replicas: always on
    assert (second.min_replicas, second.max_replicas, second.initial_replicas) == (0, 1, 1)


@pytest.mark.slow  # a Ray cluster and two model loads: about 30 s on 2 cores
def test_a_llama_cpp_replica_follows_the_fleet_count_through_serve_autoscaling() -> None:
    from ray import serve
    from ray.experimental.internal_kv import _internal_kv_put

    from regions.config import Replica
    from router.ray_app.fleet import NAMESPACE, RayFleetTargets, autoscaling_config, key_of
    from router.ray_app.replica import RegionReplica

    pytest.importorskip("llama_cpp")

    rep = Replica.model_validate(
        {"name": "eu-north-1", "backend": {"kind": "llama_cpp", "n_threads": 1},
         "meter": "cpu", "max_concurrency": 1}
    )  # fmt: skip
    dep = "replica-eu-north-1"
    ray.init(num_cpus=2, include_dashboard=False, namespace="carbon-router", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        app = RegionReplica.options(  # type: ignore[attr-defined]
            name=dep,
            autoscaling_config=autoscaling_config(always_on=False),
            ray_actor_options={"num_cpus": 0.5},
        ).bind(rep.model_dump_json())
        serve.run(app, name=APP, route_prefix=None)
        assert running(dep) == 1  # on at start
        # with no traffic and no delay Serve's own policy would drop it to 0 at once; the
        # router's policy keeps it while the router has said nothing
        assert not wait_for(lambda: running(dep) == 0, timeout_s=3.0)
        targets = RayFleetTargets(APP, {rep.name: dep})

        asyncio.run(targets({rep.name: 0}))  # the fleet scaler switched it off
        assert wait_for(lambda: running(dep) == 0), serve.status()
        asyncio.run(targets({rep.name: 1}))  # and on again, with no request asking for it
        assert wait_for(lambda: running(dep) == 1), serve.status()

        # a count the router has not refreshed for max_age_s is its silence: nothing changes
        old = json.dumps({"replicas": 0, "written_at": time.time() - 3600})
        _internal_kv_put(key_of(APP, dep), old, overwrite=True, namespace=NAMESPACE)
        assert not wait_for(lambda: running(dep) == 0, timeout_s=3.0)
    finally:
        serve.shutdown()
        ray.shutdown()
