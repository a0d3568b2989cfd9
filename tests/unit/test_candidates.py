"""Which (runtime, precision) pairs a version is tried on, and why the others are not."""

from __future__ import annotations

import pytest
import torch

import binserve.engines.candidates as candidates
from binserve.engines.candidates import plan_candidates

CPU, GPU = torch.device("cpu"), torch.device("cuda")


@pytest.fixture
def natively(monkeypatch):
    """The device computes what the test says natively: natively.update({"bf16"}) etc."""
    native = {"fp32", "int8"}
    monkeypatch.setattr(candidates, "native", lambda p, device: p in native or (device.type == "cuda" and p != "int8"))
    return native


def test_auto_on_a_bf16_cpu_tries_every_runtime_in_what_it_computes(natively):
    natively.add("bf16")
    chosen, skipped = plan_candidates("auto", "auto", CPU)
    assert chosen == [
        ("torch", "bf16"), ("compile", "bf16"), ("onnx", "fp32"), ("onnx", "int8"), ("openvino", "fp32"),
        ("openvino", "bf16"),
    ]  # fmt: skip
    assert skipped == [("torch-fp16", "fp16 is not native on this cpu")]  # pairs that do not exist go unnamed


def test_bf16_is_not_tried_where_the_cpu_would_emulate_it(natively):
    chosen, _ = plan_candidates("auto", "auto", CPU)
    assert ("openvino", "bf16") not in chosen and ("torch", "bf16") not in chosen and ("openvino", "fp32") in chosen
    assert ("compile", "fp32") in chosen  # torch.compile in the precision torch runs best here


def test_on_a_gpu_only_torch_runs_and_the_cpu_runtimes_say_why(natively):
    chosen, skipped = plan_candidates("auto", "auto", GPU)
    assert chosen == [("torch", "bf16"), ("torch", "fp16"), ("compile", "bf16")]
    why = dict(skipped)
    assert why["onnx-fp32"] == "ONNX Runtime runs on the CPU here, not on cuda"
    assert why["openvino-bf16"] == "OpenVINO runs on the CPU here, not on cuda"


def test_an_asked_precision_names_the_runtimes_that_do_not_run_it(natively):
    chosen, skipped = plan_candidates("auto", "int8", CPU)
    assert chosen == [("onnx", "int8")]
    assert dict(skipped)["openvino-int8"] == "OpenVINO runs fp32/bf16 here, not int8"
    chosen, skipped = plan_candidates("openvino", "fp32", CPU)
    assert chosen == [("openvino", "fp32")] and skipped == []


def test_torch_compile_is_tried_once_and_not_at_all_when_turned_off(natively):
    natively.add("bf16")
    chosen, _ = plan_candidates("auto", "auto", CPU)
    assert [c for c in chosen if c[0] == "compile"] == [("compile", "bf16")]  # one compile, not one per precision
    chosen, skipped = plan_candidates("auto", "auto", CPU, compile=False)
    assert not [c for c in chosen if c[0] == "compile"]
    assert dict(skipped)["compile-bf16"].startswith("torch.compile is off here")
    chosen, _ = plan_candidates("compile", "fp32", CPU)
    assert chosen == [("compile", "fp32")]


def test_the_encoder_servers_disable_compile_turns_torch_compile_off():
    from binserve.encoder_server import config_for, parser
    from models.registry import default_minilm_path, parse_specs

    assert config_for(parser().parse_args(["--models", default_minilm_path()])).torch_compile is True
    off = config_for(parser().parse_args(["--models", default_minilm_path(), "--disable-compile"]))
    assert off.torch_compile is False
    # and per model version
    assert parse_specs("m=hf_encoder:/x;compile=false")[0].settings == {"compile": False}
