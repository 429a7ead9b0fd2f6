"""The README's Ray-job command, end to end: `ray start --head` on loopback (a cluster of its own, beside the
session's), `ray job submit` of a small annotate job against the fake controller, its exit code and output.

The head is stopped by killing the processes of its GCS address only: `ray stop` would stop the session's
cluster too."""

from __future__ import annotations

import json
import os
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
from tests.fake_openai import FakeOpenAI, oracle

BIN = Path(sys.executable).parent


def _ray(*args: str, timeout: float, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], capture_output=True, text=True, timeout=timeout, env=env)


def _stop_head(gcs: str) -> None:
    import psutil

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
