"""The sentence-transformers pipeline of an embedding directory: pooling as sentence-transformers pools,
Dense layers from safetensors, and a clear refusal of what binserve does not run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

from models.examples.encoders import write_encoder
from models.registry import ModelSpec, load_model
from models.sentence_modules import POOLING_MODES, pool, read_pipeline


@pytest.mark.parametrize("mode", sorted(POOLING_MODES.values()))
def test_every_pooling_mode_equals_sentence_transformers(mode):
    hidden = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    theirs = Pooling(8, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})["sentence_embedding"]
    torch.testing.assert_close(pool(hidden, mask, mode), theirs, rtol=1e-5, atol=1e-6)


def _modules(root, *entries):
    listing = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}, *entries]
    (root / "modules.json").write_text(json.dumps(listing))


def test_refusals_name_what_binserve_does_not_run(tmp_path):
    _modules(tmp_path, {"path": "1_LayerNorm", "type": "sentence_transformers.models.LayerNorm"})
    with pytest.raises(ValueError, match="LayerNorm.*is not one binserve runs"):
        read_pipeline(tmp_path)
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True})
    )
    _modules(tmp_path, {"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    with pytest.raises(ValueError, match=r"pooling \['mean', 'max'\]"):
        read_pipeline(tmp_path)
    (tmp_path / "2_Dense").mkdir()
    (tmp_path / "2_Dense" / "config.json").write_text(json.dumps({"in_features": 4, "out_features": 2}))
    (tmp_path / "2_Dense" / "pytorch_model.bin").write_bytes(b"a pickle")
    _modules(tmp_path, {"path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    with pytest.raises(ValueError, match="must be model.safetensors"):
        read_pipeline(tmp_path)


def test_without_modules_json_the_legacy_pooling_config_or_mean(tmp_path):
    assert read_pipeline(tmp_path).pooling == "mean" and read_pipeline(tmp_path).dense is None
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert read_pipeline(tmp_path).pooling == "cls"


def test_a_directory_sentence_transformers_6_saves_serves_its_embeddings(tmp_path):
    """sentence-transformers 6 writes new module type names; binserve reads them and, through its own
    engines, computes what SentenceTransformer.encode does (mean pooling, a Tanh Dense, normalize)."""
    encoder = write_encoder(tmp_path / "t5", "t5-encoder")
    first = Transformer(str(encoder), model_args={"local_files_only": True})
    st = SentenceTransformer(
        modules=[
            first,
            Pooling(32, pooling_mode="mean"),
            Dense(32, 16, activation_function=torch.nn.Tanh()),
            Normalize(),
        ],
        device="cpu",
    )
    st.save(str(tmp_path / "st"))
    assert "sentence_transformer.modules" in (tmp_path / "st" / "modules.json").read_text()
    spec = ModelSpec("st", "hf_encoder", str(tmp_path / "st"), settings={"compile": False})  # not the subject
    adapter = load_model(spec, torch.device("cpu"))
    adapter.warmup()
    texts = ["hello world", "a somewhat longer sentence to pad the batch with", "x"]
    got = np.stack([o["embeddings"] for o in adapter.run_batch(adapter.validate({"texts": texts}).samples)])
    want = st.encode(texts, normalize_embeddings=True)
    assert got.shape == (3, 16) and ((got * want).sum(1)).min() >= 0.999
