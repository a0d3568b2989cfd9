"""The adapter contract between the server and a model.

design: an adapter owns one loaded model version on one device and knows its inputs. The request
thread calls `validate` (decode-time checks and cheap CPU work such as tokenization, BEFORE the
request is queued, so a bad request never reaches a batch); the batch thread calls `run_batch` with
the samples of many requests: `collate` them into host arrays, run the engine the version's plan
picks for that batch size (binserve/engines/: torch or ONNX Runtime, fp32, bf16, fp16 or int8,
chosen at load by accuracy and measured speed), and `split` the outputs back to one dict per
sample; the request thread calls `join` to shape the reply. An adapter supplies the pieces the
engines need - its torch forward, an exportable module, inputs to check accuracy on and a way to
compare outputs - and the base class builds the candidates and the plan. Adapters never import Flask.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from binserve.engines.cache import cache_key, cached_path, exclusive, load_record, machine_key, save_record
from binserve.engines.candidates import plan_candidates
from binserve.engines.compiled import compile_module
from binserve.engines.onnx import export_onnx, ort_engine, quantize_int8
from binserve.engines.openvino import convert, ir_name, ov_engine
from binserve.engines.plans import Plan, make_plan
from binserve.engines.settings import TORCH_DTYPES, Engine, RuntimeSettings
from binserve.errors import LimitExceeded
from binserve.process.runtime import DeviceRunner, batch_threads, in_compute_thread
from models.contract import TensorSpec, Validated


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of an adapter, checked in `validate` before any expensive step."""

    #: samples (texts, token rows, array rows) in one request: more could never fit the queue
    max_samples: int = 2048
    #: characters per text before tokenizing; 0: 32 x the model's maximum tokens
    max_text_chars: int = 0
    #: tokens per text or token row at most; 0: the model's own maximum
    max_text_tokens: int = 0
    #: cut texts and token rows to the model's maximum length (True), or refuse them with 413
    truncate: bool = True
    #: one encoded image: its bytes, and the pixels its header may declare (models/images.py)
    max_image_bytes: int = 16 << 20
    max_image_pixels: int = 24_000_000
    #: what one request's samples may hold once decoded (images become float arrays)
    max_decoded_bytes: int = 256 << 20


@dataclass(frozen=True)
class AdapterOptions:
    """How a model version is served, beyond its files: what the operator configured."""

    runtime: RuntimeSettings = RuntimeSettings()
    limits: RequestLimits = RequestLimits()
    #: package prefixes that model code (torch_module classes) may be imported from; see README
    trusted_modules: tuple[str, ...] = ("models",)
    #: on a GPU: pinned staging buffers and copy/compute streams (DeviceRunner), or plain copies
    pinned_staging: bool = True


@dataclass(frozen=True)
class OnnxSpec:
    """How to export an adapter's model: a module taking the collated inputs in order, and names."""

    module: torch.nn.Module
    example: dict  # collated host arrays to trace with (a padded batch, for token models)
    inputs: list[str]
    outputs: list[str]
    dynamic: dict  # input/output name -> {axis: name} for torch.onnx.export's dynamic_axes


class ModelAdapter(abc.ABC):
    """One loaded model version on one device."""

    #: registry name of the adapter ("hf_encoder", "torch_module")
    adapter_name: str = ""
    #: True when samples are token rows padded per batch: the batcher then bounds batches by
    #: padded tokens and groups similar lengths, using `sample_length`.
    token_inputs: bool = False
    #: True for adapters served by a continuous batcher (generation), not the request batcher
    generates: bool = False
    #: bf16 on a CPU by casting the weights (faster for small batches than autocast, which casts
    #: them on every call) rather than by autocast; only for modules whose inputs are integers
    bf16_weights_on_cpu: bool = False

    def __init__(
        self, name: str, version: str, path: str, device: torch.device, options: AdapterOptions | None = None
    ) -> None:
        self.name = name
        #: the directory the version's files are in (ONNX exports are keyed by its files)
        self.model_dir = Path(path)
        self.version = version
        self.device = device
        self.options = options or AdapterOptions()
        self.limits = self.options.limits
        #: staging buffers and streams for this model's batches
        self.runner = DeviceRunner(device, pinned=self.options.pinned_staging)
        self._record_file: Path | None = None
        self._record_seen: int | None = None
        self._follow_at = 0.0
        self.plan: Plan | None = None
        #: the fp32 torch weights were let go after planning (no engine of the plan runs on torch)
        self.torch_released = False
        self.load(self.model_dir)

    # --- what an adapter supplies -----------------------------------------------------------------
    @abc.abstractmethod
    def load(self, root: Path) -> None:
        """Load the version's files from `root` onto `self.device` (called once, by the constructor)."""

    @abc.abstractmethod
    def input_spec(self) -> dict:
        """JSON description of the accepted inputs (shown by GET /models)."""

    @abc.abstractmethod
    def input_tensors(self) -> list[TensorSpec]:
        """The named inputs a request may carry, per sample (tensor protocols describe them)."""

    @abc.abstractmethod
    def validate(self, payload: dict, shared: dict | None = None) -> Validated:
        """Check a decoded request and turn it into samples; raises errors.InvalidInput (400) or
        errors.LimitExceeded (413). Sizes are checked before anything costs more than the request.

        `shared` is one request's scratch space across the models it fans out to: an adapter may
        keep work there that another model of the same request can reuse (tokens, for models with
        the same tokenizer), under keys that say exactly what the work depended on."""

    @abc.abstractmethod
    def collate(self, samples: list) -> dict[str, np.ndarray]:
        """Host arrays for a batch of samples (into the runner's staging buffers)."""

    @abc.abstractmethod
    def torch_forward(self, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The forward pass on device tensors, with whatever post-processing the outputs need."""

    @abc.abstractmethod
    def accuracy(self, reference: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> tuple[bool, str]:
        """Whether `got` is close enough to fp32's `reference` for this model, and a short measure."""

    @abc.abstractmethod
    def example_payload(self) -> dict:
        """A valid request, used to warm the model up and to check a freshly loaded version."""

    @property
    @abc.abstractmethod
    def module(self) -> torch.nn.Module:
        """The underlying torch module in fp32 (the reference every other engine is checked against)."""

    def gate_samples(self) -> list:
        """Samples the accuracy gate runs (as one batch, and the first alone): varied, realistic."""
        return self.validate(self.example_payload()).samples

    def bench_samples(self, n: int) -> list:
        """n representative samples for timing the engines at load."""
        samples = self.gate_samples()
        return (samples * n)[:n]

    def onnx_spec(self) -> OnnxSpec | None:
        """How to export the model to ONNX, or None when it cannot be."""
        return None

    def int8_excluded(self, node_name: str) -> bool:
        """MatMuls that int8 quantization leaves in fp32 (the ones that cost too much accuracy)."""
        return False

    def split(self, outputs: dict[str, np.ndarray], n: int) -> list[dict]:
        """One output dict per sample."""
        return [{k: v[i] for k, v in outputs.items()} for i in range(n)]

    def sample_length(self, sample) -> int:
        """Tokens in one sample (only called when `token_inputs`)."""
        return len(sample)

    # --- limits -----------------------------------------------------------------------------------
    def check_samples(self, n: int, what: str) -> None:
        """413 for a request of more samples than `limits.max_samples` (it could never be queued)."""
        if n > self.limits.max_samples:
            raise LimitExceeded(
                f"{what} holds {n} samples; one request may hold at most {self.limits.max_samples} "
                "(max_queue_samples): split it into several requests"
            )

    # --- engines and the plan ---------------------------------------------------------------------
    def _torch_precision(self, precision: str) -> tuple[torch.nn.Module, torch.dtype | None]:
        """The module and autocast dtype torch runs `precision` with: fp32 as loaded; bf16/fp16 by
        autocast, or by cast weights (see `bf16_weights_on_cpu`)."""
        if self.torch_released:
            raise RuntimeError(f"{self.name}: the torch weights were released after planning (no engine uses them)")
        dtype = TORCH_DTYPES[precision]
        if precision == "fp32":
            return self.module, None
        if precision == "bf16" and self.bf16_weights_on_cpu and self.device.type == "cpu":
            return _cast_copy(self.module, dtype), None
        return self.module, dtype

    def torch_engine(self, precision: str) -> Engine:
        """torch in `precision`, eagerly."""
        module, autocast = self._torch_precision(precision)
        runner = self.runner

        def run(host: dict) -> dict:
            return runner.to_host(runner.forward(self.torch_forward, module, runner.to_device(host), autocast=autocast))

        return Engine(f"torch-{precision}", run)

    def compiled_engine(self, precision: str) -> Engine:
        """torch.compile of the module in `precision`, compiled now on the shapes the plan gates and
        times (a batch of varied lengths, one row, a batch of four); serving never compiles."""
        module, autocast = self._torch_precision(precision)
        runner = self.runner

        def call(fn, host: dict) -> dict:
            return runner.to_host(runner.forward(self.torch_forward, fn, runner.to_device(host), autocast=autocast))

        def warm(compiled) -> None:
            gate = self.gate_samples()
            for samples in (gate, gate[:1], self.bench_samples(4)):
                call(compiled, {k: v.copy() for k, v in self.collate(samples).items()})

        serving = compile_module(module, warm)
        return Engine(f"compile-{precision}", lambda host: call(serving, host))

    def onnx_export(self) -> tuple[OnnxSpec, str, Path]:
        """The adapter's exportable module, the key its derived files are cached under, and its ONNX
        export: the version's own `model.onnx`, else one made once and cached."""
        spec = self.onnx_spec()
        if spec is None:
            raise RuntimeError(f"{self.adapter_name} models of this kind do not export to ONNX")
        key = cache_key(self.model_dir, self.adapter_name, *spec.inputs, *spec.outputs)
        shipped = self.model_dir / "model.onnx"
        if shipped.is_file():
            return spec, key, shipped
        path = cached_path(self.options.runtime.cache_dir, f"{key}-fp32.onnx")
        example = tuple(torch.from_numpy(np.ascontiguousarray(spec.example[k])) for k in spec.inputs)
        return spec, key, export_onnx(spec.module, example, spec.inputs, spec.outputs, spec.dynamic, path)

    def onnx_engine(self, precision: str) -> Engine:
        """ONNX Runtime on the CPU: the ONNX export, int8-quantized if asked (cached beside the version)."""
        spec, key, path = self.onnx_export()
        if precision == "int8":
            int8 = cached_path(self.options.runtime.cache_dir, f"{key}-int8.onnx")
            path = quantize_int8(path, int8, self.int8_excluded)
        return ort_engine(f"onnx-{precision}", path, spec.inputs, spec.outputs)

    def openvino_engine(self, precision: str) -> Engine:
        """OpenVINO on the CPU: the ONNX export converted to OpenVINO's IR (cached), compiled in `precision`."""
        spec, key, onnx_path = self.onnx_export()
        ir = convert(onnx_path, cached_path(self.options.runtime.cache_dir, ir_name(key)))
        return ov_engine(f"openvino-{precision}", ir, precision, spec.inputs, spec.outputs)

    def prepare(self) -> None:
        """Choose the engines: every candidate the settings and the device allow, gated and timed."""
        in_compute_thread()
        s = self.options.runtime
        makers = {"torch": self.torch_engine, "compile": self.compiled_engine, "onnx": self.onnx_engine,
                  "openvino": self.openvino_engine}  # fmt: skip
        pairs, skipped = plan_candidates(s.runtime, s.precision, self.device, s.compile)
        candidates = [(f"{rt}-{p}", lambda make=makers[rt], p=p: make(p)) for rt, p in pairs]
        gate = self.gate_samples()
        # owned copies: on a GPU collate fills reusable pinned buffers, which the next collate overwrites
        gate_sets = [{k: v.copy() for k, v in self.collate(g).items()} for g in (gate, gate[:1])]
        explicit = s.runtime != "auto" or s.precision != "auto"
        record_file = None
        try:
            settings_key = repr(dataclasses.replace(s, cache_dir=None))
            key = cache_key(self.model_dir, self.adapter_name, "plan", machine_key(self.device), settings_key)
            record_file = cached_path(s.cache_dir, f"{key}-plan.json")
        except OSError:
            pass
        # Workers load the same version at the same moment; timing engines side by side would make
        # each disturb the other's numbers. The first measures alone, the others reuse its record.
        with exclusive(record_file) if record_file else contextlib.nullcontext():
            self.plan = make_plan(
                self.torch_engine("fp32"),
                candidates,
                lambda n: self.collate(self.bench_samples(n)),
                gate_sets,
                self.accuracy,
                # asked for another engine explicitly: fp32 torch is the reference, used only as a fallback
                reference_eligible=not explicit or (s.runtime in ("auto", "torch") and s.precision in ("auto", "fp32")),
                record=load_record(record_file) if record_file else None,
                boot=os.environ.get("BINSERVE_SERVER_STARTED"),  # set by the Gunicorn master: one per server start
            )
            if record_file:
                save_record(record_file, self.plan.record())
                # what the online check learns while serving is what the next load starts from
                self.plan.on_change = lambda plan: save_record(record_file, plan.record())
        self._record_file, self._record_seen, self._follow_at = record_file, _mtime(record_file), 0.0
        for name, why in skipped:
            self.plan.note_skipped(name, why)
        self._release_unused()

    def _release_unused(self) -> None:
        """After planning, hold only the engines the plan serves with: the others are dropped, and the
        fp32 torch weights (the reference every candidate was gated against) go too when no engine
        kept runs on torch - their structure stays, on the meta device, for `describe`."""
        self.plan.release_unused()
        if self.device.type == "cpu" and not any(n.startswith(("torch-", "compile-")) for n in self.plan.holds()):
            self.module.to("meta")
            self.torch_released = True

    # --- the batch thread ---------------------------------------------------------------------------
    def run_batch(self, samples: list) -> list[dict]:
        """Run samples from many requests as one batch; returns one output dict per sample."""
        if self.plan is None:
            self.prepare()
        self.runner.next_batch()
        host = self.collate(samples)
        engine = self.plan.engine_for(len(samples))
        with batch_threads():
            started = time.perf_counter()
            outputs = engine(host)
            self.plan.observe(len(samples), engine, time.perf_counter() - started)
        self._follow_siblings()
        return self.split(outputs, len(samples))

    def _follow_siblings(self) -> None:
        """At most once a second: when a sibling worker's online check moved a step (it saved the
        record), move it here too, so every worker of the server runs a batch on the same engine."""
        now = time.monotonic()
        if self._record_file is None or now < self._follow_at:
            return
        self._follow_at = now + 1.0
        seen = _mtime(self._record_file)
        if seen != self._record_seen:
            self._record_seen = seen
            self.plan.follow(load_record(self._record_file))

    def join(self, outputs: list[dict], batched: bool, options: dict | None = None) -> dict:
        """One request's reply from its per-sample output dicts: stacked, or the lone sample's."""
        if not batched:
            return dict(outputs[0])
        return {k: np.stack([o[k] for o in outputs]) for k in outputs[0]}

    def warmup(self, batch_sizes=(1, 4)) -> None:
        """Choose the engines, then run the example through them at a few batch sizes."""
        if self.plan is None:
            self.prepare()
        validated = self.validate(self.example_payload())
        for n in batch_sizes:
            samples = (validated.samples * n)[:n]
            outputs = self.run_batch(samples)
            if len(outputs) != n:
                raise RuntimeError(f"{self.name}: warm-up returned {len(outputs)} outputs for {n} inputs")

    def describe(self) -> dict:
        """What GET /models shows about this model."""
        params = list(self.module.parameters())
        return {
            "name": self.name,
            "version": self.version,
            "adapter": self.adapter_name,
            "model_type": type(self.module).__name__,
            "device": str(self.device),
            "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
            "engines": self.plan.engines if self.plan else [],
            "runtime": self.plan.describe() if self.plan else None,
            "device_memory_bytes": self.runner.memory_bytes(),
            "parameters": sum(p.numel() for p in params),
            "inputs": self.input_spec(),
        }


def _mtime(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:
        return None


def _cast_copy(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    return copy.deepcopy(module).to(dtype)
