"""Connecting to Ray: which cluster a job joins, or starts."""

import pytest

from labelwright.cluster import runtime
from labelwright.specialists.errors import ConfigError


@pytest.fixture
def ray_init(monkeypatch):
    """ray.init recorded, not run; the cluster reported as one node with 4 CPUs."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(runtime, "describe", lambda started_here=False: runtime.ClusterInfo(4, 0, 1, started_here))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_no_address_starts_a_local_cluster_whatever_ray_start_left_behind(ray_init):
    # A bare ray.init() would join the cluster the last `ray start` wrote into /tmp/ray/ray_current_cluster.
    info = runtime.connect(None, num_cpus=6)
    assert ray_init[0]["address"] == "local" and ray_init[0]["num_cpus"] == 6 and info.started_here


def test_ray_address_is_joined_and_num_cpus_refused_there(ray_init, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # as `ray job submit` sets it for the driver
    info = runtime.connect(None)
    assert ray_init[0]["address"] == "10.0.0.5:6379" and "num_cpus" not in ray_init[0] and not info.started_here
    with pytest.raises(ConfigError, match="runtime.num_cpus only applies to a local cluster"):
        runtime.connect("auto", num_cpus=4)
