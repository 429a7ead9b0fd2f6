"""The service record of a run and what ``labelwright serve`` reads from it (no Ray: the HTTP routes are in
tests/integration/test_serve.py)."""

import json

import numpy as np
import pytest

from labelwright.orchestrator import service
from labelwright.orchestrator.spec import load_task
from labelwright.specialists.errors import ConfigError


def _run(tmp_path, records):
    spec = load_task(None, {"labels": ["pos", "neg"]})
    service.save_record(tmp_path, spec=spec, controller={"base_url": "http://127.0.0.1:9/v1", "model": "m"},
                        embedded=False, calibrated=True,
                        demonstrations=(["good", "bad"], ["pos", "neg"], np.eye(2, dtype=np.float32)))
    (tmp_path / "stages.json").write_text(json.dumps(records))
    return spec


def test_a_run_reads_back_with_its_fits_by_versions(tmp_path):
    ckpt = tmp_path / "checkpoints" / "a"
    ckpt.mkdir(parents=True)
    gate0 = {"threshold": 0.9, "stack": {"a": [1.0]}}
    gate1 = {"threshold": None, "combine": {"applied": True}}
    spec = _run(tmp_path, [
        {"stage": 0, "checkpoints": {"a": str(ckpt)}, "versions": {"a": "a0"}, "check": {"gate": gate0}},
        {"stage": 1, "checkpoints": {"a": str(ckpt)}, "versions": {"a": "a1"}, "check": {"gate": gate1}},
        {"stage": 2, "checkpoints": {"a": str(ckpt)}, "versions": {"a": "a2"}, "check": None},  # failed check
    ])
    state = service.load_service(tmp_path)
    assert state.spec == spec and state.stage == 2 and state.versions == {"a": "a2"}
    assert state.demo_texts == ["good", "bad"] and state.demo_labels == ["pos", "neg"]
    np.testing.assert_array_equal(state.demo_embeddings, np.eye(2))
    fits = state.fits()
    assert fits({"a": "a0"}) == (True, 0.9, {"stack": {"a": [1.0]}})
    assert fits({"a": "a1"}) == (True, None, {"combine": {"applied": True}})
    assert fits({"a": "a2"}) == (False, None, None)  # no fit for it: the rule's own threshold


def test_what_is_missing_is_said_with_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="no run directory"):
        service.load_service(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="run the same|Run the same"):
        service.load_service(tmp_path)
    _run(tmp_path, [{"stage": 0, "checkpoints": {"a": str(tmp_path / "gone")}, "versions": {"a": "a0"}}])
    with pytest.raises(ConfigError, match="checkpoints .* are missing"):
        service.load_service(tmp_path)
    with pytest.raises(ConfigError, match="unknown"):
        service.app_builder({"run_dir": str(tmp_path), "port": 1})
    with pytest.raises(ConfigError, match="run_dir is missing"):
        service.app_builder({})
