"""Shared fixtures: one local Ray cluster for the whole test session (Ray starts in ~12 s here)."""

import os
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
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from labelwright.specialists.encoder import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64))
    directory = tmp_path_factory.mktemp("tiny") / "bert"
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)
