"""Adapter for a user's `nn.Module` with safetensors weights and a declared input spec.

design: a model directory holds `manifest.json` - the module's import path ("pkg.mod:Class"), its
constructor arguments, the weights file and one entry per input (dtype and per-sample shape) - and
the weights as safetensors (never a pickle). A request is one sample (every input at its declared
shape) or a batch (every input with one more leading dimension, all the same length); an input
whose manifest entry declares `image` steps (models/image_steps.py: resize, center_crop, resample,
and for float inputs rescale, mean, std) also takes an encoded image or a list of them, decoded
and preprocessed on the request thread to exactly that array (so a camera can send JPEGs). The batch
thread stacks samples per input and runs `module(**inputs)` on the engine the plan picks (torch
fp32 or bf16 autocast, ONNX Runtime for modules that export; binserve/engines/), gated by the
manifest's `accuracy` tolerances (`{"rtol": ..., "atol": ...}`); modules with convolutions run in
channels_last. A tensor, tuple or dict result is split into one output dict per sample, named by
the manifest's `outputs`.
"""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from binary_protocol import as_array
from binserve.errors import InvalidInput
from models.base import ModelAdapter, OnnxSpec
from models.contract import TensorSpec, Validated
from models.image_steps import ImageSteps
from models.images import ImageLimits, prepared

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
#: example modules that moved under models/examples/: manifests written before the move name the old
#: module, and a model repository outlives a release
_MOVED = {f"models.example_{n}": f"models.examples.{n}" for n in ("policy", "resnet")}


class UntrustedModelCode(ValueError):
    """A manifest names code outside the packages the operator trusts (refused before it runs)."""


def trusted_class(spec: str, prefixes: tuple[str, ...]) -> type[torch.nn.Module]:
    """The nn.Module class `spec` ("package.module:Class") names, if it lives under a trusted package.

    The module path is checked before anything is imported (importing runs a module's code), and
    the class after: it must be an nn.Module subclass defined under a trusted package too, so a
    trusted module's re-exported `subprocess` or `os.system` is refused like any other name.
    """
    rule = (
        f"torch_module classes must be torch.nn.Module subclasses from modules under the trusted packages "
        f"{list(prefixes)} (setting trusted_modules)"
    )

    def trusted(module_path: str) -> bool:
        return any(module_path == p or module_path.startswith(p + ".") for p in prefixes)

    module_path, colon, name = spec.partition(":")
    if not colon or not _DOTTED.match(module_path) or not name.isidentifier():
        raise UntrustedModelCode(f"class {spec!r} is not of the form 'package.module:Class'; {rule}")
    if not trusted(module_path):
        raise UntrustedModelCode(f"class {spec!r} is refused: {rule}")
    moved = _MOVED.get(module_path)
    cls = getattr(importlib.import_module(moved or module_path), name, None)
    home = isinstance(cls, type) and (trusted(cls.__module__) or cls.__module__ == moved)
    if not (home and issubclass(cls, torch.nn.Module)):
        raise UntrustedModelCode(f"class {spec!r} is refused: {rule}")
    return cls


class TorchModule(ModelAdapter):
    """A plain `nn.Module` served on dicts of arrays, e.g. {"image": uint8 (480, 640, 3), "state": ...}."""

    adapter_name = "torch_module"

    def load(self, root: Path) -> None:
        device = self.device
        manifest = json.loads((root / "manifest.json").read_text())
        cls = trusted_class(str(manifest.get("class", "")), self.options.trusted_modules)
        init_args = manifest.get("init_args", {})
        if not isinstance(init_args, dict):
            raise ValueError(f"{root}/manifest.json: 'init_args' must be an object of keyword arguments")
        weights = str(manifest.get("weights", "model.safetensors"))
        if Path(weights).name != weights or not weights.endswith(".safetensors"):
            raise ValueError(f"'weights' must name a .safetensors file in the model directory, got {weights!r}")
        model = cls(**init_args)
        model.load_state_dict(safetensors.torch.load_file(root / weights))
        model = model.to(device).eval()
        if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()):
            model = model.to(memory_format=torch.channels_last)  # oneDNN's and cuDNN's fast layout
        self._model = model
        self.inputs = {k: (np.dtype(v["dtype"]), tuple(v["shape"])) for k, v in manifest["inputs"].items()}
        # inputs that also take encoded images (JPEG, PNG, WebP), preprocessed to the declared array
        self.image_steps = {
            k: ImageSteps.from_manifest(v["image"], self.inputs[k][1], self.inputs[k][0], f"manifest input {k!r}")
            for k, v in manifest["inputs"].items()
            if "image" in v
        }
        self.image_limits = ImageLimits(self.limits.max_image_bytes, self.limits.max_image_pixels)
        self.output_names = list(manifest.get("outputs", ["output"]))
        # the accuracy gate for other engines: the manifest's tolerances, else the server's
        tol = manifest.get("accuracy", {})
        self.tolerance = (
            float(tol.get("rtol", self.options.runtime.rtol)),
            float(tol.get("atol", self.options.runtime.atol)),
        )

    @property
    def module(self) -> torch.nn.Module:
        return self._model

    def input_spec(self) -> dict:
        spec = {k: {"dtype": str(dt), "shape": list(shape)} for k, (dt, shape) in self.inputs.items()}
        for k in self.image_steps:
            spec[k]["or"] = "an encoded image (JPEG, PNG, WebP; base64 in JSON), or a list of them"
        return {**spec, "outputs": self.output_names}

    def input_tensors(self) -> list[TensorSpec]:
        return [
            TensorSpec(k, dt, shape, encoding="image" if k in self.image_steps else None)
            for k, (dt, shape) in self.inputs.items()
        ]

    def example_payload(self) -> dict:
        rng = np.random.default_rng(0)
        return {
            k: (rng.integers(0, 255, shape) if dt.kind in "iu" else rng.standard_normal(shape)).astype(dt)
            for k, (dt, shape) in self.inputs.items()
        }

    def validate(self, payload: dict, shared: dict | None = None) -> Validated:
        missing = [k for k in self.inputs if k not in payload]
        unknown = [k for k in payload if k not in self.inputs]
        if missing or unknown:
            parts = [f"missing inputs {missing}" if missing else "", f"unknown inputs {unknown}" if unknown else ""]
            raise InvalidInput(f"{'; '.join(p for p in parts if p)}; this model takes {sorted(self.inputs)}")
        arrays = {}
        batch = set()
        timing = {}
        for key, (dtype, shape) in self.inputs.items():
            value = payload[key]
            if key in self.image_steps and _encoded(value):
                images, batched, seconds = prepared(
                    value, key, self.image_steps[key], self.image_limits, self.limits.max_decoded_bytes,
                    self.check_samples,
                )  # fmt: skip
                value = np.stack(images) if batched else images[0]
                timing["decode-image"] = timing.get("decode-image", 0.0) + seconds
            if isinstance(value, np.ndarray) and value.ndim == len(shape) + 1:
                self.check_samples(value.shape[0], repr(key))  # before any per-sample work
            arr = as_array(value, dtype=dtype, name=key)
            if arr.shape == shape:
                batch.add(None)
            elif arr.ndim == len(shape) + 1 and arr.shape[1:] == shape and arr.shape[0] > 0:
                batch.add(arr.shape[0])
            else:
                raise InvalidInput(
                    f"{key!r} has shape {arr.shape}; expected {shape} (one sample) or (N, {', '.join(map(str, shape))})"
                    " (a batch)"
                )
            arrays[key] = arr
        if len(batch) != 1:
            raise InvalidInput(f"inputs disagree on the batch size: {sorted(batch, key=str)}")
        (n,) = batch
        if n is None:
            return Validated([arrays], batched=False, timing=timing)
        return Validated([{k: a[i] for k, a in arrays.items()} for i in range(n)], batched=True, timing=timing)

    def collate(self, samples: list) -> dict[str, np.ndarray]:
        host = {}
        for k, (dtype, shape) in self.inputs.items():
            host[k] = self.runner.staging(k, (len(samples), *shape), dtype)
            np.stack([s[k] for s in samples], out=host[k])
        return host

    def torch_forward(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = module(**inputs)
        if isinstance(out, torch.Tensor):
            return {self.output_names[0]: out}
        if isinstance(out, (tuple, list)):
            return dict(zip(self.output_names, out, strict=True))
        return dict(out)

    def onnx_spec(self) -> OnnxSpec:
        names = list(self.inputs)
        example = self.collate(self.gate_samples()[:2])
        axes = {k: {0: "batch"} for k in [*names, *self.output_names]}
        return OnnxSpec(_Positional(self._model, names), example, names, self.output_names, axes)

    def gate_samples(self) -> list:
        rng = np.random.default_rng(1)
        samples = self.validate(self.example_payload()).samples
        for _ in range(3):
            samples.append(
                {
                    k: (rng.integers(0, 255, shape) if dt.kind in "iu" else rng.standard_normal(shape)).astype(dt)
                    for k, (dt, shape) in self.inputs.items()
                }
            )
        return samples

    def accuracy(self, reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[bool, str]:
        rtol, atol = self.tolerance
        worst = max(
            float(np.max(np.abs(got[k].astype(np.float64) - r) - rtol * np.abs(r))) if r.size else -1.0
            for k, r in ((k, reference[k].astype(np.float64)) for k in reference)
        )
        return worst <= atol, f"max |error| - rtol x |fp32| = {worst:.2e} (atol {atol}, rtol {rtol})"


def _encoded(value) -> bool:
    """Whether a request value is an encoded image or a list of them (not an array)."""
    kinds = (bytes, bytearray, memoryview, str)
    return isinstance(value, kinds) or (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, kinds) for v in value)
    )


class _Positional(torch.nn.Module):
    """The user's module called with positional inputs in the manifest's order (what ONNX export passes)."""

    def __init__(self, module: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, *tensors: torch.Tensor):
        return self.module(**dict(zip(self.names, tensors, strict=True)))
