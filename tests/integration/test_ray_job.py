"""Jobs on clusters of their own, beside the session's: the README's Ray-job command end to end (`ray start --head`
on loopback, `ray job submit` of a small annotate job against the fake controller, its exit code and output), and
a job on several nodes (``ray.cluster_utils.Cluster``) that loses one of them mid-run.

The head is stopped by killing the processes of its GCS address only: `ray stop` would stop the session's
cluster too."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.conftest import free_port, movie_slice
from tests.fake_openai import FakeOpenAI, oracle, slow

BIN = Path(sys.executable).parent


def _ray(*args: str, timeout: float, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _forget(gcs: str) -> None:
    """Remove /tmp/ray/ray_current_cluster where it names ``gcs``: `ray start` and ``Cluster`` write it, and a bare
    ``ray.init()`` on this machine would join the cluster it names, long after the test."""
    from ray._common.utils import reset_ray_address
    from ray._private.utils import read_ray_address

    if read_ray_address() == gcs:
        reset_ray_address()


def _stop_head(gcs: str) -> None:
    import psutil

    _forget(gcs)

    for proc in psutil.process_iter(["cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if gcs in line or f"--gcs_server_port={gcs.rsplit(':', 1)[1]}" in line:
            try:
                proc.kill()
            except psutil.Error:
                pass


@pytest.fixture(scope="module")
def head():
    port, dashboard = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="lwhead-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Every port of its own: the session's cluster (or anything else) may hold a default one, such as the
    # dashboard agent's 52365, and a head whose agent cannot bind never takes a job.
    ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
        "ray-client-server-port", "node-manager-port", "object-manager-port")]
    started = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=8",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                   *ports, f"--temp-dir={temp}", "--disable-usage-stats", timeout=180, env=env)
    gcs = f"127.0.0.1:{port}"
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield {"dashboard": f"http://127.0.0.1:{dashboard}", "env": env, "temp": temp}
    finally:
        _stop_head(gcs)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_runs_annotate_to_the_end(head, datasets_dir, tmp_path):
    path, df = movie_slice(datasets_dir, tmp_path, 60)
    task = tmp_path / "task.yaml"
    with FakeOpenAI(oracle(dict(zip(df["text"], df["label"])))) as server:
        task.write_text(yaml.safe_dump({
            "labels": ["positive", "negative"],
            "controller": {"base_url": server.base_url, "model": server.model, "cache": False, "max_retries": 1},
            "seed": {"size": 20},
            "specialists": [{"name": "tfidf", "kind": "tfidf_linear"}, {"name": "probe", "kind": "embedding_linear"}],
            "stages": {"enabled": False},
            "runtime": {"use_gpu": "no"},
        }))
        out, run_dir = tmp_path / "out.parquet", tmp_path / "run"
        # The README's command: no --address, the job's driver joins the cluster it was submitted to.
        deadline = time.monotonic() + 300
        while True:  # the head's job agent comes up some seconds after `ray start` returns
            job = _ray("job", "submit", "--address", head["dashboard"], "--", str(BIN / "labelwright"), "annotate",
                       str(path), "--task", str(task), "--output", str(out), "--run-dir", str(run_dir), "--report",
                       str(tmp_path / "report.json"), timeout=900, env=head["env"])
            if "No available agent" not in job.stderr + job.stdout or time.monotonic() > deadline:
                break
            time.sleep(2)
    logs = job.stdout + job.stderr
    agent = sorted(Path(head["temp"]).glob("session_*/logs/dashboard_agent*.log"))
    assert job.returncode == 0, logs[-3000:] + "".join(p.read_text()[-2000:] for p in agent)
    assert "succeeded" in logs.lower()
    res = pd.read_parquet(out)
    assert len(res) == len(df) and res["row"].is_unique
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["rows_out"] == len(df)
    assert "ray: 1 node(s), 8 CPU" in logs  # it ran on the submitted-to cluster, not one of its own
    assert (run_dir / "service" / "service.json").is_file()


def _alive_actors(dashboard: str) -> dict[str, set[str]]:
    """Live actors' node ids by class name, from Ray's state API."""
    from ray.util.state import list_actors

    out: dict[str, set[str]] = {}
    for actor in list_actors(address=dashboard, limit=10_000, raise_on_missing_output=False):
        if actor.state == "ALIVE":
            out.setdefault(actor.class_name, set()).add(actor.node_id)
    return out


def _nodes_of(actors: dict[str, set[str]], part: str) -> set[str]:
    return set().union(*[nodes for name, nodes in actors.items() if part in name])


def test_a_job_spreads_over_nodes_and_loses_no_row_when_one_goes(datasets_dir, tmp_path):
    """A head (2 CPUs) and two worker nodes (3 CPUs each); the job's voting actors and specialist replicas run on
    more than one node; the worker node holding some of them is killed once rows are being labelled; every row
    comes out once, voted by both specialists."""
    nodes = subprocess.Popen([sys.executable, "-m", "tests.integration.cluster_nodes", "2", "3", "3"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[2])
    try:
        line = ""
        while not line.startswith("nodes "):
            line = nodes.stdout.readline()
            assert line, "the cluster's process ended before its nodes were up"
        cluster = json.loads(line.removeprefix("nodes "))
        path, df = movie_slice(datasets_dir, tmp_path, 400)
        replicas = {"num_cpus": 0.5, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
        with FakeOpenAI(slow(0.05, oracle(dict(zip(df["text"], df["label"]))))) as server:
            task = tmp_path / "task.yaml"
            task.write_text(yaml.safe_dump({
                "labels": ["positive", "negative"],
                "controller": {"base_url": server.base_url, "model": server.model, "cache": False, "max_retries": 1},
                "seed": {"size": 20},
                "specialists": [{"name": "tfidf", "kind": "tfidf_linear", **replicas},
                                {"name": "probe", "kind": "embedding_linear", **replicas}],
                "stages": {"enabled": False},
                "runtime": {"use_gpu": "no", "vote_actors": 3, "controller_actors": 2, "vote_batch_size": 16,
                            "shard_rows": 100},
            }))
            out, log = tmp_path / "out.parquet", tmp_path / "job.log"
            with open(log, "w") as sink:
                job = subprocess.Popen(
                    [str(BIN / "labelwright"), "annotate", str(path), "--task", str(task), "--output", str(out),
                     "--address", cluster["address"], "--report", str(tmp_path / "report.json")],
                    stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
            seen: dict[str, set[str]] = {}
            removed = None
            deadline = time.monotonic() + 900
            while job.poll() is None:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
                if removed is not None:
                    continue
                for name, where in _alive_actors(cluster["dashboard"]).items():
                    seen.setdefault(name, set()).update(where)
                if re.search(r"^labelled \d+/\d+ rows", log.read_text(), re.M):  # rows are being labelled
                    busy = _nodes_of(seen, "VoteStage") | _nodes_of(seen, "specialist-")
                    removed = next(w for w in cluster["workers"] if w in busy)
                    nodes.stdin.write(f"remove {removed}\n")
                    nodes.stdin.flush()
                    while (answer := nodes.stdout.readline()).strip() != f"removed {removed}":
                        assert answer, "the cluster's process ended before it removed the node"
    finally:
        nodes.communicate("stop\n", timeout=120)
    text = log.read_text()
    assert job.returncode == 0, text[-4000:]
    assert "ray: 3 node(s), 8 CPU" in text
    assert len(_nodes_of(seen, "VoteStage")) > 1, seen
    assert len(_nodes_of(seen, "specialist-probe")) > 1 and len(_nodes_of(seen, "specialist-tfidf")) > 1, seen
    assert removed is not None, "the job ended before a node could be removed mid-run"
    res = pd.read_parquet(out)
    assert len(res) == len(df) and res["row"].is_unique
    assert sorted(res["text"]) == sorted(df["text"])
    assert res["vote_probe"].notna().all() and res["vote_tfidf"].notna().all()
