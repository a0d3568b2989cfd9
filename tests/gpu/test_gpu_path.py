"""The GPU data path: pinned staging reused, streams, bf16, results equal to the CPU path, engine
choice; the pageable path kept for comparison; image models and continuous batching on the GPU.

bench/gpu_check.sh runs these on the device machine, with BINSERVE_TEST_MINILM naming a MiniLM of
random weights it built there (the package's weights cannot travel); elsewhere MiniLM is the package's.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from binserve.engines.settings import RuntimeSettings
from binserve.process.runtime import DeviceRunner
from binserve.scheduling.continuous import ContinuousBatcher
from binserve.scheduling.contract import BatchSettings
from binserve.scheduling.sequences import SamplingParams, Sequence
from models.base import AdapterOptions
from models.examples.causal_lm import EXAMPLE_PROMPTS, greedy_reference
from models.examples.resnet import write_model_dir
from models.registry import ModelSpec, load_model
from tests.conftest import MINILM

pytestmark = pytest.mark.gpu
TEXTS = [f"a sentence of some length number {i}" * (1 + i % 3) for i in range(24)]
CUDA = torch.device("cuda")


def load(device: str, runtime: str = "torch", precision: str = "fp32", path: str = MINILM, adapter="hf_encoder",
         pinned: bool = True):  # fmt: skip
    options = AdapterOptions(runtime=RuntimeSettings(runtime=runtime, precision=precision), pinned_staging=pinned)
    return load_model(ModelSpec("m", adapter, str(path)), torch.device(device), options)


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
    r = DeviceRunner(CUDA)
    first = r.staging("x", (4, 8), np.int64)
    r.next_batch()
    other = r.staging("x", (4, 8), np.int64)
    r.next_batch()
    again = r.staging("x", (2, 8), np.int64)
    assert first.ctypes.data == again.ctypes.data != other.ctypes.data
    assert r._buffers[(0, "in:x")].is_pinned()
    big = r.staging("x", (4096, 512), np.int64)
    assert big.shape == (4096, 512)


@pytest.mark.parametrize("pinned", [True, False])
def test_copy_compute_round_trip(pinned):
    r = DeviceRunner(CUDA, pinned=pinned)
    a = r.staging("x", (3, 5), np.float32)
    a[:] = np.random.default_rng(0).standard_normal((3, 5))
    out = r.to_host(r.forward(lambda d: {"y": d["x"] * 3}, r.to_device({"x": a})))
    np.testing.assert_allclose(out["y"], a * 3, rtol=1e-6)
    assert r.memory_bytes() is not None
    assert (r._buffers != {}) is pinned  # pageable: no pinned buffer was made


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """A small ResNet-style policy (one bottleneck per stage) on the seed's 480x640x3 images."""
    return write_model_dir(tmp_path_factory.mktemp("resnet") / "r", (1, 1, 1, 1), 16)


def actions(model, payload) -> np.ndarray:
    v = model.validate(payload)
    return model.join(model.run_batch(v.samples), v.batched)["action"]


def test_image_model_on_the_gpu_matches_the_cpu_pinned_or_not_and_bf16_passes_its_gate(resnet):
    rng = np.random.default_rng(3)
    payload = {"image": rng.integers(0, 256, (6, 480, 640, 3), dtype=np.uint8),
               "state": rng.standard_normal((6, 6)).astype(np.float32)}  # fmt: skip
    cpu = actions(load("cpu", path=resnet, adapter="torch_module"), payload)
    for pinned in (True, False):
        gpu = actions(load("cuda", path=resnet, adapter="torch_module", pinned=pinned), payload)
        np.testing.assert_allclose(gpu, cpu, rtol=1e-3, atol=1e-4)  # TF32 convolutions: not bit-equal
    bf16 = load("cuda", precision="bf16", path=resnet, adapter="torch_module")
    ok, measure = bf16.accuracy({"action": cpu}, {"action": actions(bf16, payload)})
    assert ok, measure


def test_continuous_batching_on_the_gpu_equals_generate_alone(hf_lm):
    cpu_model, tok = hf_lm
    model = type(cpu_model).from_pretrained(cpu_model.name_or_path).eval().to(CUDA)
    with torch.no_grad():  # sharpened attention, as tests/unit/test_generation.py says why
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    b = ContinuousBatcher(model, tok, CUDA, BatchSettings(16, 32768), eos_ids=()).start()
    try:
        lengths = [5, 17, 9, 30, 3, 12, 21, 8]
        params = [SamplingParams(max_new_tokens=n, temperature=0.0) for n in lengths]
        seqs = [b.submit_sequence(Sequence(tok(p).input_ids, sp, time.monotonic() + 60))
                for p, sp in zip(EXAMPLE_PROMPTS, params, strict=True)]  # fmt: skip
        for seq in seqs:
            list(seq.stream(60))
        for seq, p, n in zip(seqs, EXAMPLE_PROMPTS, lengths, strict=True):
            assert seq.output == greedy_reference(model, tok(p).input_ids, n, eos=False), p
        assert b.steps < sum(lengths)  # they shared steps
    finally:
        b.close()
