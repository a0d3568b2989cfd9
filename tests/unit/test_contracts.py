"""The declared seams hold: every implementation has what its protocol names, with the same signatures,
and the HTTP layer loads neither torch nor transformers."""

from __future__ import annotations

import inspect
import subprocess
import sys
from typing import Protocol

import pytest
import torch

from binserve.config import ServerConfig
from binserve.observability.metrics import BatchMetrics, GenerationMetrics
from binserve.scheduling.batcher import Batcher
from binserve.scheduling.continuous import ContinuousBatcher
from binserve.scheduling.contract import (
    BatchObserver,
    BatchSettings,
    GenerationObserver,
    GenerationScheduler,
    NullObserver,
    Scheduler,
)
from binserve.serving.contract import AdapterView, GenerativeView, ModelHost, ServedModel
from binserve.serving.manager import ModelManager
from binserve.serving.served import LoadedModel, ModelSlot, ServedVersion
from models.examples.causal_lm import write_causal_lm
from models.registry import ModelSpec, default_minilm_path, load_model
from tests.http.fakes import DoubleAdapter, EmbedAdapter, FakeManager

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def protocol_members(proto: type) -> dict[str, object]:
    """Every public name a protocol (and the protocols it extends) declares: methods, properties, fields."""
    members: dict[str, object] = {}
    for base in reversed(proto.__mro__):
        if base is Protocol or not getattr(base, "_is_protocol", False):
            continue
        for name in getattr(base, "__annotations__", {}):
            members.setdefault(name, None)
        for name, value in vars(base).items():
            if not name.startswith("_"):
                members[name] = value
    return members


def _params(fn) -> list[inspect.Parameter]:
    return [p for p in inspect.signature(fn).parameters.values() if p.name != "self"]


def problems(obj: object, proto: type) -> list[str]:
    """What `obj` lacks of `proto`: a missing member, or a method whose parameters differ (names and
    kinds; an implementation may add parameters only with defaults)."""
    found = []
    for name, declared in protocol_members(proto).items():
        if not hasattr(obj, name):
            found.append(f"{type(obj).__name__} has no {name!r}")
            continue
        if not inspect.isfunction(declared):
            continue  # a field or a property: present is what can be checked
        impl = getattr(obj, name)
        if not callable(impl):
            found.append(f"{type(obj).__name__}.{name} is not callable")
            continue
        want, got = _params(declared), {p.name: p for p in _params(impl)}
        for p in want:
            if p.name not in got or got[p.name].kind != p.kind:
                found.append(f"{type(obj).__name__}.{name} does not take {p.name!r} as {p.kind.description}")
        extra = [p for n, p in got.items() if n not in {w.name for w in want} and p.default is p.empty]
        extra = [p for p in extra if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if extra:
            found.append(f"{type(obj).__name__}.{name} needs more than the protocol gives: {[p.name for p in extra]}")
    return found


def test_the_checker_finds_what_is_missing_or_different():
    class Small(Protocol):
        size: int

        def run(self, samples: list, *, deadline: float) -> list: ...

    class Good:
        size = 1

        def run(self, samples, *, deadline, extra=None):
            return samples

    class Bad:
        def run(self, items, deadline, required):
            return items

    assert problems(Good(), Small) == []
    found = problems(Bad(), Small)
    assert any("no 'size'" in p for p in found)
    assert any("'samples'" in p for p in found) and any("'deadline'" in p for p in found)
    assert any("needs more" in p and "'required'" in p for p in found)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return write_causal_lm(tmp_path_factory.mktemp("lm") / "tiny", layers=1, hidden=32)


def test_schedulers_and_their_observers_keep_the_contract(tiny_lm):
    batcher = Batcher(lambda xs: xs)
    assert problems(batcher, Scheduler) == [] and isinstance(batcher, Scheduler)
    lm = load_model(ModelSpec("lm", "hf_causal_lm", str(tiny_lm)), torch.device("cpu"))
    generator = lm.continuous_batcher(BatchSettings(4, 512), NullObserver())
    assert isinstance(generator, ContinuousBatcher)
    assert problems(generator, GenerationScheduler) == [] and isinstance(generator, GenerationScheduler)
    assert problems(BatchMetrics("contract_test"), BatchObserver) == []
    assert problems(GenerationMetrics("contract_test"), GenerationObserver) == []
    assert problems(NullObserver(), BatchObserver) == problems(NullObserver(), GenerationObserver) == []
    assert problems(lm, GenerativeView) == []


def test_the_manager_its_models_and_the_http_fake_keep_the_routes_contract(tmp_path):
    manager = ModelManager(
        ServerConfig(models="policy=torch_module:models/policy_v1", model_repository=str(tmp_path)),
        torch.device("cpu"),
    )
    assert problems(manager, ModelHost) == []
    fake = FakeManager()
    try:
        assert problems(fake, ModelHost) == []
        for served in fake.served():
            assert problems(served, ServedModel) == [] and problems(served.adapter, AdapterView) == []
    finally:
        fake.close()
    for spec in (
        ModelSpec("minilm", "hf_encoder", default_minilm_path()),
        ModelSpec("policy", "torch_module", str(ROOT / "models" / "policy_v1")),
    ):
        adapter = load_model(spec, torch.device("cpu"))
        assert problems(adapter, AdapterView) == []
        loaded = LoadedModel(spec.name, ModelSlot(ServedVersion(adapter, {})), Batcher(lambda xs: xs))
        assert problems(loaded, ServedModel) == []
    for fake_adapter in (DoubleAdapter(), EmbedAdapter("embed")):
        assert problems(fake_adapter, AdapterView) == []


def test_the_http_layer_loads_neither_torch_nor_transformers():
    code = (
        "import sys, server\n"
        "from binserve.api import admin, failures, fanout, health, native, openai_compat, openai_generate, v2\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'tokenizers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
