"""The models the GPU check serves, built where it runs, with no hub and nothing large carried.

design: the device machine reaches no registry and takes at most 64 MiB per call, less than the
MiniLM package's weights; a random-weight model of the same shape is as fast as the real one, and
the check compares every engine and every reply with the same model's fp32 output, never with
published embeddings. So MiniLM's small files (config, tokenizer, sentence-transformers pooling;
`copy_model_files`, done here by `bash bench/gpu_check.sh --prepare`) travel, and `build` makes:
- `minilm`: all-MiniLM-L6-v2's architecture and tokenizer with seeded random weights;
- `resnet`: models/examples/resnet.py's ResNet-50-style policy on 480x640x3 uint8 images + a state;
- `llama`: a random Llama of ~0.5B parameters (24 x 1280, 10 heads / 2 KV heads, MLP 5120).
The CPU dry run builds the same three from the same code, smaller where size is only cost.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

# what a model directory holds besides its weights (and what is not worth carrying)
_WEIGHTS = (".safetensors", ".bin", ".pt", ".onnx", ".h5", ".msgpack")
_SKIPPED = ("README.md", "data_config.json", ".gitattributes")


@dataclass(frozen=True)
class Sizes:
    """How large the built models are: the GPU's, or the dry run's."""

    resnet_blocks: tuple[int, ...] = (3, 4, 6, 3)
    resnet_width: int = 64
    llama_layers: int = 24
    llama_hidden: int = 1280
    llama_heads: int = 10
    llama_kv_heads: int = 2
    llama_intermediate: int = 5120


GPU_SIZES = Sizes()
DRY_SIZES = Sizes(resnet_blocks=(1, 1, 1, 1), resnet_width=8, llama_layers=2, llama_hidden=64, llama_heads=4,
                  llama_kv_heads=2, llama_intermediate=128)  # fmt: skip


def copy_model_files(src: Path, dst: Path) -> Path:
    """Copy a model directory's files except its weights (and its README) into `dst`."""
    for path in sorted(src.rglob("*")):
        if not path.is_file() or path.suffix in _WEIGHTS or path.name in _SKIPPED:
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    if not (dst / "config.json").is_file():
        raise FileNotFoundError(f"{src} holds no config.json: not a Hugging Face model directory")
    return dst


def write_random_twin(files: Path, out: Path, seed: int = 0) -> Path:
    """A model directory with `files`' config, tokenizer and pooling, and seeded random weights."""
    from transformers import AutoConfig, AutoModel

    copy_model_files(files, out)
    config = AutoConfig.from_pretrained(files)
    torch.manual_seed(seed)
    AutoModel.from_config(config).eval().save_pretrained(out, safe_serialization=True)
    return out


def build(files: Path, root: Path, sizes: Sizes) -> dict[str, Path]:
    """The three model directories under `root`: name -> path."""
    from models.examples.causal_lm import write_causal_lm
    from models.examples.resnet import write_model_dir

    s = sizes
    return {
        "minilm": write_random_twin(files, root / "minilm"),
        "resnet": write_model_dir(root / "resnet", s.resnet_blocks, s.resnet_width),
        "llama": write_causal_lm(
            root / "llama", s.llama_layers, s.llama_hidden, heads=s.llama_heads, kv_heads=s.llama_kv_heads,
            intermediate=s.llama_intermediate,
        ),  # fmt: skip
    }
