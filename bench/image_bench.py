"""Image benchmark: the raw vision model on pre-decoded tensors against binserve with 640x480 JPEGs, in one run.

Run: `make bench-images` (= `.venv/bin/python -m bench.image_bench`). On one machine, in one run:
(1) a ViT-Tiny-shaped classifier (models/examples/vision.py "small": 224 x 224, 12 layers of 192,
random weights) on each engine binserve can use, in this process, on preprocessed tensors, at
batch 1..32 (collate + forward + copy back), each one's accuracy gate against fp32;
(2) the decode + preprocess cost of one 640x480 JPEG (Pillow decode, EXIF, RGB, resize to 224,
rescale, normalise), in this process, one thread;
(3) binserve on its defaults under Gunicorn, driven by the lean keep-alive client at concurrency
1, 8 and 32 with 640x480 JPEGs: as bytes in the framed format, and base64 in JSON; every reply's
probabilities checked against fp32 in process (the classifiers' gate), the server's CPU time
(its workers' utime + stime) and the share the decoding takes of it (decode cost x requests);
(4) the targets: c=32 >= 0.7x the best gated engine's batch-32 rate with the decode cost added
(1 / (1/raw + decode)), c=1 p50 <= that engine's batch-1 time + decode + 2 ms.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.gpu_phases import time_batches  # noqa: E402
from bench.serve_bench import drive  # noqa: E402
from binary_protocol import MEDIA_TYPES, binary_to_dict, dict_to_binary  # noqa: E402
from binserve.engines.settings import RuntimeSettings, native  # noqa: E402
from models.base import AdapterOptions  # noqa: E402
from models.examples.vision import write_vision_model  # noqa: E402
from models.images import prepared  # noqa: E402
from models.registry import ModelSpec, load_model  # noqa: E402
from tests.images import encode, photo  # noqa: E402
from tests.serverproc import ServerProcess  # noqa: E402

BATCHES = [1, 2, 4, 8, 16, 32]
MAX_PROB_ERROR = 0.01


def engines(model) -> dict:
    """Every engine binserve could pick for this model on this machine, by name."""
    out = {"torch-fp32": model.torch_engine("fp32")}
    if native("bf16", model.device):
        out["torch-bf16"] = model.torch_engine("bf16")
    out["onnx-fp32"] = model.onnx_engine("fp32")
    return out


def raw(path: Path, jpegs: list[bytes], seconds: float) -> tuple[dict, dict, list]:
    """Per engine: samples/s by batch size and its gate verdict; and the fp32 reference of `jpegs`."""
    model = load_model(ModelSpec("pets", "hf_image", str(path)), torch.device("cpu"),
                       AdapterOptions(runtime=RuntimeSettings("torch", "fp32")))  # fmt: skip
    samples = model.validate({"images": jpegs}).samples
    fp32 = model.torch_engine("fp32")
    reference = fp32({k: v.copy() for k, v in model.collate(samples).items()})["probabilities"]
    speed, verdict = {}, {}
    for name, engine in engines(model).items():
        got = engine({k: v.copy() for k, v in model.collate(samples[:16]).items()})
        verdict[name] = model.accuracy({"probabilities": reference[:16]}, got)
        speed[name] = time_batches(model, engine, samples, BATCHES, seconds, "cpu")
        print(f"  raw {name}: b1 {speed[name][1]:.0f}, b32 {speed[name][32]:.0f} img/s", file=sys.stderr, flush=True)
    return speed, verdict, list(reference)


def decode_cost(path: Path, jpegs: list[bytes]) -> float:
    """Seconds to decode and preprocess one JPEG, one thread (best of three passes)."""
    model = load_model(ModelSpec("pets", "hf_image", str(path)), torch.device("cpu"), AdapterOptions())
    best = float("inf")
    for _ in range(3):
        _, _, seconds = prepared(jpegs, "images", model.steps, model.image_limits, 1 << 30, lambda n, w: None)
        best = min(best, seconds / len(jpegs))
    return best


def server_cpu_s(srv) -> float:
    """utime + stime of the server's workers so far, in seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in srv.worker_pids():
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / tick


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="per server run")
    ap.add_argument("--raw-seconds", type=float, default=1.5)
    ap.add_argument("--concurrency", default="1,8,32")
    args = ap.parse_args()
    path = write_vision_model(Path(tempfile.mkdtemp(prefix="binserve-image-bench-")) / "pets", "classifier", "small")
    jpegs = [encode(photo(480, 640, seed), "JPEG", quality=90) for seed in range(64)]
    torch.set_num_threads(os.cpu_count() or 1)
    speed, verdict, refs = raw(path, jpegs, args.raw_seconds)
    decode_s = decode_cost(path, jpegs)
    torch.set_num_threads(1)

    def check(k: int, data: bytes) -> str | None:
        reply = json.loads(data) if data[:1] == b"{" else binary_to_dict(data)
        got = np.asarray(reply["probabilities"])
        err = float(np.abs(got - refs[k]).max())
        return None if err <= MAX_PROB_ERROR and got.argmax() == refs[k].argmax() else f"prob error {err:.4f}"

    bodies = {
        "binary (framed, bytes)": ([dict_to_binary({"images": j}) for j in jpegs], MEDIA_TYPES["binserve"]),
        "JSON (base64)": ([json.dumps({"images": base64.b64encode(j).decode()}).encode() for j in jpegs],
                          "application/json"),
    }  # fmt: skip
    rows = []
    with ServerProcess(workers=0, models=f"pets=hf_image:{path}") as srv:
        drive(srv.base_url, bodies["binary (framed, bytes)"][0], None, 8, 64, path="/infer/pets", model="pets")
        plan = next(m for m in srv_models(srv) if m["name"] == "pets")["runtime"]["plan"]
        for label, (encoded, media) in bodies.items():
            for c in map(int, args.concurrency.split(",")):
                cpu0 = server_cpu_s(srv)
                r = drive(srv.base_url, encoded, check, c, 10**9, path="/infer/pets", model="pets",
                          seconds=args.seconds, media=media)  # fmt: skip
                cpu = server_cpu_s(srv) - cpu0
                r["decode_share"] = decode_s * r["requests"] / cpu if cpu else 0.0
                r["server_cpu"] = cpu / (r["requests"] / r["req/s"]) if r["req/s"] else 0.0
                rows.append((label, c, r))
                print(f"  server {label} c={c}: {r['req/s']:.0f} req/s", file=sys.stderr, flush=True)
        workers = srv.workers
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
          f"torch {torch.__version__}; ViT 224 x 224, 12 x 192 (ViT-Tiny's shape), random weights\n")  # fmt: skip
    print("Raw model, in process, on preprocessed tensors (images/s):\n")
    print("| engine | " + " | ".join(f"b{b}" for b in BATCHES) + " | b1 ms | gate |")
    print("|---|" + "---:|" * (len(BATCHES) + 1) + "---|")
    for name, row in speed.items():
        ok, measure = verdict[name]
        cells = " | ".join(f"{row[b]:.0f}" for b in BATCHES)
        print(f"| {name} | {cells} | {1000 / row[1]:.1f} | {'pass' if ok else 'FAIL'}: {measure} |")
    print(f"\nDecode + preprocess of one 640x480 JPEG (one thread): {decode_s * 1000:.2f} ms")
    print(f"\nbinserve, {workers} workers, defaults; plan {plan}; one 640x480 JPEG per request:\n")
    print("| body | c | req/s | p50 ms | p99 ms | mean batch | server CPU (cores) | decode share | failures | wrong |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, c, r in rows:
        print(f"| {label} | {c} | {r['req/s']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['batch']:.1f} | "
              f"{r['server_cpu']:.2f} | {r['decode_share']:.0%} | {r['failures']} | {r['wrong']} |")  # fmt: skip
    gated = {n: row for n, row in speed.items() if verdict[n][0]}
    best32 = max(gated, key=lambda n: gated[n][32])
    best1 = max(gated, key=lambda n: gated[n][1])
    with_decode = 1 / (1 / gated[best32][32] + decode_s)
    print("\nTargets:")
    for label in bodies:
        res = {c: r for lab, c, r in rows if lab == label}
        if 32 in res:
            ratio = res[32]["req/s"] / with_decode
            print(f"- {label}, c=32: {res[32]['req/s']:.0f} req/s = {ratio:.2f}x {best32} at batch 32 with decode "
                  f"({with_decode:.0f}/s) (target >= 0.7x) -> {'PASS' if ratio >= 0.7 else 'FAIL'}")  # fmt: skip
        if 1 in res:
            floor = 1000 / gated[best1][1] + decode_s * 1000 + 2
            print(f"- {label}, c=1: p50 {res[1]['p50']:.1f} ms vs {best1} b1 + decode + 2 ms = {floor:.1f} ms "
                  f"-> {'PASS' if res[1]['p50'] <= floor else 'FAIL'}")  # fmt: skip
    bad = sum(r["failures"] + r["wrong"] for _, _, r in rows)
    print(f"- failed requests and replies outside the gate: {bad} -> {'PASS' if bad == 0 else 'FAIL'}")


def srv_models(srv) -> list:
    import requests

    return requests.get(f"{srv.base_url}/models", timeout=10).json()["models"]


if __name__ == "__main__":
    main()
