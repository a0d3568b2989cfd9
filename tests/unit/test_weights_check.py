"""binserve.serving.weights: a version's safetensors files are checked from their headers before a
load, and a bad one is named with what is wrong with it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from binserve.serving.weights import CorruptWeights, check_weights
from models.registry import default_minilm_path


@pytest.fixture
def version(tmp_path):
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, tmp_path / "model.safetensors")
    (tmp_path / "2_Dense").mkdir()
    save_file({"linear.weight": torch.ones(2, 2)}, tmp_path / "2_Dense" / "model.safetensors")
    return tmp_path


def test_complete_files_pass_and_are_counted(version):
    assert check_weights(version) == 2
    assert check_weights(default_minilm_path()) >= 1  # the real packaged MiniLM


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[: len(b) - 5], "2_Dense/model.safetensors is cut short: its tensors need"),
        (lambda b: b[:40], "2_Dense/model.safetensors is not a safetensors file, or is cut short"),
        (lambda b: b + b"\0" * 7, "2_Dense/model.safetensors is longer than its tensors"),
        (lambda b: b[:5], "2_Dense/model.safetensors is 5 bytes: too short"),
        (lambda b: (2).to_bytes(8, "little") + b"[]", "its header is not a JSON object"),
        (lambda b: (4).to_bytes(8, "little") + b"\xff\xfe{}", "its header is not JSON"),
        (lambda b: b"\x00" * 64 + b"not safetensors", "is not a safetensors file"),
    ],
)
def test_a_damaged_file_is_named_with_what_is_wrong(version, damage, message):
    target = version / "2_Dense" / "model.safetensors"
    target.write_bytes(damage(target.read_bytes()))
    with pytest.raises(CorruptWeights, match=message.replace("(", r"\(")):
        check_weights(version)


def test_symlinks_are_not_followed(version, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside") / "x.safetensors"
    outside.write_bytes(b"garbage")
    (version / "link.safetensors").symlink_to(outside)
    assert check_weights(version) == 2
