"""Random-weight vision models with their image processor config, for tests, benchmarks and the README.

Real transformers classes (ViT) with seeded random weights and a `preprocessor_config.json`
written by transformers' own ViTImageProcessor, built here with no hub: what `hf_image` serves.
The labels are a pet classifier's; with random weights the answers are arbitrary, but the
decode, preprocessing, batching and the probabilities' agreement with transformers run directly
are real. `python -m models.examples.vision DIR [classifier|encoder] [tiny|small] [vit|bit]` writes one: `tiny`
(64 x 64 images, 2 layers of 64, for tests) or `small` (224 x 224, ViT-Tiny's 12 layers of 192).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import BitImageProcessor, ViTConfig, ViTForImageClassification, ViTImageProcessor, ViTModel

PET_LABELS = ["cat", "dog", "rabbit", "hamster", "parrot"]
SIZES = {
    "tiny": {"image_size": 64, "patch_size": 16, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "intermediate_size": 128},
    "small": {"image_size": 224, "patch_size": 16, "hidden_size": 192, "num_hidden_layers": 12,
              "num_attention_heads": 3, "intermediate_size": 768},
}  # fmt: skip


def write_vision_model(
    out: Path, kind: str = "classifier", size: str = "tiny", seed: int = 0, processor: str = "vit"
) -> Path:
    """Write a ViT `kind` ("classifier" or "encoder") of `size` (SIZES) with its processor config to `out`:
    `processor` "vit" resizes every image to the model's square, "bit" resizes the shortest edge and
    crops the centre (as DINOv2's BitImageProcessor does)."""
    shape = SIZES[size]
    config = ViTConfig(**shape)
    if kind == "classifier":
        config.num_labels = len(PET_LABELS)
        config.id2label = dict(enumerate(PET_LABELS))
        config.label2id = {name: i for i, name in enumerate(PET_LABELS)}
    torch.manual_seed(seed)
    model = (ViTForImageClassification if kind == "classifier" else ViTModel)(config).eval()
    if kind == "classifier":
        with torch.no_grad():  # random init gives near-equal probabilities; a real classifier is decisive
            model.classifier.weight.mul_(30.0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    side = shape["image_size"]
    if processor == "vit":
        ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(out)
    else:
        BitImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(out)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    kind, size, processor = (args[1:] + ["classifier", "tiny", "vit"][len(args) - 1 :])[:3]
    print(write_vision_model(Path(args[0]), kind, size, processor=processor))
