"""Shared fixtures: one local Ray cluster for the whole test session (Ray starts in ~12 s here)."""

import os
from pathlib import Path

import pytest

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {DATASETS}")
    return DATASETS


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A local Ray cluster shared by every integration test; shut down at the end of the session."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(
            num_cpus=6,  # logical slots; leaves headroom so Ray Data never waits on Serve replicas
            include_dashboard=False,
            configure_logging=False,
            _temp_dir=None,
        )
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()
