"""The GPU paths on a real GPU, on the session's Ray cluster (which finds the GPU itself): fractional-GPU
Serve replicas, fine-tuning on a Ray Train GPU worker, and a hot swap of a GPU replica while requests
are in flight; and, on any machine, that a Ray worker granted no GPU keeps its models on the CPU.

CI and the development machines have no GPU, so the GPU tests are marked ``gpu`` and skipped where
CUDA is not available (no Ray is started then); run them with ``pytest -m gpu tests/integration/test_gpu.py``
on a machine with one. The model is ``tiny_bert``'s (2 layers, width 32, random weights) with a small
word vocabulary written here, because ``tiny_bert`` takes its tokenizer from the bundled MiniLM package,
which is not on the GPU machine and too large to carry there.

A replica reports the device its model is on (``info()["device"]``); the tests also check from outside
that Ray granted the GPU share and whether the replica's process has a CUDA context (nvidia-smi's
compute processes), which catches a model that went onto the GPU without reserving it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import save_tiny_bert, swap_under_load, wait_until

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LABELS = ["negative", "positive"]
TEXTS = ["great fun", "awful mess", "a joy to watch", "dull and bad", "lovely", "boring"] * 4
GOLD = ["positive", "negative", "positive", "negative", "positive", "negative"] * 4
ONE_REPLICA = {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 2}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    from transformers import BertTokenizer

    directory = tmp_path_factory.mktemp("tiny")
    words = sorted({w for t in TEXTS for w in t.split()})
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return save_tiny_bert(BertTokenizer(str(directory / "vocab.txt")), directory / "bert")


def tfm_config(name: str, model: str, **extra):
    from labelwright.specialists.base import SpecialistConfig

    return SpecialistConfig(name=name, kind="transformer_classifier", model=model, max_length=16, batch_size=8,
                            **extra)


def save_untrained(config, directory: Path, seed: int) -> str:
    """A transformer checkpoint whose head is drawn with ``seed`` (so two seeds give two versions)."""
    from labelwright.specialists.transformer_classifier import TransformerClassifierSpecialist

    spec = TransformerClassifierSpecialist(config, LABELS, seed=seed, device="cpu")
    spec.mark_trained()
    spec.save(directory)
    return str(directory)


def free_gpu() -> float:
    import ray

    return float(ray.available_resources().get("GPU", 0.0))


def replica_pids(endpoint) -> list[int]:
    """Processes of a deployment's replicas, found by the title Ray gives actor processes."""
    import psutil

    tag = f"ServeReplica:{endpoint.app}:{endpoint.deployment}"
    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(tag in part for part in proc.info["cmdline"] or []):
            pids.append(proc.pid)
    return pids


def cuda_pids() -> set[int]:
    """Processes with a CUDA context on the GPU, from nvidia-smi. (Open /dev/nvidia* files are no sign:
    a process that only asked the driver how many GPUs there are holds them too, with no context.)"""
    import subprocess

    query = ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"]
    out = subprocess.run(query, capture_output=True, text=True, check=True).stdout
    return {int(p) for p in out.split()}


@pytest.mark.gpu
@needs_gpu
def test_fractional_gpu_replicas_share_the_gpu(ray_cluster, tiny_model, tmp_path):
    """Two transformer specialists at num_gpus 0.25, and a transformer and a tfidf one at 0, deployed with
    gpu=True: Ray grants exactly 0.5 GPU, the two transformer replicas with a share run on CUDA, all
    transformers give what the same checkpoint gives on the CPU, the replicas without a share do not touch
    the GPU, and deleting them gives the GPU back."""
    from labelwright.cluster.deploy import delete_specialists, deploy_specialists
    from labelwright.specialists.base import SpecialistConfig
    from labelwright.specialists.registry import build_specialist
    from labelwright.specialists.transformer_classifier import TransformerClassifierSpecialist

    configs = [tfm_config(n, tiny_model, num_gpus=0.25, autoscaling=ONE_REPLICA) for n in ("tfm_a", "tfm_b")]
    # a transformer given no GPU share: it sees the GPU (Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone on
    # zero GPUs) but must not use it
    configs.append(tfm_config("tfm_cpu", tiny_model, num_gpus=0, autoscaling=ONE_REPLICA))
    tfidf = SpecialistConfig(name="tfidf", kind="tfidf_linear", num_gpus=0, autoscaling=ONE_REPLICA)
    checkpoints = {c.name: save_untrained(c, tmp_path / c.name, seed=i) for i, c in enumerate(configs)}
    spec = build_specialist(tfidf, LABELS)
    spec.fit(TEXTS, GOLD)
    spec.save(tmp_path / "tfidf")
    checkpoints["tfidf"] = str(tmp_path / "tfidf")

    before = free_gpu()
    assert before >= 0.5
    endpoints = deploy_specialists([*configs, tfidf], checkpoints, app_prefix="gpu", gpu=True)
    try:
        wait_until(lambda: abs(before - free_gpu() - 0.5) < 1e-6, timeout_s=30)
        versions = set()
        for name, ep in endpoints.items():
            out = ep.handle().predict.remote(TEXTS).result()
            probs = out["probs"]
            assert probs.shape == (len(TEXTS), 2) and probs.dtype == np.float32
            assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
            versions.add(out["version"])
            pids = replica_pids(ep)
            assert len(pids) == 1, (name, pids)
            device = ep.handle().info.remote().result()["device"]
            if name in ("tfidf", "tfm_cpu"):
                assert device == "cpu", (name, device)
                assert pids[0] not in cuda_pids(), f"the {name} replica (num_gpus 0) has a CUDA context"
            else:
                assert device.startswith("cuda"), (name, device)
                assert pids[0] in cuda_pids(), f"the {name} replica holds no CUDA context"
            if name == "tfidf":
                assert (np.asarray(LABELS)[probs.argmax(1)] == np.asarray(GOLD)).all()
            else:
                on_cpu = TransformerClassifierSpecialist.load(checkpoints[name], device="cpu")
                assert out["version"] == on_cpu.version
                np.testing.assert_allclose(probs, on_cpu.predict_proba(TEXTS), atol=1e-4)
        assert len(versions) == 4
    finally:
        delete_specialists(endpoints)
    wait_until(lambda: abs(free_gpu() - before) < 1e-6, timeout_s=30)


def fine_tune_on_gpus(tiny_model, tmp_path, num_workers: int) -> tuple[str, float]:
    """fine_tune_transformer with use_gpu on ``num_workers`` workers; returns the checkpoint and the
    least free GPU seen while it ran."""
    from labelwright.training.finetune import fine_tune_transformer

    config = tfm_config("tfm", tiny_model, epochs=12, lr=3e-3, num_cpus=1)
    lowest = [free_gpu()]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            lowest[0] = min(lowest[0], free_gpu())
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out = fine_tune_transformer(
            config, TEXTS, GOLD, label_names=LABELS, output_dir=str(tmp_path / "ckpt"), num_workers=num_workers,
            use_gpu=True, storage_path=str(tmp_path / "ray_results"), seed=0,
        )
    finally:
        stop.set()
        watcher.join(timeout=5)
    return out, lowest[0]


def assert_fits(checkpoint: str) -> None:
    from labelwright.specialists.registry import load_specialist

    spec = load_specialist(checkpoint)  # on the driver's GPU
    assert spec.device.type == "cuda" and spec.kind == "transformer_classifier" and spec.labels == LABELS
    assert spec.version.startswith("tfm-")
    probs = spec.predict_proba(TEXTS)
    assert probs.shape == (len(TEXTS), 2)
    assert (np.asarray(LABELS)[probs.argmax(1)] == np.asarray(GOLD)).mean() == 1.0


@pytest.mark.gpu
@needs_gpu
def test_fine_tune_on_a_gpu_train_worker(ray_cluster, tiny_model, tmp_path):
    """One Train worker with use_gpu holds a whole GPU while it trains, gives it back, and its
    checkpoint loads and fits the toy data (as the CPU test's does)."""
    import ray

    total = float(ray.cluster_resources()["GPU"])
    out, lowest = fine_tune_on_gpus(tiny_model, tmp_path, num_workers=1)
    assert out == str(tmp_path / "ckpt")
    assert lowest <= total - 1.0 + 1e-6, f"no worker held a GPU (least free {lowest} of {total})"
    wait_until(lambda: abs(free_gpu() - total) < 1e-6, timeout_s=30)
    assert_fits(out)


@pytest.mark.gpu
@needs_gpu
def test_fine_tune_on_two_gpu_train_workers(ray_cluster, tiny_model, tmp_path):
    """Data-parallel (DDP over NCCL) on two GPU workers; needs two GPUs."""
    import ray

    total = float(ray.cluster_resources().get("GPU", 0.0))
    if total < 2:
        pytest.skip(f"needs 2 GPUs, the cluster has {total:g}")
    out, lowest = fine_tune_on_gpus(tiny_model, tmp_path, num_workers=2)
    assert lowest <= total - 2.0 + 1e-6, f"two workers did not hold two GPUs (least free {lowest} of {total})"
    assert_fits(out)


@pytest.mark.gpu
@needs_gpu
def test_hot_swap_of_a_gpu_replica_with_requests_in_flight(ray_cluster, tiny_model, tmp_path):
    """test_staged_learning's hot swap on a GPU replica: 4 callers keep sending batches while the
    deployment is redeployed with another checkpoint; no call fails, every call after the swap answers
    with the new version, and the replica serving then is on the GPU, holding its 0.25 share."""
    from labelwright.cluster.deploy import delete_specialists, deploy_specialists
    from labelwright.specialists.registry import load_specialist

    config = tfm_config("tfm", tiny_model, num_gpus=0.25, autoscaling=ONE_REPLICA)
    a = {"tfm": save_untrained(config, tmp_path / "a", seed=0)}
    b = {"tfm": save_untrained(config, tmp_path / "b", seed=1)}
    va, vb = load_specialist(a["tfm"]).version, load_specialist(b["tfm"]).version
    assert va != vb
    before = free_gpu()
    endpoints = deploy_specialists([config], a, app_prefix="gpuswap", gpu=True)
    try:
        seen, errors, swapped = swap_under_load(
            endpoints["tfm"].handle(), TEXTS, lambda: deploy_specialists([config], b, app_prefix="gpuswap", gpu=True))
        wait_until(lambda: len(replica_pids(endpoints["tfm"])) == 1, timeout_s=30)  # the old replica has left
        pids = replica_pids(endpoints["tfm"])
        assert pids[0] in cuda_pids(), "the replica serving after the swap holds no CUDA context"
        wait_until(lambda: abs(before - free_gpu() - 0.25) < 1e-6, timeout_s=30)
    finally:
        delete_specialists(endpoints)
    assert not errors, errors[:3]
    assert va in [v for t, v in seen if t < swapped]
    assert {v for t, v in seen if t > swapped + 0.2} == {vb}


def test_a_ray_worker_granted_no_gpu_picks_the_cpu(ray_cluster, monkeypatch):
    """pick_device(None) in a Ray actor that reserved no GPU gives the CPU even where CUDA is visible (here
    faked), while the driver, which Ray does not schedule, still gets the GPU."""
    import ray

    from labelwright.specialists.encoder import pick_device

    @ray.remote(num_cpus=0)
    class Worker:
        def device(self) -> str:
            import torch

            from labelwright.specialists.encoder import pick_device

            torch.cuda.is_available = lambda: True  # this actor's process only
            return str(pick_device(None))

    worker = Worker.remote()
    try:
        assert ray.get(worker.device.remote()) == "cpu"
    finally:
        ray.kill(worker)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert str(pick_device(None)) == "cuda"
    assert str(pick_device("cpu")) == "cpu"
