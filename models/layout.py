"""Which adapter serves a model directory, read from its files alone (no torch, no transformers), so
the Gunicorn master can refuse a `--model-path` that holds no model before any worker starts."""

from __future__ import annotations

import json
import re
from pathlib import Path

_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9._-]")


def directory_model_name(path: str) -> str:
    """The name a model directory is served under: its own name, with any character a model name
    may not hold replaced by '-' ("model" when nothing is left)."""
    return _NOT_IN_NAMES.sub("-", Path(path).resolve().name).strip("-.")[:64] or "model"

#: a config.json larger than this is not a Hugging Face configuration (read whole to detect the adapter)
_MAX_CONFIG_BYTES = 4 << 20


def detect_adapter(path: str) -> str:
    """Which adapter serves the model directory `path`, from its files: `manifest.json` is a
    torch_module; a Hugging Face `config.json` is hf_causal_lm (a `...ForCausalLM` architecture),
    hf_image (an image classifier, or a vision model with an image processor and no tokenizer) or
    hf_encoder (every other: sentence-transformers, sequence classifiers, plain encoders). ValueError
    naming the directory and what it holds when neither file is there or config.json is not JSON."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist (or is not a directory)")
    if (root / "manifest.json").is_file():
        return "torch_module"
    config = root / "config.json"
    if not config.is_file():
        found = sorted(p.name for p in root.iterdir())[:20]
        raise ValueError(
            f"{path} holds neither manifest.json (a torch_module: an nn.Module with safetensors weights) nor "
            f"config.json (a Hugging Face model); found {found or 'nothing'}"
        )
    try:
        if config.stat().st_size > _MAX_CONFIG_BYTES:
            raise ValueError("larger than 4 MiB")
        data = json.loads(config.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config} is not a Hugging Face configuration: {exc}") from None
    archs = [a for a in data.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith("ForCausalLM") for a in archs):
        return "hf_causal_lm"
    tokenizer = any((root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"))
    if any(a.endswith("ForImageClassification") for a in archs) or (
        (root / "preprocessor_config.json").is_file() and not tokenizer
    ):
        return "hf_image"
    return "hf_encoder"
