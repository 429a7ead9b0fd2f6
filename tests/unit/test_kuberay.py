"""The KubeRay manifests in cluster/kuberay/: the fields KubeRay's CRDs (ray.io/v1) require, a Serve config that
`serve deploy` accepts naming our application builder, and commands our CLI accepts."""

import re
import shlex
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from labelwright.orchestrator import service

KUBERAY = Path(__file__).resolve().parents[2] / "cluster" / "kuberay"


def load(name: str) -> dict:
    return yaml.safe_load((KUBERAY / name).read_text())


def check_cluster(spec: dict, where: str) -> None:
    """RayClusterSpec as KubeRay's CRD requires it: headGroupSpec.template; each worker group's groupName,
    minReplicas, maxReplicas and template; containers with a name and an image; mounts of declared volumes."""
    ray_version = spec["rayVersion"]
    assert ray_version == version("ray"), f"{where}: rayVersion {ray_version} is not the Ray labelwright runs"
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]
    for name, group in groups:
        pod = group["template"]["spec"]
        volumes = {v["name"] for v in pod.get("volumes", [])}
        assert pod["containers"], f"{where}/{name}: no container"
        for c in pod["containers"]:
            assert c["name"] and c["image"], f"{where}/{name}: a container needs a name and an image"
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, f"{where}/{name}: mount without volume"
            for key, value in c.get("resources", {}).get("limits", {}).items():
                assert c["resources"]["requests"][key] == value, f"{where}/{name}: {key} limit != request"
        assert isinstance(group.get("rayStartParams", {}), dict)
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), "rayStartParams are strings"
    for g in spec["workerGroupSpecs"]:
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"]
    gpus = [g for g in spec["workerGroupSpecs"]
            if any("nvidia.com/gpu" in c["resources"]["limits"] for c in g["template"]["spec"]["containers"])]
    assert gpus, f"{where}: a GPU worker group"


def test_rayjob_runs_annotate_on_the_shared_volume():
    job = load("rayjob-annotate.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    check_cluster(job["spec"]["rayClusterSpec"], "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["labelwright", "annotate"]
    from labelwright.orchestrator.cli import _annotate_parser
    import argparse

    parser = argparse.ArgumentParser()
    _annotate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv[1:])
    assert args.address == "auto"
    mount = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]
    for path in (args.input, args.output, args.run_dir, args.task):
        assert path.startswith(mount["mountPath"] + "/"), f"{path} is not on the shared volume"


def test_rayservice_serves_a_run_with_our_builder():
    from ray._common.utils import import_attr
    from ray.serve.schema import ServeDeploySchema

    svc = load("rayservice-serve.yaml")
    assert (svc["apiVersion"], svc["kind"]) == ("ray.io/v1", "RayService")
    check_cluster(svc["spec"]["rayClusterConfig"], "RayService")
    config = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    (app,) = config["applications"]
    assert import_attr(app["import_path"]) is service.app_builder
    assert app["args"]["run_dir"].startswith("/data/")
    head = svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert config["http_options"]["port"] in {p["containerPort"] for p in head["ports"]}


@pytest.mark.parametrize("name", ["rayjob-annotate.yaml", "rayservice-serve.yaml"])
def test_the_image_is_the_one_the_dockerfile_builds(name):
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    base = re.search(r"^FROM rayproject/ray:(\S+)", dockerfile, re.M).group(1)
    assert base.startswith(version("ray") + "-"), "the base image's Ray is the one labelwright runs"
    text = (KUBERAY / name).read_text()
    tag = f"labelwright:{version('labelwright')}"
    assert set(re.findall(r"image: (\S+)", text)) == {tag}, "the manifests run the image of this version"
    assert tag in dockerfile
