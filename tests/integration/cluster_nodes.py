"""A ``ray.cluster_utils.Cluster`` (a head and worker nodes, each its own raylet on this machine) run in a process of
its own, driven over stdin/stdout by ``tests/integration/test_ray_job.py``.

In the test process itself, the nodes' process-group handling took the pytest process and the session's cluster
down with them at teardown; here they can take only this process.

    python -m tests.integration.cluster_nodes HEAD_CPUS WORKER_CPUS [WORKER_CPUS ...]

prints a line ``nodes {"address", "dashboard", "workers": [node ids]}`` (Ray may print lines of its own before it),
then reads commands: ``remove NODE_ID``
(kill that worker node at once; answers ``removed NODE_ID``) and ``stop`` (or end of input: every node).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile


def main(head_cpus: int, worker_cpus: list[int]) -> None:
    from ray._common.utils import reset_ray_address
    from ray.cluster_utils import Cluster

    from tests.conftest import free_port

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="lwnodes-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    dashboard = free_port()
    # Free ports of its own (the session's cluster holds the default ones); the dashboard serves the state API.
    cluster = Cluster(initialize_head=True, connect=False, head_node_args=dict(
        num_cpus=head_cpus, gcs_server_port=free_port(), dashboard_agent_listen_port=free_port(),
        metrics_export_port=free_port(), runtime_env_agent_port=free_port(), include_dashboard=True,
        dashboard_host="127.0.0.1", dashboard_port=dashboard, temp_dir=temp, enable_object_reconstruction=True))
    reset_ray_address()  # a bare ray.init() on this machine must not join this cluster
    try:
        workers = {node.node_id: node for node in (cluster.add_node(num_cpus=n) for n in worker_cpus)}
        print("nodes", json.dumps({"address": cluster.address, "dashboard": f"http://127.0.0.1:{dashboard}",
                          "workers": list(workers)}), flush=True)
        for line in sys.stdin:
            command = line.split()
            if command[:1] == ["remove"]:
                cluster.remove_node(workers.pop(command[1]), allow_graceful=False)
                print(f"removed {command[1]}", flush=True)
            elif command[:1] == ["stop"]:
                break
    finally:
        for node in list(cluster.worker_nodes):
            cluster.remove_node(node, allow_graceful=False)
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node, allow_graceful=False)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(n) for n in sys.argv[2:]])
