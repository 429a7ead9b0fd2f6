"""Connecting to or starting Ray, and what the cluster offers.

A local cluster gets more logical CPU slots than cores: the pipeline's actors mostly wait on
Serve replicas and HTTP, and reserving every slot makes Ray Data wait silently for actors that can
never be scheduled. Resource decisions (GPU or CPU, fractions) are made here from what the
cluster reports, never hard-coded in the callers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from labelwright.specialists.errors import ConfigError


@dataclass(frozen=True)
class ClusterInfo:
    cpus: float
    gpus: float
    nodes: int
    started_here: bool

    @property
    def has_gpus(self) -> bool:
        return self.gpus > 0


def connect(address: str | None = None, *, num_cpus: int | None = None) -> ClusterInfo:
    """Join the Ray cluster at ``address`` ("auto", "ray://host:10001", ...), else the one ``RAY_ADDRESS`` names (a
    Ray job's driver has it set), or start a local one."""
    import ray
    from ray.data import DataContext

    started = False
    if address is None and os.environ.get("RAY_ADDRESS"):
        # Under `ray job submit` (or with RAY_ADDRESS exported) the cluster is chosen: join it, as Ray would.
        address = os.environ["RAY_ADDRESS"]
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, configure_logging=True, logging_level="WARNING",
                      log_to_driver=True)
        if address is None:
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster on loopback
            # "local", not None: with None, Ray joins whatever cluster /tmp/ray/ray_current_cluster names (the
            # last `ray start` on this machine, even one long gone) and then refuses num_cpus.
            kwargs["address"] = "local"
            cores = os.cpu_count() or 2
            kwargs["num_cpus"] = num_cpus or max(16, 4 * cores)
            started = True
        else:
            if num_cpus is not None:
                raise ConfigError("runtime.num_cpus only applies to a local cluster; drop it with --address")
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except ConnectionError as exc:
            raise ConfigError(
                f"cannot reach a Ray cluster at {address!r}: {exc}. Start one with `ray start --head`, "
                "or leave out --address to run on a local cluster"
            ) from None
    ctx = DataContext.get_current()
    ctx.wait_for_min_actors_s = 900  # fail loudly rather than hang when actors cannot be placed
    ctx.raise_original_map_exception = True  # a ControllerError in a stage reaches the caller as itself
    ctx.enable_progress_bars = True
    return describe(started)


def describe(started_here: bool = False) -> ClusterInfo:
    import ray

    res = ray.cluster_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ClusterInfo(cpus=float(res.get("CPU", 0)), gpus=float(res.get("GPU", 0)), nodes=nodes,
                       started_here=started_here)


def use_gpu(setting: str, info: ClusterInfo) -> bool:
    """Resolve a yes/no/auto GPU setting against the cluster. Asking for GPUs on a cluster without
    them would leave work pending forever, so that is an error here."""
    if setting == "no":
        return False
    if setting == "yes":
        if not info.has_gpus:
            raise ConfigError("runtime.use_gpu is 'yes' but the Ray cluster reports no GPUs; use 'auto' or 'no'")
        return True
    return info.has_gpus


def actor_resources(*, num_cpus: float, num_gpus: float, gpu: bool) -> dict:
    """ray_actor_options for a model replica: a (fractional) GPU where used, else CPUs."""
    if gpu:
        return {"num_cpus": min(num_cpus, 1.0), "num_gpus": num_gpus}
    return {"num_cpus": num_cpus}


def beside_driver(cls, *args, **kwargs):
    """An actor of ``cls`` (no CPU reserved) on the driver's node: a node that goes away mid-run takes it with it
    only where it takes the driver, which ends the job anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(cls).remote(*args, **kwargs)
