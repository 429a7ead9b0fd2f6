"""Shared fixtures: one local Ray cluster for the whole test session (Ray starts in ~12 s here)."""

import os
import threading
import time
from types import SimpleNamespace
from pathlib import Path

import pytest

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {DATASETS}")
    return DATASETS


def movie_slice(datasets_dir: Path, directory: Path, rows: int):
    """The first ``rows`` movie_sentiment test rows as a CSV in ``directory``; returns (path, frame)."""
    import pandas as pd

    df = pd.read_csv(datasets_dir / "movie_sentiment" / "test.csv").head(rows).reset_index(drop=True)
    path = directory / "movie.csv"
    df.to_csv(path, index=False)
    return path, df


def wait_until(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def kill_a_replica_after_first_part(parts: Path, marker: str) -> tuple[threading.Thread, list[float]]:
    """Start a thread that waits for a job's first finished shard in ``parts`` and then kills one Serve replica
    whose actor name holds ``marker``; returns the thread and the list it appends the kill's time to."""
    import ray

    killed: list[float] = []

    def kill():
        wait_until(lambda: any(parts.glob("part-*.parquet")), timeout_s=600)
        replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith("SERVE_REPLICA::") and marker in a["name"]]
        ray.kill(ray.get_actor(replicas[0], namespace="serve"))
        killed.append(time.time())

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread, killed


def swap_under_load(handle, texts, swap, *, callers: int = 4):
    """Keep ``callers`` threads calling ``handle.predict`` on ``texts`` while ``swap()`` redeploys the
    specialist, until 4 calls have answered after it. Returns (seen, errors, swapped): each answer's
    (time, version), every exception a call raised, and the time the swap returned."""
    seen: list[tuple[float, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller():
        while not stop.is_set():
            try:
                seen.append((time.monotonic(), handle.predict.remote(texts).result()["version"]))
            except BaseException as exc:  # noqa: BLE001 - the test counts every failure
                errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    try:
        for t in threads:
            t.start()
        wait_until(lambda: len(seen) >= 4)  # calls are in flight on the old version
        swap()
        swapped = time.monotonic()
        wait_until(lambda: sum(t > swapped + 0.2 for t, _ in seen) >= 4)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    return seen, errors, swapped


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module: 2 threads on a busy 2-core box spin-wait badly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster shared by every integration test; shut down at the end of the session."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(
            address="local",  # a cluster of its own, whatever `ray start` left in /tmp/ray/ray_current_cluster
            num_cpus=16,  # logical slots, as labelwright gives a local cluster: headroom for actors that mostly wait
            include_dashboard=False,
            configure_logging=False,
            _temp_dir=None,
        )
    from ray import serve

    # Serve keeps the HTTP port it was first started on; start it here on a free loopback port
    # so no test depends on port 8000 or on which test happened to start Serve first.
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield SimpleNamespace(serve_port=port)
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def serve_port(ray_cluster) -> int:
    """Serve's HTTP proxy port for the session (Serve keeps the first port it was started on)."""
    return ray_cluster.serve_port


@pytest.fixture(scope="session")
def embedded_llm(ray_cluster, serve_port):
    """The default embedded LLM (Qwen2.5-Coder-0.5B-Instruct) on Serve, started once per session.

    The first start on a machine converts the GGUF (1-3 min); later starts load the cached weights.
    """
    from labelwright.cluster.embedded_llm import EmbeddedLLMConfig, start_embedded_llm

    config = EmbeddedLLMConfig(port=serve_port, startup_timeout_s=900)
    return start_embedded_llm(config), config


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny randomly initialised BERT with the bundled MiniLM tokenizer, saved as a local model dir."""
    from transformers import AutoTokenizer

    from labelwright.specialists.encoder import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    return save_tiny_bert(tokenizer, tmp_path_factory.mktemp("tiny") / "bert")


def save_tiny_bert(tokenizer, directory: Path) -> str:
    """A 2-layer, width-32 BERT with random weights (seed 0) for ``tokenizer``'s vocabulary, saved with
    the tokenizer in ``directory``; returns the directory."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
