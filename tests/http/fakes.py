"""A small fake model manager for in-process HTTP tests (Flask's test client, no Gunicorn, no torch).

It is a `serving.contract.ModelHost` (what the routes use of the manager; checked in
tests/unit/test_contracts.py), with real Batchers, so requests go through the same submit/wait path
as in production; the models are two tiny deterministic functions:
`double` (an array model: y = 2x on float32 rows of 3) and `embed` (a text model whose embedding
of a text is a fixed function of its characters, and whose samples are "token" rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from binary_protocol import as_array
from binserve.errors import InvalidInput, ModelNotFound, NotReady
from binserve.scheduling.batcher import Batcher
from binserve.scheduling.contract import BatchSettings, Tagged
from models.contract import TensorSpec, Validated

DIM = 4


def embed_text(text: str) -> np.ndarray:
    """The fake embedding of `text` (unit length)."""
    codes = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.float32)
    v = np.array([len(codes), codes.sum() % 97, codes.max(initial=0), 1.0], dtype=np.float32)
    return v / np.linalg.norm(v)


class DoubleAdapter:
    """y = 2x for rows of 3 float32; one sample is shape (3,), a batch (N, 3)."""

    adapter_name = "fake_double"
    model_dir = Path("/nonexistent")
    generates = False
    token_inputs = False

    def __init__(self, name: str = "double", version: str = "1") -> None:
        self.name = name
        self.version = version

    def input_tensors(self):
        return [TensorSpec("x", np.dtype(np.float32), (3,))]

    def validate(self, payload: dict, shared: dict | None = None) -> Validated:
        if set(payload) != {"x"}:
            raise InvalidInput(f"expected exactly 'x', got {sorted(payload)}")
        x = as_array(payload["x"], dtype=np.float32, name="x")
        if x.shape == (3,):
            return Validated([x], batched=False)
        if x.ndim == 2 and x.shape[1] == 3 and x.shape[0] > 0:
            return Validated(list(x), batched=True)
        raise InvalidInput(f"'x' has shape {x.shape}; expected (3,) or (N, 3)")

    def run(self, samples: list) -> list[dict]:
        return [{"y": 2 * s} for s in samples]

    def join(self, outputs: list[dict], batched: bool, options: dict | None = None) -> dict:
        if not batched:
            return dict(outputs[0])
        return {k: np.stack([o[k] for o in outputs]) for k in outputs[0]}


class EmbedAdapter(DoubleAdapter):
    """Texts (or token rows) in, DIM-wide embeddings out; samples are uint8 code rows."""

    adapter_name = "fake_embed"
    token_inputs = True  # its uint8 code rows stand for token rows

    def input_tensors(self):
        return [TensorSpec("texts", None, ()), TensorSpec("input_ids", np.dtype(np.int64), (-1,))]

    def validate(self, payload: dict, shared: dict | None = None) -> Validated:
        if "texts" in payload:
            texts = payload["texts"]
            batched = not isinstance(texts, str)
            texts = texts if batched else [texts]
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
                raise InvalidInput("'texts' must be a str or a non-empty list of str")
            return Validated([np.frombuffer(t.encode(), dtype=np.uint8) for t in texts], batched)
        if "input_ids" in payload:
            rows = payload["input_ids"]
            rows = list(rows) if isinstance(rows, np.ndarray) and rows.ndim == 2 else rows
            return Validated([as_array(r, dtype=np.uint8, name="input_ids") for r in rows], True)
        raise InvalidInput("expected 'texts' or 'input_ids'")

    def run(self, samples: list) -> list[dict]:
        return [{"embeddings": embed_text(bytes(s).decode("utf-8", "replace"))} for s in samples]


class ShoutAdapter(EmbedAdapter):
    """Another text model: the embedding of the text in capitals (so its outputs differ from embed's)."""

    adapter_name = "fake_shout"

    def run(self, samples: list) -> list[dict]:
        return [{"embeddings": embed_text(bytes(s).decode("utf-8", "replace").upper())} for s in samples]


class BrokenAdapter(EmbedAdapter):
    """A text model whose forward pass always fails (after its load-time check)."""

    adapter_name = "fake_broken"
    broken = False

    def run(self, samples: list) -> list[dict]:
        if self.broken:
            raise RuntimeError("the fake model is broken")
        return super().run(samples)


@dataclass
class FakeLoaded:
    """A `serving.contract.ServedModel`: name, adapter, signature, scheduler, cacheable."""

    name: str
    adapter: DoubleAdapter
    scheduler: Batcher
    signature: dict = field(init=False)
    cacheable: bool = True

    def __post_init__(self) -> None:
        out = self.adapter.run(self.adapter.validate(_EXAMPLES[self.adapter.adapter_name]).samples)[0]
        self.signature = {k: (v.shape, str(v.dtype)) for k, v in out.items()}


_EXAMPLES = {
    "fake_double": {"x": [1.0, 2.0, 3.0]},
    "fake_embed": {"texts": "example"},
    "fake_shout": {"texts": "example"},
    "fake_broken": {"texts": "example"},
}


class FakeRepo:
    """The repository as the routes ask it: which versions exist."""

    def __init__(self, versions: dict[str, list[str]]) -> None:
        self._versions = versions

    def versions(self, model: str) -> list[str]:
        return list(self._versions.get(model, []))


class FakeManager:
    """A `serving.contract.ModelHost` over fake models with real batchers; `calls` records updates."""

    def __init__(self, max_batch_size: int = 8, max_wait_ms: float = 0.0) -> None:
        self._models = {}
        models = (DoubleAdapter("double"), EmbedAdapter("embed"), ShoutAdapter("shout"), BrokenAdapter("broken"))
        for adapter in models:
            batcher = Batcher(
                lambda samples, a=adapter: Tagged(a.run(samples), a.version),
                BatchSettings(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms),
                name=adapter.name,
            ).start()
            self._models[adapter.name] = FakeLoaded(adapter.name, adapter, batcher)
        self._models["broken"].adapter.broken = True  # it passed its load check; now every batch fails
        self.names = [*self._models, "loading"]
        self.default_name = "double"
        self.ready = True
        self.others_ready = True  # the server's other workers (workers_ready)
        self.draining = False
        self.repo = FakeRepo({"double": ["1", "2"], "embed": ["1"]})
        self.calls: list[dict] = []

    def get(self, name: str | None) -> FakeLoaded:
        name = name or self.default_name
        if name in self._models:
            return self._models[name]
        if name == "loading":
            raise NotReady("model 'loading' is still loading", retry_after_s=1.0)
        raise ModelNotFound(f"model {name!r} is not served here; models: {sorted(self.names)}")

    def served(self) -> list[FakeLoaded]:
        return list(self._models.values())

    def describe(self) -> list[dict]:
        return [{"name": m.name, "version": m.adapter.version} for m in self._models.values()]

    def workers_ready(self) -> bool:
        return self.others_ready

    def not_ready_reasons(self) -> dict[str, str]:
        return {}

    def loading(self) -> dict[str, dict]:
        return {}

    def update(
        self, name: str, *, version: str | None, path: str | None, adapter: str | None, timeout_s: float
    ) -> dict:
        self.calls.append({"model": name, "version": version, "path": path, "adapter": adapter, "timeout_s": timeout_s})
        return {"model": name, "version": version or "imported", "converged": True, "workers": {}}

    def start_draining(self) -> None:
        self.draining = True

    def close(self) -> None:
        for m in self._models.values():
            m.scheduler.close()


def add_model(manager: FakeManager, adapter) -> None:
    """Serve one more fake model (its batcher closed with the manager)."""
    batcher = Batcher(lambda samples: Tagged(adapter.run(samples), adapter.version), BatchSettings(max_batch_size=8),
                      name=adapter.name).start()  # fmt: skip
    manager._models[adapter.name] = FakeLoaded(adapter.name, adapter, batcher)
    manager.names.append(adapter.name)


def add_tiny_lm(manager: FakeManager, path, backend: str = "loop", cache_dir: str | None = None) -> None:
    """Serve the causal LM at `path` as model "lm" (closed with the manager), on `backend` (loop or
    openvino: OpenVINO GenAI in fp32, exported into `cache_dir`)."""
    from types import SimpleNamespace

    import torch

    from binserve.scheduling.continuous import ContinuousBatcher
    from models.registry import ModelSpec, load_model

    adapter = load_model(ModelSpec("lm", "hf_causal_lm", str(path)), torch.device("cpu"))
    # no end-of-sequence token, so only max tokens or a cancel ends a sequence
    if backend == "openvino":
        from binserve.engines.genai_export import export_for_genai, export_python
        from binserve.scheduling.openvino_genai import OpenVINOGenerator

        export = export_for_genai(path, cache_dir, export_python())
        batcher = OpenVINOGenerator(export, adapter.tokenizer, BatchSettings(16, 32768), threads=2, eos_ids=()).start()
    else:
        batcher = ContinuousBatcher(adapter._model, adapter.tokenizer, torch.device("cpu"), BatchSettings(16, 32768),
                                    eos_ids=()).start()  # fmt: skip
    batcher.submitted = []
    submit = batcher.submit_sequence
    batcher.submit_sequence = lambda seq: (batcher.submitted.append(seq), submit(seq))[1]
    manager._models["lm"] = SimpleNamespace(name="lm", adapter=adapter, signature={}, scheduler=batcher,
                                            cacheable=False)  # fmt: skip
    manager.names.append("lm")
