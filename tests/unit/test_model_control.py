"""Model control's pieces alone: the repository's serving state, what a worker wants to serve, and
per-version batching settings."""

from __future__ import annotations

import pytest
import torch

from binserve.config import ServerConfig
from binserve.errors import ModelNotFound
from binserve.scheduling.contract import BatchSettings
from binserve.serving.manager import ModelManager
from binserve.serving.repository import ModelRepository
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


def test_the_repository_index_says_why_a_model_is_not_served(tmp_path):
    from types import SimpleNamespace

    from binserve.serving.control import ModelControl

    repo = ModelRepository(tmp_path)
    for name in ("configured", "unloaded", "imported"):
        repo.register(ModelSpec(name, "hf_encoder", default_minilm_path()))
    repo.set_serving("unloaded", False)
    manager = SimpleNamespace(repo=repo, names=["configured"], configured=["configured", "unloaded"])
    reasons = {m["name"]: m["reason"] for m in ModelControl(manager).index()}
    assert reasons == {
        "configured": "loading or failed (GET /readyz says why)",  # wanted, but no worker reports it yet
        "unloaded": "unloaded (model control)",
        "imported": "not loaded: not in this server's models (POST /v2/repository/models/imported/load)",
    }


def test_loading_names_the_model_being_loaded_its_version_and_for_how_long(tmp_path):
    import threading

    path = default_minilm_path()
    config = ServerConfig(models=f"a=hf_encoder:{path},b=hf_encoder:{path}", model_repository=str(tmp_path))
    manager = ModelManager(config, torch.device("cpu"))  # not started: nothing loads by itself
    entered, release = threading.Event(), threading.Event()

    def slow_load(name, version):
        entered.set()
        release.wait(10)
        raise RuntimeError("stop here")  # this test is about the state while loading

    manager.loader.load = slow_load
    assert manager.loading() == {"a": {"state": "waiting"}, "b": {"state": "waiting"}}
    worker = threading.Thread(target=manager._try, args=("a", "1"))
    worker.start()
    assert entered.wait(10)
    now = manager.loading()
    assert now["a"]["state"] == "loading" and now["a"]["version"] == "1" and now["a"]["seconds"] >= 0
    assert now["b"] == {"state": "waiting"}
    release.set()
    worker.join(10)
    assert "a" not in manager.loading() and "stop here" in manager.not_ready_reasons()["a"]  # failing: said there


def test_the_start_up_banner_previews_what_registering_will_do_without_writing(tmp_path):
    import shutil

    repo = ModelRepository(tmp_path / "repo")
    one = ModelSpec("m", "hf_encoder", default_minilm_path())
    assert repo.preview(one).endswith("- a new version, 1") and repo.models() == []  # nothing written
    repo.register(one)
    assert repo.preview(one).endswith(f"{default_minilm_path()} - version 1")
    other = shutil.copytree(default_minilm_path(), tmp_path / "other", ignore=shutil.ignore_patterns("*.safetensors"))
    repo.register(ModelSpec("m", "hf_encoder", str(other)))  # version 2, current
    assert repo.preview(one).endswith("- version 1, made current again (was 2)")
    repo.register(one)
    repo.set_current("m", "2")  # a hot reload made since the configuration named version 1
    assert repo.preview(one).endswith("- version 2 (made current since)")
    assert "MISSING" in repo.preview(ModelSpec("x", "hf_encoder", str(tmp_path / "nowhere")))


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
    settings = manager.loader.batch_settings("m", "1", adapter)
    assert settings == BatchSettings(4, config.max_batch_tokens, config.max_wait_ms)
    policy = load_model(ModelSpec("p", "torch_module", "models/policy_v1"), torch.device("cpu"))
    assert manager.loader.batch_settings("m", "1", policy).max_batch_tokens is None  # arrays have no token budget


class _Repo:
    """The repository as ModelControl reads it; workers keep reporting the model for `lag` reads."""

    poll_s = 0.001
    await_workers = ModelRepository.await_workers  # the real wait, over these fake reports

    def __init__(self, lag: int) -> None:
        self.lag, self.serving = lag, {}

    def models(self):
        return ["m"]

    def lock(self, name):
        import contextlib

        return contextlib.nullcontext()

    def set_serving(self, name, on):
        self.serving[name] = on

    def current(self, name):
        return "1"

    def workers(self, name, max_age_s=None):
        if self.serving.get(name):
            return {"r:1": "1", "r:2": "1"}
        self.lag -= 1
        return {"r:2": "1"} if self.lag >= 0 else {}


class _Manager:
    names = ["m"]
    configured = ["m"]

    def __init__(self, repo):
        self.repo = repo
        self.refreshed = 0

    def refresh(self):
        self.refreshed += 1

    def not_ready_reasons(self):
        return {}


def test_unload_waits_until_no_worker_reports_the_model():
    from binserve.serving.control import ModelControl

    repo = _Repo(lag=5)
    result = ModelControl(_Manager(repo)).unload("m", timeout_s=10)
    assert result == {"model": "m", "converged": True, "workers": {}} and repo.lag < 0
    late = ModelControl(_Manager(_Repo(lag=10**9))).unload("m", timeout_s=0.05)
    assert not late["converged"] and late["error"] == "workers ['r:2'] still serve 'm'"
    with pytest.raises(ModelNotFound):
        ModelControl(_Manager(repo)).unload("other", timeout_s=1)


class _LoadRepo(_Repo):
    """Two live workers (both report `other`); after `m` is set to serve, r:1 reports it at once and
    r:2 only after `lag` reads."""

    def models(self):
        return ["m", "other"]

    def workers(self, name, max_age_s=None):
        if name == "other":
            return {"r:1": "1", "r:2": "1"}
        if not self.serving.get(name):
            return {}
        self.lag -= 1
        return {"r:1": "1", "r:2": "1"} if self.lag < 0 else {"r:1": "1"}


def test_load_waits_until_every_live_worker_serves_the_model():
    from binserve.serving.control import ModelControl

    repo = _LoadRepo(lag=5)
    result = ModelControl(_Manager(repo)).load("m", timeout_s=10)
    assert result["converged"] and result["workers"] == {"r:1": "1", "r:2": "1"} and repo.lag < 0
    assert result["lagging"] == []
    late = ModelControl(_Manager(_LoadRepo(lag=10**9))).load("m", timeout_s=0.05)
    assert not late["converged"] and late["lagging"] == ["r:2"]  # r:2 is live (it serves `other`)
    assert late["error"] == "model 'm' is not loaded everywhere: workers ['r:2'] do not serve it after the timeout"
