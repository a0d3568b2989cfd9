"""`--model-path DIR` (the Flask card's flag): one model directory served as the default model, its
adapter read from its files, and a repository kept out of the user's model directory."""

from __future__ import annotations

import json
import os

import pytest

from binserve.config import ServerConfig
from models.layout import detect_adapter
from models.registry import configured_specs, default_minilm_path, model_path_spec


def _hf(tmp_path, name: str, archs: list[str], *files: str):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": archs}))
    for f in files:
        (d / f).write_text("{}")
    return d


def test_the_adapter_is_read_from_the_directory(tmp_path):
    assert detect_adapter(default_minilm_path()) == "hf_encoder"  # a sentence-transformers directory
    assert detect_adapter("models/policy_v1") == "torch_module"  # manifest.json
    assert detect_adapter(str(_hf(tmp_path, "lm", ["LlamaForCausalLM"], "tokenizer.json"))) == "hf_causal_lm"
    assert detect_adapter(str(_hf(tmp_path, "vit", ["ViTForImageClassification"], "preprocessor_config.json"))) \
        == "hf_image"  # fmt: skip
    assert detect_adapter(str(_hf(tmp_path, "dino", ["Dinov2Model"], "preprocessor_config.json"))) == "hf_image"
    assert detect_adapter(str(_hf(tmp_path, "cls", ["DebertaV2ForSequenceClassification"], "tokenizer.json"))) \
        == "hf_encoder"  # fmt: skip


def test_a_directory_that_is_no_model_is_refused_naming_what_it_holds(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"neither manifest.json .* nor config.json .* found \['weights.bin'\]"):
        detect_adapter(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="config.json is not a Hugging Face configuration"):
        detect_adapter(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        detect_adapter(str(tmp_path / "missing"))


def test_the_model_path_is_the_default_and_only_model_unless_models_add_more(tmp_path):
    only = configured_specs("", "models/policy_v1")
    assert [(s.name, s.adapter) for s in only] == [("policy_v1", "torch_module")]
    assert only[0].path == os.path.realpath("models/policy_v1")
    both = configured_specs(f"m=hf_encoder:{default_minilm_path()}", "models/policy_v1")
    assert [s.name for s in both] == ["policy_v1", "m"]
    with pytest.raises(ValueError, match="model names must be unique"):
        configured_specs(f"policy_v1=hf_encoder:{default_minilm_path()}", "models/policy_v1")
    odd = tmp_path / "my model!"
    odd.mkdir()
    (odd / "manifest.json").write_text("{}")
    assert model_path_spec(str(odd)).name == "my-model"
    assert configured_specs("")[0].name == "minilm"  # no model path: binserve's default


def test_the_repository_stays_out_of_the_model_directory(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    assert ServerConfig(model_path=str(models), model_repository=str(tmp_path / "repo")).repository_root \
        == str(tmp_path / "repo")  # fmt: skip
    inside = ServerConfig(model_path=str(models), model_repository=str(models)).repository_root
    assert not inside.startswith(str(models)) and "binserve-repository-" in inside
    # every worker computes the same directory for the same model path
    assert ServerConfig(model_path=str(models), model_repository=str(models / "x")).repository_root == inside
    assert ServerConfig(model_repository=str(models)).repository_root == str(models)


def test_the_cards_command_line_parses():
    config = ServerConfig.from_args(["--model-path", "/models", "--device", "cpu", "--port", "50000",
                                     "--host", "0.0.0.0"])  # fmt: skip
    assert (config.model_path, config.device, config.port, config.host) == ("/models", "cpu", 50000, "0.0.0.0")


def test_a_repository_that_is_one_model_directory_serves_that_model(tmp_path):
    """The card's `docker run -v /path/to/models:/models` with the image's own command (its
    repository is /models): the mounted model is served, not MiniLM."""
    plain = tmp_path / "models"
    plain.mkdir()
    (plain / "manifest.json").write_text("{}")
    config = ServerConfig(model_repository=str(plain))
    assert config.served_model_path == str(plain) and "binserve-repository-" in config.repository_root
    assert ServerConfig(model_repository=str(plain), models="m=hf_encoder:/m").served_model_path == ""
    repository = tmp_path / "repo"
    (repository / "minilm" / "1").mkdir(parents=True)  # a real repository: one folder per model
    assert ServerConfig(model_repository=str(repository)).served_model_path == ""
