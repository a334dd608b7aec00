"""Region replicas land on their region's nodes: a multi-node Ray cluster on one machine."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.conftest import ROOT

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.needs_data  # replays the registered Electricity Maps files

CONFIG = (ROOT / "configs/local.yaml").read_text()


def test_each_replica_runs_on_a_node_of_its_region(tmp_path: Path) -> None:
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from router.serve_app import build_app

    cfg = tmp_path / "local.yaml"
    cfg.write_text(
        CONFIG.replace("ledger: carbon-router.sqlite", f"ledger: {tmp_path / 'l.sqlite'}")
    )
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {
        region: cluster.add_node(num_cpus=1, resources={f"region:{region}": 1.0})
        for region in ("eu-north", "eu-central", "us-south")
    }
    try:
        ray.init(address=cluster.address, namespace="carbon-router", log_to_driver=False)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"config": str(cfg)}), name="carbon-router", route_prefix="/")
        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
        placed = {}
        for a in actors:
            name = a.name or ""
            for region in nodes:
                if f"replica-{region}-0" in name:
                    placed[region] = a.node_id
        assert set(placed) == set(nodes)
        for region, node in nodes.items():
            assert placed[region] == node.node_id, f"{region} replica is not on its region's node"
        head = cluster.head_node.node_id
        assert head not in placed.values()
    finally:
        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()
