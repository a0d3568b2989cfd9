"""Each engine on tiny models against torch fp32: a random DeBERTa-v2 encoder (embeddings, through the
cosine gate) and its classifier (probabilities), and the policy CNN of `torch_module` (float arrays).
Every engine is asked for alone, so the plan serves it or falls back to torch fp32 - which the test
refuses: the engine itself must run and pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.examples.encoders import write_encoder
from models.registry import ModelSpec, load_model

CPU = torch.device("cpu")
ENGINES = [("compile", "fp32"), ("compile", "bf16"), ("onnx", "fp32"), ("openvino", "fp32"), ("openvino", "bf16")]
TEXTS = ["hi", "a tiny encoder, random weights, checked against torch in fp32", "Ünïcödé 🙂 3.14 " * 20]


def needs_native(precision: str) -> None:
    from binserve.engines.settings import native

    if not native(precision, CPU):
        pytest.skip(f"{precision} is not native on this CPU")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: write_encoder(root / f, f) for f in ("deberta-v2", "deberta-v2-classifier")}


def served(path, cache, runtime: str, precision: str, adapter: str = "hf_encoder"):
    spec = ModelSpec("m", adapter, str(path), settings={"runtime": runtime, "precision": precision}, cache_dir=cache)
    model = load_model(spec, CPU)
    model.prepare()
    assert model.plan.engines == [f"{runtime}-{precision}"], model.describe()["runtime"]["candidates"]
    return model


def reference(path, cache, adapter: str = "hf_encoder"):
    return served(path, cache, "torch", "fp32", adapter)


def outputs(model, payload: dict) -> dict:
    return model.join(model.run_batch(model.validate(payload).samples), True)


@pytest.mark.parametrize("runtime,precision", ENGINES)
def test_each_engine_embeds_as_torch_fp32_does(tiny, tmp_path, runtime, precision):
    needs_native(precision)
    want = outputs(reference(tiny["deberta-v2"], str(tmp_path)), {"texts": TEXTS})["embeddings"]
    got = outputs(served(tiny["deberta-v2"], str(tmp_path), runtime, precision), {"texts": TEXTS})["embeddings"]
    assert got.shape == want.shape and got.dtype == np.float32
    assert (got * want).sum(1).min() >= (0.99999 if precision == "fp32" else 0.999)  # unit rows: cosine


@pytest.mark.parametrize("runtime,precision", [e for e in ENGINES if e != ("compile", "fp32")])  # compiles are slow
def test_each_engine_classifies_as_torch_fp32_does(tiny, tmp_path, runtime, precision):
    needs_native(precision)
    path = tiny["deberta-v2-classifier"]
    want = outputs(reference(path, str(tmp_path)), {"texts": TEXTS})["probabilities"]
    got = outputs(served(path, str(tmp_path), runtime, precision), {"texts": TEXTS})["probabilities"]
    np.testing.assert_allclose(got, want, atol=1e-4 if precision == "fp32" else 1e-2)


@pytest.mark.parametrize("runtime,precision", [e for e in ENGINES if e[1] == "fp32"])
def test_each_engine_runs_the_policy_cnn_as_torch_fp32_does(tmp_path, runtime, precision):
    rng = np.random.default_rng(3)
    payload = {"image": rng.integers(0, 255, (3, 480, 640, 3), dtype=np.uint8),
               "state": rng.standard_normal((3, 6)).astype(np.float32)}  # fmt: skip
    want = outputs(reference("models/policy_v1", str(tmp_path), "torch_module"), payload)["action"]
    got = outputs(served("models/policy_v1", str(tmp_path), runtime, precision, "torch_module"), payload)["action"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_compiled_module_never_compiles_after_its_warm_up():
    """What the warm-up compiled serves; a shape it did not compile for (a batch of one, which Dynamo
    specializes) runs eagerly instead of compiling on the request path."""
    import torch._dynamo as dynamo

    from binserve.engines.compiled import compile_module

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(5, 4)
    with torch.inference_mode():
        serving = compile_module(module, lambda compiled: compiled(x[:3]))
        graphs = dynamo.utils.counters["stats"]["unique_graphs"]
        for rows in (x, x[:1], x[:2]):  # five rows: the dynamic graph; one and two: never compiled for
            torch.testing.assert_close(serving(rows), module(rows))
    assert dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a graph was compiled after the warm-up"
