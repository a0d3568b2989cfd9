"""The GPU data path: pinned staging reused, streams, bf16, results equal to the CPU path, engine choice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from binserve.process.runtime import DeviceRunner
from models.base import AdapterOptions
from models.engines import RuntimeSettings
from models.registry import ModelSpec, default_minilm_path, load_model

pytestmark = pytest.mark.gpu
TEXTS = [f"a sentence of some length number {i}" * (1 + i % 3) for i in range(24)]


def load(device: str, runtime: str = "torch", precision: str = "fp32"):
    options = AdapterOptions(runtime=RuntimeSettings(runtime=runtime, precision=precision))
    return load_model(ModelSpec("minilm", "hf_encoder", default_minilm_path()), torch.device(device), options)


def embed(model) -> np.ndarray:
    v = model.validate({"texts": TEXTS})
    return model.join(model.run_batch(v.samples), True)["embeddings"]


def test_gpu_fp32_matches_cpu():
    np.testing.assert_allclose(embed(load("cuda")), embed(load("cpu")), atol=1e-4)


def test_gpu_bf16_is_close_and_returns_float32():
    gpu, cpu = embed(load("cuda", precision="bf16")), embed(load("cpu"))
    assert gpu.dtype == np.float32
    assert ((gpu * cpu).sum(1)).min() > 0.999  # unit vectors: cosine


def test_auto_on_the_gpu_uses_torch_engines_that_pass_the_gate():
    model = load("cuda", runtime="auto", precision="auto")
    model.prepare()
    assert model.plan.engines and all(e.startswith("torch-") for e in model.plan.engines)
    onnx = next(c for c in model.describe()["runtime"]["candidates"] if c["engine"] == "onnx-fp32")
    assert onnx["note"].startswith("skipped")


def test_pinned_staging_is_reused_per_slot_and_grows():
    r = DeviceRunner(torch.device("cuda"))
    first = r.staging("x", (4, 8), np.int64)
    r.next_batch()
    other = r.staging("x", (4, 8), np.int64)
    r.next_batch()
    again = r.staging("x", (2, 8), np.int64)
    assert first.ctypes.data == again.ctypes.data != other.ctypes.data
    assert r._buffers[(0, "in:x")].is_pinned()
    big = r.staging("x", (4096, 512), np.int64)
    assert big.shape == (4096, 512)


def test_copy_compute_round_trip_on_streams():
    r = DeviceRunner(torch.device("cuda"))
    a = r.staging("x", (3, 5), np.float32)
    a[:] = np.random.default_rng(0).standard_normal((3, 5))
    out = r.to_host(r.forward(lambda d: {"y": d["x"] * 3}, r.to_device({"x": a})))
    np.testing.assert_allclose(out["y"], a * 3, rtol=1e-6)
    assert r.memory_bytes() is not None
