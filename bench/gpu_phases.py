"""The GPU check's phases, each a function of the profile and the built models to a dict of figures.

design: bench/gpu_check.sh runs every phase as its own process under `timeout`, so a phase that
hangs or crashes (a CUDA error, a server that never gets ready) costs only its own time slot and
the next phase still runs; each writes `phase-<name>.json` in the work directory, which
`gpu_check.py report` turns into the summary. The phases reuse the project's own benchmark pieces
(the raw-engine timing, the keep-alive bench client, the generation benchmark), so what the lease
measures is what `make bench-*` measures on a CPU. Every reply the server gives is checked against
the same model's fp32 output in this process (embeddings: cosine >= 0.999; image actions: the
manifest's tolerances), and every engine's outputs pass the adapter's own accuracy gate.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import requests
import torch

from bench.generate_bench import model_rows, prompts, static_generate
from bench.gpu_models import DRY_SIZES, GPU_SIZES, Sizes
from bench.serve_bench import drive, embedding_check
from bench.texts import text_of
from binary_protocol import binary_to_dict, dict_to_binary
from binserve.engines.plans import Plan, Trial
from binserve.engines.settings import RuntimeSettings
from models.base import AdapterOptions
from models.examples.policy import IMAGE_SHAPE, STATE_DIM
from models.registry import ModelSpec, load_model
from tests.serverproc import ServerProcess


@dataclass(frozen=True)
class Profile:
    """Sizes, durations and the device of one kind of run (the GPU's, or the CPU dry run's)."""

    device: str
    seq: int  # tokens per encoder text
    enc_batches: tuple[int, ...]
    img_batches: tuple[int, ...]
    precisions: tuple[str, ...]
    raw_seconds: float  # timed per engine and batch size
    concurrency: tuple[int, ...]
    drive_seconds: float  # per concurrency level
    workers: int  # Gunicorn workers; 0: the server's default
    gen_streams: tuple[int, ...]
    gen_tokens: int
    sizes: Sizes = field(default_factory=Sizes)


PROFILES = {
    "gpu": Profile("cuda", 128, (1, 2, 4, 8, 16, 32, 64, 128, 256), (1, 2, 4, 8, 16, 32, 64), ("fp32", "bf16", "fp16"),
                   0.4, (1, 32, 128), 6.0, 0, (1, 8, 32), 64, GPU_SIZES),
    "dry": Profile("cpu", 32, (1, 2, 4), (1, 2), ("fp32", "bf16"), 0.1, (1, 4, 8), 1.0, 1, (1, 8), 8, DRY_SIZES),
}  # fmt: skip


def free() -> None:
    """Collect the models the caller has just dropped, and give their CUDA memory back."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# --- inputs -----------------------------------------------------------------------------------------
def texts(p: Profile, n: int, offset: int = 0) -> list[str]:
    """n texts of exactly p.seq MiniLM tokens."""
    return [text_of(p.seq, offset + i) for i in range(n)]


def image_sample(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, IMAGE_SHAPE, dtype=np.uint8),
        "state": rng.standard_normal(STATE_DIM).astype(np.float32),
    }


def load(p: Profile, name: str, adapter: str, path: Path, precision: str = "fp32", pinned: bool = True):
    options = AdapterOptions(runtime=RuntimeSettings("torch", precision), pinned_staging=pinned)
    return load_model(ModelSpec(name, adapter, str(path)), torch.device(p.device), options)


def reference(model, samples: list) -> list[dict]:
    """The fp32 outputs, one dict per sample (the server's replies are checked against these)."""
    model.plan = Plan([(math.inf, model.torch_engine("fp32"))], [Trial("torch-fp32")])
    return [o for i in range(0, len(samples), 16) for o in model.run_batch(samples[i : i + 16])]


# --- phase: raw engines in process ------------------------------------------------------------------
def time_batches(model, engine, samples: list, batches, seconds: float, device: str) -> dict[int, float]:
    """Samples per second of `model.run_batch` (collate, copy, forward, copy back) on `engine` alone."""
    model.plan = Plan([(math.inf, engine)], [Trial(engine.name)])
    out = {}
    for b in batches:
        batch = (samples * math.ceil(b / len(samples)))[:b]
        model.run_batch(batch)  # warm-up: kernels, cuDNN's algorithm choice, the pinned buffers
        model.run_batch(batch)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 2:
            model.run_batch(batch)  # ends with the host holding the outputs: a full round trip
            n += 1
        sync(device)
        out[b] = n * b / (time.perf_counter() - t0)
    return out


def engines_of(model, p: Profile, samples: list, batches) -> dict:
    """Per precision: samples/s by batch size and the adapter's accuracy verdict against fp32."""
    gate = samples[:16]
    # owned copies: collate fills the runner's reusable staging buffers
    ref = model.torch_engine("fp32")({k: v.copy() for k, v in model.collate(gate).items()})
    out = {}
    for precision in p.precisions:
        engine = model.torch_engine(precision)
        got = engine({k: v.copy() for k, v in model.collate(gate).items()})
        ok, measure = model.accuracy(ref, got)
        speed = time_batches(model, engine, samples, batches, p.raw_seconds, p.device)
        out[precision] = {"seq_per_s": speed, "passes_gate": bool(ok), "accuracy": measure}
        print(f"  raw {model.name} {precision}: " + ", ".join(f"b{b} {v:.0f}" for b, v in speed.items()), flush=True)
    return out


def phase_raw(p: Profile, models: dict) -> dict:
    enc = load(p, "minilm", "hf_encoder", models["minilm"])
    enc_samples = enc.validate({"texts": texts(p, 64)}).samples
    encoder = engines_of(enc, p, enc_samples, p.enc_batches)
    del enc, enc_samples
    free()
    img = load(p, "resnet", "torch_module", models["resnet"])
    img_samples = [img.validate(image_sample(i)).samples[0] for i in range(16)]
    images = engines_of(img, p, img_samples, p.img_batches)
    del img, img_samples
    free()
    return {"encoder": encoder, "images": images, "seq_tokens": p.seq}


# --- phase: the server ------------------------------------------------------------------------------
class GpuSampler:
    """GPU utilisation (%) from `nvidia-smi` every 200 ms while in the block (none without it)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        while not self._stop.wait(0.2):
            r = subprocess.run(query, capture_output=True, text=True)
            if r.returncode == 0 and r.stdout.strip():
                self.samples.append(int(r.stdout.split()[0]))

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def median(self) -> float | None:
        return float(np.median(self.samples)) if self.samples else None


def action_check(refs: list[dict], tolerance: tuple[float, float]):
    """A reply check for `drive`: body k's action within the manifest's tolerance of fp32's."""
    rtol, atol = tolerance

    def check(k: int, data: bytes) -> str | None:
        got, want = binary_to_dict(data)["action"], refs[k]["action"]
        err = float(np.max(np.abs(got - want) - rtol * np.abs(want)))
        return None if err <= atol else f"action off by {err:.2e} (atol {atol})"

    return check


def image_bodies(p: Profile, path: Path, n: int) -> tuple[list[bytes], object]:
    """n image request bodies and the check of their replies against fp32 in this process."""
    samples = [image_sample(1000 + i) for i in range(n)]
    model = load(p, "resnet", "torch_module", path)
    refs = reference(model, [model.validate(s).samples[0] for s in samples])
    check = action_check(refs, model.tolerance)
    del model
    free()
    return [dict_to_binary(s) for s in samples], check


def encoder_bodies(p: Profile, path: Path, n: int) -> tuple[list[bytes], object]:
    batch = texts(p, n, offset=5000)
    model = load(p, "minilm", "hf_encoder", path)
    refs = np.stack([o["embeddings"] for o in reference(model, model.validate({"texts": batch}).samples)])
    del model
    free()
    return [dict_to_binary({"texts": [t]}) for t in batch], embedding_check(refs)


def timed(srv, bodies, check, c: int, seconds: float, model: str) -> dict:
    with GpuSampler() as gpu:
        r = drive(srv.base_url, bodies, check, c, 10**9, path=f"/infer/{model}", model=model, seconds=seconds)
    r["gpu_util"] = gpu.median()
    print(f"  server {model} c={c}: {r['req/s']:.0f} req/s, p50 {r['p50']:.1f} ms, batch {r['batch']:.1f}, "
          f"failures {r['failures']}, wrong {r['wrong']}", flush=True)  # fmt: skip
    return r


def plans(srv) -> dict:
    info = requests.get(f"{srv.base_url}/models", timeout=10).json()
    return {m["name"]: (m.get("runtime") or {}).get("plan") for m in info["models"]}


def phase_server(p: Profile, models: dict) -> dict:
    enc_bodies, enc_check = encoder_bodies(p, models["minilm"], 256)
    img_bodies, img_check = image_bodies(p, models["resnet"], 32)
    biggest = max(p.enc_batches)
    spec = f"enc=hf_encoder:{models['minilm']},img=torch_module:{models['resnet']}"
    settings = {"device": p.device, "max_batch_size": biggest, "max_batch_tokens": biggest * p.seq}
    encoder, images = {}, {}
    with ServerProcess(workers=p.workers, models=spec, **settings) as srv:
        drive(srv.base_url, enc_bodies, None, 8, 200, path="/infer/enc", model="enc")  # warm-up
        drive(srv.base_url, img_bodies, None, 8, 32, path="/infer/img", model="img")
        for c in p.concurrency:
            encoder[c] = timed(srv, enc_bodies, enc_check, c, p.drive_seconds, "enc")
        for c in p.concurrency[:2]:
            images[c] = timed(srv, img_bodies, img_check, c, p.drive_seconds, "img")
        return {"workers": srv.workers, "settings": settings, "plans": plans(srv), "encoder": encoder, "images": images}


# --- phase: pinned staging + streams against plain copies ---------------------------------------------
def phase_overlap(p: Profile, models: dict) -> dict:
    # in process first: the same batches through both runners, interleaved, best of three rounds
    samples = [image_sample(i) for i in range(8)]
    pinned = load(p, "resnet", "torch_module", models["resnet"], pinned=True)
    plain = load(p, "resnet", "torch_module", models["resnet"], pinned=False)
    per = {m: [m.validate(s).samples[0] for s in samples] for m in (pinned, plain)}
    engines = {m: m.torch_engine("fp32") for m in (pinned, plain)}
    in_process: dict[str, dict[int, float]] = {"pinned": {}, "pageable": {}}
    for _ in range(3):
        for label, m in (("pinned", pinned), ("pageable", plain)):
            speed = time_batches(m, engines[m], per[m], p.img_batches[-3:], p.raw_seconds, p.device)
            for b, v in speed.items():
                in_process[label][b] = max(v, in_process[label].get(b, 0.0))
    del pinned, plain, per, engines
    free()
    bodies, check = image_bodies(p, models["resnet"], 32)
    c = p.concurrency[1]
    server = {}
    for label, flag in (("pinned", True), ("pageable", False)):
        settings = {"device": p.device, "pinned_staging": flag}
        with ServerProcess(workers=p.workers, models=f"img=torch_module:{models['resnet']}", **settings) as srv:
            drive(srv.base_url, bodies, None, 8, 32, path="/infer/img", model="img")  # warm-up
            server[label] = timed(srv, bodies, check, c, p.drive_seconds, "img")
    return {"in_process": in_process, "server": server, "concurrency": c}


# --- phase: generation ----------------------------------------------------------------------------
def phase_generation(p: Profile, models: dict) -> dict:
    ps = prompts(max(p.gen_streams))
    rows = model_rows(models["llama"], SimpleNamespace(workers=p.workers, max_tokens=p.gen_tokens), ps)
    server = {c: r for c, r in rows}
    static = {n: static_generate(models["llama"], ps[:n], p.gen_tokens, p.device) for n in p.gen_streams}
    return {"server": server, "static": static, "max_tokens": p.gen_tokens}


# --- phase: the GPU tests -------------------------------------------------------------------------
def phase_tests(p: Profile, models: dict, work: Path, timeout_s: float) -> dict:
    """tests/gpu (and the unit tests with GPU cases) on the built models; every skip is counted."""
    xml = work / "pytest.xml"
    env = os.environ | {f"BINSERVE_TEST_{k.upper()}": str(v) for k, v in models.items()}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", "tests/gpu",
           "tests/unit/test_runtime.py", f"--junitxml={xml}", "-o", "timeout=120"]  # fmt: skip
    rc = subprocess.run(cmd, env=env, timeout=timeout_s).returncode
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {"exit": rc, **counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}


PHASES = {"raw": phase_raw, "server": phase_server, "overlap": phase_overlap, "generation": phase_generation}


def write(path: Path, result: dict) -> None:
    path.write_text(json.dumps(result, indent=1, default=str))
