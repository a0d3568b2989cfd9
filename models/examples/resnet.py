"""A ResNet-50-style policy on the seed's request shape: camera image + robot state -> action.

Why it exists: the example policy (models/examples/policy.py) is two small convolutions, which says
nothing about a GPU; this is the architecture of a real vision backbone (a 7x7 stem, bottleneck
stages of [3, 4, 6, 3] blocks, widths 64..512 x 4: ResNet-50's 25M parameters at the defaults) with
the policy's head, on uint8 (480, 640, 3) images and a float32 state of 6, so the GPU check can
measure what the image path (pinned staging, copy and compute streams, channels_last, autocast)
does with it. Weights are random and seeded; the last BatchNorm of each block starts at a small
scale so activations stay in range through 16 blocks, as zero-init-residual training recipes do.
`python -m models.examples.resnet DIR [blocks] [width]` writes a model directory for torch_module;
`blocks` as `3,4,6,3` and a base width of 64 give ResNet-50, `1,1,1,1` and 8 a tiny one for CPU runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from models.examples.policy import ACTION_DIM, IMAGE_SHAPE, STATE_DIM

RESNET50_BLOCKS = (3, 4, 6, 3)
EXPANSION = 4
# per-channel ImageNet statistics (scaled to 0..255), as torchvision's ResNet preprocessing uses
_MEAN = (123.675, 116.28, 103.53)
_STD = (58.395, 57.12, 57.375)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, each with BatchNorm; a projected shortcut when shapes change."""

    def __init__(self, inputs: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * EXPANSION
        self.body = nn.Sequential(
            nn.Conv2d(inputs, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out, 1, bias=False),
            nn.BatchNorm2d(out),
        )
        self.shortcut = (
            nn.Sequential(nn.Conv2d(inputs, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))
            if stride != 1 or inputs != out
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNetPolicy(nn.Module):
    """uint8 image (B, 480, 640, 3) + float32 state (B, 6) -> float32 action (B, 2) in [-1, 1]."""

    def __init__(self, blocks: list[int] | tuple[int, ...] = RESNET50_BLOCKS, width: int = 64) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
        inputs = width
        for stage, count in enumerate(blocks):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                layers.append(Bottleneck(inputs, width * 2**stage, stride))
                inputs = width * 2**stage * EXPANSION
        self.backbone = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(inputs + STATE_DIM, 256), nn.ReLU(), nn.Linear(256, ACTION_DIM), nn.Tanh())

    def forward(self, image: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        # HWC uint8 -> NCHW float, normalised on the device (the request carries raw camera bytes)
        x = (image.permute(0, 3, 1, 2).float() - self.mean) / self.std
        return self.head(torch.cat([self.backbone(x), state.float()], dim=1))


def init_weights(model: ResNetPolicy, seed: int) -> None:
    """Seeded He initialisation; each block's last BatchNorm scaled to 0.2 (see the module docstring)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    for block in model.modules():
        if isinstance(block, Bottleneck):
            nn.init.constant_(block.body[-1].weight, 0.2)


def write_model_dir(out: Path, blocks=RESNET50_BLOCKS, width: int = 64, seed: int = 0) -> Path:
    """Write manifest.json and seeded safetensors weights for ResNetPolicy into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    model = ResNetPolicy(list(blocks), width)
    init_weights(model, seed)
    safetensors.torch.save_file(model.state_dict(), out / "model.safetensors")
    manifest = {
        "adapter": "torch_module",
        "class": "models.examples.resnet:ResNetPolicy",
        "init_args": {"blocks": list(blocks), "width": width},
        "weights": "model.safetensors",
        "inputs": {
            "image": {"dtype": "uint8", "shape": list(IMAGE_SHAPE)},
            "state": {"dtype": "float32", "shape": [STATE_DIM]},
        },
        "outputs": ["action"],
        # bf16 through 50 layers moves these actions by ~3e-4 (measured on a CPU); the default atol
        # (1e-3) leaves too little room for a GPU's other kernels, and more would hide a wrong model
        "accuracy": {"rtol": 0.01, "atol": 2e-3},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


if __name__ == "__main__":
    blocks = tuple(int(b) for b in sys.argv[2].split(",")) if len(sys.argv) > 2 else RESNET50_BLOCKS
    width = int(sys.argv[3]) if len(sys.argv) > 3 else 64
    print(write_model_dir(Path(sys.argv[1]), blocks, width))
