"""Serve wiring for specialists: config + cluster -> an autoscaled Serve deployment each.

In a labelling job each specialist is its own application (``<prefix>-<name>``), reachable by handle only
(``route_prefix=None``); ``labelwright serve`` binds the same deployments into its one HTTP application. Resources come from the specialist's config and the cluster: a fractional
GPU where the cluster has GPUs, CPUs otherwise.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

from labelwright.cluster.runtime import actor_resources
from labelwright.specialists.base import SpecialistConfig
from labelwright.specialists.deployment import SpecialistReplica

DEFAULT_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2}


@dataclass(frozen=True)
class SpecialistEndpoint:
    name: str
    app: str
    deployment: str

    def handle(self):
        from ray import serve

        return serve.get_deployment_handle(self.deployment, app_name=self.app)


def predict_all(handles: Mapping[str, object], texts: list[str], *, patience_s: float = 300.0,
                **options) -> dict[str, dict]:
    """Every specialist's ``predict`` on ``texts`` (sent at once, with ``options``), by name.

    A replica lost mid-request (its node gone, its process killed) is asked again through the same handle, which
    routes to a live replica, or to the one Serve starts in its place: a prediction is a pure function of the
    checkpoint, so asking twice changes nothing. Errors raised by the specialist itself are not retried; a
    specialist with no live replica for ``patience_s`` seconds raises the last error."""
    from ray.exceptions import RayActorError

    pending = {name: handle.predict.remote(texts, **options) for name, handle in handles.items()}
    out: dict[str, dict] = {}
    deadline, delay = time.monotonic() + patience_s, 0.5
    while pending:
        lost = []
        for name, response in pending.items():
            try:
                out[name] = response.result()
            except RayActorError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                print(f"specialist {name}: a replica was lost mid-request ({type(exc).__name__}); asking "
                      f"again in {delay:g} s", file=sys.stderr, flush=True)
                lost.append(name)
        if lost:
            time.sleep(delay)
            delay = min(2 * delay, 10.0)
        pending = {name: handles[name].predict.remote(texts, **options) for name in lost}
    return out


def deployment_name(name: str) -> str:
    """The Serve deployment of the specialist called ``name`` (its own application's, or a service's part)."""
    return f"specialist-{name}"


def deployment_options(config: SpecialistConfig, *, gpu: bool, checkpoint: str) -> dict:
    return {
        "name": deployment_name(config.name),
        "ray_actor_options": actor_resources(num_cpus=config.num_cpus, num_gpus=config.num_gpus, gpu=gpu),
        "autoscaling_config": dict(config.autoscaling or DEFAULT_AUTOSCALING),
        "max_ongoing_requests": 4,
        "user_config": {"checkpoint": checkpoint},
        "health_check_period_s": 10,
        "logging_config": {"log_level": "WARNING", "enable_access_log": False},
    }


def specialist_deployment(config: SpecialistConfig, *, gpu: bool, checkpoint: str):
    """The specialist's Serve deployment, bound (an application of its own, or a part of a bigger one)."""
    from ray import serve

    opts = deployment_options(config, gpu=gpu, checkpoint=checkpoint)
    return serve.deployment(SpecialistReplica).options(**opts).bind(torch_threads=config.torch_threads)


def deploy_specialists(
    configs: Sequence[SpecialistConfig], checkpoints: dict[str, str], *, app_prefix: str, gpu: bool
) -> dict[str, SpecialistEndpoint]:
    """Deploy (or update with a rolling swap) one Serve application per specialist, all at once;
    returns when every application is running."""
    from ray import serve

    endpoints, targets = {}, []
    for config in configs:
        app = f"{app_prefix}-{config.name}"
        bound = specialist_deployment(config, gpu=gpu, checkpoint=checkpoints[config.name])
        targets.append(serve.RunTarget(bound, name=app, route_prefix=None))
        endpoints[config.name] = SpecialistEndpoint(config.name, app, deployment_name(config.name))
    serve.run_many(targets)
    return endpoints


def delete_specialists(endpoints: dict[str, SpecialistEndpoint]) -> None:
    from ray import serve

    for ep in endpoints.values():
        serve.delete(ep.app)
