"""The sentence-transformers modules an embedding directory declares after its encoder.

design: a sentence-transformers directory lists its pipeline in `modules.json`: the Transformer
(the Hugging Face model, at the directory's root or in a sub-directory), then Pooling, and
optionally Dense projections (sentence-T5 and GTR end in one) and Normalize. binserve runs the
same pipeline inside `EncoderHead`, so every engine (torch, the ONNX export) returns the final
embedding: pooling as the directory's Pooling config says, each Dense layer with its safetensors
weights and activation, then L2 normalisation (binserve always normalises, which leaves cosine
similarities as they are). A module binserve does not run is refused when the model loads, naming
it, rather than served as a different embedding. A directory without `modules.json` pools by mean.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

# Module types by class name: sentence-transformers 2-5 write `sentence_transformers.models.Pooling`,
# 6 writes `sentence_transformers.sentence_transformer.modules.pooling.Pooling` and the like.
_TRANSFORMER, _POOLING, _DENSE, _NORMALIZE, _DROPOUT = "Transformer", "Pooling", "Dense", "Normalize", "Dropout"
#: Pooling's modes, by their config flag (older directories) and name (newer ones)
POOLING_MODES = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
#: Dense activations binserve runs, by the class name sentence-transformers records
_ACTIVATIONS = {"Identity": torch.nn.Identity, "Tanh": torch.nn.Tanh, "ReLU": torch.nn.ReLU, "GELU": torch.nn.GELU}


@dataclass(frozen=True)
class SentencePipeline:
    """Where the encoder is, how its tokens are pooled, and what runs on the pooled vector."""

    encoder_dir: Path
    pooling: str = "mean"
    #: the Dense layers in order (fp32), or None
    dense: torch.nn.Module | None = None


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def _pooling(path: Path) -> str:
    config = _read(path / "config.json") if (path / "config.json").is_file() else {}
    if isinstance(config.get("pooling_mode"), str):
        mode = {"mean_sqrt_len": "mean_sqrt_len_tokens"}.get(config["pooling_mode"], config["pooling_mode"])
        modes = [mode]
    else:
        modes = [name for flag, name in POOLING_MODES.items() if config.get(flag)]
    if len(modes) > 1 or (modes and modes[0] not in POOLING_MODES.values()):
        raise ValueError(f"{path}/config.json: pooling {modes} is not one of {sorted(POOLING_MODES.values())}")
    return modes[0] if modes else "mean"


def _dense(path: Path) -> torch.nn.Module:
    config = _read(path / "config.json")
    activation = str(config.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{path}: Dense activation {activation!r} is not one of {sorted(_ACTIVATIONS)}")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{path}: Dense weights must be model.safetensors (binserve loads no pickled weights)")
    sizes = int(config["in_features"]), int(config["out_features"])
    linear = torch.nn.Linear(*sizes, bias=bool(config.get("bias", True)))
    state = {k.removeprefix("linear."): v for k, v in safetensors.torch.load_file(weights).items()}
    linear.load_state_dict(state)
    return torch.nn.Sequential(linear, _ACTIVATIONS[activation]())


def read_pipeline(root: Path) -> SentencePipeline:
    """The pipeline `root/modules.json` declares (mean pooling at the root without one); ValueError
    naming a module binserve does not run."""
    listing = root / "modules.json"
    if not listing.is_file():
        legacy = root / "1_Pooling"
        return SentencePipeline(root, _pooling(legacy) if legacy.is_dir() else "mean")
    modules = _read(listing)
    if not isinstance(modules, list) or not modules or _kind(modules[0]) != _TRANSFORMER:
        raise ValueError(f"{listing}: the first module must be a sentence-transformers Transformer")
    encoder_dir, pooling, dense = root / modules[0].get("path", ""), "mean", []
    for module in modules[1:]:
        kind, where = _kind(module), root / module.get("path", "")
        if kind == _POOLING:
            pooling = _pooling(where)
        elif kind == _DENSE:
            dense.append(_dense(where))
        elif kind not in (_NORMALIZE, _DROPOUT):  # dropout does nothing at inference
            raise ValueError(
                f"{listing}: module {module.get('type')!r} is not one binserve runs (Pooling, Dense, Normalize)"
            )
    return SentencePipeline(encoder_dir, pooling, torch.nn.Sequential(*dense).eval() if dense else None)


def _kind(module: dict) -> str:
    return str(module.get("type", "")).rsplit(".", 1)[-1]


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Token states [B, T, H] pooled to [B, H] over the tokens `mask` keeps (rows right-padded)."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    if mode == "lasttoken":
        last = (mask.sum(dim=1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "weightedmean":
        m = m * torch.arange(1, hidden.shape[1] + 1, device=hidden.device, dtype=hidden.dtype).view(1, -1, 1)
    summed, counts = (hidden * m).sum(dim=1), m.sum(dim=1).clamp(min=1e-9)
    return summed / counts.sqrt() if mode == "mean_sqrt_len_tokens" else summed / counts
