"""Adapter for a local Hugging Face vision model: image classification (labels and scores) or embeddings.

design: a request carries `{"images": <one image or a list>}`, each an encoded JPEG, PNG or WebP
(bytes in the binary formats and V2 BYTES, base64 or a data URL in JSON). On the request thread,
`validate` decodes each one under the limits of models/images.py and preprocesses it as the
directory's `preprocessor_config.json` says (models/image_steps.py: resize, crop, rescale,
normalise, as transformers' processor does), so every sample is one float32 (3, H, W) array
whatever the image's size, and images of any size batch together; the time it took is reported as
`decode-image` in Server-Timing. The batch thread only stacks them into the runner's staging
buffer and runs the engine the plan picks. `*ForImageClassification` models reply `logits`,
`probabilities`, `labels` and `scores` (top-k / threshold, as the text classifiers); other vision
encoders reply L2-normalised `embeddings` (the model's pooled output, else its first token).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from binserve.errors import InvalidInput
from models.base import ModelAdapter, OnnxSpec
from models.contract import TensorSpec, Validated
from models.image_steps import ImageSteps
from models.images import ImageLimits, prepared
from models.labels import OPTION_KEYS, gate, parse_options, with_labels


class ImageHead(torch.nn.Module):
    """pixel_values -> the final outputs (logits and probabilities, or embeddings), for torch and ONNX."""

    def __init__(self, model: torch.nn.Module, task: str, multi_label: bool) -> None:
        super().__init__()
        self.model, self.task, self.multi_label = model, task, multi_label

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(pixel_values=pixel_values)
        if self.task == "classification":
            logits = out.logits.float()
            return logits, torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        pooled = getattr(out, "image_embeds", None)
        if pooled is None:
            pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return (torch.nn.functional.normalize(pooled.flatten(1).float(), p=2, dim=1),)


def synthetic_images(n: int) -> list[Image.Image]:
    """Photo-like images for the gate and timing: a few large smooth regions, texture and sensor noise,
    landscape, portrait, small and square. Smooth gradients alone were too easy: bf16's probability
    error on them was a fifth of what it was on photos (0.0018 against 0.0094-0.016 on a ViT), so
    an engine could pass the gate and then miss it on real images."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        h, w = ((480, 640), (640, 480), (120, 90), (300, 300))[i % 4]
        regions = Image.fromarray(rng.integers(0, 256, (4 + i % 5, 5 + i % 7, 3)).astype(np.uint8))
        texture = Image.fromarray(rng.integers(0, 256, (max(1, h // 8), max(1, w // 8), 3)).astype(np.uint8))
        field = np.asarray(regions.resize((w, h), Image.BICUBIC), dtype=np.int16)
        detail = np.asarray(texture.resize((w, h), Image.BILINEAR), dtype=np.int16)
        pixels = field + (detail - 128) // 3 + rng.integers(-12, 13, (h, w, 3))
        out.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)))
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


class HFImage(ModelAdapter):
    """A ViT-, ConvNeXt- or CLIP-style vision model: `{"images": ...}` in, labels or embeddings out."""

    adapter_name = "hf_image"

    def load(self, root: Path) -> None:
        config = AutoConfig.from_pretrained(root, local_files_only=True)
        archs = config.architectures or []
        self.task = "classification" if any(a.endswith("ForImageClassification") for a in archs) else "embedding"
        processor = root / "preprocessor_config.json"
        if not processor.is_file():
            raise FileNotFoundError(f"{processor} is missing: an image model needs its preprocessing")
        self.steps = ImageSteps.from_processor_config(json.loads(processor.read_text()), str(processor))
        self.shape = self.steps.shape()
        if self.shape is None:
            raise ValueError(f"{processor}: the preprocessing must end at one fixed size (a crop or an exact resize)")
        options = {"use_safetensors": True, "local_files_only": True}
        cls = AutoModelForImageClassification if self.task == "classification" else AutoModel
        self._model = cls.from_pretrained(root, **options).to(self.device).eval()
        self.labels = [config.id2label[i] for i in range(config.num_labels)] if self.task == "classification" else None
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.output_names = ["embeddings"] if self.task == "embedding" else ["logits", "probabilities"]
        self.image_limits = ImageLimits(self.limits.max_image_bytes, self.limits.max_image_pixels)
        self._heads: dict[int, ImageHead] = {}

    @property
    def module(self) -> torch.nn.Module:
        return self._model

    def input_spec(self) -> dict:
        return {
            "images": "an encoded image or a list of them: JPEG, PNG or WebP bytes; base64 or a data URL in JSON",
            "max_image_bytes": self.image_limits.max_bytes,
            "max_image_pixels": self.image_limits.max_pixels,
            "preprocessed_to": list(self.shape),
            "outputs": self.output_names,
            "labels": self.labels,
            "multi_label": self.multi_label if self.labels else None,
            "options": {"top_k": "labels per image, best first", "threshold": "labels scoring at least this"}
            if self.labels
            else None,
        }

    def input_tensors(self) -> list[TensorSpec]:
        return [TensorSpec("images", None, (), encoding="image")]

    def example_payload(self) -> dict:
        return {"images": [png_bytes(synthetic_images(1)[0])]}

    # --- request thread --------------------------------------------------------------------
    def validate(self, payload: dict, shared: dict | None = None) -> Validated:
        allowed = {"images", *OPTION_KEYS} if self.labels else {"images"}
        extra = set(payload) - allowed
        if extra or "images" not in payload:
            raise InvalidInput(
                f"expected 'images' (an encoded image or a list of them); unexpected keys {sorted(extra)}"
                if extra
                else f"expected 'images' (an encoded image or a list of them); got keys {sorted(payload)}"
            )
        options = parse_options(payload, len(self.labels)) if self.labels else {}
        samples, batched, seconds = prepared(
            payload["images"], "images", self.steps, self.image_limits, self.limits.max_decoded_bytes,
            self.check_samples,
        )  # fmt: skip
        return Validated(samples, batched, options, {"decode-image": seconds})

    # --- batch thread ------------------------------------------------------------------------
    def collate(self, samples: list) -> dict[str, np.ndarray]:
        host = self.runner.staging("pixel_values", (len(samples), *self.shape), np.float32)
        np.stack(samples, out=host)
        return {"pixel_values": host}

    def torch_forward(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        head = self._heads.get(id(module))
        if head is None:
            head = self._heads[id(module)] = ImageHead(module, self.task, self.multi_label)
        return dict(zip(self.output_names, head(inputs["pixel_values"]), strict=True))

    def onnx_spec(self) -> OnnxSpec:
        example = {k: v.copy() for k, v in self.collate(self.gate_samples()[:2]).items()}
        axes = {name: {0: "batch"} for name in ["pixel_values", *self.output_names]}
        return OnnxSpec(ImageHead(self._model, self.task, self.multi_label), example, ["pixel_values"],
                        self.output_names, axes)  # fmt: skip

    def join(self, outputs: list[dict], batched: bool, options: dict | None = None) -> dict:
        reply = super().join(outputs, batched, options)
        return with_labels(reply, batched, self.labels, self.multi_label, options) if self.labels else reply

    def gate_samples(self) -> list:
        return [self.steps.apply(img, "gate image", self.image_limits.max_pixels) for img in synthetic_images(8)]

    def accuracy(self, reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[bool, str]:
        return gate(self.task, reference, got, self.options.runtime)
