"""A version's safetensors files checked before anything loads them: complete, and what they say they are.

design: an upload or copy that was interrupted leaves a weights file cut short; safetensors then
fails deep inside the model's load with a message that names no file. Reading each file's header
(8 bytes of length, then JSON: every tensor's byte range) is enough to say which file is wrong and
how, and costs a few kilobytes per file, so it runs before every load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class CorruptWeights(ValueError):
    """A weights file of the version is cut short or is not a safetensors file."""


def check_weights(version_dir: str | Path) -> int:
    """Raise CorruptWeights naming the first bad *.safetensors file under `version_dir` (symlinks
    are not followed); returns how many files were checked."""
    root = Path(version_dir)
    checked = 0
    for path in sorted(root.rglob("*.safetensors")):
        if path.is_symlink() or not path.is_file():
            continue
        _check_one(path, path.relative_to(root))
        checked += 1
    return checked


def _check_one(path: Path, name: Path) -> None:
    size = os.stat(path).st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptWeights(f"{name} is {size} bytes: too short to be a safetensors file")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise CorruptWeights(f"{name} is not a safetensors file, or is cut short: its header "
                                 f"declares {n} bytes, the file has {size}")  # fmt: skip
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            raise CorruptWeights(f"{name} is not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise CorruptWeights(f"{name} is not a safetensors file: its header is not a JSON object")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CorruptWeights(f"{name} is not a safetensors file: a tensor has no byte range") from None
    expected = 8 + n + end
    if size != expected:
        how = "cut short" if size < expected else "longer than its tensors"
        raise CorruptWeights(f"{name} is {how}: its tensors need {expected} bytes, the file has {size}")
