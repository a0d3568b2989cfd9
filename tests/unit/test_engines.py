"""Runtime and precision selection: the accuracy gate, the per-batch-size plan, overrides, the ONNX
export cache, and every engine's outputs against the fp32 reference and sentence-transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

import binserve.engines.plans as plans
import binserve.engines.timing as timing
from binserve.engines.plans import make_plan
from binserve.engines.settings import Engine, RuntimeSettings, native
from models.base import AdapterOptions
from models.hf_encoder import GATE_TEXTS
from models.registry import ModelSpec, default_minilm_path, load_model

CPU = torch.device("cpu")
TEXTS = [f"sentence number {i} about {'cats' if i % 2 else 'the stock market'} and more" for i in range(12)]


# --- the plan, with hand-written engines -------------------------------------------------------------


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine_gate(ref: dict, got: dict) -> tuple[bool, str]:
    cos = float((unit_rows(ref["e"]) * unit_rows(got["e"])).sum(1).min())
    return cos >= 0.999, f"min cosine {cos:.4f}"


BASE = np.random.default_rng(0).standard_normal((5, 8))
GATE = [{"x": np.arange(5)}]


def engine(name: str, noise: float = 0.0) -> Engine:
    rng = np.random.default_rng(1)
    return Engine(name, lambda host: {"e": BASE[host["x"]] + noise * rng.standard_normal((len(host["x"]), 8))})


def collate(n: int) -> dict:
    return {"x": np.arange(n) % 5}


@pytest.fixture
def speeds(monkeypatch):
    """Engine timings set by the test: speeds[engine][batch size] = seq/s."""
    table: dict[str, dict[int, float]] = {}

    def timed(engine, host, budget_s):
        return len(host["x"]) / table[engine.name][len(host["x"])]

    monkeypatch.setattr(timing, "_time_call", timed)
    return table


def test_a_candidate_that_fails_the_gate_is_not_used(speeds):
    speeds.update({"ref": {1: 10, 4: 10, 16: 10}, "good": {1: 20, 4: 20, 16: 20}, "bad": {1: 99, 4: 99, 16: 99}})
    plan = make_plan(
        engine("ref"), [("good", lambda: engine("good")), ("bad", lambda: engine("bad", noise=1.0))],
        collate, GATE, cosine_gate,
    )  # fmt: skip
    assert plan.engines == ["good"]  # bad is fastest, and wrong
    bad = next(t for t in plan.trials if t.engine == "bad")
    assert not bad.used and bad.note == "failed the accuracy gate" and "min cosine" in bad.accuracy


def test_each_batch_size_goes_to_its_fastest_engine(speeds):
    speeds.update({"ref": {1: 10, 4: 10, 16: 10}, "small": {1: 50, 4: 30, 16: 20}, "big": {1: 20, 4: 40, 16: 90}})
    plan = make_plan(
        engine("ref"), [("small", lambda: engine("small")), ("big", lambda: engine("big"))],
        collate, GATE, cosine_gate,
    )  # fmt: skip
    assert [plan.engine_for(n).name for n in (1, 2, 3, 4, 8, 9, 32)] == ["small"] * 2 + ["big"] * 5
    assert plan.describe()["plan"] == [{"max_batch": 2, "engine": "small"}, {"max_batch": None, "engine": "big"}]


def test_an_unavailable_engine_is_reported_not_fatal():
    def broken():
        raise RuntimeError("no kernel for this op")

    plan = make_plan(engine("ref"), [("broken", broken)], collate, GATE, cosine_gate)
    assert plan.engines == ["ref"]
    assert "not available: RuntimeError: no kernel for this op" in plan.trials[1].note


def test_a_record_from_an_earlier_load_builds_only_what_it_used(speeds):
    speeds.update({"ref": {1: 10, 4: 10, 16: 10}, "fast": {1: 50, 4: 50, 16: 50}, "slow": {1: 5, 4: 5, 16: 5}})
    built = []

    def make(name, noise=0.0):
        def factory():
            built.append(name)
            return engine(name, noise)

        return factory

    cands = [("fast", make("fast")), ("slow", make("slow")), ("bad", make("bad", 1.0))]
    first = make_plan(engine("ref"), cands, collate, GATE, cosine_gate)
    assert first.engines == ["fast"] and built == ["fast", "slow", "bad"]
    speeds.clear()  # a reload must not time anything again
    built.clear()
    again = make_plan(engine("ref"), cands, collate, GATE, cosine_gate, record=first.record())
    # the slower and the failing ones are not rebuilt; the runner-up the online check tries is ref
    assert again.engines == ["fast"] and built == ["fast"]
    assert [[alt.name for alt in alts] for alts in again.alternatives] == [["ref"]] * 3
    assert {t.engine: t.note for t in again.trials}["bad"] == "failed the accuracy gate"
    # if the engine the record used now fails its gate, everything is evaluated afresh
    speeds.update({"ref": {1: 10, 4: 10, 16: 10}, "slow": {1: 5, 4: 5, 16: 5}})
    broken = [("fast", make("fast", 1.0)), ("slow", make("slow")), ("bad", make("bad", 1.0))]
    fresh = make_plan(engine("ref"), broken, collate, GATE, cosine_gate, record=first.record())
    assert fresh.engines == ["ref"]


def test_an_explicit_choice_falls_back_to_the_reference_only_when_it_fails():
    ok = make_plan(engine("ref"), [("asked", lambda: engine("asked"))], collate, GATE, cosine_gate,
                   reference_eligible=False)  # fmt: skip
    assert ok.engines == ["asked"]
    failed = make_plan(engine("ref"), [("asked", lambda: engine("asked", noise=1.0))], collate, GATE, cosine_gate,
                       reference_eligible=False)  # fmt: skip
    assert failed.engines == ["ref"]


def test_settings_are_validated():
    for bad in ({"runtime": "tensorrt"}, {"precision": "fp8"}, {"min_cosine": 0.0}):
        with pytest.raises(ValueError):
            RuntimeSettings(**bad)


# --- MiniLM, for real ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def minilm(cache: Path, **settings) -> object:
    spec = ModelSpec("minilm", "hf_encoder", default_minilm_path(), settings=settings, cache_dir=str(cache))
    model = load_model(spec, CPU)
    model.prepare()
    return model


@pytest.fixture(scope="module")
def auto(cache):
    return minilm(cache)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return SentenceTransformer(default_minilm_path(), device="cpu").encode(TEXTS)


def embed(model, texts=TEXTS) -> np.ndarray:
    return model.join(model.run_batch(model.validate({"texts": texts}).samples), True)["embeddings"]


def test_auto_uses_only_engines_that_pass_and_says_why(auto):
    info = auto.describe()["runtime"]
    by_engine = {c["engine"]: c for c in info["candidates"]}
    used = [step["engine"] for step in info["plan"]]
    assert used and all(by_engine[e]["used"] for e in used)
    for name, c in by_engine.items():
        if c["used"] and name != "torch-fp32":
            assert "gate 0.999" in c["accuracy"] and "failed" not in c["note"]
        if not c["used"]:
            assert c["note"], f"{name} is unused without a reason"
    assert "onnx-fp32" in by_engine and "onnx-int8" in by_engine
    if not native("fp16", CPU):
        assert by_engine["torch-fp16"]["note"].startswith("skipped: fp16 is not native")


def test_served_embeddings_match_sentence_transformers_on_every_batch_size(auto, reference):
    for n in (1, 3, 12):  # the plan may use different engines for these
        got = np.concatenate([embed(auto, TEXTS[i : i + n]) for i in range(0, 12, n)])
        assert (unit_rows(got) * unit_rows(reference)).sum(1).min() >= 0.999


@pytest.mark.parametrize(
    "runtime,precision,floor",
    [
        ("torch", "fp32", 0.99999), ("torch", "bf16", 0.999), ("onnx", "fp32", 0.99999), ("onnx", "int8", 0.97),
        ("openvino", "fp32", 0.99999), ("openvino", "bf16", 0.999),
    ],  # fmt: skip
)
def test_every_engine_against_the_reference(cache, reference, runtime, precision, floor):
    if not native(precision, CPU):
        pytest.skip(f"{precision} is not native on this CPU")
    model = minilm(cache, runtime=runtime, precision=precision, min_cosine=floor)
    assert model.plan.engines == [f"{runtime}-{precision}"]
    cos = (unit_rows(embed(model)) * unit_rows(reference)).sum(1).min()
    assert cos >= floor


def test_a_precision_that_fails_the_gate_is_refused(cache):
    model = minilm(cache, runtime="onnx", precision="int8", min_cosine=0.9999)  # int8 cannot reach this
    assert model.plan.engines == ["torch-fp32"]
    int8 = next(c for c in model.describe()["runtime"]["candidates"] if c["engine"] == "onnx-int8")
    assert int8["note"] == "failed the accuracy gate" and "gate 0.9999" in int8["accuracy"]


def test_the_onnx_export_is_cached_and_reused_across_loads(cache, monkeypatch):
    monkeypatch.setattr(plans.CpuMeter, "foreign_cores", lambda self: 0.0)  # a quiet machine: the record is kept
    minilm(cache, runtime="onnx", precision="fp32")
    minilm(cache)
    exported = sorted(p.name for p in cache.glob("*-fp32.onnx"))
    assert exported, "nothing was exported"

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    monkeypatch.setattr(timing, "_time_call", lambda *a, **k: pytest.fail("timed again"))
    again = minilm(cache)  # a reload of the same files: export and timings come from the cache
    assert again.plan.engines and sorted(p.name for p in cache.glob("*-fp32.onnx")) == exported


def test_the_openvino_ir_is_converted_once_and_reused(cache, monkeypatch):
    import openvino

    minilm(cache, runtime="openvino", precision="fp32")
    irs = sorted(cache.glob("*-openvino-*.xml"))
    assert len(irs) == 1 and irs[0].with_suffix(".bin").stat().st_size > 80e6  # MiniLM's fp32 weights
    stamp = irs[0].stat().st_mtime_ns
    monkeypatch.setattr(openvino, "save_model", lambda *a, **k: pytest.fail("converted again"))
    again = minilm(cache, runtime="openvino", precision="fp32")
    assert again.plan.engines == ["openvino-fp32"] and irs[0].stat().st_mtime_ns == stamp


def test_a_worker_holds_only_the_engines_its_plan_uses(cache, monkeypatch):
    monkeypatch.setattr(plans.CpuMeter, "foreign_cores", lambda self: 0.0)  # a quiet machine
    model = minilm(cache, runtime="auto", precision="fp32", compile=False)  # torch, ONNX Runtime, OpenVINO in fp32
    assert model.plan.holds() == set(model.plan.engines)  # the slower ones were let go
    if not any(e.startswith("torch-") for e in model.plan.engines):
        assert model.torch_released and next(model.module.parameters()).device.type == "meta"
        with pytest.raises(RuntimeError, match="released"):
            model.torch_engine("fp32")
    # it still serves, and describes itself with the released module
    assert embed(model).shape == (len(TEXTS), 384) and model.describe()["parameters"] > 20e6

    monkeypatch.setattr(plans.CpuMeter, "foreign_cores", lambda self: 2.0)  # timed beside a busy neighbour
    provisional = minilm(cache / "busy", runtime="auto", precision="fp32", compile=False)
    assert provisional.plan.provisional
    # each step keeps its runner-up, which the online check may still prefer
    assert all(len(alts) == 1 for alts in provisional.plan.alternatives)


def test_a_shipped_onnx_file_is_used(cache, tmp_path, monkeypatch):
    src = Path(default_minilm_path())
    version = tmp_path / "version"
    shutil.copytree(src, version)
    shutil.copy(next(cache.glob("*-fp32.onnx")), version / "model.onnx")
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: pytest.fail("exported a model that ships one"))
    spec = ModelSpec("m", "hf_encoder", str(version), settings={"runtime": "onnx", "precision": "fp32"})
    model = load_model(spec, CPU, AdapterOptions(runtime=RuntimeSettings(cache_dir=str(tmp_path / "c"))))
    model.prepare()
    assert model.plan.engines == ["onnx-fp32"]


def test_the_gate_texts_exercise_padding_and_long_rows(auto):
    lengths = [len(s) for s in auto.gate_samples()]
    assert min(lengths) <= 3 and max(lengths) >= 200 and len(GATE_TEXTS) == len(lengths)


# --- the policy model (torch_module) -----------------------------------------------------------------


def test_policy_engines_stay_within_its_tolerance(tmp_path):
    from models.examples.policy import PolicyNet

    model = load_model(ModelSpec("policy", "torch_module", "models/policy_v1", cache_dir=str(tmp_path)), CPU)
    model.prepare()
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (5, 480, 640, 3), dtype=np.uint8)
    state = rng.standard_normal((5, 6)).astype(np.float32)
    v = model.validate({"image": image, "state": state})
    got = model.join(model.run_batch(v.samples), True)["action"]
    net = PolicyNet()
    net.load_state_dict(load_file("models/policy_v1/model.safetensors"))
    with torch.inference_mode():
        direct = net(torch.from_numpy(image), torch.from_numpy(state)).numpy()
    np.testing.assert_allclose(got, direct, rtol=1e-2, atol=1e-3)
    names = {c["engine"]: c for c in model.describe()["runtime"]["candidates"]}
    assert "not available" not in names["onnx-fp32"]["note"], names["onnx-fp32"]  # the CNN exports


def test_exclusive_works_on_a_read_only_cache(tmp_path, monkeypatch):
    """A replica mounting the repository read-only cannot create lock files: it locks the writer's
    lock file read-only if there is one, else goes on unlocked (it writes nothing there)."""
    import errno
    import os

    from binserve.engines.cache import exclusive

    real_open = os.open

    def read_only(path, flags, *args):
        if flags & (os.O_CREAT | os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    target = tmp_path / "model.onnx"
    monkeypatch.setattr(os, "open", read_only)
    with exclusive(target):  # no lock file yet
        pass
    monkeypatch.setattr(os, "open", real_open)
    (tmp_path / ".model.onnx.lock").touch()  # what the writer leaves
    monkeypatch.setattr(os, "open", read_only)
    with exclusive(target):
        pass
