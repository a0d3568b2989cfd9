"""The example array model: a small CNN policy, camera image + robot state -> action.

It is what `torch_module` serves out of the box (models/policy_v1), so the array path of binserve
is served and tested with a real module and real weights. `python -m models.examples.policy DIR`
writes a model directory (manifest + seeded safetensors weights) for it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

IMAGE_SHAPE = (480, 640, 3)
STATE_DIM = 6
ACTION_DIM = 2


class PolicyNet(nn.Module):
    """uint8 image (B, 480, 640, 3) + float32 state (B, 6) -> float32 action (B, 2) in [-1, 1]."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=5, stride=4, padding=2),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, stride=4, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(16 + STATE_DIM, hidden), nn.ReLU(), nn.Linear(hidden, ACTION_DIM), nn.Tanh()
        )

    def forward(self, image: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float().div_(255.0)
        return self.head(torch.cat([self.encoder(x), state.float()], dim=1))


def write_model_dir(out: Path, seed: int = 0) -> Path:
    """Write manifest.json and seeded weights for PolicyNet into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    safetensors.torch.save_file(PolicyNet().state_dict(), out / "model.safetensors")
    manifest = {
        "adapter": "torch_module",
        "class": "models.examples.policy:PolicyNet",
        "init_args": {},
        "weights": "model.safetensors",
        "inputs": {
            "image": {"dtype": "uint8", "shape": list(IMAGE_SHAPE)},
            "state": {"dtype": "float32", "shape": [STATE_DIM]},
        },
        "outputs": ["action"],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out


if __name__ == "__main__":
    print(write_model_dir(Path(sys.argv[1] if len(sys.argv) > 1 else "models/policy_v1")))
