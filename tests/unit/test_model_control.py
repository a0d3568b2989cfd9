"""Model control's pieces alone: the repository's serving state, what a worker wants to serve, and
per-version batching settings."""

from __future__ import annotations

import pytest
import torch

from config import ServerConfig
from errors import ModelNotFound
from model_manager import ModelManager
from model_repository import ModelRepository
from models.registry import ModelSpec, check_settings, default_minilm_path, load_model, parse_specs


def test_serving_state_round_trips(tmp_path):
    repo = ModelRepository(tmp_path)
    repo.register(ModelSpec("a", "hf_encoder", default_minilm_path()))
    assert repo.models() == ["a"] and repo.serving("a") is None
    repo.set_serving("a", False)
    assert repo.serving("a") is False
    repo.set_serving("a", True)
    assert repo.serving("a") is True


def test_a_worker_serves_configured_models_unless_unloaded_and_loaded_ones(tmp_path):
    config = ServerConfig(models=f"minilm=hf_encoder:{default_minilm_path()}", model_repository=str(tmp_path))
    manager = ModelManager(config, torch.device("cpu"))  # not started: nothing loads
    manager.repo.register(ModelSpec("other", "hf_encoder", default_minilm_path()))
    assert manager._wanted() == ["minilm"]  # in the repository, but never loaded
    manager.repo.set_serving("other", True)
    assert manager._wanted() == ["minilm", "other"]
    manager.repo.set_serving("minilm", False)
    assert manager._wanted() == ["other"]
    manager.names = manager._wanted()
    with pytest.raises(ModelNotFound, match="'minilm' is unloaded"):
        manager.get("minilm")
    with pytest.raises(ModelNotFound, match="not served here"):
        manager.get("never-heard-of")


def test_batch_settings_are_per_version_and_bounded(tmp_path):
    assert check_settings({"max_batch_size": "8", "max_wait_ms": 5}, "x") == {"max_batch_size": 8, "max_wait_ms": 5.0}
    for bad in ({"max_batch_size": 0}, {"max_batch_tokens": 10**9}, {"max_wait_ms": -1}):
        with pytest.raises(ValueError, match="must be in"):
            check_settings(bad, "x")
    spec = parse_specs(f"m=hf_encoder:{default_minilm_path()};max_batch_size=4;runtime=torch;precision=fp32")[0]
    adapter = load_model(spec, torch.device("cpu"))  # batch settings are not the runtime's
    assert adapter.options.runtime.runtime == "torch"
    models = f"m=hf_encoder:{default_minilm_path()};max_batch_size=4"
    config = ServerConfig(models=models, model_repository=str(tmp_path))
    manager = ModelManager(config, torch.device("cpu"))
    assert manager.batch_settings("m", "1") == {
        "max_batch_size": 4,
        "max_batch_tokens": config.max_batch_tokens,
        "max_wait_ms": config.max_wait_ms,
    }
